"""OpenAI-compatible chat completions: request schema, and the response and SSE chunk shapes.

Models: `hybrid` runs the whole pipeline (the last user message is the query, earlier turns are
context); `slm` is the small model alone, with retrieval unless `hybrid.retrieval` is false.
Citations and routing metadata travel in the `hybrid` extension field of the response (and of the
final stream chunk); the text carries the `[n]` markers.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictStr, field_validator

from agents.schemas import AnswerResponse, Mode, PIIPolicy, StrictModel, VerifyPolicy

MODELS = {
    "hybrid": "The whole pipeline: retrieval, SLM, escalation to Claude when it adds value.",
    "slm": "The small model alone, with retrieval unless hybrid.retrieval is false.",
}
CREATED = 1_735_689_600  # a fixed timestamp: models do not change at run time


class TextPart(StrictModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(StrictModel):
    include_usage: StrictBool = False


class HybridOptions(StrictModel):
    """hybrid-serve's own parameters, in an extension field the OpenAI SDK passes via extra_body."""

    top_k: int = Field(5, ge=1, le=50)
    retrieval: StrictBool = Field(True, description="slm model: retrieve and cite (default).")
    mode: Mode = "auto"
    verify: VerifyPolicy | None = None
    sensitive: StrictBool = False
    pii: PIIPolicy | None = None


class ChatCompletionRequest(StrictModel):
    model: StrictStr
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only one choice is supported.")
    user: StrictStr | None = None
    hybrid: HybridOptions = Field(default_factory=HybridOptions)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @property
    def limit_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self) -> dict[str, Any]:
        """The parameters the SLM honours, as GenerationRequest fields (unset ones omitted)."""
        out: dict[str, Any] = {}
        if self.limit_tokens is not None:
            out["max_tokens"] = self.limit_tokens
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.stop:
            out["stop"] = list(self.stop)
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def models_list() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "hybrid-serve"}
            for m in MODELS
        ],
    }


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def hybrid_extension(answer: AnswerResponse) -> dict[str, Any]:
    """Everything of /v1/answer but the text, which is the message content."""
    return answer.model_dump(mode="json", exclude={"answer"})


def completion(
    cid: str, model: str, text: str, finish: str, answer: AnswerResponse
) -> dict[str, Any]:
    u = answer.usage
    prompt = u.slm_prompt_tokens + u.claude_input_tokens
    done = u.slm_completion_tokens + u.claude_output_tokens
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": done,
            "total_tokens": prompt + done,
        },
        "hybrid": hybrid_extension(answer),
    }


def chunk(
    cid: str,
    model: str,
    delta: dict[str, Any],
    finish: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if extra:
        body.update(extra)
    return f"data: {json.dumps(body)}\n\n"


def usage_chunk(cid: str, model: str, answer: AnswerResponse) -> str:
    full = completion(cid, model, "", "stop", answer)
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": full["created"],
        "model": model,
        "choices": [],
        "usage": full["usage"],
    }
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
