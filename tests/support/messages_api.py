"""A local HTTP server that speaks Anthropic's Messages API, for the real `anthropic` SDK to call.

Claude is unreachable from here, so this is the network boundary's stand-in. It answers JSON and
SSE, tool use (`tool_choice: {"type": "tool"}`), and injected faults: 429/529/500 with or without
`retry-after`, slow responses, connection resets and malformed tool input; `count_tokens` and the
model list, with a context window per model when a test gives one (`context_tokens`; a prompt
past it is refused as vLLM refuses it). It records every request it receives, so a test can prove
what did, or did not, leave the cluster.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    status: int | None = None  # 429, 500, 529, ...
    retry_after: str | None = None
    delay_s: float = 0.0  # sleep before answering (past the client's timeout = a timeout)
    reset: bool = False  # drop the connection without a response
    malformed: bool = False  # tool input that violates the schema
    # A text reply instead of the tool_use block, "{input}" standing for the tool input's JSON:
    # how open models served without enforced tool calls often answer.
    as_text: str | None = None
    trickle_s: float = 0.0  # send the reply a few bytes at a time, this long apart


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def text(self) -> str:
        """Everything the request carried as text: system, messages, tools."""
        return json.dumps(self.body, ensure_ascii=False)


def _question(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, list):
        content = " ".join(b.get("text", "") for b in content if isinstance(b, dict))
    m = re.search(r"<question>\s*(.*?)\s*</question>", content, re.S)
    return m.group(1) if m else content[:200]


def default_tool_input(name: str, body: dict[str, Any]) -> dict[str, Any]:
    q = _question(body)
    if name == "rewrite_query":
        return {"rewritten_query": q, "search_queries": [q], "steps": []}
    if name == "plan_subtasks":  # no split; tests queue the plans they need
        return {"subtasks": [{"id": "s1", "question": q, "search_queries": [q], "depends_on": []}]}
    if name == "condense_question":  # the question as sent; tests queue real rewrites
        return {"question": q}
    if name == "grade_answer":
        return {
            "factual_support": 0.9,
            "citation_match": 0.9,
            "completeness": 0.9,
            "score": 0.9,
            "notes": "",
        }
    return {}


@dataclass
class MessagesAPIServer:
    answer_text: str = "According to the passages, this is the answer [1]."
    tool_inputs: dict[str, deque[dict[str, Any]]] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[Recorded] = field(default_factory=list)
    on_request: Callable[[Recorded], None] | None = None
    # A fault for every request the queue has none for: an upstream that hangs or is slow.
    always: Fault | None = None
    # Model id -> context window: listed by GET /v1/models (`max_input_tokens`, as Anthropic's
    # API says it), and enforced by count_tokens.
    context_tokens: dict[str, int] = field(default_factory=dict)
    counts: bool = True  # False: no count_tokens route (404), as some Messages-API servers

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/v1/models":
                    self._json(404, _error("not_found_error", "no such route"))
                    return
                models = [
                    {"type": "model", "id": name, "display_name": name, "max_input_tokens": n}
                    for name, n in server.context_tokens.items()
                ]
                self._json(200, {"data": models, "has_more": False})

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._json(400, _error("invalid_request_error", "body is not JSON"))
                    return
                rec = Recorded(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()
                )
                counting = self.path.split("?")[0] == "/v1/messages/count_tokens"
                with server._lock:
                    server.requests.append(rec)
                    fault = None
                    if not counting:  # faults are for the calls that generate
                        fault = server.faults.popleft() if server.faults else server.always
                if server.on_request:
                    server.on_request(rec)
                if not self.path.startswith("/v1/messages"):
                    self._json(404, _error("not_found_error", "no such route"))
                    return
                if not (self.headers.get("x-api-key") or self.headers.get("authorization")):
                    self._json(401, _error("authentication_error", "missing API key"))
                    return
                if counting and not server.counts:
                    self._json(404, _error("not_found_error", "no such route"))
                    return
                if counting:
                    self._count(body)
                    return
                if fault and fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault and fault.reset:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault and fault.status:
                    headers = {"retry-after": fault.retry_after} if fault.retry_after else {}
                    kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(
                        fault.status, "api_error"
                    )
                    self._json(fault.status, _error(kind, f"injected {fault.status}"), headers)
                    return
                message = server._message(
                    body,
                    malformed=bool(fault and fault.malformed),
                    as_text=fault.as_text if fault else None,
                )
                if body.get("stream"):
                    self._sse(message)
                else:
                    self._json(200, message, trickle_s=fault.trickle_s if fault else 0.0)

            def _count(self, body: dict[str, Any]) -> None:
                n = count_tokens(body)
                window = server.context_tokens.get(body.get("model", ""))
                if window is not None and n > window:
                    message = f"This model's maximum context length is {window} tokens."
                    self._json(400, _error("invalid_request_error", message))
                    return
                self._json(200, {"input_tokens": n})

            def _json(
                self,
                status: int,
                payload: Any,
                headers: dict[str, str] | None = None,
                trickle_s: float = 0.0,
            ):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", "req_" + uuid.uuid4().hex[:16])
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not trickle_s:
                    self.wfile.write(data)
                    return
                for i in range(0, len(data), 16):
                    self.wfile.write(data[i : i + 16])
                    self.wfile.flush()
                    time.sleep(trickle_s)

            def _sse(self, message: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True

                def event(name: str, data: dict[str, Any]) -> None:
                    payload = f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
                    self.wfile.write(payload.encode())
                    self.wfile.flush()

                start = {**message, "content": [], "stop_reason": None}
                start["usage"] = {**message["usage"], "output_tokens": 1}
                event("message_start", {"message": start})
                for i, block in enumerate(message["content"]):
                    if block["type"] == "text":
                        event(
                            "content_block_start",
                            {"index": i, "content_block": {"type": "text", "text": ""}},
                        )
                        for word in re.findall(r"\S+\s*", block["text"]):
                            event(
                                "content_block_delta",
                                {"index": i, "delta": {"type": "text_delta", "text": word}},
                            )
                    else:
                        event(
                            "content_block_start",
                            {"index": i, "content_block": {**block, "input": {}}},
                        )
                        event(
                            "content_block_delta",
                            {
                                "index": i,
                                "delta": {
                                    "type": "input_json_delta",
                                    "partial_json": json.dumps(block["input"]),
                                },
                            },
                        )
                    event("content_block_stop", {"index": i})
                event(
                    "message_delta",
                    {
                        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                        "usage": {"output_tokens": message["usage"]["output_tokens"]},
                    },
                )
                event("message_stop", {})

        class Server(ThreadingHTTPServer):
            # http.server's listen backlog is 5: under load, a burst of concurrent calls got
            # connections refused, which the real API never does.
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients dropping keep-alive connections are not news

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- control -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MessagesAPIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.tool_inputs.clear()

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def queue_tool_input(self, name: str, *inputs: dict[str, Any]) -> None:
        with self._lock:
            self.tool_inputs.setdefault(name, deque()).extend(inputs)

    def calls(self, tool: str | None = None) -> list[Recorded]:
        with self._lock:
            reqs = list(self.requests)
        if tool is None:
            return reqs
        return [
            r
            for r in reqs
            if (r.body.get("tool_choice") or {}).get("name") == tool
            and not r.path.startswith("/v1/messages/count_tokens")
        ]

    # -- responses ---------------------------------------------------------------------------

    def _message(
        self, body: dict[str, Any], malformed: bool, as_text: str | None = None
    ) -> dict[str, Any]:
        tool_choice = body.get("tool_choice") or {}
        if tool_choice.get("type") == "tool":
            name = tool_choice["name"]
            with self._lock:
                queue = self.tool_inputs.get(name)
                tool_input = queue.popleft() if queue else default_tool_input(name, body)
            if malformed:
                tool_input = {"unexpected": True}
            content = [
                {
                    "type": "tool_use",
                    "id": "toolu_" + uuid.uuid4().hex[:20],
                    "name": name,
                    "input": tool_input,
                }
            ]
            stop = "tool_use"
            out_text = json.dumps(tool_input)
            if as_text is not None:
                out_text = as_text.replace("{input}", out_text)
                content = [{"type": "text", "text": out_text}]
                stop = "end_turn"
        else:
            content = [{"type": "text", "text": self.answer_text}]
            stop = "end_turn"
            out_text = self.answer_text
        system = json.dumps(body.get("system", ""))
        cached = any(
            isinstance(b, dict) and b.get("cache_control")
            for b in body.get("system") or []
            if isinstance(body.get("system"), list)
        )
        cache_read = cache_write = 0
        system_tokens = len(system) // 4
        with self._lock:
            if cached and system in self._cached:
                cache_read = system_tokens
            elif cached:
                cache_write = system_tokens
                self._cached.add(system)
        input_tokens = max(1, len(json.dumps(body.get("messages"))) // 4)
        return {
            "id": "msg_" + uuid.uuid4().hex[:24],
            "type": "message",
            "role": "assistant",
            "model": body.get("model", ""),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": max(1, len(out_text) // 4),
                "cache_creation_input_tokens": cache_write,
                "cache_read_input_tokens": cache_read,
            },
        }


def count_tokens(body: dict[str, Any]) -> int:
    """This server's token count of a request: a token every four characters of what it carries
    (system, messages, tools), as the usage of its replies counts them."""
    parts = [body.get("system"), body.get("messages"), body.get("tools")]
    return max(1, len(json.dumps(parts, ensure_ascii=False)) // 4)


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}
