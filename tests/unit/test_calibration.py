"""The risk guarantee holds: over repeated calibration samples from a known model of confidence
and error, the chosen threshold's true kept-answer error rate exceeds α in at most about δ of
them; and the procedure says so when nothing can meet α."""

import math

import numpy as np
import pytest

from hybrid_serve.agents.calibration import clopper_pearson_upper, risk_threshold


def true_risk(threshold: float) -> float:
    """P(wrong | score ≥ t) for score ~ U(0, 1) and P(wrong | s) = 0.7 (1 − s)."""
    if threshold >= 1:
        return 0.0
    # mean of 0.7 (1 − s) over s in [t, 1]
    return 0.7 * (1 - threshold) / 2


def sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    scores = rng.uniform(0, 1, n)
    wrong = rng.uniform(0, 1, n) < 0.7 * (1 - scores)
    return scores, wrong


def test_clopper_pearson_matches_known_values():
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10), rel=1e-6)
    assert clopper_pearson_upper(5, 5, 0.1) == 1.0 and clopper_pearson_upper(0, 0, 0.1) == 1.0


@pytest.mark.parametrize(("alpha", "delta"), [(0.1, 0.1), (0.2, 0.05)])
def test_the_guarantee_holds_over_repeated_splits(alpha, delta):
    rng = np.random.default_rng(7)
    trials, violations, escalation = 300, 0, []
    for _ in range(trials):
        scores, wrong = sample(1000, rng)
        chosen = risk_threshold(scores.tolist(), wrong.tolist(), alpha, delta)
        # an infeasible draw escalates everything: no answer is kept, none is wrong
        violations += chosen.feasible and true_risk(chosen.threshold) > alpha
        escalation.append(chosen.escalation_rate)
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert violations / trials <= delta + slack
    # and it is not vacuous: the threshold escalates about what the target needs, not everything
    t_star = 1 - 2 * alpha / 0.7  # true_risk(t*) = α
    assert np.mean(escalation) < t_star + 0.2


def test_nothing_meets_an_impossible_target():
    rng = np.random.default_rng(1)
    scores, wrong = sample(50, rng)
    chosen = risk_threshold(scores.tolist(), [True] * 50, 0.05, 0.1)
    assert not chosen.feasible and chosen.escalation_rate == 1.0 and chosen.threshold > max(scores)
    with pytest.raises(ValueError):
        risk_threshold([0.5], [False], 0.0, 0.1)
