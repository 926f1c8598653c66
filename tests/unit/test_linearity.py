"""No function that reads user or document text grows faster than linearly with it: each runs
on the largest adversarial input the API lets reach it, bounded 100x above one Python step per
character of that input (measured here, in the same process), so a noisy machine cannot trip
the bound while a quadratic regression does (the planner's comparison regex took 350 ms on a
4,000-character query, 1,750x a linear pass; the echo filter 1.1 s on a 5,000-character answer).
The 4x/1x ratios are `benchmarks.linearity`'s."""

from __future__ import annotations

import pytest

from hybrid_serve.benchmarks.linearity import CASES, INPUTS, linear_pass, seconds

BOUND = 100


@pytest.mark.parametrize("shape", sorted(INPUTS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_on_the_largest_adversarial_input(name, shape):
    f, size = CASES[name]
    text = INPUTS[shape](size)
    assert len(text) == size
    reference = seconds(linear_pass, text)
    took = seconds(f, text)
    assert took <= BOUND * reference, (
        f"{name} on {size} characters of {shape}: {took * 1e3:.1f} ms, "
        f"{took / reference:.0f}x a linear pass (bound {BOUND}x)"
    )
