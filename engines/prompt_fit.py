"""A prompt fitted to the engine's context, counted with the model's own tokenizer: what the
answer needs most stays, what does not fit is left out and said, nothing is sent that the
engine would refuse.

The request says which parts may shrink (`GenerationRequest.evidence`: the passages, best
first, and where they are in the last message); earlier chat turns may go too. Fitting happens
in the engine because only the engine knows its tokenizer and its context; the reasoning asks
for what it would like to send and learns from `GenerationResult` what was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hybrid_serve.schemas import GenerationRequest, GenerationResult
from hybrid_serve.text import sentence_spans

# Counts the tokens of a whole chat prompt (template included), as the engine will send it.
CountPrompt = Callable[[list[dict[str, str]]], int]


class PromptTooLong(ValueError):
    """Not even the question and its instructions fit the context with room for `max_tokens`:
    the client's request is too large for this model (a 400, never a 500)."""


@dataclass(frozen=True)
class Fitted:
    messages: list[dict[str, str]]
    evidence_used: int  # passages shown, the last perhaps cut
    history_dropped: int  # earlier turns left out, oldest first
    trimmed: bool = False

    def report(self, result: GenerationResult) -> GenerationResult:
        """`result`, saying what was left out (nothing said when nothing was)."""
        if not self.trimmed:
            return result
        return result.model_copy(
            update={"evidence_used": self.evidence_used, "history_dropped": self.history_dropped}
        )


# Tokens a server's own rendering may add to our count of the same messages (a BOS token).
SLACK_TOKENS = 8


def _without_evidence(req: GenerationRequest) -> list[dict[str, str]]:
    if not req.evidence:
        return list(req.messages)
    last = req.messages[-1]
    evidence = "\n\n".join(req.evidence)
    at, span = req.evidence_at, len(evidence)
    content = last["content"]
    if content[at : at + span] != evidence:
        raise ValueError("evidence_at does not point at the evidence in the last message")
    return [*req.messages[:-1], {**last, "content": content[:at] + content[at + span :]}]


def render(
    req: GenerationRequest, blocks: list[str], messages: list[dict[str, str]]
) -> list[dict[str, str]]:
    """`messages` (without evidence) with `blocks` put into the last one where it goes."""
    if not req.evidence:
        return messages
    last = messages[-1]
    at = req.evidence_at
    content = last["content"][:at] + "\n\n".join(blocks) + last["content"][at:]
    return [*messages[:-1], {**last, "content": content}]


def fit_prompt(
    req: GenerationRequest,
    count: CountPrompt | None,
    context: int | None,
    whole: int | None = None,
) -> Fitted:
    """The messages to send: the request's own when they fit with room for `max_tokens`; else
    earlier turns dropped oldest first, then the lowest-ranked passages, the last one kept cut
    at a sentence end. Tokenizes O(log passages + turns) times, each linear in the prompt.
    `whole`: the tokens of the request's own messages, when the caller has them already."""
    if count is None or context is None:
        return Fitted(req.messages, len(req.evidence), 0)
    if whole is None:
        whole = count(req.messages)
    if whole <= context - req.max_tokens - SLACK_TOKENS:
        return Fitted(req.messages, len(req.evidence), 0)
    room = context - req.max_tokens - SLACK_TOKENS
    if room <= 0:
        raise PromptTooLong(
            f"max_tokens is {req.max_tokens}; the model's context holds {context} tokens in all"
        )

    def fits(messages: list[dict[str, str]], blocks: list[str]) -> bool:
        return count(render(req, blocks, messages)) <= room

    messages = _without_evidence(req)
    first = 1 if messages and messages[0].get("role") == "system" else 0
    dropped = 0
    while len(messages) - first > 1 and not fits(messages, req.evidence):
        del messages[first]
        dropped += 1
    if fits(messages, req.evidence):
        return Fitted(render(req, req.evidence, messages), len(req.evidence), dropped, True)
    if not fits(messages, []):
        total = count(render(req, [], messages))
        raise PromptTooLong(
            f"the question and its instructions are {total} tokens; with max_tokens "
            f"{req.max_tokens} the model's context of {context} tokens holds {room}"
        )
    low, high = 0, len(req.evidence)  # fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(messages, req.evidence[:mid]):
            low = mid
        else:
            high = mid
    blocks = req.evidence[:low]
    cut = _cut_to_fit(req.evidence[low], lambda b: fits(messages, [*blocks, b]))
    if cut:
        blocks = [*blocks, cut]
    return Fitted(render(req, blocks, messages), len(blocks), dropped, True)


def _cut_to_fit(block: str, fits: Callable[[str], bool]) -> str | None:
    """The longest prefix of `block` ending at a sentence end that fits, found by halving (a
    few tokenizations); None if not even its first sentence does."""
    ends = [end for _, end in sentence_spans(block)][:-1]  # the whole block did not fit
    low, high = -1, len(ends)  # ends[low] fits (or none), ends[high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if fits(block[: ends[mid]] + " …"):
            low = mid
        else:
            high = mid
    return block[: ends[low]] + " …" if low >= 0 else None
