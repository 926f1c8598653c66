"""LLMGateway with the real anthropic SDK against the local Messages-API server."""

import asyncio
import json
import time

import pytest
from anthropic import AsyncAnthropic

from hybrid_serve.agents import pricing
from hybrid_serve.agents.interfaces import LLMCall, Unavailable
from hybrid_serve.agents.llm_gateway import LLMGateway
from hybrid_serve.agents.roles import ROLES, Grade, RewritePlan, tool_spec
from hybrid_serve.config import LLMConfig, PolicyConfig
from hybrid_serve.schemas import Passage
from tests.support.messages_api import Fault, MessagesAPIServer

PASSAGES = [Passage(chunk_id="a#0", doc_id="a", title="Paris", text="Paris is in France.")]


@pytest.fixture()
def server():
    s = MessagesAPIServer().start()
    yield s
    s.stop()


def gateway(server, **claude) -> LLMGateway:
    cfg = LLMConfig(**claude)
    client = AsyncAnthropic(api_key="sk-test", base_url=server.url)
    return LLMGateway(cfg, PolicyConfig(pii_names=["Alice Smith"]), client)


def run(coro):
    return asyncio.run(coro)


def ask(g: LLMGateway, role: str, rid: str, query: str, pii: str = "redact", answer: str = ""):
    return g.call(role, LLMCall(rid, query, PASSAGES, pii, answer=answer))


def test_rewrite_is_structured_through_tool_use(server):
    server.queue_tool_input(
        "rewrite_query",
        {
            "rewritten_query": "Which country is Paris in?",
            "search_queries": ["Paris country"],
            "steps": [],
        },
    )
    g = gateway(server)
    result = run(ask(g, "rewrite", "r1", "paris where", "redact"))
    assert isinstance(result.output, RewritePlan)
    assert result.output.search_queries == ["Paris country"]
    body = server.calls("rewrite_query")[0].body
    tool = body["tools"][0]
    assert tool["strict"] is True and tool["input_schema"]["additionalProperties"] is False
    assert body["tool_choice"] == {"type": "tool", "name": "rewrite_query"}
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert result.usage.input_tokens > 0 and result.usage.cost_usd > 0


def test_prompt_cache_reads_are_counted_and_priced(server):
    g = gateway(server)
    first = run(ask(g, "verify", "r", "q", "redact", answer="a [1]"))
    second = run(ask(g, "verify", "r", "q", "redact", answer="a [1]"))
    assert isinstance(second.output, Grade)
    assert first.usage.cache_write_tokens > 0 and second.usage.cache_read_tokens > 0
    assert g.ledger.totals.cache_read_tokens == second.usage.cache_read_tokens


def test_retries_honour_retry_after(server):
    server.inject(Fault(status=429, retry_after="1"), Fault(status=529))
    g = gateway(server)
    result = run(ask(g, "answer", "r", "q", "redact"))
    assert result.usage.attempts == 3 and g.retries == 2
    t = [r.at for r in server.calls()]
    assert t[1] - t[0] >= 0.95  # waited for retry-after, not the short backoff


def test_too_long_retry_after_fails_fast(server):
    server.inject(Fault(status=429, retry_after="120"))
    with pytest.raises(Unavailable) as e:
        run(ask(gateway(server), "answer", "r", "q", "redact"))
    assert e.value.reason == "claude_rate_limited" and len(server.calls()) == 1


def test_timeouts_and_resets_are_retried(server):
    server.inject(Fault(delay_s=1.5), Fault(reset=True))
    g = gateway(server, timeout_s=0.5)
    result = run(ask(g, "answer", "r", "q", "redact"))
    assert result.usage.attempts == 3 and "answer" in result.output


def test_529_storm_opens_the_circuit_and_it_recovers(server):
    server.inject(*[Fault(status=529)] * 6)
    g = gateway(server, max_retries=1, circuit_failures=3, circuit_cooldown_s=0.5)
    reasons = []
    for _ in range(4):
        try:
            run(ask(g, "answer", "r", "q", "redact"))
        except Unavailable as exc:
            reasons.append(exc.reason)
    assert reasons == ["claude_error"] * 3 + ["claude_circuit_open"]
    sent = len(server.calls())
    assert sent == 6  # the open circuit sent nothing
    assert g.status()["circuit"] == "open"
    time.sleep(0.6)
    assert run(ask(g, "answer", "r", "q", "redact")).output  # half-open trial succeeds
    assert g.status()["circuit"] == "closed"


def test_malformed_tool_output_is_a_clear_failure(server):
    server.inject(Fault(malformed=True))
    with pytest.raises(Unavailable) as e:
        run(ask(gateway(server), "verify", "r", "q", "redact", answer="a"))
    assert e.value.reason == "claude_malformed_output"


def test_a_tool_call_written_as_text_is_recovered_or_fails_clearly(server):
    """Open models served without enforced tool calls answer in text: the JSON is taken from
    it (fenced, bare, wrapped, cut short), and text without a usable one is a named failure."""
    g = gateway(server)
    grade = {
        "factual_support": 0.8,
        "citation_match": 0.7,
        "completeness": 0.9,
        "score": 0.8,
        "notes": "fine",
    }
    wrapped = json.dumps({"name": "grade_answer", "arguments": json.dumps(grade)})
    replies = (
        "Here is my grade:\n```json\n{input}\n```",
        "Sure! {input} Hope this helps.",
        wrapped,
        json.dumps(grade)[:-3],  # cut short in the notes: the partial parser completes it
    )

    async def calls() -> list[float | str]:  # one event loop: the client's pool lives in it
        out: list[float | str] = []
        for reply in [*replies, "I cannot grade this.", '{"score": "high"}']:
            server.queue_tool_input("grade_answer", grade)
            server.inject(Fault(as_text=reply))
            try:
                out.append((await ask(g, "verify", "r", "q", "redact", answer="a")).output.score)
            except Unavailable as exc:
                out.append(exc.reason)
        return out

    assert run(calls()) == [0.8] * len(replies) + ["claude_malformed_output"] * 2
    assert g.status()["recovered_tool_calls"] == len(replies)
    assert len(server.calls("grade_answer")) == len(replies) + 2  # nothing retried


def test_budget_exhaustion_stops_calls(server):
    g = gateway(server, daily_budget_usd=0.01, request_budget_usd=0.01)
    with pytest.raises(Unavailable) as e:
        run(ask(g, "answer", "r", "q", "redact"))  # worst case: 1024 output tokens > budget
    assert e.value.reason == "budget_exhausted" and server.calls() == []
    g2 = gateway(server, daily_budget_usd=1.0, request_budget_usd=0.012)
    spent = 0.0
    with pytest.raises(Unavailable) as e:
        for _ in range(200):
            spent += run(ask(g2, "rewrite", "same-request", "q", "redact")).usage.cost_usd
    assert e.value.reason == "budget_exhausted"
    assert 0 < spent <= 0.012 and g2.ledger.spent_today == pytest.approx(spent)


def test_pii_block_never_sends_and_redact_sends_placeholders(server):
    g = gateway(server)
    query = "Email alice@corp.com about Alice Smith's card 4111 1111 1111 1111"
    with pytest.raises(Unavailable) as e:
        run(ask(g, "rewrite", "r", query, "block"))
    assert e.value.reason == "pii_blocked" and server.calls() == []
    server.answer_text = "Write to [EMAIL_1] about [NAME_1] [1]."
    result = run(ask(g, "answer", "r", query, "redact"))
    sent = server.calls()[0].text
    for secret in ["alice@corp.com", "Alice Smith", "4111 1111 1111 1111"]:
        assert secret not in sent
    assert "[EMAIL_1]" in sent and "[CARD_1]" in sent
    assert result.output == "Write to alice@corp.com about Alice Smith [1]."


def test_no_key_is_unavailable_without_a_call():
    g = LLMGateway(LLMConfig(), PolicyConfig(), None, unavailable_reason="no_api_key")
    with pytest.raises(Unavailable) as e:
        run(ask(g, "answer", "r", "q", "redact"))
    assert e.value.reason == "claude_unavailable"
    assert g.status()["available"] is False and g.status()["reason"] == "no_api_key"


def test_default_model_is_current():
    from anthropic._data import DEPRECATED_MODELS
    from anthropic.types.model_param import ModelParam

    model = LLMConfig().model
    assert model not in DEPRECATED_MODELS
    assert model in ModelParam.__args__[0].__args__ and "sonnet" in model


def test_a_self_hosted_tier_costs_its_gpu_time_and_may_keep_pii(server):
    g = gateway(server, price_model="gpu_hours", gpu_hour_usd=36.0, on_premises=True)
    query = "Email alice@corp.com about the budget"
    result = run(ask(g, "answer", "r", query, "keep"))
    assert "alice@corp.com" in server.calls()[0].text  # keep: sent as is, nothing redacted
    assert not result.redacted and result.model
    u = result.usage
    assert 0 < u.shared_seconds <= u.seconds  # alone, its share is its time at the tier
    assert u.cost_usd == pytest.approx(u.shared_seconds * 36.0 / 3600)
    assert g.status()["tier"] == "on_premises"
    # GPU time is known only after a call: nothing is reserved, the spend is settled after.
    assert pricing.reserve_estimate(g.cfg, 10_000, 1_000) == 0.0
    assert g.ledger.totals.cost_usd == pytest.approx(u.cost_usd)


def test_tier_client_sends_the_key_as_the_endpoint_expects(server, monkeypatch):
    from hybrid_serve.agents.llm_gateway import tier_client

    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    assert tier_client(None, None) == (None, "no_api_key")  # Anthropic's API needs a key
    hosted, _ = tier_client(None, "sk-ant-1")
    assert hosted.api_key == "sk-ant-1"
    # Another Messages-API server: the key as the bearer token vLLM's --api-key checks.
    client, reason = tier_client(server.url, "tier-key")
    assert reason is None
    g = LLMGateway(LLMConfig(), PolicyConfig(), client)
    run(ask(g, "answer", "r", "q"))
    assert server.calls()[0].headers["authorization"] == "Bearer tier-key"
    # A tier without a key is still usable (vLLM started without --api-key).
    client, reason = tier_client(server.url, None)
    assert client is not None and reason is None


def test_doctor_reaches_a_tier_at_its_base_url(server, monkeypatch):
    from hybrid_serve.cluster.doctor import check_claude
    from hybrid_serve.config import HybridServeConfig

    monkeypatch.setenv("MY_TIER_KEY", "tier-key")
    cfg = HybridServeConfig.load(
        overrides={
            "llm.base_url": server.url,
            "llm.api_key_env": "MY_TIER_KEY",
            "llm.on_premises": True,
        }
    )
    check = check_claude(cfg)
    assert check.status == "ok" and "(on_premises)" in check.detail, check
    assert server.calls()[0].headers["authorization"] == "Bearer tier-key"
    deployed = HybridServeConfig.load(overrides={"claude.deploy.enabled": True})
    assert "deployed by the cluster" in check_claude(deployed).detail


def test_length_bounds_are_in_the_full_schema_and_cut_to_not_rejected():
    from hybrid_serve.agents.planner import Plan

    full = tool_spec("grade_answer", Grade, full_schema=True)["input_schema"]
    assert full["properties"]["notes"]["maxLength"] == 500  # what vLLM enforces while decoding
    hint = tool_spec("grade_answer", Grade)["input_schema"]
    assert "maxLength" not in hint["properties"]["notes"]  # Anthropic's strict subset
    long = {"id": "s1-too-long", "question": "q" * 400, "search_queries": ["x" * 300] * 5}
    plan = Plan.model_validate({"subtasks": [{**long, "depends_on": []}]})
    st = plan.subtasks[0]  # a model that overshoots is cut to the bounds, not failed
    assert len(st.question) == 300 and len(st.search_queries) == 3 and st.id == "s1-too-l"
    assert all(len(q) == 120 for q in st.search_queries)


# -- the prompt fitted to the tier's context -------------------------------------------------

SMALL = "small-tier-model"


def long_passages(n: int, chars: int = 1000) -> list[Passage]:
    sentence = "The harbour bridge carries eight lanes of traffic over the water. "
    text = (sentence * (chars // len(sentence) + 1))[:chars]
    return [
        Passage(chunk_id=f"d{i}#0", doc_id=f"d{i}", title=f"Doc {i}", text=f"{i}: {text}")
        for i in range(n)
    ]


def sent(server) -> list:
    return [r for r in server.calls() if r.path.split("?")[0] == "/v1/messages"]


def counted(server) -> list:
    return [r for r in server.calls() if "count_tokens" in r.path]


def small_tier(server, window: int = 3000, **claude) -> LLMGateway:
    """A tier at a base URL whose model list says its context window, as vLLM's does."""
    server.context_tokens[SMALL] = window
    return gateway(server, model=SMALL, base_url=server.url, **claude)


def test_a_prompt_past_the_tiers_context_keeps_the_best_passages_that_fit(server):
    from tests.support.messages_api import count_tokens

    g = small_tier(server, window=3000)
    passages = long_passages(40)
    result = run(g.call("answer", LLMCall("r", "Which bridge?", passages, "redact")))
    kept = result.passages_used
    assert kept is not None and 1 <= kept < 40 and g.status()["fitted_calls"] == 1
    [message] = sent(server)
    room = 3000 - 1024  # the answer role's max_tokens
    assert count_tokens(message.body) <= room
    prompt = message.body["messages"][0]["content"]
    assert f"[{kept}] (Doc {kept - 1})" in prompt and f"[{kept + 1}]" not in prompt
    # The best passages are the ones kept, and one more would not have fitted.
    bigger = LLMCall("r2", "Which bridge?", passages[: kept + 1], "redact")
    bigger_user = ROLES["answer"].user(bigger)
    assert (
        count_tokens({**message.body, "messages": [{"role": "user", "content": bigger_user}]})
        > room
    )
    # A binary search: a handful of counts for 40 passages, not one per passage.
    assert 2 <= len(counted(server)) <= 8


def test_a_prompt_sure_to_fit_is_never_counted(server):
    g = small_tier(server, window=100_000)
    result = run(
        g.call(
            "verify",
            LLMCall("r", "Which bridge?", long_passages(5), "redact", answer="The bridge [1]."),
        )
    )
    assert result.passages_used is None and counted(server) == [] and len(sent(server)) == 1


def test_older_chat_turns_go_before_any_passage(server):
    g = small_tier(server, window=1500)
    history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 300}
        for i in range(6)
    ]
    call = LLMCall("r", "And its length?", long_passages(1, 200), "redact", history=history)
    result = run(g.call("condense", call))
    assert result.history_dropped > 0 and result.passages_used == 1
    prompt = sent(server)[0].body["messages"][0]["content"]
    assert "turn 5" in prompt and "turn 0" not in prompt  # the latest turns stay


def test_a_question_too_long_for_the_tier_is_not_sent(server):
    g = small_tier(server, window=2000)
    call = LLMCall("r", "Which bridge? " * 400, long_passages(3), "redact")
    with pytest.raises(Unavailable) as err:
        run(g.call("answer", call))
    assert err.value.reason == "llm_prompt_too_long" and "2000 tokens" in err.value.detail
    assert sent(server) == []  # counted, never generated from


def test_a_tier_that_cannot_count_is_held_to_the_byte_bound(server):
    from hybrid_serve.agents.llm_gateway import byte_bound

    g = small_tier(server, window=4000)
    server.counts = False  # a Messages-API server without count_tokens
    result = run(g.call("answer", LLMCall("r", "Which bridge?", long_passages(40), "redact")))
    assert result.passages_used is not None and result.passages_used >= 1
    [message] = sent(server)
    assert byte_bound(message.body) <= 4000 - 1024
    assert len(counted(server)) == 1  # asked once, then not again
    run(g.call("answer", LLMCall("r2", "Which bridge?", long_passages(40), "redact")))
    assert len(counted(server)) == 1


# -- the concurrency cap: priority and deadlines ---------------------------------------------


def test_interactive_calls_go_before_batch_calls_and_a_hopeless_one_is_refused_at_once(server):
    server.always = Fault(delay_s=0.4)
    g = gateway(server, max_concurrency=1)

    def call(rid: str, priority: str, deadline: float | None = None) -> LLMCall:
        return LLMCall(rid, rid, PASSAGES, "redact", priority=priority, deadline=deadline)

    async def scenario() -> list[str]:
        await g.call("answer", call("warm", "interactive"))  # measures the service time
        first = asyncio.create_task(g.call("answer", call("first", "interactive")))
        await asyncio.sleep(0.1)
        batch = asyncio.create_task(g.call("answer", call("batch", "batch")))
        await asyncio.sleep(0.05)
        interactive = asyncio.create_task(g.call("answer", call("interactive", "interactive")))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:  # 3 calls of 0.4 s ahead, 1 s left
            await g.call("answer", call("late", "batch", deadline=time.time() + 1.0))
        assert err.value.reason == "claude_overloaded" and err.value.retry_after_s >= 1
        assert time.monotonic() - started < 0.2  # refused at once, not at its deadline
        await asyncio.gather(first, batch, interactive)
        return [r.body["messages"][0]["content"] for r in server.calls()]

    order = run(scenario())
    asked = [next(q for q in ("warm", "first", "batch", "interactive") if q in m) for m in order]
    assert asked == ["warm", "first", "interactive", "batch"]
    assert g.breaker.state == "closed" and g.status()["queue"]["refused"]["batch"] == 1


def test_a_self_hosted_tier_charges_calls_that_ran_together_their_share_of_its_time(server):
    """A batching tier priced by the hour: four calls side by side for 0.4 s cost the tier
    0.4 s, not 1.6 s — each is charged a quarter, and the charges sum to the busy time."""
    server.always = Fault(delay_s=0.4)
    g = gateway(server, price_model="gpu_hours", gpu_hour_usd=3600.0, max_concurrency=4)

    async def scenario():
        calls = [ask(g, "answer", f"r{i}", f"question {i}") for i in range(4)]
        return await asyncio.gather(*calls)

    results = run(scenario())
    walls = [r.usage.seconds for r in results]
    costs = [r.usage.cost_usd for r in results]  # $1 a second
    busy = g.status()["tier_time"]["busy_seconds"]
    assert min(walls) >= 0.4 and sum(costs) < 0.5 * sum(walls)
    assert sum(costs) == pytest.approx(busy, rel=0.05)
    assert all(c == pytest.approx(busy / 4, rel=0.2) for c in costs)
