"""Planning, running and merging sub-tasks: pure asyncio, no model."""

import asyncio

import pytest

from hybrid_serve.agents.merge import PartialAnswer, merge
from hybrid_serve.agents.planner import Plan, SubtaskPlan, local_plan, validate_plan
from hybrid_serve.agents.prompts import EchoFilter, strip_echo
from hybrid_serve.agents.subagent import bridge_entity, fill, run_plan, short_answer
from hybrid_serve.schemas import Citation, Passage


def passage(cid: str, doc: str) -> Passage:
    return Passage(chunk_id=cid, doc_id=doc, title=doc.title(), text=f"{doc} text.", score=0.1)


def cite(n: int, p: Passage) -> Citation:
    return Citation(number=n, doc_id=p.doc_id, title=p.title, snippet=p.text, score=p.score)


A, B, C = passage("a#0", "alpha"), passage("b#0", "beta"), passage("c#0", "gamma")


def part(pid: str, text: str, sources: list[Passage], status: str = "ok") -> PartialAnswer:
    cites = [cite(i + 1, p) for i, p in enumerate(sources)]
    return PartialAnswer(pid, f"question {pid}?", text, cites, sources, status=status)


# -- merge ----------------------------------------------------------------------------------------


def test_merge_renumbers_across_parts_and_dedupes_the_same_passage():
    text, citations, sources = merge(
        [
            part("s1", "Alpha is first [1]. Beta is second [2].", [A, B]),
            part("s2", "Beta again [1]. Gamma is third [2].", [B, C]),
        ]
    )
    assert text == "Alpha is first [1]. Beta is second [2]. Beta again [2]. Gamma is third [3]."
    assert [c.number for c in citations] == [1, 2, 3]
    assert [c.doc_id for c in citations] == ["alpha", "beta", "gamma"]
    assert [s.chunk_id for s in sources] == ["a#0", "b#0", "c#0"]


def test_merge_drops_numbers_without_an_entry_and_reports_what_is_missing():
    text, citations, _ = merge(
        [
            part("s1", "Alpha [1][7]. Both [1, 9].", [A]),
            part("s2", "", [], status="timeout"),
            part("s3", "", [], status="failed"),
        ]
    )
    assert "[7]" not in text and "[9]" not in text
    assert text.startswith("Alpha [1]. Both [1].")
    assert "Not answered: question s2? (timeout); question s3? (failed)." in text
    assert len(citations) == 1


def test_merge_of_nothing_says_nothing_was_answered():
    text, citations, _ = merge([part("s1", "", [], status="timeout")])
    assert text == "Not answered: question s1? (timeout)." and citations == []


# -- planner --------------------------------------------------------------------------------------


def test_local_plan_splits_a_comparison_into_independent_subtasks():
    plan = local_plan("Who is older, Annie Morton or Terry Richardson?")
    assert [s.question for s in plan.subtasks] == [
        "When was Annie Morton born?",
        "When was Terry Richardson born?",
    ]
    assert all(not s.depends_on for s in plan.subtasks)


def test_local_plan_chains_a_bridge_question():
    plan = local_plan(
        "What government position was held by the woman who portrayed Corliss Archer "
        "in the film Kiss and Tell?"
    )
    first, second = plan.subtasks
    assert first.question.startswith("Who is the woman who portrayed Corliss Archer")
    assert second.depends_on == ["s1"] and "{s1}" in second.question
    assert any("{s1}" in q for q in second.search_queries)


def test_local_plan_keeps_a_simple_question_whole():
    plan = local_plan("When was the Eiffel Tower completed?")
    assert len(plan.subtasks) == 1 and plan.subtasks[0].question.startswith("When was the Eiffel")


def test_validate_plan_repairs_ids_and_drops_forward_or_unknown_dependencies():
    plan = validate_plan(
        Plan(
            subtasks=[
                SubtaskPlan(id="s1", question="A?", search_queries=[], depends_on=["s2"]),
                SubtaskPlan(id="s1", question="B of {s1}?", search_queries=["b"], depends_on=[]),
                SubtaskPlan(id="s3", question="C?", search_queries=["c"], depends_on=["zz"]),
            ]
        )
    )
    assert [s.id for s in plan.subtasks] == ["s1", "s2", "s3"]
    assert plan.subtasks[0].depends_on == []  # s2 comes later: no cycle possible
    assert plan.subtasks[0].search_queries == ["A?"]
    assert plan.subtasks[1].depends_on == ["s1"]  # named in the question
    assert plan.subtasks[2].depends_on == []


def test_the_next_hop_gets_the_new_name_an_answer_brings():
    assert (
        bridge_entity(
            "The romantic comedy Big Stone Gap was directed by Adriana Trigiani [1].",
            "Who directed the romantic comedy Big Stone Gap?",
        )
        == "Adriana Trigiani"
    )
    assert bridge_entity("Shirley Temple [1]. She acted.", "Who is the woman?") == "Shirley Temple"
    assert bridge_entity("Roger O. Egeberg served [2].", "Who served?") == "Roger O. Egeberg"
    assert bridge_entity("it was in 1998 [1].", "When?") == "1998"
    assert bridge_entity("no names here [1].", "Which one?") == "no names here"  # fallback


def test_dependency_answers_are_short_and_unmarked():
    assert short_answer("Shirley Temple [1]. She was an actress [2].") == "Shirley Temple"
    assert short_answer("The answer is: Janet Waldo\n\nPassage:") == "Janet Waldo"
    assert fill("What post did {s1} hold?", {"s1": "Shirley Temple"}) == (
        "What post did Shirley Temple hold?"
    )


# -- running a plan -------------------------------------------------------------------------------


def plan_of(*subtasks: tuple[str, str, list[str]]) -> Plan:
    return validate_plan(
        Plan(
            subtasks=[
                SubtaskPlan(id=i, question=q, search_queries=[q], depends_on=d)
                for i, q, d in subtasks
            ]
        )
    )


class Recorder:
    """A sub-agent that holds each sub-task until released, so concurrency is observable."""

    def __init__(self, delay: float = 0.05, fail: str = "", hang: str = "") -> None:
        self.delay, self.fail, self.hang = delay, fail, hang
        self.running = self.most = 0
        self.questions: dict[str, str] = {}
        self.order: list[str] = []
        self.cancelled: list[str] = []

    async def __call__(self, st: SubtaskPlan, question: str, queries: list[str]) -> PartialAnswer:
        self.questions[st.id] = question
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(3600 if st.id == self.hang else self.delay)
            if st.id == self.fail:
                raise RuntimeError("replica died")
            self.order.append(st.id)
            return part(st.id, f"The answer is {st.id.upper()} [1].", [A])
        except asyncio.CancelledError:
            self.cancelled.append(st.id)
            raise
        finally:
            self.running -= 1


def test_independent_subtasks_run_at_once_and_dependents_wait():
    rec = Recorder()
    plan = plan_of(("s1", "A?", []), ("s2", "B?", []), ("s3", "C?", []), ("s4", "D of {s1}?", []))
    parts = asyncio.run(run_plan(plan, rec, timeout_s=5))
    assert [p.status for p in parts] == ["ok"] * 4
    assert rec.most >= 3  # s1..s3 together
    assert rec.order.index("s4") > rec.order.index("s1")
    assert rec.questions["s4"] == "D of S1?"  # the name the answer brought, not its wording
    assert all(p.latency_ms > 0 for p in parts)


def test_timeout_and_failure_are_reported_not_raised():
    rec = Recorder(fail="s2", hang="s3")
    plan = plan_of(("s1", "A?", []), ("s2", "B?", []), ("s3", "C?", []), ("s4", "{s2} D?", []))
    parts = asyncio.run(run_plan(plan, rec, timeout_s=0.5))
    status = {p.id: p.status for p in parts}
    assert status == {"s1": "ok", "s2": "failed", "s3": "timeout", "s4": "failed"}
    by_id = {p.id: p for p in parts}
    assert "replica died" in by_id["s2"].error and "s3" in rec.cancelled
    assert "needs s2" in by_id["s4"].error and "s4" not in rec.questions  # never ran


def test_cancelling_the_request_cancels_every_running_subtask():
    rec = Recorder(delay=3600)

    async def main() -> None:
        task = asyncio.create_task(
            run_plan(plan_of(("s1", "A?", []), ("s2", "B?", [])), rec, timeout_s=60)
        )
        while rec.running < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sorted(rec.cancelled) == ["s1", "s2"] and rec.running == 0


def test_a_part_with_nothing_to_search_for_is_not_a_question_of_its_own():
    plan = local_plan("Who invented the Zorblax protocol and where?")
    assert [s.question for s in plan.subtasks] == ["Who invented the Zorblax protocol and where?"]
    two = local_plan("Who invented the Zorblax protocol and where is Tallinn?")
    assert len(two.subtasks) == 2


def test_an_initialism_is_one_bridge_entity():
    answer = "The film scored by Jerry Goldsmith is L.A. Confidential [1]."
    assert bridge_entity(answer, "Which film was scored by Jerry Goldsmith?") == "L.A. Confidential"


def test_echoed_prompt_structure_never_reaches_the_answer():
    passages = [
        Passage(chunk_id="c#0", doc_id="c", title="Configuration", text="Port 8000.", score=1.0)
    ]
    text, echoed = strip_echo(
        "Invented by Mira Quen [1]. Question: Where [2]? Answer: [3] (Configuration)", passages
    )
    assert (text, echoed) == ("Invented by Mira Quen [1].", True)
    assert strip_echo("Answer: Port 8000 [1] (Configuration).", passages) == (
        "Port 8000 [1].",
        True,
    )
    assert strip_echo("Port 8000 [1].", passages) == ("Port 8000 [1].", False)
    assert strip_echo("Answer: Port 8000 [1].", passages) == ("Port 8000 [1].", False)
    restated = "Question: Which port? Answer: Port 8000 [1]. Question: Why?"
    assert strip_echo(restated, passages) == ("Port 8000 [1].", True)
    assert strip_echo("Question: Which port?", passages) == ("", True)


def test_a_streamed_answer_is_the_same_text_as_the_unstreamed_one():
    passages = [
        Passage(chunk_id="c#0", doc_id="c", title="What hybrid-serve is", text="x", score=1.0)
    ]
    for raw in (
        "Answer: It runs on Ray [1] (What hybrid-serve is). Fine.",
        "It runs on Ray [1]. Question: Where [2]? Answer: [3] (Configuration)",
        "Costs (in USD) are reported [1] (What hybrid",
        "Plain text without anything to strip, a little longer than the hold-back.",
        "Short.",
        "Question: Which port? Answer: Port 8000 [1]. Question: Why?",
    ):
        for step in (1, 3, 7):
            echo = EchoFilter(passages)
            streamed = "".join(echo.push(raw[i : i + step]) for i in range(0, len(raw), step))
            streamed += echo.flush()
            assert streamed == strip_echo(raw, passages)[0], (raw, step)


def test_answer_stop_sequences_fit_the_openai_limit():
    from hybrid_serve.agents.prompts import ANSWER_STOP

    assert len(ANSWER_STOP) <= 4  # vLLM's OpenAI server refuses more
