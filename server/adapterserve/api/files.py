"""OpenAI's files API for fine-tuning data: POST /v1/files (multipart: `file`, `purpose`),
GET /v1/files, GET /v1/files/{id}, GET /v1/files/{id}/content, DELETE /v1/files/{id}.

An upload is parsed as it streams in, within the size limit, then checked line by line as training data
(finetuning/datasets.py); a malformed file is refused with the line and the reason.
Files belong to the key's tenant: another tenant's file reads as not found.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from adapterserve.errors import InvalidRequest, NotFound
from adapterserve.finetuning.datasets import DatasetInvalid, read_chat_file

from .middleware import context_of
from .serving import bounded_request

router = APIRouter()
PURPOSES = {"fine-tune"}
CHUNK = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the purpose field


def service(raw_request: Request):
    fine_tuning = getattr(raw_request.app.state, "fine_tuning", None)
    if fine_tuning is None:
        raise InvalidRequest("Fine-tuning is not available on this server.", code="fine_tuning_unavailable")
    return fine_tuning


def tenant_of(raw_request: Request) -> str:
    key = context_of(raw_request).key
    return key.tenant if key is not None else ""


def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


@router.post("/v1/files")
async def create_file(raw_request: Request):
    fine_tuning, tenant = service(raw_request), tenant_of(raw_request)
    most = fine_tuning.settings.fine_tuning_max_file_bytes
    # the multipart body parsed as it streams in (the file spooled to disk past 1 MB, not
    # held in memory), within the file's limit (+ room for the form's own parts): a larger
    # one is a 413
    request = bounded_request(raw_request, most + MULTIPART_OVERHEAD)
    async with request.form(max_files=1, max_fields=4, max_part_size=1024) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {sorted(PURPOSES)}.", param="purpose", code="invalid_purpose")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("A file is required (multipart field 'file').", param="file", code="missing_file")
        staged, size = await _stage(upload, most, fine_tuning.store.root)
    stored = fine_tuning.store.stored_bytes(tenant) + size
    if stored > fine_tuning.settings.fine_tuning_max_stored_bytes:
        staged.unlink(missing_ok=True)
        raise InvalidRequest(f"The files stored would take {stored} bytes, over the limit of "
                             f"{fine_tuning.settings.fine_tuning_max_stored_bytes}; delete some first.",
                             param="file", code="storage_limit_exceeded")
    try:
        await asyncio.to_thread(read_chat_file, staged)
    except DatasetInvalid as exc:
        staged.unlink(missing_ok=True)
        raise InvalidRequest(f"Invalid file format for fine-tuning: {exc}", param="file", code="invalid_file_format") from None
    name = Path(upload.filename or "upload.jsonl").name[:255]
    return file_object(fine_tuning.store.add_file(tenant, name, purpose, staged, size, "processed", None))


async def _stage(upload, most: int, root: Path) -> tuple[Path, int]:
    """The upload's bytes in a temporary file, at most `most` of them."""
    handle = tempfile.NamedTemporaryFile(dir=root, prefix=".upload-", delete=False)
    size = 0
    with handle:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            if size > most:
                Path(handle.name).unlink(missing_ok=True)
                raise InvalidRequest(f"The file is larger than the limit of {most} bytes.", param="file", code="file_too_large")
            handle.write(chunk)
    return Path(handle.name), size


@router.get("/v1/files")
async def list_files(raw_request: Request, purpose: str | None = None):
    fine_tuning, tenant = service(raw_request), tenant_of(raw_request)
    rows = fine_tuning.store.files(tenant, purpose)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": False,
            "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}


def _file(raw_request: Request, file_id: str) -> dict:
    row = service(raw_request).store.file(tenant_of(raw_request), file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
    return row


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, raw_request: Request):
    return file_object(_file(raw_request, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, raw_request: Request):
    row = _file(raw_request, file_id)
    return FileResponse(service(raw_request).store.file_path(row["id"]), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, raw_request: Request):
    row = _file(raw_request, file_id)
    service(raw_request).store.delete_file(tenant_of(raw_request), row["id"])
    return {"id": row["id"], "object": "file", "deleted": True}
