"""The repetition stop (`GenerationRequest.repetition_detection`) for engines that sample
themselves: vLLM's own check, ported because llama.cpp and llama-cpp-python have none, with the
same semantics so that an answer stops at the same token on either engine."""

from __future__ import annotations

from collections.abc import Sequence

from hybrid_serve.schemas import RepetitionDetection


def repeats(tokens: Sequence[int], params: RepetitionDetection) -> bool:
    """Whether `tokens` end in a pattern of n tokens that came `min_count` times back to back,
    for some n in [min_pattern_size, max_pattern_size] (vLLM's `check_sequence_repetition`).
    Called after every token: a mismatch usually shows at the first comparison of each n, and
    the work is at most max_pattern_size² × min_count comparisons, both bounded by the schema."""
    count = params.min_count
    for size in range(params.min_pattern_size, params.max_pattern_size + 1):
        if size * count > len(tokens):
            return False
        if all(
            tokens[-n] == tokens[-(size * m + n)]
            for n in range(1, size + 1)
            for m in range(1, count)
        ):
            return True
    return False
