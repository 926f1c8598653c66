"""Follow-up questions: the question retrieval searches for when a chat has earlier turns, and
whether those turns make the request sensitive.

"Where was it invented?" alone retrieves nothing about what "it" is. The LLM tier (or a capable
SLM) rewrites the question with the conversation in view; where there is no usable rewrite, the
previous user question is searched together with the new one, which keeps the names a follow-up
leaves out. Before any of that, the earlier turns are checked: a chat is sensitive when they are.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import replace

from hybrid_serve.agents import prompts, tracing
from hybrid_serve.agents.context import RequestContext
from hybrid_serve.agents.interfaces import DeadlineExceeded, Unavailable
from hybrid_serve.agents.policy import KEPT_LOCAL, history_in_use
from hybrid_serve.agents.retrieve import search
from hybrid_serve.agents.services import Services

_PREFIX = re.compile(
    r"^\s*(?:rewritten question|standalone question|question|rewritten|answer)\s*:\s*", re.I
)


def earlier_user_turns(history: Sequence[dict[str, str]]) -> list[str]:
    return [m["content"] for m in history if m.get("role") == "user" and m.get("content")]


def is_follow_up(history: Sequence[dict[str, str]]) -> bool:
    return bool(earlier_user_turns(history))


def with_previous(history: Sequence[dict[str, str]], question: str) -> str:
    """The previous user question, then this one: the fallback search."""
    previous = earlier_user_turns(history)
    return f"{previous[-1].strip()} {question.strip()}" if previous else question


# Words a rewrite may replace: the references it resolves, and the glue around them.
_REFERENCES = frozenset(
    "it its it's they them their theirs he him his she her hers this that these those there "
    "then one ones the a an of in on at to for by with and or is are was were be do does "
    "did".split()
)
_WORDS = re.compile(r"[a-z0-9]+", re.I)


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORDS.findall(text)} - _REFERENCES


def parse_condensed(text: str, question: str) -> str | None:
    """The model's rewrite as one question, or None when it is not one: it must be a question and
    keep what the follow-up asks (at least half of its own content words). Small models often
    answer instead of rewriting, or restate the conversation: SmolLM2-135M did in 52 % of the
    follow-ups of `benchmarks/followups.py`."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip().strip("\"'“”").strip()
    if not line.endswith("?") or len(line) > 3 * len(question) + 120:
        return None
    asked = content_words(question)
    if asked and len(asked & content_words(line)) < 0.5 * len(asked):
        return None
    return line


async def run(s: Services, ctx: RequestContext) -> None:
    """A follow-up question made self-contained (conversation.follow_ups) and used from here on,
    by retrieval and by every prompt (`ctx.req`, `ctx.searched_query`); nothing changes for a
    question that is not one."""
    if ctx.history:
        await check_history(s, ctx)
    how = s.cfg.conversation.follow_ups
    if how == "off" or not is_follow_up(ctx.history):
        return
    question = ctx.req.query
    rewritten = None
    if how == "condense" and s.cfg.conversation.condense_with == "llm":
        rewritten = await _condense_by_llm(ctx)
    elif how == "condense":
        rewritten = await _condense_by_slm(s, ctx)
    searched = rewritten or with_previous(ctx.history, question)
    ctx.condensed_by = "previous" if rewritten is None else ctx.condensed_by
    ctx.searched_query = searched
    ctx.req = ctx.req.model_copy(update={"query": searched})
    tracing.annotate({"hybrid.follow_up": True, "hybrid.condensed_by": ctx.condensed_by})


async def check_history(s: Services, ctx: RequestContext) -> None:
    """A chat is sensitive when its earlier turns are. The API is stateless, so this is decided
    from what the server can check: a pattern in any turn, a sensitive passage in what an
    earlier question the prompts carry retrieves (as it did when it was asked), or an earlier
    answer they carry that restates one. Asked only while the request could still reach a
    hosted tier; a check the deadline cuts keeps the request local."""
    if ctx.llm is None or ctx.local_only or ctx.on_premises:
        return
    sensitivity = s.policy.sensitivity
    if sensitivity.text(*(m.get("content", "") for m in ctx.history)):
        ctx.keep_local()
        return
    top_k = ctx.req.top_k

    async def earlier(turn: dict[str, str]) -> None:
        if turn["role"] == "user":
            await search(s, ctx, turn["content"], top_k)
            return
        hits = await s.retrieve(turn["content"], top_k, ctx.collections)
        if sensitivity.written_from(turn["content"], hits):
            ctx.keep_local()

    turns = history_in_use(ctx.history, prompts.HISTORY_TURNS)
    try:
        await ctx.within("follow_up", asyncio.gather(*(earlier(t) for t in turns)))
    except DeadlineExceeded:
        ctx.cut_short("follow_up")
        ctx.keep_local()


async def _condense_by_llm(ctx: RequestContext) -> str | None:
    """The LLM tier's rewrite, when the request may use it (not sensitive, the conversation
    included). None when it may not, or the call fails."""
    if ctx.llm is None:
        return None
    call = replace(ctx.call(ctx.req.query, []), history=ctx.history)
    try:
        result = await ctx.within("condense", ctx.llm.call("condense", call))
    except Unavailable as exc:
        if exc.reason == KEPT_LOCAL:
            ctx.llm_failed("condense", exc)
        return None
    except DeadlineExceeded:
        return None
    ctx.count_llm(result)
    ctx.condensed_by = "llm"
    return parse_condensed(result.output.question, ctx.req.query)


async def _condense_by_slm(s: Services, ctx: RequestContext) -> str | None:
    """The SLM's rewrite, inside the cluster; the answer must still fit after it."""
    question = ctx.req.query
    gen_req = ctx.slm_request(
        messages=prompts.condense_messages(ctx.history, question),
        max_tokens=s.cfg.conversation.condense_max_tokens,
        temperature=0.0,
        stop=["\n"],
        logprobs=False,
    )
    try:
        reserve = s.timing.fallback_s()
        gen = await ctx.within("condense", s.generate(gen_req), reserve_s=reserve)
    except DeadlineExceeded:
        ctx.cut_short("condense")
        return None
    ctx.count_slm(gen)
    ctx.condensed_by = "slm"
    return parse_condensed(gen.text, question)
