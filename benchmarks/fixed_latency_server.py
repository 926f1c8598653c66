"""An OpenAI-compatible chat server whose every reply takes a fixed time, for measuring the
framework's own scheduling apart from the cores: behind the `openai` engine, a sub-task costs
exactly `latency_s` however many run at once, so any excess wall time is ours.

    python -m hybrid_serve.benchmarks.fixed_latency_server --port 8001 --latency-ms 500

It speaks the parts of `/v1/chat/completions` the engine uses (JSON and SSE, usage, logprobs;
vLLM's `continuous_usage_stats`, usage in every streamed chunk) and `/v1/models`; it counts
requests and the most it held at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hybrid_serve.cluster.local import free_port

DEFAULT_REPLY = "The passages answer this [1]."


class FixedLatencyServer:
    def __init__(
        self, latency_s: float = 0.5, reply: str = DEFAULT_REPLY, port: int = 0, model: str = "slm"
    ) -> None:
        self.latency_s = latency_s
        self.reply = reply
        self.model = model
        self.port = port or free_port()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- HTTP ------------------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return JSONResponse(
                {"error": {"message": "messages is required", "type": "invalid_request_error"}},
                status_code=400,
            )
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        words = self.reply.split(" ")
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        logprobs = body.get("logprobs") is True

        def lp(token: str) -> dict[str, Any]:
            return {"token": token, "logprob": -0.05, "bytes": None, "top_logprobs": []}

        base = {"id": cid, "created": int(time.time()), "model": body.get("model", self.model)}
        if not body.get("stream"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens)},
                "finish_reason": "stop",
                "logprobs": {"content": [lp(t) for t in tokens]} if logprobs else None,
            }
            return JSONResponse(
                {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            )

        options = body.get("stream_options") or {}
        continuous = bool(options.get("include_usage") and options.get("continuous_usage_stats"))

        def chunk(delta: dict[str, Any], finish: str | None, token: str | None, n: int) -> str:
            choice = {
                "index": 0,
                "delta": delta,
                "finish_reason": finish,
                "logprobs": {"content": [lp(token)]} if logprobs and token else None,
            }
            data = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            if continuous:  # vLLM's extension: the usage so far, in every chunk
                data["usage"] = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": prompt_tokens + n,
                }
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> Any:
            yield chunk({"role": "assistant", "content": ""}, None, None, 0)
            for n, t in enumerate(tokens, 1):
                yield chunk({"content": t}, None, t, n)
            yield chunk({}, "stop", None, len(tokens))
            if options.get("include_usage"):
                data = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FixedLatencyServer:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fixed-latency server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FixedLatencyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=float, default=500.0)
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    args = parser.parse_args()
    server = FixedLatencyServer(args.latency_ms / 1000, args.reply, args.port).start()
    print(f"serving {server.url} with {args.latency_ms:.0f} ms per reply; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
