"""The OpenAI chat-completions wire format, for the engines that speak it (`openai`, `vllm`):
request parameters from a GenerationRequest, and a GenerationResult from a response or a stream."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hybrid_serve.engines.text_stops import TextStops, asks_text_stops, text_stops
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


def stream_options(req: GenerationRequest, vllm_extensions: bool) -> dict[str, Any]:
    """Usage at the end; on a vLLM server whose text is read as it comes, in every chunk too
    (vLLM's `continuous_usage_stats`), so that a stream ended early is still counted exactly."""
    options: dict[str, Any] = {"include_usage": True}
    if text_watched(req, vllm_extensions):
        options["continuous_usage_stats"] = True
    return options


def text_watched(req: GenerationRequest, vllm_extensions: bool) -> bool:
    """Whether a wire engine reads this request's text as it comes (`engines.text_stops`): on
    vLLM only, where every chunk says what was used; another server's stream ended early would
    leave the request's usage unknown, so there generation runs on."""
    return vllm_extensions and asks_text_stops(req)


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
    """What a streamed chat completion adds up to; with `stops`, up to where one of them ended
    the text (`stopped`: the caller ends the stream there)."""

    model: str
    stops: TextStops | None = None
    stopped: bool = False
    start: float = field(default_factory=time.perf_counter)
    parts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of(cls, model: str, req: GenerationRequest, vllm_extensions: bool) -> StreamTally:
        return cls(model, text_stops(req) if vllm_extensions else None)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        if not self.stopped:
            self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def chunk(self, chunk: Any) -> str:
        """One chat-completion chunk (the openai SDK's `ChatCompletionChunk`, which both wire
        engines read), its usage first; the text to pass on."""
        if chunk.usage is not None:
            self.usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        out = []
        for choice in chunk.choices:
            content = choice.logprobs.content if choice.logprobs else None
            delta = choice.delta.content if choice.delta else None
            logprobs = [t.logprob for t in content or []]
            out.append(self.choice(delta, logprobs, choice.finish_reason))
        return "".join(out)

    def choice(self, delta: str | None, logprobs: list[float], finish_reason: str | None) -> str:
        """The text to pass on ("" once stopped: what a batch of chunks holds past the stop)."""
        if self.stopped:
            return ""
        self.logprobs.extend(logprobs)
        if finish_reason is not None:
            self.finish = as_finish_reason(finish_reason)
        if not delta:
            return ""
        self.parts.append(delta)
        if self.stops is not None and (reason := self.stops.push(delta)):
            self.finish, self.stopped = reason, True
        return delta

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
