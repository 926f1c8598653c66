"""The fastest correct llama.cpp set-up for this machine, measured once and remembered.

llama.cpp's speed on a CPU depends on the weights' quantization type (which kernels the CPU's
instruction set has), flash attention and threads, and the fastest choice differs between CPUs:
the bundled Q4_1 reads prompts at ~300 tok/s on an AVX-512/AMX Xeon where the same weights as
Q4_0 read 530. So at start every candidate runs a short probe — a prompt of `PROBE_PROMPT_TOKENS`
and `PROBE_GEN_TOKENS` generated — in a child process (a crash in native code is a candidate
ruled out, never a replica lost), and the one that answers a typical request (`TYPICAL_PROMPT`
tokens read, `TYPICAL_GEN` written) soonest is used. Converted models (llama.cpp's own quantizer,
once per source model) and the measurements live in a cache keyed by the CPU's flags, the
llama.cpp build and the source model, so a machine measures once; `slm.llama_cpp.*` overrides
each choice.

Only a conversion that keeps the weights is a candidate by default: F16 holds the bundled Q4_1's
values to F16's rounding (measured: `bench quality` F1 within noise of the bundled model's).
Q8_0 re-rounds Q4_1's affine blocks onto a symmetric 8-bit grid (up to 1/254 of a block's largest
weight; measured F1 -0.011, 95 % interval -0.026 to 0.000 — at the edge of noise) and Q4_0
re-quantizes to 4 bits with no per-block minimum, so both are used only when configured.

Written here because no library chooses an engine's set-up by measuring it on the machine it
runs on; the measuring is llama.cpp's own (`Llama`, `llama_model_quantize`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from hybrid_serve.config import ExtraBuffers, LlamaCppEngineConfig, Quantization
from hybrid_serve.engines.hardware import cpu_flags, has_amx, usable_cpus
from hybrid_serve.engines.machine_cache import user_cache_dir, write_record

# llama.cpp's file types for the conversions offered (llama_ftype).
FILE_TYPES = {"q4_0": 2, "q8_0": 7, "f16": 1}
# What auto chooses among: the bundled weights and the conversion that keeps them.
AUTO_QUANTIZATIONS: tuple[Quantization, ...] = ("bundled", "f16")
PROBE_PROMPT_TOKENS = 384
PROBE_GEN_TOKENS = 32
# A typical answer: five passages read, a short cited answer written.
TYPICAL_PROMPT = 1000
TYPICAL_GEN = 160
PROBE_TIMEOUT_S = 120.0
# The cache's layout; a new one measures again.
CACHE_FORMAT = 1


def extra_buffers_enabled(setting: ExtraBuffers, amx: bool | None) -> bool:
    """Whether llama.cpp may use its extra buffer types. `auto` turns them off on CPUs with AMX
    (`amx` True), whose repacking path segfaults on the first generation (llama.cpp issue 20824),
    and where the CPU's flags cannot be read (None); elsewhere they stay on, as llama.cpp's
    default."""
    if setting != "auto":
        return setting == "on"
    return amx is False


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def model_params(use_extra_bufts: bool) -> Iterator[None]:
    """llama-cpp-python's `Llama` does not expose `use_extra_bufts` (it builds its model params
    from `llama_model_default_params()` inside the constructor), so the defaults it reads are
    adjusted for the duration of one construction; a lock keeps constructions apart."""
    import llama_cpp.llama_cpp as low

    if use_extra_bufts:
        yield
        return
    original = low.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    with _PARAMS_LOCK:
        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


@dataclass(frozen=True)
class Candidate:
    quantization: Quantization
    flash_attention: bool
    threads_batch: int


@dataclass
class Measured:
    candidate: Candidate
    prompt_tps: float = 0.0
    gen_tps: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.prompt_tps > 0 and self.gen_tps > 0

    @classmethod
    def from_record(cls, candidate: Candidate, entry: dict[str, Any]) -> Measured:
        """A measurement read back from the cache's record."""
        return cls(candidate, entry["prompt_tps"], entry["gen_tps"], entry["error"])

    def answer_s(self) -> float:
        """Seconds for a typical answer at these speeds (inf when it failed)."""
        if not self.ok:
            return float("inf")
        return TYPICAL_PROMPT / self.prompt_tps + TYPICAL_GEN / self.gen_tps


@dataclass
class Setup:
    """What the engine runs with, and why."""

    model_path: str
    quantization: Quantization
    flash_attention: bool
    threads: int
    threads_batch: int
    reason: str
    measured: list[Measured] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "flash_attention": self.flash_attention,
            "threads": self.threads,
            "threads_batch": self.threads_batch,
            "reason": self.reason,
        }


def cache_dir(cfg: LlamaCppEngineConfig) -> Path:
    """Where conversions and measurements are kept: `slm.llama_cpp.cache_dir`, else the user's
    cache (XDG_CACHE_HOME), shared by every data dir on the machine."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return user_cache_dir() / "llama_cpp"


def _source_id(source: Path) -> str:
    """The source model as a cache knows it: its path, size and modification time."""
    stat = source.stat()
    ident = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def converted(source: Path, quantization: Quantization, cache: Path) -> Path:
    """`source` in `quantization`, converted once with llama.cpp's quantizer and reused; the
    source itself for `bundled`."""
    if quantization == "bundled":
        return source
    import llama_cpp

    target = cache / "models" / f"{source.stem}-{_source_id(source)}-{quantization}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quantization]
    params.allow_requantize = True  # the bundled model is quantized already
    params.nthread = usable_cpus()
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(partial).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise RuntimeError(f"llama.cpp could not convert {source.name} to {quantization}")
        partial.replace(target)  # whole or not at all
    finally:
        partial.unlink(missing_ok=True)
    return target


def probe(
    path: Path, flash_attention: bool, threads: int, threads_batch: int, extra_buffers: bool
) -> dict[str, float]:
    """Prompt and generation speed of one set-up, in this process (`measure` runs it in a child)."""
    from llama_cpp import Llama

    with model_params(extra_buffers):
        llm = Llama(
            model_path=str(path),
            n_ctx=PROBE_PROMPT_TOKENS + PROBE_GEN_TOKENS + 64,
            n_threads=threads,
            n_threads_batch=threads_batch,
            n_batch=512,
            flash_attn=flash_attention,
            verbose=False,
        )
    words = "the river stone carried a lamp across the quiet field of bread and song".split()
    text = " ".join(words[i % len(words)] for i in range(PROBE_PROMPT_TOKENS * 2))
    tokens = llm.tokenize(text.encode())[:PROBE_PROMPT_TOKENS]
    best = {"prompt_tps": 0.0, "gen_tps": 0.0}
    for _ in range(2):  # the better of two: the first pays for warming caches
        llm.reset()
        started = time.perf_counter()
        stream = llm.generate(tokens, temp=0.0)
        next(stream)
        read = time.perf_counter() - started
        started, n = time.perf_counter(), 0
        for _token in stream:
            n += 1
            if n >= PROBE_GEN_TOKENS:
                break
        written = time.perf_counter() - started
        best["prompt_tps"] = max(best["prompt_tps"], len(tokens) / read)
        best["gen_tps"] = max(best["gen_tps"], n / written if written > 0 else 0.0)
    return best


def measure(path: Path, candidate: Candidate, threads: int, extra_buffers: bool) -> Measured:
    """`probe` in a child process: a segfault or an illegal instruction rules the candidate
    out."""
    args = [
        sys.executable,
        "-m",
        "hybrid_serve.engines.llama_setup",
        str(path),
        str(int(candidate.flash_attention)),
        str(threads),
        str(candidate.threads_batch),
        str(int(extra_buffers)),
    ]
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return Measured(candidate, error=f"no answer in {PROBE_TIMEOUT_S:g} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return Measured(candidate, error=last[:200])
    speeds = json.loads(done.stdout.strip().splitlines()[-1])
    return Measured(candidate, speeds["prompt_tps"], speeds["gen_tps"])


def _key(source: Path, threads: int, cfg: LlamaCppEngineConfig) -> str:
    import llama_cpp

    flags = sorted(cpu_flags() or [])
    parts = [
        CACHE_FORMAT,
        llama_cpp.__version__,
        _source_id(source),
        threads,
        cfg.extra_buffers,
        hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
    ]
    return ":".join(str(p) for p in parts)


def _candidates(cfg: LlamaCppEngineConfig, threads: int, own_model: bool) -> list[Candidate]:
    quantizations: tuple[Quantization, ...] = (cfg.quantization,)
    if cfg.quantization == "auto":
        # Conversions that keep the weights are known for the bundled Q4_1 only.
        quantizations = ("bundled",) if own_model else AUTO_QUANTIZATIONS
    flash = (False, True) if cfg.flash_attention == "auto" else (cfg.flash_attention == "on",)
    batch = [cfg.threads_batch] if cfg.threads_batch else [threads]
    return [Candidate(q, f, b) for q in quantizations for f in flash for b in batch]


def choose(
    source: Path,
    cfg: LlamaCppEngineConfig,
    threads: int,
    own_model: bool = False,
    progress: Any = None,
) -> Setup:
    """The set-up to run: each candidate measured (or its measurement read from the cache),
    the fastest for a typical answer chosen; with one candidate (every choice configured), that
    one unmeasured. `own_model`: `source` is the user's, used as given under `auto`."""
    candidates = _candidates(cfg, threads, own_model)
    if len(candidates) == 1:
        c = candidates[0]
        path = converted(source, c.quantization, cache_dir(cfg))
        return Setup(
            str(path), c.quantization, c.flash_attention, threads, c.threads_batch, "configured"
        )
    cache = cache_dir(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    # One measurer per machine at a time: replicas starting together on a node would measure
    # side by side, each slowed by the others (a worse choice) and converting the same model
    # twice; the ones that wait read what the first measured.
    with FileLock(cache / "setups.lock"):
        return _choose_measured(source, cfg, threads, candidates, cache, progress)


def _choose_measured(
    source: Path,
    cfg: LlamaCppEngineConfig,
    threads: int,
    candidates: list[Candidate],
    cache: Path,
    progress: Any,
) -> Setup:
    record = cache / "setups.json"
    key = _key(source, threads, cfg)
    known: dict[str, Any] = {}
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        pass
    extra = extra_buffers_enabled(cfg.extra_buffers, has_amx())
    measured: list[Measured] = []
    fresh = False
    for c in candidates:
        entry = known.get(key, {}).get(_name(c))
        if entry is not None:
            measured.append(Measured.from_record(c, entry))
            continue
        if progress is not None:
            progress(f"measuring llama.cpp set-up {_name(c)}")
        try:
            path = converted(source, c.quantization, cache)
        except (OSError, RuntimeError) as exc:
            measured.append(Measured(c, error=str(exc)[:200]))
        else:
            measured.append(measure(path, c, threads, extra))
        fresh = True
    if fresh:
        known[key] = {
            _name(m.candidate): {
                "prompt_tps": round(m.prompt_tps, 1),
                "gen_tps": round(m.gen_tps, 1),
                "error": m.error,
            }
            for m in measured
        }
        write_record(record, json.dumps(known, indent=1))
    best = min(measured, key=Measured.answer_s)
    if not best.ok:
        raise RuntimeError(
            "no llama.cpp set-up worked on this machine: "
            + "; ".join(f"{_name(m.candidate)}: {m.error}" for m in measured)
        )
    c = best.candidate
    baseline = next((m for m in measured if m.candidate.quantization == "bundled"), None)
    gain = ""
    if baseline is not None and baseline.ok:
        gain = f", {baseline.answer_s() / best.answer_s():.2f}x the bundled set-up"
    reason = (
        f"measured: prompt {best.prompt_tps:.0f} tok/s, generation {best.gen_tps:.0f} tok/s, "
        f"{best.answer_s():.1f} s for a typical answer{gain}"
        + ("" if fresh else " (measured before on this machine)")
    )
    path = converted(source, c.quantization, cache)
    return Setup(
        str(path), c.quantization, c.flash_attention, threads, c.threads_batch, reason, measured
    )


def remembered(source: Path, cfg: LlamaCppEngineConfig, threads: int) -> str:
    """What the engine will run with, as `doctor` says it: configured, measured before on this
    machine (and which won), or still to be measured at the first start."""
    candidates = _candidates(cfg, threads, own_model=False)
    if len(candidates) == 1:
        c = candidates[0]
        return f"configured: {_name(c)}"
    try:
        known = json.loads((cache_dir(cfg) / "setups.json").read_text())
        entries = known[_key(source, threads, cfg)]
    except (OSError, ValueError, KeyError):
        entries = {}
    # Read back as `choose` reads it, for the candidates it has now: the record also keeps
    # set-ups measured under an earlier candidate list (Q8_0 was one), which it will not run.
    measured = [
        Measured.from_record(c, entry)
        for c in candidates
        if (entry := entries.get(_name(c))) is not None
    ]
    if not measured:
        return (
            f"not measured on this machine yet: the first start measures {len(candidates)} "
            f"set-ups (about {4 * len(candidates)} s) and remembers the fastest"
        )
    best = min(measured, key=Measured.answer_s)
    if not best.ok:
        return "measured before: no set-up worked"
    said = (
        f"measured: {_name(best.candidate)} ({best.answer_s():.1f} s for a typical answer, "
        f"fastest of {len(measured)})"
    )
    if len(measured) < len(candidates):
        said += f"; the next start measures {len(candidates) - len(measured)} more"
    return said


def _name(c: Candidate) -> str:
    return f"{c.quantization}/fa-{'on' if c.flash_attention else 'off'}/tb-{c.threads_batch}"


if __name__ == "__main__":  # the child process of `measure`
    model, flash, n, nb, extra = sys.argv[1:6]
    print(json.dumps(probe(Path(model), flash == "1", int(n), int(nb), extra == "1")))
