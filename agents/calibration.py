"""The escalation threshold as a risk guarantee: the lowest confidence threshold whose answers kept
on the SLM are wrong at most a share α of the time, with probability at least 1 − δ over the
calibration sample.

Learn-then-Test (Angelopoulos, Bates, Candès, Jordan, Lei, 2021) with fixed-sequence testing:
thresholds are tested from strict (keeps few answers) to lenient, each with a one-sided
Clopper–Pearson (1 − δ) upper bound on the error rate of the answers it keeps (scipy's beta
quantile); the first that fails stops the sequence, and the last that passed is chosen. Testing in
a fixed order needs no multiplicity correction, so the chosen threshold's kept-answer error rate
exceeds α with probability at most δ. The sequence starts where `min_kept` answers are kept: its
order depends on the scores, never on which answers were wrong, and a bound over a handful of
answers would fail at once and stop it. The price is escalation: what the threshold sends to
Claude. `tests/unit/test_calibration.py` checks the guarantee over repeated simulated splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from scipy.stats import beta


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided (1 − δ) upper confidence bound on a binomial rate from `errors` in `n`."""
    if n == 0 or errors >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, errors + 1, n - errors))


@dataclass
class Step:
    threshold: float
    kept: int
    errors: int
    bound: float
    escalation_rate: float


@dataclass
class RiskThreshold:
    alpha: float
    delta: float
    n: int
    feasible: bool  # False: not even the strictest threshold passed; everything escalates
    threshold: float
    bound: float
    escalation_rate: float
    kept: int
    errors: int
    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def risk_threshold(
    scores: Sequence[float],
    wrong: Sequence[bool],
    alpha: float,
    delta: float,
    min_kept: int | None = None,
) -> RiskThreshold:
    """The lowest threshold (answers with confidence ≥ it are kept) that passes the fixed
    sequence. Candidates are the observed scores, strictest first; the sequence starts where
    `min_kept` answers are kept (default: a tenth of the sample, at least 30)."""
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError("alpha and delta must be in (0, 1)")
    if len(scores) != len(wrong):
        raise ValueError("scores and wrong must have the same length")
    n = len(scores)
    start = min(n, max(30, n // 10) if min_kept is None else min_kept)
    pairs = sorted(zip(scores, wrong), key=lambda p: -p[0])
    steps: list[Step] = []
    chosen: Step | None = None
    kept = errors = 0
    i = 0
    while i < n:
        threshold = pairs[i][0]
        while i < n and pairs[i][0] == threshold:  # ties are kept together
            kept += 1
            errors += bool(pairs[i][1])
            i += 1
        if kept < start:
            continue  # not yet a sample worth a bound; the sequence starts below
        step = Step(
            threshold=float(threshold),
            kept=kept,
            errors=errors,
            bound=clopper_pearson_upper(errors, kept, delta),
            escalation_rate=(n - kept) / n,
        )
        steps.append(step)
        if step.bound > alpha:
            break
        chosen = step
    if chosen is None:
        top = float(pairs[0][0]) + 1e-9 if pairs else 1.0
        return RiskThreshold(alpha, delta, n, False, min(top, 1.0), 1.0, 1.0, 0, 0, steps)
    return RiskThreshold(
        alpha,
        delta,
        n,
        True,
        chosen.threshold,
        chosen.bound,
        chosen.escalation_rate,
        chosen.kept,
        chosen.errors,
        steps,
    )
