"""Running a plan: every sub-task is a sub-agent with its own retrieval and SLM call. Independent
sub-tasks run at once; a dependent one waits only for the answers it names, which are written into
its question. A sub-task that fails or runs past its timeout is reported, not raised: the merge
works with what succeeded. Cancelling `run_plan` cancels every sub-task still running."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

from hybrid_serve.agents.citations import strip_markers
from hybrid_serve.agents.merge import PartialAnswer
from hybrid_serve.agents.planner import REF, Plan, SubtaskPlan
from hybrid_serve.text import NAME, NUMBER, split_sentences

# (the sub-task, its question and search queries with dependencies filled in) -> its answer
RunSubtask = Callable[[SubtaskPlan, str, list[str]], Awaitable[PartialAnswer]]
OnDone = Callable[[PartialAnswer], Awaitable[None]]

ANSWER_CHARS = 160
_PREAMBLE = re.compile(r"^(?:the\s+)?answer(?:\s+is\s*:?|\s*:)\s*", re.IGNORECASE)


def short_answer(text: str) -> str:
    """An answer's first sentence without markers: the next hop's fallback when no name is new."""
    text = strip_markers(text)
    text = _PREAMBLE.sub("", text.split("\n", 1)[0]).strip()
    first = next(iter(split_sentences(text)), "").rstrip(".!? ")
    return first if len(first) <= ANSWER_CHARS else first[: ANSWER_CHARS - 1].rstrip() + "…"


# A name or a number ("… in 1998"), whichever comes first.
_ENTITY = re.compile(f"{NAME.pattern}|{NUMBER.pattern}")


def bridge_entity(answer: str, question: str) -> str:
    """The new name an answer brings, for the next hop: the first capitalised span whose words
    the question did not already have ("… directed by Adriana Trigiani" -> "Adriana Trigiani").
    Falls back to the short answer, so the next hop asks about the answer, not its wording."""
    text = _PREAMBLE.sub("", strip_markers(answer).split("\n", 1)[0]).strip()
    asked = {w.lower() for w in re.findall(r"[\w'’]+", question)}
    for m in _ENTITY.finditer(text):
        words = [w for w in re.findall(r"[\w'’]+", m.group(0)) if w.lower() not in {"the", "a"}]
        if words and any(w.lower() not in asked for w in words):
            return m.group(0).strip(" .,")
    return short_answer(answer)


def fill(text: str, answers: dict[str, str]) -> str:
    return REF.sub(lambda m: answers.get(m.group(1), m.group(0)), text)


async def run_plan(
    plan: Plan, run: RunSubtask, timeout_s: float, on_done: OnDone | None = None
) -> list[PartialAnswer]:
    """Parts in plan order. `timeout_s` bounds each sub-task's own work, not its wait for others."""
    loop = asyncio.get_running_loop()
    done: dict[str, asyncio.Future[PartialAnswer]] = {
        st.id: loop.create_future() for st in plan.subtasks
    }

    async def one(st: SubtaskPlan) -> PartialAnswer:
        answers: dict[str, str] = {}
        missing: list[str] = []
        for dep in st.depends_on:
            part = await done[dep]
            if part.status == "ok" and part.text.strip():
                answers[dep] = bridge_entity(part.text, part.question)
            else:
                missing.append(dep)
        question = fill(st.question, answers)
        start = time.perf_counter()
        if missing:
            part = PartialAnswer(st.id, question, "", [], [], status="failed")
            part.error = f"needs {', '.join(missing)}, which did not answer"
        else:
            queries = [fill(q, answers) for q in st.search_queries]
            try:
                part = await asyncio.wait_for(run(st, question, queries), timeout_s)
            except TimeoutError:
                part = PartialAnswer(st.id, question, "", [], [], status="timeout")
                part.error = f"no answer within {timeout_s:g} s"
            except Exception as exc:  # one sub-agent's failure is reported, not raised
                part = PartialAnswer(st.id, question, "", [], [], status="failed")
                part.error = f"{type(exc).__name__}: {exc}"[:300]
                part.exception = exc
        part.latency_ms = round((time.perf_counter() - start) * 1000, 1)
        done[st.id].set_result(part)
        if on_done is not None:
            await on_done(part)
        return part

    async with asyncio.TaskGroup() as group:  # cancelled as a whole when the caller is
        tasks = [group.create_task(one(st)) for st in plan.subtasks]
    return [t.result() for t in tasks]
