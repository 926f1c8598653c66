"""Plans for complex questions: sub-tasks with their own search queries and dependencies.

Claude writes the plan through a strict tool schema. When Claude cannot be used (no key, open
circuit, budget, a sensitive query) the local planner below handles the recognisable shapes —
comparisons of two named things, "X of the Y that Z" bridges, several questions in one — and
otherwise plans a single sub-task, so decomposition never depends on Claude being there.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from hybrid_serve.agents.citations import content_words

# A sub-task may refer to an earlier one's answer as {s1}; it is filled in before it runs.
REF = re.compile(r"\{(s\d+)\}")


def cut_to(max_length: int) -> BeforeValidator:
    """A length bound that validation cuts to rather than rejects (paired with a `Field`
    max_length that the JSON schema states: a server that enforces the schema while decoding,
    vLLM, keeps a small open model's output short with it; Anthropic's API reads it only as a
    hint)."""

    def cut(value: Any) -> Any:
        return value[:max_length] if isinstance(value, (str, list)) else value

    return BeforeValidator(cut)


# Bounds on what a planner writes: generous for Claude, and what keeps a small open model from
# filling its whole token budget.
MAX_SUBTASKS = 6
SubtaskId = Annotated[str, cut_to(8), Field(max_length=8)]
SearchQuery = Annotated[str, cut_to(120), Field(max_length=120)]


class SubtaskPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: SubtaskId = Field(description="s1, s2, ... in order.")
    question: Annotated[str, cut_to(300), Field(max_length=300)] = Field(
        description="A self-contained question; write {s1} where the answer of s1 is needed."
    )
    search_queries: Annotated[list[SearchQuery], cut_to(3), Field(max_length=3)] = Field(
        description="One or two short search queries."
    )
    depends_on: Annotated[list[SubtaskId], cut_to(MAX_SUBTASKS), Field(max_length=MAX_SUBTASKS)] = (
        Field(description="Ids whose answers this sub-task needs.")
    )


class Plan(BaseModel):
    """Sub-tasks that together answer the question; independent ones run in parallel."""

    model_config = ConfigDict(extra="forbid")

    subtasks: Annotated[list[SubtaskPlan], cut_to(MAX_SUBTASKS), Field(max_length=MAX_SUBTASKS)] = (
        Field(min_length=1, description="Two to five sub-tasks.")
    )


def validate_plan(plan: Plan) -> Plan:
    """Keep a plan executable: unique ids, known and earlier dependencies, no cycles."""
    seen: set[str] = set()
    out = []
    for i, st in enumerate(plan.subtasks[:MAX_SUBTASKS]):
        sid = st.id if st.id and st.id not in seen else f"s{i + 1}"
        named = REF.findall(" ".join([st.question, *st.search_queries]))
        deps = [d for d in dict.fromkeys(st.depends_on + named) if d in seen]
        queries = [q for q in st.search_queries if q.strip()] or [REF.sub("", st.question)]
        out.append(
            st.model_copy(update={"id": sid, "depends_on": deps, "search_queries": queries[:3]})
        )
        seen.add(sid)
    return Plan(subtasks=out)


# "Who is older, A or B?", "Which band, A or B, had more members?", "... : the A or the B?"
_EITHER = re.compile(
    r"^(?P<head>.*?)[,:]\s*(?:the\s+)?(?P<a>[^,:?]+?)\s+(?:or|vs\.?|versus)\s+(?:the\s+)?"
    r"(?P<b>[^,:?]+?)\s*(?:,\s*(?P<tail>[^?]+?))?\s*\??$",
    re.IGNORECASE,
)
# "who is younger A or B?" (no comma)
_EITHER_BARE = re.compile(
    r"^(?P<head>(?:who|which|what)\s+(?:is|was|are|were)\s+\w+(?:\s+(?-i:[a-z]\w*))?)\s+"
    r"(?P<a>[A-Z][^?]*?)\s+or\s+(?P<b>[A-Z][^?]*?)\s*\??$",
    re.IGNORECASE,
)
# "Were A and B of the same nationality?", "Are A and B both from the United States?"
_BOTH = re.compile(
    r"^(?P<verb>are|were|is|was|do|did|does)\s+(?:both\s+)?(?P<a>.+?),?\s+and\s+(?P<b>.+?)\s+"
    r"(?P<tail>(?:both|of the same|the same|located|from|in the same|each)\b.*?)\s*\??$",
    re.IGNORECASE,
)
# "Are both A and B genera?", "Are both A, and B described as a genus?"
_BOTH_FIRST = re.compile(
    r"^(?P<verb>are|were|is|was)\s+both\s+(?P<a>.+?),?\s+and\s+(?P<b>\S+)\s+(?P<tail>.+?)\s*\??$",
    re.IGNORECASE,
)
_THING = r"(?P<thing>(?:[\w'-]+\s+){0,3}?[\w'-]+)"
# "What position was held by the woman who portrayed X?" -> who is that woman, then the position.
_BRIDGE_WH = re.compile(
    r"^(?P<ask>(?:what|who|when|where|which|how)\b.*?)\s+(?P<prep>of|for|by|in|at|from|with)\s+"
    r"the\s+" + _THING + r"\s+(?P<rel>that|which|who|whose|where)\s+(?P<rest>.+?)\s*\??$",
    re.IGNORECASE,
)
# "The arena where the Maineiacs played can seat how many people?" -> the arena, then the seats.
_BRIDGE_SUBJECT = re.compile(
    r"^(?:the|a|an)\s+" + _THING + r"\s+(?P<rel>of|that|which|who|whose|where)\s+"
    r"(?P<rest>.+?)\s+(?P<verb>is|was|are|were|has|had|can|could|managed|became|served)\s+"
    r"(?P<tail>.+?)\s*\??$",
    re.IGNORECASE,
)
_PEOPLE = re.compile(
    r"\b(?:man|woman|person|director|manager|writer|author|singer|actor|actress|founder|"
    r"president|father|mother|son|daughter|wife|husband|player|coach|composer|producer|"
    r"screenwriter|artist|politician|industrialist|physicist|pilot|member)s?$",
    re.IGNORECASE,
)


def _subtask(sid: str, question: str, query: str, deps: tuple[str, ...] = ()) -> SubtaskPlan:
    return SubtaskPlan(id=sid, question=question, search_queries=[query], depends_on=list(deps))


# Longest question the shape rules read. The questions they recognise (comparisons, bridges) are
# one sentence; their regexes backtrack quadratically on long comma- or "or"-laden text (93 s at
# 64,000 characters), so a longer one is only split at question marks and semicolons.
SHAPE_MAX_CHARS = 400


def local_plan(query: str) -> Plan:
    """Rules for the shapes that can be recognised without a model; one sub-task otherwise."""
    q = " ".join(query.split()).strip()
    shapes = (_EITHER, _EITHER_BARE, _BOTH, _BOTH_FIRST) if len(q) <= SHAPE_MAX_CHARS else ()
    for pattern in shapes:
        m = pattern.match(q)
        if m and m.group("a").strip() and m.group("b").strip():
            aspect = " ".join(
                x for x in (m.groupdict().get("head"), m.groupdict().get("tail")) if x
            )
            if pattern in (_BOTH, _BOTH_FIRST):
                aspect = m.group("tail")
                if pattern is _BOTH_FIRST:
                    aspect = "both " + aspect
            a, b = (m.group(k).strip(" ,") for k in ("a", "b"))
            return validate_plan(
                Plan(
                    subtasks=[_subtask(f"s{i}", _about(x, aspect), x) for i, x in ((1, a), (2, b))]
                )
            )
    m = _BRIDGE_WH.match(q) if shapes else None
    if m:
        thing, rel, rest = m.group("thing").strip(), m.group("rel"), m.group("rest").strip()
        return validate_plan(
            Plan(
                subtasks=[
                    _subtask(
                        "s1", f"{_who(thing, rel)} the {thing} {rel} {rest}?", f"{thing} {rest}"
                    ),
                    _subtask(
                        "s2",
                        f"{m.group('ask')} {m.group('prep')} {{s1}}?",
                        f"{{s1}} {_topic(m.group('ask'))}",
                        ("s1",),
                    ),
                ]
            )
        )
    m = _BRIDGE_SUBJECT.match(q) if shapes else None
    if m:
        thing, rel, rest = m.group("thing").strip(), m.group("rel"), m.group("rest").strip()
        tail = f"{m.group('verb')} {m.group('tail')}"
        return validate_plan(
            Plan(
                subtasks=[
                    _subtask(
                        "s1", f"{_who(thing, rel)} the {thing} {rel} {rest}?", f"{thing} {rest}"
                    ),
                    _subtask("s2", f"{{s1}} {tail}?", f"{{s1}} {_topic(tail)}", ("s1",)),
                ]
            )
        )
    parts = [
        p.strip(" ,")
        for p in re.split(
            r"\?\s+|\s*;\s*|,?\s+and\s+(?=(?:who|what|when|where|which|why|how)\b)", q
        )
        if p.strip(" ,?")
    ]
    # "Who invented X and where?" is one question: a part with nothing to search for ("where?")
    # would be asked on its own, and a small model answers it with the prompt's layout.
    if len(parts) > 1 and all(content_words(p) for p in parts):
        return validate_plan(
            Plan(
                subtasks=[
                    _subtask(f"s{i + 1}", p.rstrip("?") + "?", p) for i, p in enumerate(parts)
                ]
            )
        )
    return validate_plan(Plan(subtasks=[_subtask("s1", q, q)]))


def _who(thing: str, rel: str) -> str:
    return "Who is" if rel.lower() == "who" or _PEOPLE.search(thing) else "What is"


_ASPECTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("older", "younger", "born", "age"), "When was {x} born?"),
    (("nationality",), "What is the nationality of {x}?"),
    (("members",), "How many members does {x} have?"),
    (("located", "neighborhood", "city", "country", "where", "hail"), "Where is {x} located?"),
    (("taller", "height"), "How tall is {x}?"),
    (("larger", "bigger", "smaller", "population"), "How large is {x}?"),
)
_WHEN = re.compile(r"\b(started|founded|established|released|published|formed|built|opened)\b")


def _about(x: str, aspect: str) -> str:
    """One side of a comparison as its own question: 'older' -> 'When was X born?'."""
    a = aspect.lower()
    when = _WHEN.search(a)
    if when or any(w in a for w in ("first", "earlier", "later")):
        return f"When was {x} {when.group(1) if when else 'founded'}?"
    for words, template in _ASPECTS:
        if any(w in a for w in words):
            return template.format(x=x)
    both = re.match(r"^both\s+(.+)$", aspect.strip(), re.IGNORECASE)
    if both:
        return f"Is {x} {both.group(1).strip()}?"
    asked = re.match(
        r"^(?:which|what)\s+(?:[\w']+\s+){1,2}?(?P<verb>was|is|were|are|has|had)\s+(?P<rest>.+)$",
        aspect.strip(),
        re.IGNORECASE,
    )
    if asked:  # "Which writer was from England" -> "Was X from England?"
        return f"{asked.group('verb').capitalize()} {x} {asked.group('rest').rstrip('?')}?"
    return f"About {x}: {aspect.strip().rstrip('?')}?" if aspect.strip() else f"What is {x}?"


def _topic(ask: str) -> str:
    """'What government position was held' -> 'government position held': words to search for."""
    words = re.sub(
        r"^(?:what|who|when|where|which|how(?:\s+\w+)?)\s+|\b(?:is|was|are|were|the|a|an|did|does|do)\b",
        " ",
        ask,
        flags=re.IGNORECASE,
    )
    return " ".join(words.split()) or ask
