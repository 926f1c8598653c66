"""The Anthropic Messages API (`POST /v1/messages`): the request schema, and the response and SSE
events built from the `anthropic` package's own types, so that the official SDK pointed at the
cluster (`base_url=...`) works unchanged, streamed and not.

Models as in the OpenAI-compatible API: `hybrid` (the whole pipeline) and `slm` (the small model
alone). The hybrid options travel in the `hybrid` field (`extra_body={"hybrid": {...}}`).
Citations come back the way the SDK types them: the answer is split into text blocks, each carrying
`search_result_location` citations of the passages its `[n]` markers cite (the markers stay in the
text, so the blocks joined are `/v1/answer`'s answer). Routing, usage in dollars and the rest of
`/v1/answer` travel in the `hybrid` field of the message (and of the `message_delta` event).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

from anthropic.types import (
    CitationsDelta,
    CitationsSearchResultLocation,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta
from pydantic import Field, StrictBool, StrictStr, model_validator

from hybrid_serve.deployments import sse
from hybrid_serve.deployments.openai_api import (
    MAX_PARTS,
    USER_MESSAGE,
    HybridOptions,
    hybrid_extension,
)
from hybrid_serve.schemas import (
    AnswerResponse,
    Citation,
    NonBlank,
    Number,
    PositiveInteger,
    StrictModel,
)

# The engines drop a matched stop sequence and report "stop" as for the end of the text, so
# `stop_sequence` is never claimed.
StopReason = Literal["end_turn", "max_tokens"]


class TextBlockIn(StrictModel):
    type: Literal["text"]
    text: NonBlank
    # Prompt-caching hints from clients written for Claude: accepted, nothing to cache here.
    cache_control: dict[str, Any] | None = None


class MessageIn(StrictModel):
    role: Literal["user", "assistant"]
    content: NonBlank | Annotated[list[TextBlockIn], Field(min_length=1, max_length=MAX_PARTS)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content)


class Metadata(StrictModel):
    user_id: StrictStr | None = None


class MessagesRequest(StrictModel):
    model: Literal["hybrid", "slm"] = Field(
        ..., description="hybrid: the whole pipeline; slm: the small model alone (404 otherwise)."
    )
    max_tokens: PositiveInteger = Field(..., description="Output ceiling, as in the Messages API.")
    messages: list[MessageIn] = Field(
        ...,
        min_length=1,
        description="The query is the last user message; the turns before it are the "
        "conversation (a follow-up is made self-contained before retrieval).",
        json_schema_extra={"contains": USER_MESSAGE},
    )
    system: (
        NonBlank | Annotated[list[TextBlockIn], Field(min_length=1, max_length=MAX_PARTS)] | None
    ) = Field(None, description="Context for the model, as in the Messages API.")
    temperature: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] | None = None
    stop_sequences: Annotated[list[StrictStr], Field(max_length=4)] | None = None
    metadata: Metadata | None = None
    stream: StrictBool = False
    hybrid: HybridOptions = Field(
        default_factory=HybridOptions,
        description="hybrid-serve's own options (the SDK sends them with extra_body).",
    )

    @model_validator(mode="after")
    def _has_user_message(self) -> MessagesRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: at least one message must have role 'user'")
        return self

    def system_text(self) -> str | None:
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "".join(b.text for b in self.system)

    def turns(self) -> list[dict[str, str]]:
        """The conversation as chat turns, the system prompt first."""
        system = self.system_text()
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": m.role, "content": m.text()} for m in self.messages]

    def texts(self) -> list[str]:
        """Every string of the request: each is held to http.max_query_chars."""
        return [t["content"] for t in self.turns()]

    def sampling(self) -> dict[str, Any]:
        """The parameters the SLM honours, as GenerationRequest fields (unset ones omitted)."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.stop_sequences:
            out["stop"] = list(self.stop_sequences)
        return out


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def stop_reason(finish: str) -> StopReason:
    return "max_tokens" if finish == "length" else "end_turn"


_SEGMENT = re.compile(r".*?(?:\[\d+\](?:\s*\[\d+\])*[.!?;:,]?\s*|$)", re.S)


def segments(text: str) -> list[str]:
    """The text cut after each group of `[n]` markers (and the punctuation that follows it), so
    that every block carries the citations of its own markers. The pieces joined are the text."""
    parts = [p for p in _SEGMENT.findall(text) if p]
    return parts or [text]


def _location(citation: Citation, index: int) -> CitationsSearchResultLocation:
    return CitationsSearchResultLocation(
        type="search_result_location",
        cited_text=citation.snippet,
        source=citation.doc_id,
        title=citation.title or None,
        search_result_index=index,
        start_block_index=0,
        end_block_index=0,
    )


def _markers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[(\d+)\]", text)]


def locations(answer: AnswerResponse, text: str) -> list[CitationsSearchResultLocation]:
    """The citations of the `[n]` markers in `text` (a piece of the answer), in order."""
    by_number = {c.number: (i, c) for i, c in enumerate(answer.citations)}
    cited = [by_number[n] for n in dict.fromkeys(_markers(text)) if n in by_number]
    return [_location(c, i) for i, c in cited]


def blocks(answer: AnswerResponse) -> list[TextBlock]:
    """The answer as text blocks, each with the citations of the markers it contains."""
    return [
        TextBlock(type="text", text=piece, citations=locations(answer, piece) or None)
        for piece in segments(answer.answer)
    ]


def usage(answer: AnswerResponse) -> Usage:
    u = answer.usage
    return Usage(
        input_tokens=u.slm_prompt_tokens + u.claude_input_tokens,
        output_tokens=u.slm_completion_tokens + u.claude_output_tokens,
        cache_read_input_tokens=u.claude_cache_read_tokens,
        cache_creation_input_tokens=u.claude_cache_write_tokens,
    )


def message(mid: str, model: str, answer: AnswerResponse, reason: StopReason) -> dict[str, Any]:
    body = Message(
        id=mid,
        type="message",
        role="assistant",
        model=model,
        content=blocks(answer),
        stop_reason=reason,
        stop_sequence=None,
        usage=usage(answer),
    )
    return {**body.model_dump(mode="json", exclude_none=True), "hybrid": hybrid_extension(answer)}


class Events:
    """The SSE events of one streamed message, in the order the SDK's accumulator expects:
    message_start, per block (content_block_start, deltas, content_block_stop), message_delta,
    message_stop."""

    def __init__(self, mid: str, model: str) -> None:
        self.mid, self.model = mid, model
        self.index = -1  # the open block

    @staticmethod
    def _event(data: Any) -> str:
        return sse.event(data, data.type)

    def start(self) -> str:
        empty = Message(
            id=self.mid,
            type="message",
            role="assistant",
            model=self.model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=Usage(input_tokens=0, output_tokens=0),
        )
        return self._event(RawMessageStartEvent(type="message_start", message=empty))

    def open_block(self) -> str:
        self.index += 1
        block = TextBlock(type="text", text="", citations=None)
        return self._event(
            RawContentBlockStartEvent(
                type="content_block_start", index=self.index, content_block=block
            )
        )

    def text(self, text: str) -> str:
        delta = TextDelta(type="text_delta", text=text)
        return self._event(
            RawContentBlockDeltaEvent(type="content_block_delta", index=self.index, delta=delta)
        )

    def citations(self, cited: Sequence[Any]) -> Iterator[str]:
        """Citation deltas (search-result locations, as `locations` builds them)."""
        for c in cited:
            delta = CitationsDelta(type="citations_delta", citation=c)
            yield self._event(
                RawContentBlockDeltaEvent(type="content_block_delta", index=self.index, delta=delta)
            )

    def close_block(self) -> str:
        return self._event(RawContentBlockStopEvent(type="content_block_stop", index=self.index))

    def finish(self, answer: AnswerResponse, reason: StopReason) -> Iterator[str]:
        u = usage(answer)
        delta_usage = MessageDeltaUsage(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_read_input_tokens=u.cache_read_input_tokens,
            cache_creation_input_tokens=u.cache_creation_input_tokens,
        )
        delta = RawMessageDeltaEvent(
            type="message_delta",
            delta=Delta(stop_reason=reason, stop_sequence=None),
            usage=delta_usage,
        )
        data = {**delta.model_dump(mode="json", exclude_none=True)}
        data["hybrid"] = hybrid_extension(answer)
        yield sse.event(data, "message_delta")
        yield self._event(RawMessageStopEvent(type="message_stop"))

    def settled(self, answer: AnswerResponse, reason: StopReason) -> Iterator[str]:
        """A finished answer as a whole stream: one block per cited segment."""
        yield self.start()
        for block in blocks(answer):
            yield self.open_block()
            for piece in re.findall(r"\S+\s*|\s+", block.text):
                yield self.text(piece)
            yield from self.citations(block.citations or [])
            yield self.close_block()
        yield from self.finish(answer, reason)
