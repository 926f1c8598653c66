"""The privacy gate on its own, and inside the gateway with the real SDK against the recording
Messages-API server: what it refuses never reaches the wire."""

import asyncio

import pytest
from anthropic import AsyncAnthropic

from hybrid_serve.agents.interfaces import LLMCall, Unavailable
from hybrid_serve.agents.llm_gateway import LLMGateway
from hybrid_serve.agents.policy import (
    KEPT_LOCAL,
    PrivacyGate,
    Sensitivity,
    history_in_use,
)
from hybrid_serve.config import LLMConfig, PolicyConfig
from hybrid_serve.schemas import AnswerRequest, Passage
from tests.support.messages_api import MessagesAPIServer

POLICY = PolicyConfig(sensitive_patterns=[r"\bproject\s+falcon\b"])
PUBLIC = Passage(chunk_id="p#0", doc_id="p", title="Ports", text="The API listens on port 8000.")
SECRET = Passage(
    chunk_id="s#0",
    doc_id="s",
    title="Launch",
    text="The launch code of the rocket is ZEBRA-7731.",
    tags=["Confidential"],  # tags match whatever their case
)


def call(rid="r1", **fields) -> LLMCall:
    return LLMCall(rid, fields.pop("query", "Which port?"), fields.pop("passages", [PUBLIC]),
                      "redact", **fields)  # fmt: skip


def test_tags_match_case_insensitively_and_patterns_anywhere():
    s = Sensitivity(POLICY)
    assert s.passages([SECRET]) and not s.passages([PUBLIC])
    assert s.tagged(["CONFIDENTIAL"]) and s.tagged(["sensitive"]) and not s.tagged(["public"])
    assert s.text("status of Project  Falcon?") and not s.text("status of the falcon?")
    assert s.request(AnswerRequest(query="q", sensitive=True))
    assert s.request(AnswerRequest(query="Project Falcon budget"))


@pytest.mark.parametrize(
    "fields",
    [
        {"sensitive": True},
        {"passages": [PUBLIC, SECRET]},
        {"query": "When does Project Falcon launch?"},
        {"answer": "Project Falcon launches in May [1]."},
        {"notes": "Mention project falcon."},
        {"history": [{"role": "user", "content": "Tell me about Project Falcon"}]},
        {"passages": [PUBLIC.model_copy(update={"title": "Project Falcon"})]},
        {"passages": [PUBLIC.model_copy(update={"text": "Owned by Project Falcon."})]},
    ],
    ids=["flag", "tag", "query", "answer", "notes", "history", "title", "text"],
)
def test_the_gate_refuses_a_hosted_tier_every_part_of_a_call(fields):
    gate = PrivacyGate(POLICY, on_premises=False)
    assert gate.check(call(**fields)) is not None
    assert gate.check(call()) is not None  # the request stays kept: nothing it made goes later
    assert gate.check(call("r1:shadow")) is not None  # its background grading included
    assert gate.check(call("r2")) is None  # another request is not


def test_an_on_premises_tier_takes_sensitive_requests():
    gate = PrivacyGate(POLICY, on_premises=True)
    assert gate.check(call(sensitive=True, passages=[SECRET])) is None


def test_kept_requests_are_bounded_and_expire():
    gate = PrivacyGate(POLICY, on_premises=False, max_requests=2, ttl_s=0.0)
    for rid in ("a", "b", "c"):
        gate.check(call(rid, sensitive=True))
    assert len(gate._kept) == 2
    assert gate.check(call("c")) is None  # ttl 0: already forgotten


def test_an_earlier_answer_written_from_a_sensitive_passage():
    s = Sensitivity(PolicyConfig())
    assert s.written_from("The launch code is ZEBRA-7731 [1].", [PUBLIC, SECRET])
    assert not s.written_from("The API listens on port 8000 [1].", [PUBLIC, SECRET])
    assert not s.written_from("The launch code is ZEBRA-7731.", [PUBLIC])  # nothing tagged


def test_history_in_use_is_what_the_prompts_carry():
    turns = [{"role": "user", "content": f"q{i}"} for i in range(3)]
    turns += [{"role": "assistant", "content": "a"}] * 5 + [{"role": "system", "content": "s"}]
    used = history_in_use(turns, 4)
    assert [m["content"] for m in used] == ["q2", "a", "a", "a", "a"]


def test_the_gateway_sends_nothing_the_gate_refuses():
    server = MessagesAPIServer().start()
    try:
        client = AsyncAnthropic(api_key="sk-test", base_url=server.url)
        gateway = LLMGateway(LLMConfig(), POLICY, client)
        with pytest.raises(Unavailable) as refused:
            asyncio.run(gateway.call("verify", call(passages=[SECRET], answer="ZEBRA-7731 [1]")))
        assert refused.value.reason == KEPT_LOCAL
        with pytest.raises(Unavailable):  # the same request, a clean-looking call
            asyncio.run(gateway.call("answer", call()))
        assert server.requests == [] and gateway.status()["kept_local"] == 2
        asyncio.run(gateway.call("answer", call("r2")))
        assert len(server.requests) == 1 and "ZEBRA" not in server.requests[0].text
    finally:
        server.stop()
