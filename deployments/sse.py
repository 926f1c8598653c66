"""Server-Sent Events, the one way every stream here is written: `/v1/answer`'s named events and
the OpenAI-style chat chunks alike."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from hybrid_serve.agents.events import Event, EventSink
from hybrid_serve.agents.interfaces import Unavailable
from hybrid_serve.deployments.errors import APIError, error_body

log = logging.getLogger("ray.serve")

DONE = "data: [DONE]\n\n"


def event(data: Any, name: str | None = None) -> str:
    """One SSE event; pydantic models are sent as their JSON (unset fields left out)."""
    if isinstance(data, BaseModel):
        body = data.model_dump_json(exclude_unset=True)
    else:
        body = json.dumps(data)
    return (f"event: {name}\n" if name else "") + f"data: {body}\n\n"


def response(
    events: AsyncIterator[str], error_event: str | None = None, path: str = ""
) -> StreamingResponse:
    """The stream as a response. Headers are sent with the first event, so a failure after it is
    reported in-band, as an `error_event` event (or a bare data line, as OpenAI does), in the
    error shape of the API at `path`."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for item in events:
                yield item
        except APIError as exc:
            yield event(error_body(exc.status, exc.message, exc.code, path), error_event)
        except Unavailable as exc:
            yield event(error_body(503, exc.detail or exc.reason, exc.reason, path), error_event)
        except Exception:
            log.exception("stream failed")
            yield event(error_body(500, "stream failed", "internal_error", path), error_event)

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@dataclass(frozen=True)
class Done:
    """The run's result, after every event it emitted."""

    result: Any


async def emitted(run: Callable[[EventSink], Awaitable[Any]]) -> AsyncIterator[Event | Done]:
    """Run `run(sink)` and yield the events it emits, then `Done` with its result. A failure is
    raised where it happened in the sequence; closing the iterator (the client went away)
    cancels the run."""
    queue: asyncio.Queue[Event | Done | None] = asyncio.Queue()

    async def sink(event: Event) -> None:
        await queue.put(event)

    async def go() -> None:
        try:
            await queue.put(Done(await run(sink)))
        finally:
            await queue.put(None)

    task = asyncio.create_task(go())
    try:
        while (item := await queue.get()) is not None:
            yield item
        await task  # re-raises the run's failure
    finally:
        task.cancel()


def named(item: Event) -> str:
    """A pipeline event as `/v1/answer`'s named SSE event."""
    return event(item.data(), item.name)
