"""The keys file: per key a tenant, the secret's SHA-256 (never the secret), the models it
may use (names and glob patterns, the base or not), its scopes and its limits.

    keys:
      - id: key-1a2b3c4d            # public: names the key in logs and `keys revoke`
        tenant: team-a
        sha256: 9f86d081...         # of the secret, which is shown once by `keys add`
        models: [pirate, "team-a-*"]
        base: true                  # may it use the base model itself
        scopes: [inference]         # and/or admin
        limits: {requests_per_minute: 60, tokens_per_minute: 20000, concurrent_requests: 4}

API keys are long random tokens, so one SHA-256 is the right hash (a slow password hash
buys nothing against 256 random bits). The store reads the file again when it changes:
a key added or revoked takes effect on the next request, without a restart.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import secrets
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapterserve.state_files import locked, write_atomically

log = logging.getLogger(__name__)

# metrics: may read /metrics and /health's details (every tenant's series: for Prometheus)
Scope = Literal["inference", "admin", "metrics"]
SECRET_PREFIX = "as-"


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)  # prompt + generated tokens
    concurrent_requests: int | None = Field(None, gt=0)


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: list[str] = Field(default_factory=list)
    base: bool = True
    scopes: list[Scope] = Field(default_factory=lambda: ["inference"])
    limits: KeyLimits = Field(default_factory=KeyLimits)

    def may_use(self, model: str, base_name: str | None) -> bool:
        """Whether the key may use `model`; `base_name` is None where no model is the base."""
        if base_name is not None and model == base_name:
            return self.base
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read(path: Path) -> KeysFile:
    """The file's keys; a missing file has none. Raises ValueError when it is malformed."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return KeysFile()
    try:
        return KeysFile.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"keys file {path} is not valid: {exc}") from None


def write(path: Path, keys: KeysFile) -> None:
    """Atomically (a reader never sees half a file), readable by the owner only."""
    write_atomically(path, yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False), mode=0o600)


def changing(path: Path):
    """Hold the keys file's lock while it is read, changed and written: `keys add` and
    `keys revoke` run at the same time by two people, or by a script, neither lose a key nor
    bring a revoked one back (state_files.py)."""
    return locked(path)


def add(path: Path, tenant: str, models: list[str], base: bool, scopes: list[str], limits: KeyLimits) -> tuple[KeyEntry, str]:
    """A new key in the file; returns it and its secret (shown once, stored only hashed)."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    entry = KeyEntry(
        id=f"key-{secrets.token_hex(4)}", tenant=tenant, sha256=hash_secret(secret),
        models=models, base=base, scopes=scopes, limits=limits,
    )
    with changing(path):
        keys = read(path)
        keys.keys.append(entry)
        write(path, keys)
    return entry, secret


def revoke(path: Path, key_id: str | None = None, tenant: str | None = None) -> list[KeyEntry]:
    """Remove the key with this id, or every key of this tenant; returns what was removed."""
    with changing(path):
        keys = read(path)
        removed = [k for k in keys.keys if k.id == key_id or (tenant is not None and k.tenant == tenant)]
        keys.keys = [k for k in keys.keys if k not in removed]
        write(path, keys)
    return removed


class KeyStore:
    """The keys of a file, read again whenever the file changes (one stat per lookup)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._signature: tuple | None = None
        self._keys: list[KeyEntry] = []
        self.refresh()

    def refresh(self) -> None:
        try:
            stat = self.path.stat()
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            signature = None
        if signature == self._signature:
            return
        try:
            keys = read(self.path).keys
        except (OSError, ValueError) as exc:  # keep the last good keys; say why
            log.error("keys file unchanged in effect: %s", exc)
            return
        self._signature, self._keys = signature, keys
        log.info("keys file %s: %d keys", self.path, len(keys))

    def lookup(self, secret: str | None) -> KeyEntry | None:
        """The key whose secret this is; every stored hash is compared, in constant time."""
        self.refresh()
        if not secret:
            return None
        presented = hash_secret(secret).encode()
        found = None
        for entry in self._keys:
            if hmac.compare_digest(presented, entry.sha256.encode()):
                found = entry
        return found
