"""What the reasoning needs from the rest of the system, declared once: retrieval, generation, the
LLM tier's roles and its ledger, and the only two errors the pipeline raises or expects.

The deployments implement these over Ray handles (`deployments/handles.py`), tests and benchmarks
over local objects; nothing here knows Ray or HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from hybrid_serve.schemas import (
    Collections,
    GenerationRequest,
    GenerationResult,
    Passage,
    PIIHandling,
    Priority,
)

# (query, top_k, the collections the caller may read: None for all) -> ranked passages
Retrieve = Callable[[str, int, Collections], Awaitable[list[Passage]]]
Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
# Text deltas, then the GenerationResult (an SLM deployment's `generate_stream`).
GenerateStream = Callable[[GenerationRequest], AsyncIterator[str | GenerationResult]]


class Unavailable(Exception):
    """A dependency cannot serve this call: the LLM tier (no key, circuit open, budget, a refusal
    of the privacy gate, errors after retries) or a replica (overloaded, gone, the index still
    loading). `reason` is what `degraded` (or the HTTP error) says; `retry_after_s`, when
    known, how long a client should wait."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        retry_after_s: float | None = None,
        expected_s: float | None = None,
    ) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s
        # Overloaded: when the refused request would have finished, had it waited (seconds).
        self.expected_s = expected_s


class DeadlineExceeded(Exception):
    """The request's deadline ran out in `step` with no answer to return."""

    def __init__(self, step: str) -> None:
        super().__init__(f"the deadline ran out during {step}")
        self.step = step


# -- the LLM tier's roles -------------------------------------------------------------------

Role = Literal["rewrite", "plan", "verify", "answer", "condense"]


@dataclass(frozen=True)
class LLMCall:
    """One role's input. `answer` is the candidate a `verify` grades; `notes` are a grader's
    notes for a second `answer`; `history` the chat before `query` (for `condense`)."""

    request_id: str
    query: str
    passages: Sequence[Passage]
    pii: PIIHandling
    answer: str = ""
    notes: str = ""
    # When the request's answer is due (wall clock): no attempt starts or runs past it.
    deadline: float | None = None
    history: Sequence[dict[str, str]] = ()
    # The request is sensitive as far as the caller knows (the gateway's PrivacyGate checks the
    # content again, and refuses a hosted tier either way).
    sensitive: bool = False
    # Batch work waits behind interactive work for the tier's concurrency cap.
    priority: Priority = "interactive"


@dataclass
class CallUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    seconds: float = 0.0  # wall time of the call, retries included
    # Its share of the tier's time: while n calls run together each is charged 1/n of the
    # elapsed time (engines.replica_time), what a self-hosted, batching tier is priced by.
    shared_seconds: float | None = None


@dataclass
class LLMResult:
    output: Any
    usage: CallUsage = field(default_factory=CallUsage)
    redacted: bool = False
    model: str | None = None  # as the tier reported it
    # Set when the prompt was fitted to the tier's context: the passages it saw (the first
    # ones) and the earlier chat turns left out.
    passages_used: int | None = None
    history_dropped: int = 0


class Ledger(Protocol):
    """Where a finished request's costs go (the cluster-wide totals a report shows)."""

    async def finish_request(
        self,
        request_id: str,
        slm_cost_usd: float,
        all_llm_estimate_usd: float,
        requests: int = 1,
    ) -> None: ...


class LLMRoles(Ledger, Protocol):
    """What the pipeline asks of the LLM tier. `call` raises Unavailable when the tier cannot be
    used for it."""

    async def call(self, role: Role, request: LLMCall) -> LLMResult: ...
