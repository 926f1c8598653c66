"""The LLM tier's roles — rewrite, plan, verify, answer, condense — declared once: each role's
system prompt, how its user message is built from an `LLMCall`, and the structured output it
returns through a forced tool call (validated again with pydantic on the way back).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anthropic
import pydantic_core
from pydantic import BaseModel, Field

from hybrid_serve.agents import prompts
from hybrid_serve.agents.interfaces import LLMCall, Role
from hybrid_serve.agents.planner import Plan, SearchQuery, cut_to
from hybrid_serve.schemas import StrictModel

PlanStep = Annotated[str, cut_to(200), Field(max_length=200)]

# -- structured outputs ---------------------------------------------------------------------


class RewritePlan(StrictModel):
    """The question restated for a retrieval-augmented small model, and what to search for."""

    rewritten_query: Annotated[str, cut_to(600), Field(max_length=600)] = Field(
        description="The question, self-contained and unambiguous."
    )
    search_queries: Annotated[list[SearchQuery], cut_to(3), Field(max_length=3)] = Field(
        description="One to three short search queries that find the needed passages."
    )
    steps: Annotated[list[PlanStep], cut_to(6), Field(max_length=6)] = Field(
        description="Short plan steps; empty when the question is simple."
    )


class Condensed(StrictModel):
    """A follow-up question rewritten to stand on its own."""

    question: Annotated[str, cut_to(600), Field(max_length=600)] = Field(
        description="The last question, understandable without the chat."
    )


class Grade(StrictModel):
    """A 0-1 grade of a candidate answer against the passages it cites."""

    factual_support: float = Field(description="0-1: claims supported by the cited passages.")
    citation_match: float = Field(description="0-1: each [n] points at a passage saying that.")
    completeness: float = Field(description="0-1: the answer addresses the whole question.")
    score: float = Field(description="0-1 overall.")
    notes: Annotated[str, cut_to(500), Field(max_length=500)] = Field(
        description="Short, concrete notes on what to fix; empty if nothing."
    )


@dataclass(frozen=True)
class RoleSpec:
    system: str
    user: Callable[[LLMCall], str]
    tool: tuple[str, type[BaseModel]] | None
    max_tokens: int | None  # None: llm.max_tokens


ROLES: dict[Role, RoleSpec] = {
    "rewrite": RoleSpec(
        prompts.REWRITE_SYSTEM,
        lambda c: prompts.claude_rewrite_user(c.query, c.passages),
        ("rewrite_query", RewritePlan),
        512,
    ),
    "plan": RoleSpec(
        prompts.PLAN_SYSTEM,
        lambda c: prompts.claude_rewrite_user(c.query, c.passages),
        ("plan_subtasks", Plan),
        800,
    ),
    "verify": RoleSpec(
        prompts.VERIFY_SYSTEM,
        lambda c: prompts.claude_verify_user(c.query, c.answer, c.passages),
        ("grade_answer", Grade),
        512,
    ),
    "condense": RoleSpec(
        prompts.CONDENSE_SYSTEM,
        lambda c: prompts.claude_condense_user(c.query, c.history),
        ("condense_question", Condensed),
        200,
    ),
    "answer": RoleSpec(
        prompts.CLAUDE_ANSWER_SYSTEM,
        lambda c: prompts.claude_answer_user(c.query, c.passages, c.notes),
        None,
        None,
    ),
}


def tool_spec(name: str, model: type[BaseModel], full_schema: bool = False) -> dict[str, Any]:
    """A strict tool. Anthropic's API takes a subset of JSON Schema (the SDK moves the rest, such
    as length bounds, into descriptions); `full_schema` sends every bound, for a server that
    enforces the whole schema while decoding (vLLM's structured outputs) — what keeps a small
    open model's arguments short and valid."""
    schema = model.model_json_schema() if full_schema else anthropic.transform_schema(model)
    return {
        "name": name,
        "description": (model.__doc__ or name).strip(),
        "input_schema": schema,
        "strict": True,
    }


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def recover_tool_input(text: str, name: str) -> dict[str, Any] | None:
    """The tool input a model wrote as text: a fenced JSON block or the outermost {...}, cut
    short JSON completed by pydantic's partial parser, and a {"name": …, "arguments": …} wrapper
    unwrapped. None when there is no JSON object to take."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if start >= 0:
        candidates += [text[start : end + 1]] if end > start else []
        candidates.append(text[start:])
    for candidate in candidates:
        try:
            value = pydantic_core.from_json(candidate.strip(), allow_partial="trailing-strings")
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        for key in ("input", "arguments", "parameters"):
            inner = value.get(key)
            if value.get("name") == name and isinstance(inner, dict):
                return inner
            if value.get("name") == name and isinstance(inner, str):
                return recover_tool_input(inner, name)
        return value
    return None
