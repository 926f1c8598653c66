"""Admission counts a request once its body has arrived: slow-body clients hold no slot."""

from __future__ import annotations

import asyncio
import json

from hybrid_serve.deployments.middleware import AdmissionMiddleware


async def echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def call(app, chunks: list[bytes], gate: asyncio.Event | None = None, priority: str = ""):
    """Send `chunks` as the body (waiting on `gate` before the last); return (status, body)."""
    headers = [(b"x-priority", priority.encode())] if priority else []
    scope = {"type": "http", "method": "POST", "path": "/v1/answer", "headers": headers}
    pending = list(chunks)
    sent: list[dict] = []

    async def receive():
        if len(pending) == 1 and gate is not None:
            await gate.wait()
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    async def run():
        await app(scope, receive, send)
        status = sent[0]["status"]
        return status, b"".join(m.get("body", b"") for m in sent[1:])

    return run()


def test_a_slow_body_holds_no_slot_and_the_body_reaches_the_app_whole():
    app = AdmissionMiddleware(echo, limit=lambda: 1, retry_after_s=lambda: 1)

    async def scenario():
        gate = asyncio.Event()
        slow = asyncio.create_task(call(app, [b'{"q": ', b'"slow"}'], gate))
        await asyncio.sleep(0.05)  # its body is half sent
        assert app.in_progress == 0
        assert await call(app, [b'{"q": "fast"}']) == (200, b'{"q": "fast"}')
        gate.set()
        status, body = await slow
        assert status == 200 and json.loads(body) == {"q": "slow"}

    asyncio.run(scenario())


def test_past_the_limit_a_complete_request_is_refused_at_once():
    async def hold(scope, receive, send):
        await asyncio.sleep(0.2)
        await echo(scope, receive, send)

    app = AdmissionMiddleware(hold, limit=lambda: 1, retry_after_s=lambda: 3)

    async def scenario():
        first = asyncio.create_task(call(app, [b"a"]))
        await asyncio.sleep(0.05)
        status, body = await call(app, [b"b"])
        assert status == 503 and b"at capacity" in body
        assert (await first) == (200, b"a")

    asyncio.run(scenario())


def test_batch_requests_cannot_take_the_slots_kept_for_interactive_ones():
    release = asyncio.Event()

    async def hold(scope, receive, send):
        await release.wait()
        await echo(scope, receive, send)

    app = AdmissionMiddleware(
        hold, limit=lambda: 4, retry_after_s=lambda: 3, interactive_reserve=lambda: 0.5
    )

    async def scenario():
        batch = [asyncio.create_task(call(app, [b"b"], priority="batch")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert app.in_progress == 2
        status, body = await call(app, [b"b3"], priority="Batch")  # half the slots: refused
        assert status == 503 and b"batch requests may take 2 of its 4" in body
        interactive = [asyncio.create_task(call(app, [b"i"])) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert app.in_progress == 4  # interactive work still got in
        status, _ = await call(app, [b"i3"], priority="interactive")
        assert status == 503  # the whole limit holds for everyone
        release.set()
        assert [await t for t in batch + interactive] == [(200, b"b")] * 2 + [(200, b"i")] * 2

    asyncio.run(scenario())
