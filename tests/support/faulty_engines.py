"""SLM engines that fail on purpose, chosen by `slm.engine: tests.support.faulty_engines:<Class>`
(Ray workers find this module through PYTHONPATH), to prove that start-up, `/readyz` and `doctor`
report a broken engine instead of serving with it.

They fail the way native engines do: a read of address 0 kills the process with SIGSEGV in the
generating thread, with no Python exception, as llama.cpp's AMX path does; an exception is what a
Python-level engine error looks like.
"""

from __future__ import annotations

import ctypes
from collections.abc import AsyncIterator
from typing import Any

from hybrid_serve.config import SLMConfig
from hybrid_serve.schemas import GenerationRequest, GenerationResult


def segfault() -> None:
    ctypes.string_at(0)


class _Faulty:
    model_name = "faulty"
    # Generations this process has run: some engines fail only after the first.
    calls = 0

    @classmethod
    def from_config(cls, cfg: SLMConfig, replicas_on_node: int = 1) -> _Faulty:
        return cls()

    def fail(self) -> None:
        raise NotImplementedError

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        type(self).calls += 1
        self.fail()
        return GenerationResult(text="fine [1].", prompt_tokens=5, completion_tokens=3)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        yield await self.generate(req)

    def info(self) -> dict[str, Any]:
        return {"contexts": 1, "in_flight": 0}


class SegfaultEngine(_Faulty):
    """Dies of SIGSEGV on its first generation."""

    def fail(self) -> None:
        segfault()


class RaisingEngine(_Faulty):
    """Raises on every generation."""

    def fail(self) -> None:
        raise RuntimeError("the kernel library refused this CPU (test engine)")


class CrashAfterWarmupEngine(_Faulty):
    """Passes the warm-up, then dies of SIGSEGV on the first real request."""

    def fail(self) -> None:
        if type(self).calls > 1:
            segfault()
