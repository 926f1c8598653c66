"""What things cost, in one place: an LLM-tier call (per token for a hosted API, per replica-hour
for a self-hosted tier), what its budget reserves before it is sent, an SLM answer's replica
time, the estimate of Claude answering alone, and what a cache hit saved."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hybrid_serve.agents import prompts
from hybrid_serve.agents.interfaces import CallUsage
from hybrid_serve.config import LLMConfig
from hybrid_serve.schemas import AnswerResponse, Passage

# Characters per token for estimates made before a call (English prose is ~4; be conservative).
CHARS_PER_TOKEN = 3.5
# The all-Claude estimate never prices an answer below this many tokens.
MIN_ANSWER_TOKENS = 20


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def call_cost(llm: LLMConfig, usage: CallUsage) -> float:
    """Per token for a hosted API; for a self-hosted tier (`gpu_hours`) the call's share of the
    tier's time (calls that ran together share it: the tier batches them) at its replica-hour
    price, as the SLM's cost is counted."""
    if llm.price_model == "gpu_hours":
        seconds = usage.seconds if usage.shared_seconds is None else usage.shared_seconds
        return seconds * llm.gpu_hour_usd / 3600
    p = llm.price()
    return (
        usage.input_tokens * p.input
        + usage.output_tokens * p.output
        + usage.cache_read_tokens * p.cache_read
        + usage.cache_write_tokens * p.cache_write
    ) / 1e6


def reserve_estimate(llm: LLMConfig, input_tokens: int, output_tokens: int) -> float:
    """What the budget reserves before a call. A self-hosted tier's cost is its time, known only
    after the call: nothing is reserved, and the budgets stop the calls after the one that
    crosses them."""
    if llm.price_model == "gpu_hours":
        return 0.0
    p = llm.price()
    return (input_tokens * p.input + output_tokens * p.output) / 1e6


def slm_cost(seconds: float, gpu_hour_usd: float) -> float:
    """An SLM answer's replica time at the replica-hour price."""
    return round(seconds * gpu_hour_usd / 3600, 8)


def all_llm_estimate(llm: LLMConfig, query: str, passages: Sequence[Passage], answer: str) -> float:
    """Claude alone: its answer prompt with the same evidence, and an answer this long."""
    price = llm.price()
    tokens_in = estimate_tokens(
        prompts.CLAUDE_ANSWER_SYSTEM + prompts.claude_answer_user(query, passages)
    )
    tokens_out = max(estimate_tokens(answer), MIN_ANSWER_TOKENS)
    return round((tokens_in * price.input + tokens_out * price.output) / 1e6, 8)


def saved_usd(answer: AnswerResponse) -> float:
    """What reusing `answer` saves: everything it cost to make."""
    return answer.usage.cost_usd + answer.usage.slm_cost_usd
