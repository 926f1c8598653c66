"""Follow-up questions: the rewrite is taken when it is a question, the fallback otherwise; the
pipeline searches and answers with the self-contained question."""

import asyncio

from hybrid_serve.agents.context import RequestOptions
from hybrid_serve.agents.follow_up import is_follow_up, parse_condensed, with_previous
from hybrid_serve.agents.pipeline import Pipeline
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.schemas import AnswerRequest, GenerationResult, Passage

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who invented the Zorblax protocol?"},
    {"role": "assistant", "content": "Mira Quen [1]."},
]


def test_parse_condensed():
    q = "Where was it invented?"
    assert parse_condensed("Where was the Zorblax protocol invented?\nMore", q) == (
        "Where was the Zorblax protocol invented?"
    )
    assert parse_condensed('Rewritten question: "Where was Zorblax invented?"', q) == (
        "Where was Zorblax invented?"
    )
    assert parse_condensed("   ", q) is None
    assert parse_condensed("I'm sorry, I cannot", q) is None
    assert parse_condensed("x " * 200, q) is None


def test_follow_up_and_fallback():
    assert not is_follow_up(HISTORY[:1]) and is_follow_up(HISTORY)
    assert with_previous(HISTORY, "Where was it invented?") == (
        "Who invented the Zorblax protocol? Where was it invented?"
    )


def run_pipeline(rewrite: str, follow_ups: str = "condense"):
    cfg = HybridServeConfig.load(
        overrides={"conversation.follow_ups": follow_ups, "conversation.condense_with": "slm"}
    )
    searched, prompts = [], []

    async def retrieve(query: str, top_k: int, collections=None) -> list[Passage]:
        searched.append(query)
        text = "The Zorblax protocol was invented by Mira Quen in 1987 in Tallinn."
        return [Passage(chunk_id="z#0", doc_id="z", title="Zorblax", text=text, score=1.0)]

    async def generate(req):
        prompts.append(req.messages)
        text = rewrite if "rewrite" in req.messages[0]["content"] else "In Tallinn [1]."
        return GenerationResult(text=text, prompt_tokens=10, completion_tokens=5)

    pipe = Pipeline(retrieve=retrieve, generate=generate, config=cfg, llm=None)
    req = AnswerRequest(query="Where was it invented?", mode="slm")
    options = RequestOptions(req, llm_down="claude_unavailable", history=HISTORY)
    answer = asyncio.run(pipe.answer(options, "t" * 32))
    return answer, searched, prompts


def test_the_pipeline_searches_and_answers_the_condensed_question():
    answer, searched, prompts = run_pipeline("Where was the Zorblax protocol invented?")
    assert searched == ["Where was the Zorblax protocol invented?"]
    assert answer.searched_query == "Where was the Zorblax protocol invented?"
    assert "Where was the Zorblax protocol invented?" in prompts[-1][-1]["content"]
    assert answer.usage.slm_completion_tokens == 10  # the rewrite is counted


def test_unusable_rewrite_falls_back_and_off_searches_the_question_alone():
    answer, searched, _ = run_pipeline("")
    assert searched == ["Who invented the Zorblax protocol? Where was it invented?"]
    answer, searched, prompts = run_pipeline("unused", follow_ups="off")
    assert searched == ["Where was it invented?"] and answer.searched_query is None
    assert len(prompts) == 1  # no rewrite asked for


def test_a_rewrite_that_answers_or_drifts_is_not_taken():
    q = "Of what group in the periodic table is it a member?"
    assert parse_condensed("Oxygen is a member of the periodic table.", q) is None  # an answer
    assert parse_condensed("Who discovered oxygen?", q) is None  # not what was asked
    assert parse_condensed("Of what group in the periodic table is oxygen a member?", q)
