"""The repetition stop (`GenerationRequest.repetition_detection`) for engines that sample
themselves: vLLM's own check, ported because llama.cpp and llama-cpp-python have none, with the
same semantics so that an answer stops at the same token on either engine."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

from hybrid_serve.schemas import RepetitionDetection


class Repetition:
    """vLLM's `check_sequence_repetition`, made incremental: fed one token at a time, it says
    whether the sequence now ends in a pattern of n tokens written `min_count` times back to
    back, for some n in [min_pattern_size, max_pattern_size].

    vLLM compares the last n × min_count tokens again after every token, up to
    max_pattern_size² × min_count comparisons a token on text that nearly repeats. Here, for each
    n, the run of tokens in a row that equal the token n before them is kept (a pattern of n
    written min_count times is such a run of n × (min_count − 1)), and only for the n at which
    the new token came before, found from where it did: a token costs as many steps as it
    occurred in the last max_pattern_size tokens, one or two in text that does not loop."""

    def __init__(self, params: RepetitionDetection) -> None:
        self._min, self._max = params.min_pattern_size, params.max_pattern_size
        self._times = params.min_count - 1
        self._runs: dict[int, int] = {}  # n -> run, for the n whose run goes on
        self._seen: dict[Hashable, deque[int]] = {}  # token -> its recent positions
        self._length = 0

    def push(self, token: Hashable) -> bool:
        at = self._length
        self._length += 1
        seen = self._seen.setdefault(token, deque())
        while seen and seen[0] < at - self._max:
            seen.popleft()
        runs: dict[int, int] = {}
        for before in seen:
            n = at - before
            if n >= self._min:
                runs[n] = self._runs.get(n, 0) + 1
        seen.append(at)
        self._runs = runs
        return any(run >= n * self._times for n, run in runs.items())


def repeats(tokens: Iterable[Hashable], params: RepetitionDetection) -> bool:
    """Whether `tokens`, as a whole, end in a repetition (the check above, fed all of them)."""
    check, found = Repetition(params), False
    for token in tokens:
        found = check.push(token)
    return found
