"""llama.cpp engine: a pool of contexts, each used by one request at a time, on worker threads.

llama.cpp contexts are not thread-safe, so a request owns a context for its whole generation; the
pool size (`contexts_per_replica`) is the replica's real concurrency. Generation runs on a thread so
the replica's event loop keeps serving other calls and health checks; tokens cross back through
`loop.call_soon_threadsafe`. Token log-probabilities come from the last-position logits that
llama.cpp computes anyway, so confidence costs one log-sum-exp per token instead of `logits_all`.

Extra buffer types (weights repacked for the CPU's matrix units) are off where llama.cpp's AMX
path crashes: see `extra_buffers_enabled`. Its OpenMP threads spin briefly, not for long, at
barriers: see `openmp_env`.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_serve.config import ExtraBuffers, SLMConfig
from hybrid_serve.engines.base import collect
from hybrid_serve.engines.hardware import has_amx, usable_cpus
from hybrid_serve.engines.llama_setup import (
    Setup,
    choose,
    extra_buffers_enabled,
    model_params,
)
from hybrid_serve.engines.prompt_fit import Fitted, PromptTooLong, fit_prompt
from hybrid_serve.engines.repetition import Repetition
from hybrid_serve.engines.text_stops import text_stops
from hybrid_serve.schemas import FinishReason, GenerationRequest, GenerationResult

# OpenMP spin count for llama.cpp's threads (libgomp's default: 300,000 spins before a waiting
# thread sleeps). Measured on 2 cores, 2 threads, 1,000 tokens read and 160 written (median of
# 2, twice beside one busy core): alone 6.1 s against the default's 6.6; beside one busy core
# 13.8-14.0 s against 15.8-17.1; beside two 13.9 s against 31.8. (10,000 spins was worse than
# the default beside one busy core, 24-26 s.)
GOMP_SPINCOUNT = "1000"
OPENMP_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def openmp_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment for a process that runs llama.cpp (read when OpenMP loads, so it is set at
    the process's start: the SLM replica's runtime_env). A thread spinning at a barrier holds a
    core that a descheduled sibling needs; where the replica shares its CPUs (the retriever's
    embeddings on one node, noisy neighbours, a CPU-limited pod) the default spinning made an
    answer up to 2.3x slower than spinning briefly does (above); alone the two are the same.
    Empty when the operator set either OpenMP variable."""
    if any(name in environ for name in OPENMP_SETTINGS):
        return {}
    return {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}


def default_threads(cfg: SLMConfig, replicas_on_node: int = 1) -> int:
    """llama.cpp threads per replica: `slm.threads`, else the CPUs this process may use (its
    affinity and its cgroup's quota, not the node's cores) shared by the replicas on the node."""
    return cfg.threads or max(1, usable_cpus() // max(1, replicas_on_node))


class LlamaCppEngine:
    def __init__(
        self,
        model_path: str | Path,
        model_name: str = "",
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        contexts: int = 1,
        extra_buffers: ExtraBuffers = "auto",
        flash_attention: bool = False,
        n_threads_batch: int | None = None,
        setup: Setup | None = None,
    ) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.model_path = str(model_path)
        self.model_name = model_name or Path(model_path).stem
        self.n_threads = n_threads or usable_cpus()
        self.n_threads_batch = n_threads_batch or self.n_threads
        self.flash_attention = flash_attention
        self.setup = setup
        self.extra_buffers = extra_buffers_enabled(extra_buffers, has_amx())
        with model_params(self.extra_buffers):
            self._contexts = [
                Llama(
                    model_path=self.model_path,
                    n_ctx=n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads_batch,
                    n_batch=n_batch,
                    flash_attn=flash_attention,
                    logits_all=False,
                    verbose=False,
                )
                for _ in range(contexts)
            ]
        first = self._contexts[0]
        self.n_ctx = first.n_ctx()
        self.n_vocab = first.n_vocab()
        template = first.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.model_path}: GGUF has no chat template")
        eos = first.detokenize([first.token_eos()], special=True).decode("utf-8", "ignore")
        bos = first.detokenize([first.token_bos()], special=True).decode("utf-8", "ignore")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        # Free contexts and the requests waiting for one. Thread-safe and not bound to one event
        # loop: a context is handed back by the worker thread the moment generation ends.
        self._free: collections.deque[Any] = collections.deque(self._contexts)
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = (
            collections.deque()
        )
        self._pool_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=contexts, thread_name_prefix="llama"
        )
        self.in_flight = 0

    @classmethod
    def from_config(cls, cfg: SLMConfig, replicas_on_node: int = 1) -> LlamaCppEngine:
        """The engine with the set-up `engines.llama_setup` chose for this machine (measured at
        the first start, then remembered) and the configuration's overrides."""
        from hybrid_serve.bundled import bundled_gguf

        threads = default_threads(cfg, replicas_on_node)
        source = Path(cfg.model_path or bundled_gguf())
        setup = choose(source, cfg.llama_cpp, threads, own_model=cfg.model_path is not None)
        return cls(
            model_path=setup.model_path,
            model_name=cfg.model_name,
            n_ctx=cfg.n_ctx,
            n_threads=threads,
            n_batch=cfg.n_batch,
            contexts=cfg.contexts_per_replica,
            extra_buffers=cfg.llama_cpp.extra_buffers,
            flash_attention=setup.flash_attention,
            n_threads_batch=setup.threads_batch,
            setup=setup,
        )

    @property
    def contexts(self) -> int:
        return len(self._contexts)

    def info(self) -> dict[str, Any]:
        return {
            "contexts": self.contexts,
            "in_flight": self.in_flight,
            "threads": self.n_threads,
            "extra_buffers": self.extra_buffers,
            "openmp": {k: os.environ[k] for k in OPENMP_SETTINGS if k in os.environ},
            **({"setup": self.setup.info()} if self.setup is not None else {}),
        }

    async def _acquire(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._pool_lock:
            if self._free:
                return self._free.popleft()
            fut: asyncio.Future[Any] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            with self._pool_lock:
                try:
                    self._waiters.remove((loop, fut))
                except ValueError:
                    pass
            if fut.done() and not fut.cancelled():
                self._release(fut.result())  # handed over just as we were cancelled
            raise

    def _release(self, ctx: Any) -> None:
        """Give a context to the oldest live waiter, or back to the pool. Any thread."""
        with self._pool_lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                if not loop.is_closed() and not fut.done():
                    loop.call_soon_threadsafe(self._hand_over, fut, ctx)
                    return
            self._free.append(ctx)

    def _hand_over(self, fut: asyncio.Future[Any], ctx: Any) -> None:
        if fut.done():  # the waiter was cancelled meanwhile: next one
            self._release(ctx)
        else:
            fut.set_result(ctx)

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        llm = self._contexts[0]  # tokenizing only reads the vocabulary: safe to share
        formatted = self._formatter(messages=messages)  # type: ignore[arg-type]  # plain dicts
        return llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )

    def fitted_prompt(self, req: GenerationRequest) -> tuple[list[int], Fitted]:
        """The prompt's tokens, fitted to the context with room for max_tokens. A prompt that
        fits is tokenized once."""
        tokens = self.prompt_tokens(req.messages)

        def count(messages: list[dict[str, str]]) -> int:
            return len(self.prompt_tokens(messages))

        fitted = fit_prompt(req, count, self.n_ctx, whole=len(tokens))
        return (self.prompt_tokens(fitted.messages) if fitted.trimmed else tokens), fitted

    # -- generation on a worker thread -------------------------------------------------------

    def _generate_blocking(
        self,
        llm: Any,
        req: GenerationRequest,
        prompt: list[int],
        emit: Callable[[str], None] | None,
        cancelled: threading.Event,
    ) -> GenerationResult:
        import llama_cpp

        started = time.perf_counter()
        budget = self.n_ctx - len(prompt)
        if budget < 1:
            raise PromptTooLong(f"prompt is {len(prompt)} tokens; the context holds {self.n_ctx}")
        max_tokens = min(req.max_tokens, budget)
        if req.seed is not None:
            llm.set_seed(req.seed)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        ctx = llm.ctx
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in req.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        text = ""
        sent = 0
        logprobs: list[float] = []
        written: list[int] = []
        rule = req.repetition_detection
        loop = Repetition(rule) if rule is not None else None
        watch = text_stops(req)  # stops read from the text (recitation, a loop that counts)
        finish: FinishReason = "length"
        for token in llm.generate(
            prompt,
            temp=req.temperature,
            top_p=req.top_p,
            top_k=40 if req.temperature > 0 else 1,
            min_p=0.05 if req.temperature > 0 else 0.0,
            repeat_penalty=1.0,
            reset=True,
        ):
            if cancelled.is_set():
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            written.append(token)
            if req.logprobs:
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,)
                )
                top = float(logits.max())
                logprobs.append(
                    float(logits[token]) - top - float(np.log(np.exp(logits - top).sum()))
                )
            piece = decoder.decode(llm.detokenize([token], prev_tokens=None))
            text += piece
            hit = min(
                (i for s in stops if (i := text.find(s, max(0, sent - hold))) >= 0), default=-1
            )
            if hit >= 0:
                text = text[:hit]
                finish = "stop"
                break
            if emit is not None and len(text) - hold > sent:
                emit(text[sent : len(text) - hold])
                sent = len(text) - hold
            if len(written) >= max_tokens:
                finish = "length"
                break
            if loop is not None and loop.push(token):
                finish = "repetition"
                break
            if watch is not None and (reason := watch.push(piece)):
                finish = reason
                break
        text += decoder.decode(b"", final=True) if finish != "stop" else ""
        if emit is not None and len(text) > sent:
            emit(text[sent:])
        return GenerationResult(
            text=text,
            prompt_tokens=len(prompt),
            completion_tokens=len(written),
            finish_reason=finish,
            token_logprobs=logprobs,
            model=self.model_name,
            seconds=time.perf_counter() - started,
        )

    def generate_blocking(self, req: GenerationRequest) -> GenerationResult:
        """Synchronous path for benchmarks and scripts (uses the first context)."""
        prompt, fitted = self.fitted_prompt(req)
        result = self._generate_blocking(self._contexts[0], req, prompt, None, threading.Event())
        return fitted.report(result)

    # -- async API -----------------------------------------------------------------------------

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Yield text deltas, then the GenerationResult. Closing the iterator stops generation."""
        prompt, fitted = self.fitted_prompt(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()
        llm = await self._acquire()
        self.in_flight += 1

        def emit(delta: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("delta", delta))

        def run() -> None:
            try:
                result = self._generate_blocking(llm, req, prompt, emit, cancelled)
                outcome: tuple[str, Any] = ("done", result)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the loop side
                outcome = ("error", exc)
            # The context is free before anyone hears the result.
            self.in_flight -= 1
            self._release(llm)
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, outcome)

        try:
            loop.run_in_executor(self._executor, run)
        except BaseException:
            self.in_flight -= 1
            self._release(llm)
            raise
        try:
            while True:
                kind, value = await queue.get()
                if kind == "delta":
                    yield value
                elif kind == "done":
                    yield fitted.report(value)
                    return
                else:
                    raise value
        finally:
            # Closed early (client gone, request cancelled): stop generating at the next token.
            cancelled.set()

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        return await collect(self.stream(req))
