"""What every stage of the pipeline runs on: the dependencies (retrieval, generation, the LLM
tier), the configuration in force, the policy that reads it, and the SLM's measured answer time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hybrid_serve.agents.admission import RecentRefusals
from hybrid_serve.agents.interfaces import Generate, GenerateStream, LLMRoles, Retrieve
from hybrid_serve.agents.policy import Policy
from hybrid_serve.agents.shadow import Verdict
from hybrid_serve.config import HybridServeConfig

# Where a shadow verification's verdict goes (the ingress: a log and a metric).
OnVerdict = Callable[[Verdict], Awaitable[None]]
# An SLM answer's time before any was measured (SmolLM2 on 2 CPU cores: about 2 s).
SLM_ANSWER_S_PRIOR = 3.0


@dataclass
class SLMTiming:
    """What an SLM answer takes here, end to end (a moving average): the time a step that may
    fall back to the SLM leaves for it before the deadline."""

    answer_s: float = SLM_ANSWER_S_PRIOR

    def observe(self, seconds: float) -> None:
        self.answer_s = 0.8 * self.answer_s + 0.2 * seconds

    def fallback_s(self) -> float:
        """Time kept back for an SLM answer when an LLM step may have to be replaced by one."""
        return 1.5 * self.answer_s


@dataclass
class Services:
    retrieve: Retrieve
    generate: Generate
    cfg: HybridServeConfig
    llm: LLMRoles | None = None
    generate_stream: GenerateStream | None = None
    on_verdict: OnVerdict | None = None
    timing: SLMTiming = field(default_factory=SLMTiming)
    refusals: RecentRefusals = field(default_factory=RecentRefusals)
    policy: Policy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = Policy(self.cfg)
