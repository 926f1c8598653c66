"""Inference engines behind the SLM deployment. Each is imported only when chosen."""

from __future__ import annotations

import os
from typing import Any

from cluster.config import SLMConfig


def make_engine(cfg: SLMConfig, replicas_on_node: int = 1) -> Any:
    if cfg.engine == "llama_cpp":
        from engines.llama_cpp import LlamaCppEngine
        from retrieval.models import bundled_gguf

        threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, replicas_on_node))
        return LlamaCppEngine(
            model_path=cfg.model_path or bundled_gguf(),
            model_name=cfg.model_name,
            n_ctx=cfg.n_ctx,
            n_threads=threads,
            n_batch=cfg.n_batch,
            contexts=cfg.contexts_per_replica,
        )
    if cfg.engine == "openai":
        from engines.openai_compat import OpenAICompatEngine

        o = cfg.openai
        return OpenAICompatEngine.from_env(
            o.base_url,
            o.model or cfg.model_name,
            o.api_key_env,
            contexts=cfg.contexts_per_replica,
            timeout_s=o.timeout_s,
            max_retries=o.max_retries,
            logprobs=o.logprobs,
        )
    if cfg.engine == "vllm":
        raise ValueError(
            "the vllm engine is its own deployment (engines/vllm_server.py), not an in-process "
            "engine; deployments.app.build chooses it"
        )
    raise ValueError(f"unknown SLM engine {cfg.engine!r}")
