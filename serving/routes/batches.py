"""OpenAI's Files and Batch API (`/v1/files`, `/v1/batches`): a JSONL file of chat or completion requests
answered in the background by the served generators (serving/batches.py says how).

    client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
    client.batches.create(input_file_id=..., endpoint="/v1/chat/completions", completion_window="24h")
    client.batches.retrieve(batch.id).output_file_id  ->  client.files.content(...)

With API keys on, a key sees only the files and batches it created, and its batches are answered under its own
scopes and limits.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from serving.auth import CALLER
from serving.batches import public
from serving.deps import ForInference, ForInferenceJson
from serving.errors import ApiError
from serving.openai_schemas import BatchCreateRequest, BatchList, BatchObject, FileList, FileObject
from serving.routes import ERRORS
from serving.service import Service

router = APIRouter()


def _owner() -> str:
    caller = CALLER.get()
    return caller.name if caller is not None else ""


def _own(service: Service, item: dict[str, Any] | None, kind: str, item_id: str) -> dict[str, Any]:
    """The item if it exists and the caller created it (or keys are off); else 404, as for one that does not."""
    if item is None or (service.gate.required and item.get("owner") != _owner()):
        raise ApiError(404, f"no {kind} '{item_id}'", type="not_found", field=f"{kind}_id")
    return item


@router.post(
    "/v1/files",
    response_model=FileObject,
    tags=["openai"],
    responses=ERRORS,
)
async def upload_file(
    service: ForInference,
    file: Annotated[UploadFile, File(description="A JSONL file of requests, one a line.")],
    purpose: Annotated[Literal["batch"], Form(description="Only `batch` files are taken here.")],
) -> dict[str, Any]:
    """Upload a batch's input file (multipart form: `file`, `purpose=batch`), at most
    `serve.batches.max_file_bytes`. Its lines are checked when a batch is created from it."""
    content = await file.read()
    meta = service.batches.add_file(content, file.filename or "upload.jsonl", purpose, _owner())
    return public(meta)


@router.get("/v1/files", response_model=FileList, tags=["openai"], responses=ERRORS)
async def list_files(service: ForInference) -> FileList:
    """Files the caller uploaded, and the output and error files of its batches, newest first."""
    mine = [f for f in service.batches.files() if not service.gate.required or f.get("owner") == _owner()]
    return FileList(data=[FileObject(**public(f)) for f in mine])


@router.get("/v1/files/{file_id}", response_model=FileObject, tags=["openai"], responses=ERRORS)
async def get_file(file_id: str, service: ForInference) -> dict[str, Any]:
    return public(_own(service, service.batches.file(file_id), "file", file_id))


@router.get(
    "/v1/files/{file_id}/content",
    tags=["openai"],
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "The file as uploaded"}},
    response_class=Response,
)
async def file_content(file_id: str, service: ForInference) -> Response:
    """The file's bytes: an uploaded input, or a batch's output or error file (JSONL)."""
    _own(service, service.batches.file(file_id), "file", file_id)
    return Response(service.batches.content_path(file_id).read_bytes(), media_type="application/octet-stream")


@router.post(
    "/v1/batches",
    response_model=BatchObject,
    tags=["openai"],
    responses=ERRORS,
)
async def create_batch(body: BatchCreateRequest, request: Request, service: ForInferenceJson) -> dict[str, Any]:
    """Answer every request of an uploaded file in the background; `GET /v1/batches/{id}` tells how far it is."""
    _own(service, service.batches.file(body.input_file_id), "file", body.input_file_id)
    now = int(time.time())
    batch = {
        "id": f"batch_{uuid.uuid4().hex}",
        "object": "batch",
        "endpoint": body.endpoint,
        "errors": None,
        "input_file_id": body.input_file_id,
        "completion_window": body.completion_window,
        "status": "validating",
        "created_at": now,
        "expires_at": now + math.ceil(service.cfg.batches.completion_window_s),
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.metadata,
        "owner": _owner(),
    }
    # the batch's lines are sent with the caller's own credentials: its scopes and limits hold for them
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-api-key")}
    service.batch_runner.start(batch, request.app, headers)
    return public(batch)


@router.get("/v1/batches", response_model=BatchList, tags=["openai"], responses=ERRORS)
async def list_batches(
    service: ForInference, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> BatchList:
    """The caller's batches, newest first (`after`: the last id of the previous page)."""
    mine = [b for b in service.batches.batches() if not service.gate.required or b.get("owner") == _owner()]
    if after is not None:
        ids = [b["id"] for b in mine]
        mine = mine[ids.index(after) + 1 :] if after in ids else []
    page = [BatchObject(**public(b)) for b in mine[:limit]]
    return BatchList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(mine) > limit,
    )


@router.get("/v1/batches/{batch_id}", response_model=BatchObject, tags=["openai"], responses=ERRORS)
async def get_batch(batch_id: str, service: ForInference) -> dict[str, Any]:
    return public(_own(service, service.batches.batch(batch_id), "batch", batch_id))


@router.post(
    "/v1/batches/{batch_id}/cancel",
    response_model=BatchObject,
    tags=["openai"],
    responses=ERRORS,
)
async def cancel_batch(batch_id: str, service: ForInference) -> dict[str, Any]:
    """Send no more of the batch's requests: `cancelling` until those in flight are answered, then `cancelled`
    (what was answered stays in its output file)."""
    batch = _own(service, service.batches.batch(batch_id), "batch", batch_id)
    return public(service.batch_runner.cancel(batch))
