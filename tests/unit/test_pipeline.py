"""The request pipeline end to end without Ray: the real llama.cpp SLM, fixed passages, and Claude
through the real SDK against the local Messages-API server."""

import asyncio
import time

import pytest
from anthropic import AsyncAnthropic

from hybrid_serve.agents.context import RequestOptions
from hybrid_serve.agents.interfaces import DeadlineExceeded
from hybrid_serve.agents.llm_gateway import LLMGateway
from hybrid_serve.agents.pipeline import Pipeline
from hybrid_serve.bundled import bundled_gguf
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.engines.llama_cpp import LlamaCppEngine
from hybrid_serve.schemas import AnswerRequest, Passage
from tests.support.messages_api import Fault, MessagesAPIServer

PASSAGES = [
    Passage(
        chunk_id="eiffel#0",
        doc_id="eiffel",
        title="Eiffel Tower",
        score=0.03,
        dense_score=0.72,
        text="The Eiffel Tower is a wrought-iron tower in Paris. "
        "It was completed in 1889 and is 330 metres tall.",
    ),
    Passage(
        chunk_id="louvre#0",
        doc_id="louvre",
        title="Louvre",
        score=0.02,
        dense_score=0.4,
        text="The Louvre is the world's most-visited art museum, in Paris.",
    ),
]


@pytest.fixture(scope="module")
def engine():
    return LlamaCppEngine(bundled_gguf(), n_threads=2)


@pytest.fixture()
def server():
    s = MessagesAPIServer(answer_text="The Eiffel Tower was completed in 1889 [1].").start()
    yield s
    s.stop()


SETTINGS = {
    "threshold": "escalation.threshold",
    "verify": "escalation.verify",
    "verify_min_score": "escalation.verify_min_score",
    "subtask_timeout_s": "escalation.subtask_timeout_s",
    "sensitive_patterns": "policies.sensitive_patterns",
    "sensitive_tags": "policies.sensitive_tags",
    "shadow_verify_share": "escalation.shadow_verify_share",
    "auto_local_plan": "escalation.auto_local_plan",
    "on_premises": "llm.on_premises",
    "pii": "policies.pii",
}


def make_pipeline(engine, server, **settings) -> Pipeline:
    async def retrieve(query, top_k, collections=None):
        return PASSAGES[:top_k]

    client = AsyncAnthropic(api_key="sk-test", base_url=server.url)
    overrides = {"slm.max_tokens": 40, **{SETTINGS[k]: v for k, v in settings.items()}}
    cfg = HybridServeConfig.load(overrides=overrides)
    gateway = LLMGateway(cfg.llm, cfg.policies, client)
    # The gateway is the pipeline's LLMRoles here, as the handle adapter is in the cluster.
    pipe = Pipeline(retrieve, engine.generate, cfg, gateway)
    pipe.gateway = gateway
    return pipe


def answer(pipe, req, trace_id="trace-1", events=None, **options):
    return pipe.answer(RequestOptions(req, **options), trace_id, events)


def ask(pipe, emit=None, **req):
    return asyncio.run(answer(pipe, AnswerRequest(**req), "trace-1", emit))


def test_confident_answer_stays_on_the_slm(engine, server):
    r = ask(
        make_pipeline(engine, server, threshold=0.0), query="When was the Eiffel Tower completed?"
    )
    assert r.route == "slm" and not r.escalation.escalated and server.calls() == []
    assert r.usage.slm_completion_tokens > 0 and r.usage.cost_usd == 0
    assert r.usage.all_claude_cost_usd_estimate > 0


@pytest.mark.parametrize(
    ("finish", "reason"), [("repetition", "repetition"), ("recitation", "copied_passage")]
)
def test_answers_ask_the_slm_to_stop_loops_and_recitations_and_a_stopped_one_says_so(
    engine, server, finish, reason
):
    """Every answer carries the configured repetition and recitation stops, with its passages
    to check against; one the engine stopped names why among the reasons it was escalated for."""
    pipe = make_pipeline(engine, server, threshold=1.0, verify="never")
    asked = []

    async def stopped(req):
        asked.append(req)
        return (await engine.generate(req)).model_copy(update={"finish_reason": finish})

    plain = ask(pipe, query="When was the Eiffel Tower completed?")
    pipe.services.generate = stopped
    got = ask(pipe, query="When was the Eiffel Tower completed?")
    slm = pipe.services.cfg.slm
    assert asked and asked[0].repetition_detection == slm.repetition_detection
    assert asked[0].max_recited_words == slm.max_recited_words and asked[0].evidence
    assert reason in got.escalation.reasons
    assert plain.escalation.escalated and reason not in plain.escalation.reasons


def test_low_confidence_escalates_to_rewrite_then_claude(engine, server):
    pipe = make_pipeline(engine, server, threshold=1.0, verify="never")
    r = ask(pipe, query="When was the Eiffel Tower completed?")
    assert r.escalation.escalated and r.escalation.reasons
    assert r.route == "claude"  # a threshold of 1.0 is never met by the SLM's second try
    assert len(server.calls("rewrite_query")) == 1
    assert r.answer == "The Eiffel Tower was completed in 1889 [1]."
    assert r.citations[0].doc_id == "eiffel"
    assert r.usage.claude_input_tokens > 0 and r.usage.cost_usd > 0


def test_rewrite_that_helps_stays_on_the_slm(engine, server):
    pipe = make_pipeline(engine, server, threshold=0.01, verify="never")
    r = ask(pipe, query="it?")  # ambiguous: still escalates below the floor? no: tiny threshold
    assert r.route == "slm"
    pipe = make_pipeline(engine, server, threshold=0.5, verify="never")
    server.queue_tool_input(
        "rewrite_query",
        {
            "rewritten_query": "In which year was the Eiffel Tower completed?",
            "search_queries": ["Eiffel Tower completed year"],
            "steps": [],
        },
    )
    r = ask(pipe, query="what about it? eiffel when")
    if r.escalation.escalated:
        assert r.route in ("slm+rewrite", "claude")
        assert len(server.calls("rewrite_query")) == 1


def test_sensitive_query_never_reaches_claude(engine, server):
    pipe = make_pipeline(engine, server, threshold=1.0, verify="always")
    r = ask(pipe, query="When was the Eiffel Tower completed?", sensitive=True)
    assert server.calls() == []
    assert r.route == "slm" and "sensitive_local_only" in r.degraded
    assert "sensitive_kept_local" in r.escalation.reasons and not r.escalation.escalated
    pipe = make_pipeline(engine, server, threshold=1.0, sensitive_patterns=[r"\bproject\s+x\b"])
    ask(pipe, query="What is the budget of Project X?")
    assert server.calls() == []


def test_sensitive_query_escalates_only_to_an_on_premises_tier(engine, server):
    query = "When was the Eiffel Tower completed? Ask jane.doe@example.com"
    hosted = make_pipeline(engine, server, threshold=1.0, verify="never")
    r = ask(hosted, query=query, sensitive=True)
    assert server.calls() == [] and r.usage.llm_tier is None
    pipe = make_pipeline(
        engine, server, threshold=1.0, verify="never", on_premises=True, pii="keep"
    )
    r = ask(pipe, query=query, sensitive=True)
    assert r.sensitive and r.escalation.escalated and r.route == "claude"
    assert "sensitive_local_only" not in r.degraded
    assert "sensitive_kept_local" not in r.escalation.reasons
    assert r.usage.llm_tier == "on_premises" and r.usage.llm_model
    assert "jane.doe@example.com" in server.calls()[0].text  # pii keep, inside the network


def test_sensitive_document_tag_keeps_the_query_local(engine, server):
    pipe = make_pipeline(engine, server, threshold=1.0, sensitive_tags=["hr"])
    tagged = PASSAGES[0].model_copy(update={"tags": ["hr"]})

    async def retrieve(query, top_k, collections=None):
        return [tagged]

    pipe.services.retrieve = retrieve
    ask(pipe, query="When was the Eiffel Tower completed?")
    assert server.calls() == []


def test_pii_block_and_redact(engine, server):
    q = "Email bob@corp.example when the Eiffel Tower was completed"
    pipe = make_pipeline(engine, server, threshold=1.0, verify="never")
    r = ask(pipe, query=q, pii="block")
    assert server.calls() == [] and "pii_blocked" in r.degraded
    server.answer_text = "Send it to [EMAIL_1]: 1889 [1]."
    r = ask(pipe, query=q, pii="redact")
    assert server.calls() and all("bob@corp.example" not in c.text for c in server.calls())
    assert all("[EMAIL_1]" in c.text for c in server.calls())
    assert r.answer == "Send it to bob@corp.example: 1889 [1]."


def test_verification_below_the_bar_retries_once_with_the_notes(engine, server):
    pipe = make_pipeline(engine, server, threshold=1.0, verify="auto", verify_min_score=0.7)
    low = {
        "factual_support": 0.2,
        "citation_match": 0.3,
        "completeness": 0.3,
        "score": 0.3,
        "notes": "Cite the passage that gives the year.",
    }
    server.queue_tool_input("grade_answer", low, {**low, "score": 0.5, "notes": "still weak"})
    r = ask(pipe, query="When was the Eiffel Tower completed?")
    assert len(server.calls("grade_answer")) == 2  # exactly one retry
    answers = [c for c in server.calls() if "tool_choice" not in c.body]
    assert "Cite the passage that gives the year." in answers[-1].text  # the notes were used
    assert r.verification.attempts == 2 and r.verification.passed is False
    assert r.verification.score == 0.5


def test_verification_passes_first_time(engine, server):
    pipe = make_pipeline(engine, server, threshold=0.0, verify="always")
    r = ask(pipe, query="When was the Eiffel Tower completed?")
    assert r.verification.passed and r.verification.attempts == 1 and r.verification.score == 0.9
    assert r.route == "slm"


def test_a_share_of_kept_answers_is_graded_in_the_background(engine, server):
    verdicts = []

    async def on_verdict(v):
        verdicts.append(v)

    pipe = make_pipeline(engine, server, threshold=0.0, shadow_verify_share=1.0)
    pipe.services.on_verdict = on_verdict
    low = {"factual_support": 0.2, "citation_match": 0.3, "completeness": 0.3, "score": 0.3}
    server.queue_tool_input("grade_answer", {**low, "notes": "wrong year"})

    async def answer_then_wait(**req):
        r = await answer(pipe, AnswerRequest(**req), "trace-shadow")
        await pipe.shadow_idle()
        return r

    r = asyncio.run(answer_then_wait(query="When was the Eiffel Tower completed?"))
    # The response did not wait for the grade, nor did it change or carry it.
    assert r.route == "slm" and r.verification is None and r.usage.claude_calls == 0
    assert [(v.trace_id, v.score, v.wrong) for v in verdicts] == [("trace-shadow", 0.3, True)]
    assert verdicts[0].confidence == r.confidence and verdicts[0].threshold == 0.0
    assert len(server.calls("grade_answer")) == 1
    assert pipe.gateway.ledger.totals.requests == 1  # the grade is not a request of its own
    assert pipe.gateway.ledger.per_request == {}
    # Never for a sensitive request, nor for an answer that was not kept by the threshold.
    asyncio.run(answer_then_wait(query="When was the Eiffel Tower completed?", sensitive=True))
    asyncio.run(answer_then_wait(query="When was the Eiffel Tower completed?", mode="slm"))
    assert len(verdicts) == 1 and len(server.calls("grade_answer")) == 1


def test_claude_down_degrades_but_answers(engine, server):
    server.inject(*[Fault(status=529)] * 20)
    pipe = make_pipeline(engine, server, threshold=1.0, verify="auto")
    r = ask(pipe, query="When was the Eiffel Tower completed?")
    assert r.answer and r.route == "slm" and "claude_error" in r.degraded


def test_mode_slm_and_mode_claude(engine, server):
    pipe = make_pipeline(engine, server, threshold=1.0, verify="never")
    assert ask(pipe, query="When was the Eiffel Tower completed?", mode="slm").route == "slm"
    assert server.calls() == []
    r = ask(pipe, query="When was the Eiffel Tower completed?", mode="claude")
    assert r.route == "claude" and r.escalation.reasons == ["mode_claude"]


def test_a_claude_prompt_past_the_tiers_context_is_answered_from_the_best_passages(engine, server):
    """A tier with a small context (an on-premises model) gets the best passages that fit, not a
    prompt it would refuse; the answer cites only those and says it was trimmed."""
    text = "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. " * 14
    many = [
        Passage(chunk_id=f"d{i}#0", doc_id=f"d{i}", title=f"Doc {i}", text=text, score=1 - i / 100)
        for i in range(30)
    ]

    async def retrieve(query, top_k, collections=None):
        return many[:top_k]

    client = AsyncAnthropic(api_key="sk-test", base_url=server.url)
    cfg = HybridServeConfig.load(
        overrides={"slm.max_tokens": 40, "escalation.verify": "never", "llm.context_tokens": 3000}
    )
    gateway = LLMGateway(cfg.llm, cfg.policies, client)
    pipe = Pipeline(retrieve, engine.generate, cfg, gateway)
    r = ask(pipe, query="When was the Eiffel Tower completed?", mode="claude", top_k=30)
    assert r.route == "claude" and "prompt_trimmed" in r.degraded
    [call] = [c for c in server.calls() if c.path.split("?")[0] == "/v1/messages"]
    shown = call.body["messages"][0]["content"]
    assert "[1] (Doc 0)" in shown and "[30]" not in shown
    kept = max(i for i in range(1, 31) if f"[{i}] (Doc {i - 1})" in shown)
    assert r.citations and all(int(c.doc_id[1:]) < kept for c in r.citations)


TWO_PART_PLAN = {
    "subtasks": [
        {
            "id": "s1",
            "question": "When was the Eiffel Tower completed?",
            "search_queries": ["Eiffel Tower completed"],
            "depends_on": [],
        },
        {
            "id": "s2",
            "question": "What is the Louvre?",
            "search_queries": ["Louvre museum"],
            "depends_on": [],
        },
    ]
}


def test_decompose_plans_with_claude_and_merges_cited_subanswers(engine, server):
    pipe = make_pipeline(engine, server, verify="always")
    server.queue_tool_input("plan_subtasks", TWO_PART_PLAN)
    events = []

    async def emit(event):
        events.append((event.name, event.data()))

    r = ask(
        pipe,
        emit,
        query="When was the Eiffel Tower completed, and what is the Louvre?",
        mode="decompose",
    )
    assert r.route == "decomposed" and r.escalation.escalated
    assert r.escalation.reasons == ["mode_decompose"]
    assert [s.id for s in r.subtasks] == ["s1", "s2"]
    assert all(s.status == "ok" and s.latency_ms > 0 for s in r.subtasks)
    assert len(server.calls("plan_subtasks")) == 1 and len(server.calls("grade_answer")) == 1
    numbers = sorted({int(n) for n in __import__("re").findall(r"\[(\d+)\]", r.answer)})
    assert numbers == [c.number for c in r.citations]  # no number without an entry
    assert len({c.number for c in r.citations}) == len(r.citations)
    names = [n for n, _ in events]
    assert names[0] == "plan" and names.count("subtask") == 2
    assert names.index("answer") > max(i for i, n in enumerate(names) if n == "subtask")
    assert names[-1] == "verification"
    streamed = "".join(d["delta"] for n, d in events if n == "answer")
    assert streamed == r.answer


def test_decompose_without_claude_uses_the_local_planner(engine, server):
    pipe = make_pipeline(engine, server, verify="always")
    r = ask(
        pipe,
        query="Which is older, the Eiffel Tower or the Louvre?",
        mode="decompose",
        sensitive=True,
    )
    assert server.calls() == []
    assert r.route == "decomposed" and len(r.subtasks) == 2 and not r.escalation.escalated
    assert "local_planner" in r.escalation.reasons and "sensitive_local_only" in r.degraded


def test_auto_mode_decomposes_a_comparison(engine, server):
    pipe = make_pipeline(engine, server, verify="never")
    server.queue_tool_input("plan_subtasks", TWO_PART_PLAN)
    r = ask(pipe, query="Which is older, the Eiffel Tower or the Louvre?")
    assert r.route == "decomposed" and r.escalation.reasons == ["complex_query"]


def test_auto_splits_with_the_local_planner_only_if_configured(engine, server):
    q = "Which is older, the Eiffel Tower or the Louvre?"
    pipe = make_pipeline(engine, server, verify="never", auto_local_plan=True)
    local = ask(pipe, query=q, sensitive=True)
    assert local.route == "decomposed" and "local_planner" in local.escalation.reasons
    whole = ask(make_pipeline(engine, server, verify="never"), query=q, sensitive=True)
    assert whole.route == "slm" and not whole.subtasks
    # Claude's plans are still followed
    server.queue_tool_input("plan_subtasks", TWO_PART_PLAN)
    planned = ask(make_pipeline(engine, server, verify="never"), query=q)
    assert planned.route == "decomposed" and planned.escalation.reasons == ["complex_query"]


def test_subtask_timeout_gives_a_partial_answer(engine, server):
    pipe = make_pipeline(engine, server, verify="never", subtask_timeout_s=0.001)
    server.queue_tool_input("plan_subtasks", TWO_PART_PLAN)
    r = ask(
        pipe, query="When was the Eiffel Tower completed, and what is the Louvre?", mode="decompose"
    )
    assert r.route == "decomposed" and {s.status for s in r.subtasks} == {"timeout"}
    assert "Not answered" in r.answer and r.confidence == 0.0


def test_a_hung_claude_is_cut_at_the_deadline_and_the_slm_answers(engine, server):
    server.always = Fault(delay_s=30)
    pipe = make_pipeline(engine, server, threshold=1.0, verify="always")
    started = time.monotonic()
    r = asyncio.run(
        answer(
            pipe,
            AnswerRequest(query="When was the Eiffel Tower completed?", mode="claude"),
            "trace-d",
            timeout_s=3.0,
        )
    )
    assert time.monotonic() - started < 3.5
    assert r.route == "slm" and r.answer and "deadline" in r.degraded
    assert r.deadline.cut == ["claude", "verify"] or r.deadline.cut == ["claude"]
    assert r.deadline.used_s <= 3.0 and pipe.gateway.ledger.reserved == 0


def test_a_late_claude_answer_within_the_deadline_wins_over_the_hedge(engine, server):
    """Late in the deadline the SLM's answer is started beside a pending Claude call; Claude's
    answer, when it comes in time, is still the one returned."""
    server.always = Fault(delay_s=1.5)
    pipe = make_pipeline(engine, server, verify="never")
    r = asyncio.run(
        answer(
            pipe,
            AnswerRequest(query="When was the Eiffel Tower completed?", mode="claude"),
            "trace-h",
            timeout_s=4.0,
        )
    )
    assert r.route == "claude" and "deadline" not in r.degraded and r.deadline.cut == []
    assert len(server.calls()) == 1 and pipe.gateway.ledger.reserved == 0


def test_nothing_ready_by_the_deadline_raises(engine, server):
    pipe = make_pipeline(engine, server)
    with pytest.raises(DeadlineExceeded) as e:
        asyncio.run(answer(pipe, AnswerRequest(query="q?"), "t", timeout_s=0.01))
    assert e.value.step == "retrieve"


FOLLOW_UP = [
    {"role": "user", "content": "Tell me about the Eiffel Tower."},
    {"role": "assistant", "content": "It is a wrought-iron tower in Paris [1]."},
]


def test_claude_rewrites_a_follow_up_unless_the_conversation_is_sensitive(engine, server):
    pipe = make_pipeline(
        engine, server, threshold=0.0, verify="never", sensitive_patterns=[r"(?i)payroll"]
    )
    server.queue_tool_input("condense_question", {"question": "When was the Eiffel Tower built?"})
    req = AnswerRequest(query="When was it built?", mode="auto")
    r = asyncio.run(answer(pipe, req, "trace-f", history=FOLLOW_UP))
    assert r.searched_query == "When was the Eiffel Tower built?"
    (call,) = server.calls("condense_question")
    assert "wrought-iron tower in Paris" in call.text  # the conversation went with it
    assert r.usage.claude_input_tokens > 0
    server.reset()
    secret = [{"role": "user", "content": "Whose payroll is in the Eiffel Tower file?"}]
    r = asyncio.run(answer(pipe, req, "trace-g", history=secret))
    assert server.calls() == [] and r.searched_query  # rewritten locally, or the fallback
    assert r.sensitive  # a pattern in the history keeps the whole request inside


# -- data stays where it belongs on every path ------------------------------------------------

SECRET = Passage(
    chunk_id="falcon#0",
    doc_id="falcon",
    title="Falcon",
    text="The launch code of the rocket is ZEBRA-7731.",
    tags=["Confidential"],  # tags match whatever their case
)


def over(engine, server, **settings) -> Pipeline:
    """A pipe whose retrieval finds the confidential passage only for rocket questions."""
    pipe = make_pipeline(engine, server, **settings)

    async def retrieve(query, top_k, collections=None):
        return [SECRET] if "rocket" in query.lower() else PASSAGES[:top_k]

    pipe.services.retrieve = retrieve
    return pipe


def sent(server) -> str:
    """Everything that reached the LLM tier."""
    return " ".join(c.text for c in server.calls())


def test_a_rewrite_that_retrieves_a_confidential_document_stays_local(engine, server):
    pipe = over(engine, server, threshold=1.0, verify="always")
    rewrite = {
        "rewritten_query": "What is the rocket's launch code?",
        "search_queries": ["rocket launch code"],
        "steps": [],
    }
    server.queue_tool_input("rewrite_query", rewrite)
    r = ask(pipe, query="When was the Eiffel Tower completed?")
    assert len(server.calls()) == 1 and server.calls("rewrite_query")  # public until then
    assert "ZEBRA" not in sent(server) and "launch code of the rocket" not in sent(server)
    assert r.sensitive and "sensitive_local_only" in r.degraded
    assert r.route != "claude" and r.verification is None


def test_subtasks_that_retrieve_a_confidential_document_keep_the_merge_local(engine, server):
    pipe = over(engine, server, verify="always", shadow_verify_share=1.0)
    plan = {
        "subtasks": [
            TWO_PART_PLAN["subtasks"][0],
            {
                "id": "s2",
                "question": "What is the rocket's launch code?",
                "search_queries": ["rocket launch code"],
                "depends_on": [],
            },
        ]
    }
    server.queue_tool_input("plan_subtasks", plan)
    r = ask(pipe, query="When was the Eiffel Tower completed, and what else?", mode="decompose")
    asyncio.run(pipe.shadow_idle())
    assert r.route == "decomposed" and r.sensitive and "sensitive_local_only" in r.degraded
    assert [c.body["tool_choice"]["name"] for c in server.calls()] == ["plan_subtasks"]
    assert "ZEBRA" not in sent(server)


def test_a_follow_up_to_an_answer_from_a_confidential_document_stays_local(engine, server):
    pipe = over(engine, server, threshold=1.0, verify="always")
    history = [
        {"role": "user", "content": "What does the Falcon file say?"},
        {"role": "assistant", "content": "The launch code of the rocket is ZEBRA-7731 [1]."},
    ]
    req = AnswerRequest(query="And when was the Eiffel Tower completed?")
    r = asyncio.run(answer(pipe, req, "trace-h", history=history))
    assert server.calls() == [] and r.sensitive  # not even the condense call
    # The same conversation about public documents is rewritten by Claude as before.
    public = [
        {"role": "user", "content": "Tell me about the Louvre."},
        {"role": "assistant", "content": "The Louvre is an art museum in Paris [1]."},
    ]
    r = asyncio.run(answer(pipe, req, "trace-i", history=public))
    assert server.calls("condense_question") and not r.sensitive


def test_a_follow_up_whose_earlier_question_retrieved_a_confidential_document(engine, server):
    pipe = over(engine, server, threshold=1.0, verify="always")
    history = [
        {"role": "user", "content": "What is the rocket's code?"},
        {"role": "assistant", "content": "I cannot say."},
    ]
    req = AnswerRequest(query="When was the Eiffel Tower completed?")
    r = asyncio.run(answer(pipe, req, "trace-j", history=history))
    assert server.calls() == [] and r.sensitive
