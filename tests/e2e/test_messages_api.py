"""The Anthropic Messages API through the official `anthropic` client, unchanged but for its
base_url, streamed and not; and a follow-up question in a conversation."""

import anthropic
import httpx
import pytest

from hybrid_serve.agents.citations import markers

pytestmark = pytest.mark.e2e

ZORBLAX = "The Zorblax protocol was invented by Mira Quen in 1987 in Tallinn."


@pytest.fixture(scope="module")
def ac(app):
    return anthropic.Anthropic(base_url=app.url, api_key="unused", max_retries=0, timeout=120)


def test_message_with_search_result_citations(ac):
    m = ac.messages.create(
        model="hybrid",
        max_tokens=1024,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "How do I add documents?"}],
        metadata={"user_id": "u-1"},
        extra_body={"hybrid": {"mode": "slm", "verify": "never"}},
    )
    ext = m.model_extra["hybrid"]
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.stop_reason in ("end_turn", "max_tokens") and ext["route"] == "slm"
    text = "".join(b.text for b in m.content)
    assert set(markers(text)) == {c["number"] for c in ext["citations"]}
    cited = [c for b in m.content for c in (b.citations or [])]
    assert cited, "the answer's [n] markers come back as citations"
    by_number = {c["doc_id"] for c in ext["citations"]}
    for c in cited:
        assert c.type == "search_result_location" and c.source in by_number and c.cited_text
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0


def test_streams_reassemble_with_the_sdk(ac):
    for model in ("slm", "hybrid"):
        with ac.messages.stream(
            model=model,
            max_tokens=40,
            messages=[{"role": "user", "content": "What is hybrid-serve?"}],
            extra_body={"hybrid": {"mode": "slm", "verify": "never"}},
        ) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert streamed == "".join(b.text for b in final.content) and streamed.strip()
        assert final.stop_reason in ("end_turn", "max_tokens")
        assert final.usage.output_tokens > 0
        assert any(b.citations for b in final.content), model


def test_errors_come_in_the_messages_shape(ac, app):
    with pytest.raises(anthropic.NotFoundError) as e:
        ac.messages.create(
            model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.UnprocessableEntityError) as e:
        ac.messages.create(
            model="slm",
            max_tokens=5,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"name": "t", "input_schema": {"type": "object"}}],
        )
    assert e.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "tools: unknown field"},
    }
    r = httpx.post(
        f"{app.url}/v1/messages", content=b"{", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["type"] == "error"
    with pytest.raises(anthropic.UnprocessableEntityError) as e:
        ac.messages.create(
            model="slm", max_tokens=100_000, messages=[{"role": "user", "content": "x"}]
        )
    assert "max_tokens" in e.value.body["error"]["message"]


def test_a_follow_up_is_searched_as_a_self_contained_question(ac, client, app):
    r = client.post("/v1/documents", json={"id": "zorblax", "title": "Zorblax", "text": ZORBLAX})
    assert r.status_code == 201
    turns = [
        {"role": "user", "content": "Who invented the Zorblax protocol?"},
        {"role": "assistant", "content": "Mira Quen invented it."},
        {"role": "user", "content": "Where was it invented?"},
    ]
    options = {"mode": "slm", "verify": "never", "top_k": 2}
    app.claude.reset()
    app.claude.queue_tool_input(
        "condense_question", {"question": "Where was the Zorblax protocol invented?"}
    )
    m = ac.messages.create(
        model="hybrid", max_tokens=64, messages=turns, extra_body={"hybrid": options}
    )
    ext = m.model_extra["hybrid"]
    assert ext["searched_query"] == "Where was the Zorblax protocol invented?"
    (call,) = app.claude.calls("condense_question")
    assert "Mira Quen invented it." in call.text  # Claude saw the conversation
    assert "zorblax" in {c["doc_id"] for c in ext["citations"]}, ext["citations"]
    # A sensitive conversation stays local: the previous question is searched with this one.
    app.claude.reset()
    m = ac.messages.create(
        model="hybrid",
        max_tokens=64,
        messages=turns,
        extra_body={"hybrid": {**options, "sensitive": True}},
    )
    ext = m.model_extra["hybrid"]
    assert ext["searched_query"] == "Who invented the Zorblax protocol? Where was it invented?"
    assert app.claude.calls() == [] and ext["sensitive"]
    assert "zorblax" in {c["doc_id"] for c in ext["citations"]}
