"""What a streaming client is told as the pipeline makes progress, as types: the plan, each
sub-task as it finishes, the answer's text, the verification. The ingress turns them into
Server-Sent Events; `replay` gives a finished answer's events, so an answer from the cache streams
the same kinds of events as a fresh one."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hybrid_serve.schemas import AnswerResponse, Subtask, Verification


@dataclass(frozen=True)
class PlanEvent:
    planner: str  # "claude" (the LLM tier) or "local"
    subtasks: list[dict[str, Any]]
    name = "plan"

    def data(self) -> dict[str, Any]:
        return {"planner": self.planner, "subtasks": self.subtasks}


@dataclass(frozen=True)
class SubtaskEvent:
    subtask: Subtask
    name = "subtask"

    def data(self) -> dict[str, Any]:
        return self.subtask.model_dump(mode="json")


@dataclass(frozen=True)
class AnswerDelta:
    """Text of the answer; `reset` replaces what was sent before (a verification retry)."""

    delta: str
    reset: bool = False
    name = "answer"

    def data(self) -> dict[str, Any]:
        return {"reset": True, "delta": self.delta} if self.reset else {"delta": self.delta}


@dataclass(frozen=True)
class VerificationEvent:
    verification: Verification
    name = "verification"

    def data(self) -> dict[str, Any]:
        return self.verification.model_dump(mode="json")


Event = PlanEvent | SubtaskEvent | AnswerDelta | VerificationEvent
EventSink = Callable[[Event], Awaitable[None]]
_PIECE = re.compile(r"\S+\s*|\s+")


def text_deltas(text: str, reset: bool = False) -> list[AnswerDelta]:
    """A settled text as deltas, word by word (`reset` on the first)."""
    out = [AnswerDelta("", reset=True)] if reset else []
    return out + [AnswerDelta(piece) for piece in _PIECE.findall(text)]


def replay(answer: AnswerResponse) -> list[Event]:
    """The events a finished answer implies, in the order the pipeline would have sent them."""
    events: list[Event] = []
    if answer.subtasks:
        plan = [{"id": s.id, "question": s.question} for s in answer.subtasks]
        planner = "local" if "local_planner" in answer.escalation.reasons else "claude"
        events.append(PlanEvent(planner, plan))
        events.extend(SubtaskEvent(s) for s in answer.subtasks)
    events.extend(text_deltas(answer.answer))
    if answer.verification is not None:
        events.append(VerificationEvent(answer.verification))
    return events
