"""The stops read from the text (recitation, a loop that counts): their rules, the same wherever
the text is split, their bounds, and each engine that applies them stopping the real thing."""

import asyncio
import random
import re

import pytest
from pydantic import ValidationError

from hybrid_serve.benchmarks.fixed_latency_server import FixedLatencyServer
from hybrid_serve.engines.chat_wire import StreamTally, stream_options
from hybrid_serve.engines.openai_compat import OpenAICompatEngine
from hybrid_serve.engines.repetition import repeats
from hybrid_serve.engines.text_stops import TextStops, text_stops
from hybrid_serve.schemas import (
    RECITED_WORDS_MAX,
    RECITED_WORDS_MIN,
    GenerationRequest,
    RepetitionDetection,
)

PASSAGE = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk, trimmed the wick of "
    "the great lamp, polished the brass fittings until they shone, and wrote the weather in a "
    "leather logbook that his grandfather had started sixty years before."
)
OTHER = "Fishing boats left the harbour before dawn and came back with herring and mackerel."


HI = [{"role": "user", "content": "hi"}]


def recitation(passages: list[str], words: int) -> TextStops:
    stops = text_stops(GenerationRequest(messages=HI, evidence=passages, max_recited_words=words))
    assert stops is not None
    return stops


def stop_at(check: TextStops, pieces: list[str], why: str = "recitation") -> int | None:
    """How many characters had been pushed when the check first said to stop (for `why`)."""
    pushed = 0
    for piece in pieces:
        pushed += len(piece)
        if reason := check.push(piece):
            assert reason == why
            return pushed
    return None


def test_a_run_of_n_words_of_one_passage_stops_and_shorter_or_mixed_runs_do_not():
    copied = "In short: " + PASSAGE
    # The eighth copied word ("every") is complete once the character after it is written.
    eighth = re.search(r"\bevery\b", copied)
    assert eighth is not None
    assert stop_at(recitation([OTHER, PASSAGE], 8), list(copied)) == eighth.end() + 1
    # Seven words, then something else: a quote, not a recitation.
    quote = "He climbed the narrow stairs every evening at night, then slept."
    assert stop_at(recitation([PASSAGE], 8), list(quote)) is None
    # A run that crosses from one passage into another is copied from neither.
    across = "sixty years before. Fishing boats left the harbour before dawn"
    assert stop_at(recitation([PASSAGE, OTHER], 8), [across + " "]) is None
    # Case and punctuation do not hide a copy; citation markers interrupt it.
    shouted = "THE LIGHTHOUSE-KEEPER climbed; the narrow stairs, every evening! "
    assert stop_at(recitation([PASSAGE], 8), [shouted]) == len(shouted)
    cited = "The lighthouse keeper climbed [1] the narrow stairs every evening [1]. "
    assert stop_at(recitation([PASSAGE], 8), [cited]) is None


def test_a_loop_that_counts_stops_where_the_token_rule_cannot():
    """Turns that differ only in their numbers: vLLM's rule on tokens never sees two equal
    turns; on words with numbers masked it stops after the second turn."""
    rule = RepetitionDetection()
    turn = "[{n}] (Question) # How is hybrid-serve deployed on Kubernetes? "
    text = "".join(turn.format(n=n) for n in range(1, 12))
    assert not repeats([ord(c) for c in text], rule)  # characters stand in for tokens
    loop = text_stops(GenerationRequest(messages=HI, repetition_detection=rule))
    assert loop is not None
    second = len(turn.format(n=1)) + len(turn.format(n=2))
    stopped = stop_at(loop, [text[i : i + 3] for i in range(0, len(text), 3)], "repetition")
    assert stopped is not None and second <= stopped < second + 6
    markers = "Citing: " + "\n".join(f"[{n}]" for n in range(1, 40))
    loop = text_stops(GenerationRequest(messages=HI, repetition_detection=rule))
    assert loop is not None and stop_at(loop, list(markers), "repetition") is not None
    # Steps that count but say different things are not a loop.
    verbs = "open read edit save".split()
    steps = " ".join(f"Step {n}: {verb} the file." for n, verb in enumerate(verbs))
    loop = text_stops(GenerationRequest(messages=HI, repetition_detection=rule))
    assert loop is not None and stop_at(loop, list(steps + " "), "repetition") is None


def test_where_it_stops_does_not_depend_on_how_the_text_is_split():
    """Engines send text in pieces of any size (a token, a UTF-8 character completed late, a
    batch of chunks): the stop comes in the piece holding the character that completes the run."""
    rng = random.Random(11)
    text = "Answer: " + PASSAGE
    whole = stop_at(recitation([PASSAGE], 12), list(text))
    assert whole is not None
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 60)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        for _ in range(rng.randint(0, 5)):  # a token can end inside a UTF-8 character: no text
            pieces.insert(rng.randrange(len(pieces)), "")
        got = stop_at(recitation([PASSAGE], 12), pieces)
        ends = [sum(map(len, pieces[: i + 1])) for i in range(len(pieces))]
        assert got == min(e for e in ends if e >= whole), (pieces, got, whole)


def test_no_stop_asked_means_no_check():
    assert text_stops(GenerationRequest(messages=HI, evidence=[PASSAGE])) is None
    assert text_stops(GenerationRequest(messages=HI, max_recited_words=8)) is None  # no passages
    assert text_stops(GenerationRequest(messages=HI, evidence=[PASSAGE], max_recited_words=8))


def test_bounds_are_enforced_and_named():
    for bad in (RECITED_WORDS_MIN - 1, RECITED_WORDS_MAX + 1):
        with pytest.raises(ValidationError, match="max_recited_words"):
            GenerationRequest(messages=HI, max_recited_words=bad)


def test_wire_engines_watch_only_where_usage_comes_with_every_chunk():
    req = GenerationRequest(messages=HI, evidence=[PASSAGE], max_recited_words=8)
    assert stream_options(req, vllm_extensions=True) == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    assert stream_options(req, vllm_extensions=False) == {"include_usage": True}
    assert StreamTally.of("m", req, vllm_extensions=False).stops is None
    tally = StreamTally.of("m", req, vllm_extensions=True)
    words = PASSAGE.split(" ")
    for n, word in enumerate(words, 1):
        tally.usage(30, n)
        assert tally.choice(word + " ", [-0.1], None) == word + " "
        if tally.stopped:
            break
    assert n == 8 and tally.finish == "recitation"  # the eighth word, complete with its space
    # What a batch of chunks still holds past the stop is neither passed on nor counted.
    tally.usage(30, 99)
    assert tally.choice(words[8], [-0.1], "stop") == ""
    result = tally.result()
    assert result.finish_reason == "recitation" and result.completion_tokens == 8
    assert result.text == " ".join(words[:8]) + " " and len(result.token_logprobs) == 8


def test_a_stream_that_loops_by_counting_ends_as_a_repetition():
    req = GenerationRequest(messages=HI, repetition_detection=RepetitionDetection())
    tally = StreamTally.of("m", req, vllm_extensions=True)
    n = 0
    while not tally.stopped and n < 40:
        n += 1
        tally.choice(f"[{n}] (Question) # How is hybrid-serve deployed on Kubernetes? ", [], None)
    assert tally.result().finish_reason == "repetition" and n == 2  # at its second turn


def test_the_openai_engine_ends_a_recited_stream_on_a_vllm_server():
    """Against a server that recites the passage (over the OpenAI wire, vLLM's usage in every
    chunk): stopped with the usage of what was written; on another server it runs to the end."""
    req = GenerationRequest(
        messages=[{"role": "user", "content": "Tell me about the lighthouse."}],
        evidence=[PASSAGE],
        max_recited_words=10,
    )
    with FixedLatencyServer(latency_s=0.0, reply="Well. " + PASSAGE) as server:
        vllm = OpenAICompatEngine(server.url, "slm", vllm_extensions=True)
        other = OpenAICompatEngine(server.url, "slm", vllm_extensions=False)

        async def both():
            return await vllm.generate(req), await other.generate(req)

        stopped, whole = asyncio.run(both())
    assert whole.finish_reason == "stop" and whole.text == "Well. " + PASSAGE
    assert stopped.finish_reason == "recitation"
    # "Well." and ten words of the passage, then the word that completed the tenth.
    assert stopped.text == "Well. " + " ".join(PASSAGE.split(" ")[:11])
    assert stopped.completion_tokens == 12 == len(stopped.token_logprobs)
    assert stopped.prompt_tokens == whole.prompt_tokens > 0


def test_llama_cpp_stops_a_real_recitation():
    """The bundled model, asked to copy a passage, writes it out whole; with the rule it stops
    once it has copied that many words."""
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.engines.llama_cpp import LlamaCppEngine

    engine = LlamaCppEngine(bundled_gguf(), n_threads=1)
    ask = {
        "messages": [{"role": "user", "content": f"Repeat this text exactly:\n{PASSAGE}"}],
        "evidence": [PASSAGE],
        "max_tokens": 80,
    }
    whole = engine.generate_blocking(GenerationRequest(**ask))
    assert whole.finish_reason == "stop" and whole.completion_tokens > 40
    stopped = engine.generate_blocking(GenerationRequest(**ask, max_recited_words=12))
    assert stopped.finish_reason == "recitation"
    assert stopped.completion_tokens < whole.completion_tokens
    assert whole.text.startswith(stopped.text)
    assert len(re.findall(r"\w+", stopped.text)) in (12, 13)  # the 13th completed the 12th
