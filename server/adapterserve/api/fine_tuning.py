"""OpenAI's fine-tuning jobs API: POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs
(paged with `after` and `limit`), GET .../{id}, POST .../{id}/cancel, GET .../{id}/events,
GET .../{id}/checkpoints, with the shapes the official `openai` client reads.

A job is checked before it is queued: the base it names, its files (the key's tenant's,
purpose `fine-tune`, each example within the base's context), the method
(`supervised`, with `n_epochs`, `batch_size`, `learning_rate_multiplier`: `auto` means the
defaults in finetuning/defaults.py) and the LoRA extension (`lora`: `rank`, `alpha`, `target_modules`; shared
mode only: a dedicated server fine-tunes every weight); a bad one is refused with
OpenAI's error body and nothing reaches the trainer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from adapterserve.api.serving import read_json_object
from adapterserve.errors import InvalidRequest, LimitExceeded, NotFound, model_not_found
from adapterserve.finetuning.datasets import Dataset, DatasetInvalid, check_lengths, read_chat_file
from adapterserve.finetuning.defaults import DEFAULTS, LIMITS, LORA_DEFAULTS, learning_rate
from adapterserve.finetuning.naming import SUFFIX, fine_tuned_model

from .files import service, tenant_of
from .middleware import context_of

router = APIRouter()

ACTIVE = ("validating_files", "queued", "running")
ADAPTER_KINDS = ("lora", "head")  # shared mode; dedicated mode trains "full" and "full_head" (finetuning/trainer.py)


def job_object(job: dict, base_name: str) -> dict:
    body, resolved = job["body"], job["body"]["resolved"]
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"], "model": body["model"],
        "status": job["status"], "training_file": body["training_file"], "validation_file": body.get("validation_file"),
        "fine_tuned_model": job["fine_tuned_model"], "finished_at": job["finished_at"], "error": job["error"],
        "hyperparameters": body["hyperparameters"], "seed": resolved["seed"], "trained_tokens": job["trained_tokens"],
        "result_files": [], "organization_id": job["tenant"] or "adapterserve", "estimated_finish": None,
        "integrations": [], "metadata": body.get("metadata"), "suffix": body.get("suffix"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": body["hyperparameters"]}},
        # adapterserve's extensions: the adapter's LoRA shape (none for a full fine-tune), what was trained
        "lora": {k: resolved[k] for k in ("rank", "alpha", "target_modules")} if resolved.get("kind") in ADAPTER_KINDS else None,
        "kind": resolved.get("kind", "lora"), "labels": resolved.get("labels") or None,  # a head adapter's labels
        "costs": job["costs"],  # adapterserve's extension: what training cost (trainable params, time, memory, bytes)
    }


def _number(value: Any, name: str, kind: type) -> Any:
    if value in (None, "auto"):
        return DEFAULTS.get(name)
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise InvalidRequest(f"{name} must be 'auto' or a number.", param=name, code="invalid_hyperparameter")
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}.", param=name, code="invalid_hyperparameter")
    return kind(value)


def _resolve(body: dict, full: bool) -> tuple[dict, dict]:
    """(hyperparameters as asked, with `auto` kept; what the trainer gets)."""
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") != "supervised":
        raise InvalidRequest("Only the 'supervised' method is supported.", param="method", code="unsupported_method")
    asked = (method.get("supervised") or {}).get("hyperparameters") or body.get("hyperparameters") or {}
    if not isinstance(asked, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="hyperparameters", code="invalid_hyperparameter")
    epochs = _number(asked.get("n_epochs"), "n_epochs", int)
    batch = _number(asked.get("batch_size"), "batch_size", int)
    multiplier = _number(asked.get("learning_rate_multiplier"), "learning_rate_multiplier", float)
    lora = body.get("lora") or {}
    if full and lora:
        raise InvalidRequest("This server runs in dedicated mode: a job fine-tunes every weight, and lora does not apply.",
                             param="lora", code="invalid_lora")
    if not isinstance(lora, dict):
        raise InvalidRequest("lora must be an object (rank, alpha, target_modules).", param="lora", code="invalid_lora")
    targets = lora.get("target_modules", LORA_DEFAULTS["target_modules"])
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.isidentifier() for t in targets):
        raise InvalidRequest("lora.target_modules must be a list of module names.", param="lora.target_modules", code="invalid_lora")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise InvalidRequest("seed must be an integer from 0 to 2^31 - 1.", param="seed", code="invalid_seed")
    resolved = {
        "n_epochs": epochs, "batch_size": batch, "learning_rate": learning_rate(full, multiplier), "seed": seed,
        "rank": int(_number(lora.get("rank", LORA_DEFAULTS["rank"]), "rank", int)),
        "alpha": int(_number(lora.get("alpha", LORA_DEFAULTS["alpha"]), "alpha", int)), "target_modules": targets,
    }
    shown = {"n_epochs": asked.get("n_epochs", "auto"), "batch_size": asked.get("batch_size", "auto"),
             "learning_rate_multiplier": asked.get("learning_rate_multiplier", "auto")}
    return shown, resolved


@router.post("/v1/fine_tuning/jobs")
async def create_job(raw_request: Request):
    fine_tuning, tenant = service(raw_request), tenant_of(raw_request)
    body = await read_json_object(raw_request)
    model = body.get("model")
    if model != fine_tuning.base_name or not _may_train(raw_request, model):
        raise model_not_found(str(model)) if isinstance(model, str) else InvalidRequest(
            "model is required: the base model to fine-tune.", param="model", code="missing_model")
    unsignable = fine_tuning.unsignable
    if unsignable is not None:  # refused now, not after the training
        raise InvalidRequest(unsignable, param=None, code="signing_key_required")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise InvalidRequest("suffix must be 1-40 letters, digits, '.', '_' or '-'.", param="suffix", code="invalid_suffix")
    _check_metadata(body.get("metadata"))
    shown, resolved = _resolve(body, fine_tuning.full)
    unknown = set(resolved["target_modules"]) - fine_tuning.module_names()
    if unknown:
        raise InvalidRequest(f"lora.target_modules names modules the base does not have: {sorted(unknown)}.",
                             param="lora.target_modules", code="invalid_lora")
    training = await _check_file(fine_tuning, tenant, body.get("training_file"), "training_file", required=True)
    validation = await _check_file(fine_tuning, tenant, body.get("validation_file"), "validation_file", required=False)
    if validation is not None and (validation.kind != training.kind or not set(validation.labels) <= set(training.labels)):
        raise InvalidRequest("validation_file must hold examples of the training file's kind (and labels).",
                             param="validation_file", code="invalid_file")
    if len(training.labels) > fine_tuning.settings.max_cls_labels:
        raise InvalidRequest(f"The file names {len(training.labels)} labels; at most {fine_tuning.settings.max_cls_labels} "
                             "(max_cls_labels).", param="training_file", code="too_many_labels")
    classifier = training.kind == "classification"
    kind = ("full_head" if classifier else "full") if fine_tuning.full else ("head" if classifier else "lora")
    resolved.update(kind=kind, labels=training.labels)
    if len(fine_tuning.store.jobs(tenant, ACTIVE)) >= fine_tuning.settings.fine_tuning_max_active_jobs:
        raise LimitExceeded("active_jobs", f"At most {fine_tuning.settings.fine_tuning_max_active_jobs} jobs may be queued "
                            "or running at once; wait for one to finish or cancel one.", retry_after_s=60)
    kept = {k: body.get(k) for k in ("model", "training_file", "validation_file", "suffix", "metadata")}
    job = fine_tuning.store.add_job(tenant, {**kept, "hyperparameters": shown, "resolved": resolved}, "queued")
    fine_tuning.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
    fine_tuning.store.add_event(job["id"], f"Validated training file: {body['training_file']}")
    fine_tuning.runner.wake()
    return job_object(job, fine_tuning.base_name)


def _may_train(raw_request: Request, base: str) -> bool:
    """A tenant's key may fine-tune the base it may use (shared mode: `base: true`); in
    dedicated mode the base is served by no one, and every inference key may train on it."""
    key = context_of(raw_request).key
    host = raw_request.app.state.host
    return key is None or host.base_name is None or key.may_use(base, host.base_name)


def _check_metadata(metadata: Any) -> None:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())):
        raise InvalidRequest("metadata must hold at most 16 string pairs (keys up to 64 characters, values up to 512).",
                             param="metadata", code="invalid_metadata")


async def _check_file(fine_tuning, tenant: str, file_id: Any, param: str, required: bool) -> Dataset | None:
    """The file's examples, checked (format, then lengths against the base's context)."""
    if file_id is None and not required:
        return None
    row = fine_tuning.store.file(tenant, file_id) if isinstance(file_id, str) else None
    if row is None:
        raise InvalidRequest(f"{param} {file_id!r} is not a file of yours.", param=param, code="invalid_file")
    if row["purpose"] != "fine-tune":
        raise InvalidRequest(f"{param} {file_id} was not uploaded for fine-tune.", param=param, code="invalid_file")
    try:
        dataset = await asyncio.to_thread(read_chat_file, fine_tuning.store.file_path(file_id), 1)
        await asyncio.to_thread(check_lengths, dataset, fine_tuning.tokenizer(), fine_tuning.settings.max_model_len)
    except DatasetInvalid as exc:
        raise InvalidRequest(f"{param} {file_id}: {exc}", param=param, code="invalid_file_format") from None
    return dataset


def _job(raw_request: Request, job_id: str) -> dict:
    job = service(raw_request).store.job(tenant_of(raw_request), job_id)
    if job is None:
        raise NotFound(f"No fine-tuning job found with id {job_id}.", param="fine_tuning_job_id", code="job_not_found")
    return job


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    limit = max(1, min(limit, 100))
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(raw_request: Request, after: str | None = None, limit: int = 20):
    fine_tuning = service(raw_request)
    base_name = fine_tuning.base_name
    jobs = [job_object(j, base_name) for j in fine_tuning.store.jobs(tenant_of(raw_request))]
    return _page(jobs, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, raw_request: Request):
    return job_object(_job(raw_request, job_id), service(raw_request).base_name)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, raw_request: Request):
    job = _job(raw_request, job_id)
    if job["status"] not in ACTIVE:
        raise InvalidRequest(f"The job is {job['status']}; only a queued or running job can be cancelled.",
                             param="fine_tuning_job_id", code="job_not_cancellable")
    await service(raw_request).runner.cancel(job)
    return job_object(_job(raw_request, job_id), service(raw_request).base_name)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, raw_request: Request, after: str | None = None, limit: int = 20):
    job = _job(raw_request, job_id)
    events = [{"id": e["id"], "object": "fine_tuning.job.event", "created_at": e["created_at"], "level": e["level"],
               "message": e["message"], "data": e["data"], "type": e["type"]}
              for e in service(raw_request).store.events(job["id"])]
    return _page(events, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, raw_request: Request, after: str | None = None, limit: int = 10):
    job = _job(raw_request, job_id)
    base_name = service(raw_request).base_name
    checkpoints = [{"id": c["id"], "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
                    "fine_tuning_job_id": job["id"], "step_number": c["step_number"], "metrics": c["metrics"],
                    "fine_tuned_model_checkpoint": f"{fine_tuned_model(job, base_name)}:ckpt-step-{c['step_number']}"}
                   for c in service(raw_request).store.checkpoints(job["id"])]
    return _page(checkpoints, after, limit)
