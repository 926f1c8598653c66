"""`POST /v1/documents` (add or replace, durable on 2xx), `GET` and `DELETE
/v1/documents/{id}`, within the collections the caller's key may read and write."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request

from hybrid_serve.config import APIKey
from hybrid_serve.deployments.errors import APIError, error_responses
from hybrid_serve.deployments.ingress import Ingress, Shared, bounded
from hybrid_serve.retrieval.store import DocRecord, NewDocument
from hybrid_serve.schemas import (
    COLLECTION_PATTERN,
    Collections,
    DocumentBatch,
    DocumentInfo,
    DocumentsBody,
)

router = APIRouter()
CollectionQuery = Annotated[
    str | None,
    Query(
        pattern=COLLECTION_PATTERN,
        description="The document's collection. Unset: GET looks in every collection the key "
        "reads; DELETE uses the key's first collection.",
    ),
]


def writable(caller: APIKey, collection: str | None) -> str:
    """The collection a write goes to, or 403 naming what the key may write (which it knows:
    nothing about other collections is revealed)."""
    target = collection or caller.home()
    allowed = caller.writable()
    if allowed is not None and target not in allowed:
        names = ", ".join(sorted(allowed)) or "none (a read-only key)"
        raise APIError(
            403,
            f"API key {caller.label()!r} may not write collection {target!r}; it writes: {names}",
            "collection_forbidden",
        )
    return target


def readable(caller: APIKey, collection: str | None) -> Collections:
    """Where a read by id looks: the named collection if the key may read it (else nowhere: a
    document there is as absent as one that does not exist), or every readable one."""
    allowed = caller.readable()
    if collection is None:
        return allowed
    if allowed is not None and collection not in allowed:
        return frozenset()
    return frozenset([collection])


async def write(ing: Ingress, request: Request, work: Any) -> Any:
    """Writes take as long as ingestion takes, unless the client sends X-Request-Timeout: a
    default deadline would cut large batches short. A write past its deadline may still
    complete; sending it again is safe (documents are replaced by id)."""
    if "x-request-timeout" not in request.headers:
        return await work
    timeout = ing.deadline(request)
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        raise APIError(
            504,
            f"not acknowledged within {timeout:g} s; the write may still complete: send it "
            "again (documents are replaced by id, so nothing is duplicated)",
            "deadline_exceeded",
        ) from None


def not_found(doc_id: str) -> APIError:
    return APIError(404, f"no document with id {doc_id!r}", "document_not_found")


@router.post(
    "/v1/documents",
    status_code=201,
    summary="Add or replace documents (durable on 2xx)",
    responses=error_responses(401, 403, 413, 422, 503, 504),
)
async def add_documents(
    body: Annotated[DocumentsBody, Body()], request: Request, ing: Shared
) -> dict[str, Any]:
    docs = body.documents if isinstance(body, DocumentBatch) else [body]
    caller = ing.access(request)
    new = [
        NewDocument(
            id=d.id,
            title=d.title,
            text=d.text,
            metadata=d.metadata,
            collection=writable(caller, d.collection),
        )
        for d in docs
    ]
    result = await write(ing, request, ing.retriever.call("upsert", new))
    return {"ids": result["ids"], "index_version": result["index_version"]}


@router.get(
    "/v1/documents/{doc_id:path}",
    response_model=DocumentInfo,
    responses=error_responses(401, 404, 503, 504),
)
async def get_document(
    doc_id: str, request: Request, ing: Shared, collection: CollectionQuery = None
) -> DocumentInfo:
    timeout = ing.deadline(request)
    where = readable(ing.access(request), collection)
    record: DocRecord | None = None
    if where is None or where:
        record = await bounded(ing.retriever.call("get", doc_id, where, read=True), timeout)
    if record is None:
        raise not_found(doc_id)
    status = await bounded(ing.retriever.call("status", read=True), timeout)
    return DocumentInfo(
        id=record.public_id,
        collection=record.collection,
        title=record.title,
        metadata=record.metadata,
        chunks=len(record.chunk_ids),
        index_version=status["version"],
        text=record.text,
    )


@router.delete("/v1/documents/{doc_id:path}", responses=error_responses(401, 403, 404, 503, 504))
async def delete_document(
    doc_id: str, request: Request, ing: Shared, collection: CollectionQuery = None
) -> dict[str, Any]:
    caller = ing.access(request)
    target = collection or caller.home()
    if readable(caller, target) == frozenset():
        raise not_found(doc_id)  # not even readable: as absent as a document that is not there
    target = writable(caller, target)
    result = await write(ing, request, ing.retriever.call("delete", [doc_id], target))
    if not result["deleted"]:
        raise not_found(doc_id)
    return {
        "id": doc_id,
        "collection": target,
        "deleted": True,
        "index_version": result["index_version"],
    }
