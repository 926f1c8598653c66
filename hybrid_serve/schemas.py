"""Wire types shared by the orchestrator, agents and clients. Field names are the contract."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)

Route = Literal["slm", "slm+rewrite", "decomposed", "claude", "extractive"]
# The shortest deadline a request may set (a millisecond): below it nothing can answer, and a
# float that small (5e-324) is only a way to find parsers that disagree.
MIN_TIMEOUT_S = 0.001


class StrictModel(BaseModel):
    # Unknown fields are a client bug worth reporting, not silently dropping.
    model_config = ConfigDict(extra="forbid")


Mode = Literal["auto", "slm", "decompose", "claude"]
VerifyPolicy = Literal["auto", "always", "never"]
PIIPolicy = Literal["block", "redact"]
# What the configuration may set: `keep` sends PII as is, to an on-premises tier only.
PIIHandling = Literal["block", "redact", "keep"]
LLMTier = Literal["hosted", "on_premises"]
SubtaskStatus = Literal["ok", "failed", "timeout", "cancelled"]
FinishReason = Literal["stop", "length", "cancelled", "repetition", "recitation"]
CacheResult = Literal["hit", "miss", "bypass"]
# Batch work yields to interactive work in every queue, and is refused first (X-Priority).
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)  # best first


def _whole_number(v: Any) -> Any:
    """JSON has one number type: 40.0 is the integer 40, as JSON Schema counts it; 40.5 and "40"
    are not integers."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# Request fields: typed as their schema says, neither stricter nor looser.
Integer = Annotated[StrictInt, BeforeValidator(_whole_number)]
Number = StrictFloat


# Bounds on the integer itself, so that the schema states them also where the field is optional.
PositiveInteger = Annotated[StrictInt, Field(ge=1), BeforeValidator(_whole_number)]
One = Annotated[StrictInt, Field(ge=1, le=1), BeforeValidator(_whole_number)]


# A string with something in it, as a pattern so that the OpenAPI schema states the rule too.
NON_BLANK = r"\S"
NonBlank = Annotated[StrictStr, StringConstraints(pattern=NON_BLANK)]
Query = NonBlank


class AnswerRequest(StrictModel):
    query: Query = Field(..., description="The question, in natural language.")
    top_k: Integer = Field(5, ge=1, le=50, description="Passages retrieved for the answer.")
    mode: Mode = Field(
        "auto",
        description="auto: SLM first, escalate when unsure; slm: never call Claude; "
        "decompose: split into parallel SLM sub-tasks; claude: Claude answers from the evidence.",
    )
    verify: VerifyPolicy | None = Field(
        None, description="Verification by Claude; default from config (auto: escalated answers)."
    )
    sensitive: StrictBool = Field(
        False, description="Keep this query inside the cluster: nothing about it reaches Claude."
    )
    pii: PIIPolicy | None = Field(
        None, description="PII in what would leave the cluster: block or redact (default: config)."
    )
    stream: StrictBool = Field(
        False, description="Server-Sent Events: plan, subtask, answer, verification, done."
    )
    timeout_s: Annotated[Number, Field(ge=MIN_TIMEOUT_S, le=3600)] | None = Field(
        None,
        description="This request's deadline in seconds (over the X-Request-Timeout header and "
        "http.request_timeout_s); the best answer ready by then is returned, marked degraded.",
    )
    use_cache: StrictBool = Field(
        True,
        description="false: answer afresh, neither reading nor filling the answer cache (as the "
        "header Cache-Control: no-cache does on every answer endpoint).",
    )
    overload: Literal["refuse", "extract"] = Field(
        "refuse",
        description="When the SLM cannot answer inside the deadline (at capacity): refuse: 503 "
        "with Retry-After; extract: answer from the retrieved passages' sentences that best match "
        "the question, cited, without generation (route `extractive`, degraded "
        "`slm_overloaded`).",
    )


class SearchRequest(StrictModel):
    query: Query = Field(..., description="What to look for.")
    top_k: Integer = Field(10, ge=1, le=100, description="Passages returned.")


DEFAULT_COLLECTION = "default"
# A collection's name: what API keys list and documents carry.
COLLECTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
CollectionName = Annotated[StrictStr, StringConstraints(pattern=COLLECTION_PATTERN)]
# The collections a caller may read; None: every one (a key that names none, or no keys).
Collections = frozenset[str] | None


class Passage(BaseModel):
    """A retrieved chunk of a document, with the scores that ranked it."""

    chunk_id: str
    doc_id: str
    title: str
    text: str
    score: float = 0.0
    dense_score: float | None = None
    bm25_score: float | None = None
    tags: list[str] = Field(default_factory=list)
    collection: str = DEFAULT_COLLECTION

    @property
    def key(self) -> str:
        """Unique over collections (two may hold the same document id)."""
        return f"{self.collection}/{self.chunk_id}"


class SearchResponse(BaseModel):
    passages: list[Passage]
    index_version: int


class Citation(BaseModel):
    number: int
    doc_id: str
    collection: str = DEFAULT_COLLECTION
    title: str
    snippet: str
    score: float


class Escalation(BaseModel):
    escalated: bool = False
    reasons: list[str] = Field(default_factory=list)


class Verification(BaseModel):
    score: float = Field(..., ge=0.0, le=1.0)
    passed: bool
    attempts: int = 1
    notes: str = ""


class Subtask(BaseModel):
    id: str
    question: str
    answer: str = ""
    citations: list[Citation] = Field(default_factory=list)
    latency_ms: float = 0.0
    status: SubtaskStatus = "ok"


class Usage(BaseModel):
    slm_prompt_tokens: int = 0
    slm_completion_tokens: int = 0
    claude_input_tokens: int = 0
    claude_output_tokens: int = 0
    claude_cache_read_tokens: int = 0
    claude_cache_write_tokens: int = 0
    claude_calls: int = 0
    cost_usd: float = Field(0.0, description="Claude spend for this request, USD.")
    slm_cost_usd: float = Field(0.0, description="SLM replica time at the configured price.")
    all_claude_cost_usd_estimate: float = Field(
        0.0, description="What Claude alone would have cost with the same evidence."
    )
    llm_tier: LLMTier | None = Field(
        None,
        description="Which LLM tier the claude_* fields count: hosted (an external API) or "
        "on_premises (a model inside your network); null when no call was made.",
    )
    llm_model: str | None = Field(None, description="The LLM tier's model, when it was called.")


class Deadline(BaseModel):
    timeout_s: float = Field(..., description="The request's deadline.")
    used_s: float = Field(..., description="Time spent of it.")
    cut: list[str] = Field(
        default_factory=list,
        description="Steps cut short or skipped to answer in time (plan, subtasks, escalate, "
        "claude, verify).",
    )


class AnswerResponse(BaseModel):
    answer: str
    citations: list[Citation]
    route: Route
    confidence: float = Field(..., ge=0.0, le=1.0)
    escalation: Escalation = Field(default_factory=Escalation)
    verification: Verification | None = None
    subtasks: list[Subtask] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    degraded: list[str] = Field(default_factory=list)
    deadline: Deadline | None = None
    cache: CacheResult = Field(
        "bypass",
        description="hit: reused from an earlier answer to the same or a near-identical question "
        "(its usage is then zero); miss: answered afresh and cached; bypass: not cacheable.",
    )
    cached_question: str | None = Field(
        None, description="On a cache hit: the question the reused answer was made for."
    )
    sensitive: bool = Field(
        False,
        description="Kept inside the cluster: asked so, matched a sensitive pattern, or "
        "retrieved a tagged document.",
    )
    searched_query: str | None = Field(
        None,
        description="The self-contained question retrieval used, when the request's question "
        "was a follow-up in a conversation.",
    )
    trace_id: str


# Largest repetition pattern and count an engine checks after every token: the check's work per
# token is bounded by their product (agents never ask for more than the configuration allows).
REPETITION_PATTERN_MAX = 128
REPETITION_COUNT_MAX = 8


class RepetitionDetection(StrictModel):
    """vLLM's `repetition_detection` sampling parameter (`RepetitionDetectionParams`), honoured by
    every built-in engine: generation ends, finish reason `repetition`, once the last n tokens,
    for some n from `min_pattern_size` to `max_pattern_size`, have come `min_count` times back to
    back. A small model that has lost the thread loops ("… and so on. The next document is … and
    so on.") until max_tokens: the loop is text nobody reads, written at the decode rate. Engines
    that read their text as it is written apply the same rule to its words with every number
    masked too (`engines.text_stops`): a loop that counts ("[1] (Question) … [2] (Question) …")
    never writes two equal turns of tokens."""

    # The defaults are what answers use (slm.repetition_detection): a run of 8 to 64 tokens
    # written twice back to back, as a looping SLM writes it (measured: README, "Repetition").
    max_pattern_size: int = Field(64, ge=1, le=REPETITION_PATTERN_MAX)
    min_pattern_size: int = Field(8, ge=1, le=REPETITION_PATTERN_MAX)
    min_count: int = Field(2, ge=2, le=REPETITION_COUNT_MAX)

    @model_validator(mode="after")
    def _ordered(self) -> RepetitionDetection:
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError("min_pattern_size must not exceed max_pattern_size")
        return self


# Bounds of `GenerationRequest.max_recited_words`: a shorter run is a quote an answer may make
# (a name, a phrase, a short definition); the check's work per word written grows with the run.
RECITED_WORDS_MIN = 8
RECITED_WORDS_MAX = 256


class GenerationRequest(BaseModel):
    """What the orchestrator asks of an SLM engine; the same for every engine."""

    messages: list[dict[str, str]]
    max_tokens: int = 160
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True
    # The passages the last message quotes, best first: they are in it from character
    # `evidence_at`, joined by blank lines. An engine whose context cannot hold them all shows
    # the best that fit (`GenerationResult.evidence_used`) rather than fail; one that does not
    # fit prompts sends `messages` as they are.
    evidence: list[str] = Field(default_factory=list)
    evidence_at: int = 0
    # When the request's deadline runs out, wall-clock (time.time(); None: no deadline), as
    # the LLM tier's calls carry it: the hop to the replica is counted against it. A replica
    # that cannot finish it in time refuses it at once (agents.admission).
    deadline: float | None = None
    priority: Priority = "interactive"
    repetition_detection: RepetitionDetection | None = None
    # Generation ends, finish reason `recitation`, once the last this-many words written are
    # copied word for word from one `evidence` passage (engines.text_stops; None: never).
    max_recited_words: int | None = Field(None, ge=RECITED_WORDS_MIN, le=RECITED_WORDS_MAX)

    @property
    def deadline_s(self) -> float | None:
        """Seconds left of the deadline now (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.time()


class GenerationResult(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason = "stop"
    # Log-probability of each generated token: a cheap confidence signal.
    token_logprobs: list[float] = Field(default_factory=list)
    model: str = ""
    seconds: float = 0.0
    # What the prompt held when it had to be fitted to the context (None: all evidence shown).
    evidence_used: int | None = None
    history_dropped: int = 0
    # What it is charged of its replica's time: on an engine that batches, its share of the
    # steps it ran in (engines.replica_time); None: its wall time, `seconds`.
    replica_seconds: float | None = None

    def charged_seconds(self) -> float:
        return self.seconds if self.replica_seconds is None else self.replica_seconds


# What a document's metadata may hold: it is stored with the document and returned by GET, and
# its tags travel with every search hit of it.
METADATA_MAX_BYTES = 16_384
METADATA_MAX_DEPTH = 8
MAX_TAGS = 32
TAG_MAX_CHARS = 64


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The bounds above, named in the error. Depth is walked without recursion: the check must
    not be what a deeply nested value breaks."""
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > METADATA_MAX_DEPTH:
            raise ValueError(f"metadata is nested deeper than {METADATA_MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, (dict, list)):
            stack.extend((v, depth + 1) for v in children)
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON; the limit is {METADATA_MAX_BYTES}")
    tags = metadata.get("tags")
    if tags is not None:
        tags = [tags] if isinstance(tags, str) else tags
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("metadata.tags must be a string or a list of strings")
        if len(tags) > MAX_TAGS:
            raise ValueError(f"metadata.tags has {len(tags)} tags; the limit is {MAX_TAGS}")
        if any(len(t) > TAG_MAX_CHARS for t in tags):
            raise ValueError(f"a tag is longer than {TAG_MAX_CHARS} characters")
    return metadata


class DocumentIn(StrictModel):
    id: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Unique within its collection; no control characters. Unset: derived from "
        "the content (so a retry does not duplicate it).",
    )
    title: StrictStr = Field("", max_length=1000)
    text: NonBlank = Field(..., description="The document's text; not blank.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Kept with the document; `tags` (a list) marks it, e.g. `confidential`: a "
        "request that retrieves it never leaves the cluster (policies.sensitive_tags). At most "
        f"{METADATA_MAX_BYTES} bytes as JSON, {METADATA_MAX_DEPTH} levels deep, {MAX_TAGS} tags "
        f"of at most {TAG_MAX_CHARS} characters.",
        json_schema_extra={
            "properties": {
                "tags": {
                    "anyOf": [
                        {"type": "string", "maxLength": TAG_MAX_CHARS},
                        {
                            "type": "array",
                            "items": {"type": "string", "maxLength": TAG_MAX_CHARS},
                            "maxItems": MAX_TAGS,
                        },
                    ]
                }
            }
        },
    )
    collection: CollectionName | None = Field(
        None,
        description="Where the document lives; the API key must be allowed to write it. Unset: "
        "the key's first collection (`default` for a key without collections).",
    )

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(v)


class DocumentBatch(StrictModel):
    documents: list[DocumentIn] = Field(..., min_length=1, max_length=1000)


# The tags of the shapes a body may take: not part of any field's name in an error.
BODY_SHAPES = ("document", "batch")


def _document_or_batch(body: Any) -> str:
    return "batch" if isinstance(body, dict) and "documents" in body else "document"


# What POST /v1/documents takes. Told apart by the `documents` key, so a bad body is reported
# against the one shape it was meant as, not against both.
DocumentsBody = Annotated[
    Annotated[DocumentIn, Tag("document")] | Annotated[DocumentBatch, Tag("batch")],
    Discriminator(_document_or_batch),
]


class DocumentInfo(BaseModel):
    id: str
    collection: str = DEFAULT_COLLECTION
    title: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    chunks: int
    index_version: int
    text: str | None = None
