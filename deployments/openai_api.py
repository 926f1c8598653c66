"""OpenAI-compatible chat completions: the request schema, and the response and SSE chunks built
from the `openai` package's own types.

Models: `hybrid` runs the whole pipeline (the last user message is the query, earlier turns are
context); `slm` is the small model alone, with retrieval unless `hybrid.retrieval` is false.
Citations and routing metadata travel in the `hybrid` extension field of the response (and of the
final stream chunk); the text carries the `[n]` markers.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from pydantic import Field, StrictBool, StrictStr, field_validator, model_validator

from hybrid_serve.deployments import sse
from hybrid_serve.schemas import (
    AnswerResponse,
    Integer,
    Mode,
    NonBlank,
    Number,
    One,
    PIIPolicy,
    PositiveInteger,
    StrictModel,
    VerifyPolicy,
)

MODELS = {
    "hybrid": "The whole pipeline: retrieval, SLM, escalation to Claude when it adds value.",
    "slm": "The small model alone, with retrieval unless hybrid.retrieval is false.",
}
CREATED = 1_735_689_600  # a fixed timestamp: models do not change at run time
MAX_PARTS = 16
# At least one message is the user's: the schema says so with JSON Schema's `contains`.
USER_MESSAGE: dict[str, Any] = {
    "type": "object",
    "properties": {"role": {"const": "user"}},
    "required": ["role"],
}


class TextPart(StrictModel):
    type: Literal["text"]
    text: NonBlank


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: NonBlank | Annotated[list[TextPart], Field(min_length=1, max_length=MAX_PARTS)] = (
        Field(..., description="Text, or text parts.")
    )
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(StrictModel):
    include_usage: StrictBool = False


class HybridOptions(StrictModel):
    """hybrid-serve's own parameters, in an extension field the OpenAI SDK passes via extra_body."""

    top_k: Integer = Field(5, ge=1, le=50)
    retrieval: StrictBool = Field(True, description="slm model: retrieve and cite (default).")
    mode: Mode = "auto"
    verify: VerifyPolicy | None = None
    sensitive: StrictBool = False
    pii: PIIPolicy | None = None
    use_cache: StrictBool = Field(
        True, description="false: answer afresh (as Cache-Control: no-cache does)."
    )


class ChatCompletionRequest(StrictModel):
    model: Literal["hybrid", "slm"] = Field(
        ..., description="hybrid: the whole pipeline; slm: the small model alone (404 otherwise)."
    )
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        description="The query is the last user message; the turns before it are context.",
        json_schema_extra={"contains": USER_MESSAGE},
    )
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: Integer | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: One | None = Field(None, description="Only one choice is supported.")
    user: StrictStr | None = None
    hybrid: HybridOptions = Field(default_factory=HybridOptions)

    @model_validator(mode="after")
    def _has_user_message(self) -> ChatCompletionRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: at least one message must have role 'user'")
        return self

    def texts(self) -> list[str]:
        """Each message's text as the server uses it (its parts joined): each is held to
        http.max_query_chars, so splitting a long text into parts does not step around it."""
        return [m.text() for m in self.messages]

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
    models = [Model(id=m, object="model", created=CREATED, owned_by="hybrid-serve") for m in MODELS]
    return {"object": "list", "data": [m.model_dump(exclude_unset=True) for m in models]}


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def hybrid_extension(answer: AnswerResponse) -> dict[str, Any]:
    """Everything of /v1/answer but the text, which is the message content."""
    return answer.model_dump(mode="json", exclude={"answer"})


def usage(answer: AnswerResponse) -> CompletionUsage:
    u = answer.usage
    prompt = u.slm_prompt_tokens + u.claude_input_tokens
    done = u.slm_completion_tokens + u.claude_output_tokens
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


Finish = Literal["stop", "length"]


def completion(cid: str, model: str, finish: Finish, answer: AnswerResponse) -> dict[str, Any]:
    """The chat completion, with the `hybrid` extension field beside OpenAI's own."""
    choice = Choice(
        index=0,
        message=ChatCompletionMessage(role="assistant", content=answer.answer),
        finish_reason=finish,
        logprobs=None,
    )
    body = ChatCompletion(
        id=cid,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=usage(answer),
    )
    return {**body.model_dump(mode="json", exclude_unset=True), "hybrid": hybrid_extension(answer)}


class Chunks:
    """The SSE chunks of one streamed completion."""

    def __init__(self, cid: str, model: str) -> None:
        self.cid, self.model, self.created = cid, model, int(time.time())

    def _chunk(self, choices: list[ChunkChoice], **extra: Any) -> str:
        return sse.event(
            ChatCompletionChunk(
                id=self.cid,
                object="chat.completion.chunk",
                created=self.created,
                model=self.model,
                choices=choices,
                **extra,
            )
        )

    def delta(self, content: str, role: bool = False) -> str:
        delta = (
            ChoiceDelta(role="assistant", content=content) if role else ChoiceDelta(content=content)
        )
        return self._chunk([ChunkChoice(index=0, delta=delta, finish_reason=None, logprobs=None)])

    def final(self, finish: Finish, answer: AnswerResponse) -> str:
        """The last choice chunk: finish reason, and the `hybrid` extension."""
        choice = ChunkChoice(
            index=0,
            delta=ChoiceDelta(),
            finish_reason=finish,
            logprobs=None,
        )
        return self._chunk([choice], hybrid=hybrid_extension(answer))

    def usage(self, answer: AnswerResponse) -> str:
        return self._chunk([], usage=usage(answer))
