"""The OpenAI-compatible API through the official `openai` client."""

import httpx
import openai
import pytest

from hybrid_serve.agents.citations import markers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def oa(app):
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list(oa):
    ids = {m.id for m in oa.models.list()}
    assert ids == {"hybrid", "slm"}


def test_hybrid_completion_carries_citations_and_metadata(oa):
    r = oa.chat.completions.create(
        model="hybrid",
        messages=[{"role": "user", "content": "How do I add documents?"}],
        extra_body={"hybrid": {"mode": "slm", "verify": "never"}},
    )
    text = r.choices[0].message.content
    ext = r.model_extra["hybrid"]
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "stop"
    assert ext["route"] == "slm" and 0 <= ext["confidence"] <= 1
    assert set(markers(text)) == {c["number"] for c in ext["citations"]}
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_slm_parameters_are_honoured(oa):
    kwargs = dict(
        model="slm",
        messages=[{"role": "user", "content": "Tell me about Ray Serve."}],
        extra_body={"hybrid": {"retrieval": False}},
    )
    short = oa.chat.completions.create(max_tokens=5, **kwargs)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5
    a = oa.chat.completions.create(max_tokens=20, temperature=0.9, seed=7, **kwargs)
    b = oa.chat.completions.create(max_tokens=20, temperature=0.9, seed=7, **kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed
    full = oa.chat.completions.create(max_tokens=40, **kwargs).choices[0].message.content
    stop_word = full.split()[2]
    cut = oa.chat.completions.create(max_tokens=40, stop=[stop_word], **kwargs)
    assert stop_word not in cut.choices[0].message.content


def test_streaming_reassembles(oa):
    for model in ("slm", "hybrid"):
        kwargs = dict(
            model=model,
            messages=[{"role": "user", "content": "What is hybrid-serve?"}],
            max_tokens=30,
            extra_body={"hybrid": {"mode": "slm", "verify": "never"}},
        )
        whole = oa.chat.completions.create(**kwargs)
        chunks = list(
            oa.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and "hybrid" in finals[0].model_extra
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content_chunks) >= 2


def test_error_classes(oa, app):
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-9" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="slm", messages=[])
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oa.chat.completions.create(
            model="slm", messages=[{"role": "user", "content": "hi"}], max_tokens=100000
        )
    assert "limit is 1024" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        oa.chat.completions.create(model="slm", messages=[{"role": "assistant", "content": "hi"}])
    r = httpx.post(
        f"{app.url}/v1/chat/completions",
        json={"model": "slm", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {}},
    )
    assert r.status_code == 422 and "logit_bias: unknown field" in r.json()["error"]["message"]


def test_history_is_context(oa):
    r = oa.chat.completions.create(
        model="hybrid",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the index made of?"},
            {"role": "assistant", "content": "FAISS and BM25 [1]."},
            {"role": "user", "content": "How are the two rankings combined?"},
        ],
        extra_body={"hybrid": {"mode": "slm", "verify": "never"}},
        max_tokens=40,
    )
    assert r.choices[0].message.content
