"""Random cases for the repetition stop's checks: short token sequences over a small vocabulary
that end, or nearly end, in a repeated unit, each with a random rule — where the edge cases of
pattern size, count and sequence length are."""

import random
from collections.abc import Iterator

from hybrid_serve.schemas import RepetitionDetection


def random_cases(seed: int, n: int = 3000) -> Iterator[tuple[list[int], RepetitionDetection]]:
    rng = random.Random(seed)
    for _ in range(n):
        rule = RepetitionDetection(
            min_pattern_size=rng.randint(1, 4),
            max_pattern_size=rng.randint(4, 8),
            min_count=rng.randint(2, 4),
        )
        unit = [rng.randint(0, 2) for _ in range(rng.randint(1, 8))]
        tokens = [rng.randint(0, 2) for _ in range(rng.randint(0, 6))] + unit * rng.randint(1, 4)
        yield tokens, rule
