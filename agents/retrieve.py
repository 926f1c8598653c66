"""Retrieval for a request: every search it makes — the first, a rewrite's, a sub-task's, a
follow-up's check of its earlier turns — goes through `search`, within the collections its key
may read; a passage of a sensitive document makes the request sensitive from then on."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hybrid_serve.agents.context import RequestContext
from hybrid_serve.agents.services import Services
from hybrid_serve.retrieval.fusion import reciprocal_rank_fusion
from hybrid_serve.schemas import Passage


async def search(s: Services, ctx: RequestContext, query: str, top_k: int) -> list[Passage]:
    passages = await s.retrieve(query, top_k, ctx.collections)
    if s.policy.sensitivity.passages(passages):
        ctx.keep_local()
    return passages


async def search_many(
    s: Services, ctx: RequestContext, queries: Sequence[str], top_k: int
) -> list[Passage]:
    """Every query's hits fused by reciprocal rank, de-duplicated by chunk."""
    unique = list(dict.fromkeys(q.strip() for q in queries if q.strip()))
    lists = await asyncio.gather(*(search(s, ctx, q, top_k) for q in unique))
    by_key = {p.key: p for hits in lists for p in hits}
    fused = reciprocal_rank_fusion([[p.key for p in hits] for hits in lists])
    return [by_key[key] for key, _ in fused[:top_k]]
