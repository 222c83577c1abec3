"""Runtime adapter administration, behind the admin API key.

Two shapes: adapterserve's own (`/admin/adapters/...`) and vLLM's
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) so tools written for vLLM work.
Adapters are found by name in the configured stores. A `lora_path`, when a vLLM-style
client sends one, must be that adapter's folder inside a store: a client can never make
the server read an arbitrary path.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from adapterserve.errors import adapter_not_loaded, not_in_dedicated_mode
from adapterserve.metrics.engines import engine_reports
from adapterserve.registry.records import is_safe_name

from .auth import require_admin_key
from .errors import APIError
from .middleware import context_of
from .serving import read_json_object

router = APIRouter(dependencies=[Depends(require_admin_key)])


def _record_json(record) -> dict:
    data = asdict(record)
    data["path"] = str(record.path)
    data["source"] = str(record.source) if record.source else None
    return data


def _check_name(name: object, raw_request: Request | None = None) -> str:
    """A valid adapter name the caller may administer: a tenant's admin key administers
    the models its key may use, and any other name is answered as one that does not exist."""
    if not isinstance(name, str) or not name:
        raise APIError(400, "'lora_name' must be provided.", param="lora_name")
    if not is_safe_name(name):
        raise APIError(400, f"{name!r} is not a valid adapter name.", param="lora_name")
    if raw_request is not None and not _may_administer(raw_request, name):
        raise adapter_not_loaded(name)
    return name


def _may_administer(raw_request: Request, name: str) -> bool:
    tenant = context_of(raw_request).admin_tenant
    return tenant is None or tenant.may_use(name, raw_request.app.state.host.base_name)


def _require_global_admin(raw_request: Request) -> None:
    if context_of(raw_request).admin_tenant is not None:
        raise APIError(403, "This operation touches every tenant's adapters: it needs the server's admin key.", code="insufficient_scope")


def _check_path(raw_request: Request, name: str, lora_path: object) -> None:
    """A vLLM client's lora_path is accepted only as the store folder of that name. Blocking:
    the lookup is a LIST request in S3, so callers run it in a worker thread."""
    if lora_path in (None, ""):
        return
    registry = _registry(raw_request)
    source = registry.locate(name)
    try:
        allowed = (
            isinstance(lora_path, str) and source is not None
            and Path(lora_path).resolve() == Path(source.location(name)).resolve()
        )
    except (ValueError, OSError, RuntimeError):  # NUL bytes, symlink loops, names too long
        allowed = False
    if not allowed:
        raise APIError(
            403,
            "lora_path must be the adapter's folder inside a configured adapter store "
            "(or be omitted: adapters are found by name).",
            param="lora_path",
            code="path_not_allowed",
        )


def _registry(raw_request: Request):
    registry = raw_request.app.state.host.registry
    if registry is None:
        raise not_in_dedicated_mode()
    return registry


@router.get("/admin/engines")
async def list_engines(raw_request: Request):
    """Each running engine with its processes (for operators and for failure tests); on Ray
    Serve, every replica's engines, each with its replica."""
    _require_global_admin(raw_request)  # processes and every tenant's adapter ids
    host = raw_request.app.state.host
    engines = await host.engine_reports()  # Ray Serve: each replica reports its own
    if engines is None:
        engines = engine_reports(host, raw_request.app.state.metrics)
    return {"mode": host.mode, "engines": engines}


@router.get("/admin/adapters")
async def list_adapters(raw_request: Request):
    registry = _registry(raw_request)
    pinned = raw_request.app.state.host.pinned
    records = [r for r in sorted(registry.adapters.values(), key=lambda r: r.name) if _may_administer(raw_request, r.name)]
    global_admin = context_of(raw_request).admin_tenant is None
    return {
        "adapters": [{**_record_json(r), "pinned": r.name in pinned} for r in records],
        "refused": [
            {"name": p.name, "path": str(p.path), "reason": p.reason} for p in registry.problems
            if _may_administer(raw_request, p.name)
        ],
        "stores": [str(s) for s in registry.stores] if global_admin else [],
    }


@router.post("/admin/adapters/{name}/load")
async def load(name: str, raw_request: Request):
    record = await raw_request.app.state.host.load_adapter(_check_name(name, raw_request))
    return {"status": "loaded", "adapter": _record_json(record)}


@router.post("/admin/adapters/{name}/reload")
async def reload(name: str, raw_request: Request):
    record = await raw_request.app.state.host.reload_adapter(_check_name(name, raw_request))
    return {"status": "reloaded", "adapter": _record_json(record)}


@router.post("/admin/adapters/{name}/unload")
async def unload(name: str, raw_request: Request):
    await raw_request.app.state.host.unload_adapter(_check_name(name, raw_request))
    return {"status": "unloaded", "name": name}


@router.post("/admin/adapters/{name}/pin")
async def pin(name: str, raw_request: Request):
    record = await raw_request.app.state.host.pin_adapter(_check_name(name, raw_request))
    return {"status": "pinned", "adapter": _record_json(record)}


@router.post("/admin/adapters/{name}/unpin")
async def unpin(name: str, raw_request: Request):
    record = await raw_request.app.state.host.unpin_adapter(_check_name(name, raw_request))
    return {"status": "unpinned", "adapter": _record_json(record)}


@router.post("/admin/adapters/scan")
async def scan(raw_request: Request):
    """Scan the stores now (the server also does it every adapter_scan_interval_s)."""
    _require_global_admin(raw_request)
    changes = await raw_request.app.state.host.rescan()
    return {"added": changes.added, "changed": changes.changed, "removed": changes.removed}


@router.post("/v1/load_lora_adapter")
async def vllm_load(raw_request: Request):
    body = await read_json_object(raw_request)
    name = _check_name(body.get("lora_name"), raw_request)
    await asyncio.to_thread(_check_path, raw_request, name, body.get("lora_path"))
    host = raw_request.app.state.host
    if body.get("load_inplace"):
        await host.reload_adapter(name)
    else:
        await host.load_adapter(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def vllm_unload(raw_request: Request):
    body = await read_json_object(raw_request)
    name = _check_name(body.get("lora_name"), raw_request)
    await raw_request.app.state.host.unload_adapter(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
