"""The OpenAI chat-completions wire format, for the engines that speak it (`openai`, `vllm`):
request parameters from a GenerationRequest, and a GenerationResult from a response or a stream."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hybrid_serve.schemas import FinishReason, GenerationRequest, GenerationResult


def chat_params(
    model: str, req: GenerationRequest, logprobs: bool = True, vllm_extensions: bool = True
) -> dict[str, Any]:
    """`logprobs`: whether the server is asked for them at all (some servers lack them).
    `vllm_extensions`: whether it takes vLLM's own sampling parameters (`repetition_detection`);
    the OpenAI API refuses parameters it does not know."""
    params: dict[str, Any] = {
        "model": model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
    }
    if req.stop:
        params["stop"] = req.stop
    if req.seed is not None:
        params["seed"] = req.seed
    if req.logprobs and logprobs:
        params["logprobs"] = True
    if req.repetition_detection is not None and vllm_extensions:
        params["repetition_detection"] = req.repetition_detection.model_dump()
    return params


def as_finish_reason(reason: str | None) -> FinishReason:
    """A server's finish reason as ours: vLLM says `repetition` for a repetition stop."""
    if reason == "length":
        return "length"
    return "repetition" if reason == "repetition" else "stop"


def completion_result(response: Any, model: str, start: float) -> GenerationResult:
    """From a non-streamed chat completion (the openai SDK's or vLLM's, same attributes)."""
    choice = response.choices[0]
    content = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    usage = response.usage
    return GenerationResult(
        text=choice.message.content or "",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else len(content),
        finish_reason=as_finish_reason(choice.finish_reason),
        token_logprobs=[float(t.logprob) for t in content],
        model=model,
        seconds=time.perf_counter() - start,
    )


@dataclass
class StreamTally:
    """What a streamed chat completion adds up to."""

    model: str
    start: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def choice(self, delta: str | None, logprobs: list[float], finish_reason: str | None) -> None:
        self.logprobs.extend(logprobs)
        if finish_reason is not None:
            self.finish = as_finish_reason(finish_reason)
        if delta:
            self.parts.append(delta)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text="".join(self.parts),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens or len(self.logprobs),
            finish_reason=self.finish,
            token_logprobs=self.logprobs,
            model=self.model,
            seconds=time.perf_counter() - self.start,
        )
