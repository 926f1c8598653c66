"""What a streamed chat completion adds up to, for the engines that read OpenAI-style chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agents.schemas import GenerationResult


@dataclass
class StreamTally:
    model: str
    start: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def choice(self, delta: str | None, logprobs: list[float], finish_reason: str | None) -> None:
        self.logprobs.extend(logprobs)
        if finish_reason == "length":
            self.finish = "length"
        if delta:
            self.parts.append(delta)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self.parts),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens or len(self.logprobs),
            finish_reason=self.finish,  # type: ignore[arg-type]
            token_logprobs=self.logprobs,
            model=self.model,
            seconds=time.perf_counter() - self.start,
        )
