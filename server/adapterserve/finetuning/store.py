"""What the fine-tuning API keeps, so that nothing is lost on a restart: files, jobs, their
events and checkpoints in one SQLite database (the standard library's), the uploaded
files' bytes beside it (`files/<id>.jsonl`).

Every row carries its tenant ("" on a server without keys): a tenant's reads are always
filtered by it, so another tenant's file or job reads as not found. One connection per
call, in WAL mode, so the API's threads and the job runner can read and write at once.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL, status_details TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL, body TEXT NOT NULL,
    status TEXT NOT NULL, finished_at INTEGER, fine_tuned_model TEXT, adapter TEXT,
    trained_tokens INTEGER, error TEXT, costs TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, seq INTEGER NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step_number INTEGER NOT NULL,
    metrics TEXT NOT NULL, path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
"""

JOB_FIELDS = ("status", "finished_at", "fine_tuned_model", "adapter", "trained_tokens", "error", "costs")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class FineTuningStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "fine_tuning.sqlite3"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # one transaction: committed, or rolled back on an exception
                yield db
        finally:
            db.close()

    # --- files ------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(self, tenant: str, filename: str, purpose: str, staged: Path, size: int, status: str,
                 details: str | None) -> dict:
        """Register an uploaded file whose bytes are at `staged` (moved into the store)."""
        file_id = new_id("file")
        staged.rename(self.file_path(file_id))
        row = dict(id=file_id, tenant=tenant, filename=filename, purpose=purpose, bytes=size,
                   created_at=int(time.time()), status=status, status_details=details)
        with self._connect() as db:
            db.execute("INSERT INTO files VALUES (:id, :tenant, :filename, :purpose, :bytes, :created_at, :status, :status_details)", row)
        return row

    def file(self, tenant: str, file_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).fetchone()
        return dict(row) if row else None

    def files(self, tenant: str, purpose: str | None = None) -> list[dict]:
        query, args = "SELECT * FROM files WHERE tenant = ?", [tenant]
        if purpose:
            query, args = query + " AND purpose = ?", args + [purpose]
        with self._connect() as db:
            return [dict(r) for r in db.execute(query + " ORDER BY created_at DESC, id", args)]

    def stored_bytes(self, tenant: str) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE tenant = ?", (tenant,)).fetchone()[0])

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._connect() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    # --- jobs ---------------------------------------------------------------------------
    def add_job(self, tenant: str, body: dict, status: str) -> dict:
        row = dict(id=new_id("ftjob"), tenant=tenant, created_at=int(time.time()), body=json.dumps(body), status=status)
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, tenant, created_at, body, status) VALUES (:id, :tenant, :created_at, :body, :status)", row)
        return self.job(tenant, row["id"])

    def job(self, tenant: str | None, job_id: str) -> dict | None:
        """A job of `tenant` (None: of any tenant, for the runner)."""
        with self._connect() as db:
            if tenant is None:
                row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            else:
                row = db.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return _job(row) if row else None

    def jobs(self, tenant: str | None, statuses: tuple[str, ...] = ()) -> list[dict]:
        """Newest first; every tenant's when `tenant` is None."""
        query, args = "SELECT * FROM jobs WHERE 1 = 1", []
        if tenant is not None:
            query, args = query + " AND tenant = ?", [tenant]
        if statuses:
            query += f" AND status IN ({', '.join('?' * len(statuses))})"
            args += list(statuses)
        with self._connect() as db:
            return [_job(r) for r in db.execute(query + " ORDER BY created_at DESC, rowid DESC", args)]

    def count(self, status: str) -> int:
        """Jobs in `status`, every tenant's (the metrics)."""
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0])

    def owners(self) -> dict[str, str]:
        """Every fine-tuned adapter -> the tenant whose job produced it."""
        with self._connect() as db:
            return dict(db.execute("SELECT adapter, tenant FROM jobs WHERE status = 'succeeded' AND adapter IS NOT NULL"))

    def owner_of(self, adapter: str) -> str | None:
        """The tenant whose job produced adapter `adapter`; None when no job did."""
        with self._connect() as db:
            row = db.execute("SELECT tenant FROM jobs WHERE adapter = ? AND status = 'succeeded'", (adapter,)).fetchone()
        return row[0] if row else None

    def update_job(self, job_id: str, **fields) -> None:
        unknown = set(fields) - set(JOB_FIELDS)
        if unknown:
            raise ValueError(f"not job fields: {unknown}")
        values = {k: json.dumps(v) if k in ("error", "costs") and v is not None else v for k, v in fields.items()}
        assignments = ", ".join(f"{k} = :{k}" for k in values)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = :job_id", {**values, "job_id": job_id})

    # --- events and checkpoints -----------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None, kind: str = "message") -> None:
        with self._connect() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                new_id("ftevent"), job_id, seq, int(time.time()), level, message, kind, json.dumps(data) if data else None))

    def events(self, job_id: str) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [{**dict(r), "data": json.loads(r["data"]) if r["data"] else None} for r in rows]

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: Path) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)", (
                new_id("ftckpt"), job_id, int(time.time()), step, json.dumps(metrics), str(path)))

    def checkpoints(self, job_id: str) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step_number DESC", (job_id,)).fetchall()
        return [{**dict(r), "metrics": json.loads(r["metrics"])} for r in rows]


def _job(row) -> dict:
    job = dict(row)
    job["body"] = json.loads(job["body"])
    for key in ("error", "costs"):
        job[key] = json.loads(job[key]) if job[key] else None
    return job
