"""Adapter signatures: OpenSSF Model Signing (the `model-signing` package), key-based, so
it signs and verifies offline.

A signed adapter holds `model.sig` beside its files: a Sigstore bundle whose manifest lists
the SHA-256 of each file the server reads (config, weights, labels). `sign_folder` signs
exactly those files (anything else in the folder, a README or a training log, is left out
of the manifest, so it need not be fetched); `verify_folder` checks a fetched copy against
each trusted public key: the files present must be exactly the signed ones, each with its
signed digest. A folder signed over other files (the model_signing CLI over a whole
training folder) does not verify: sign with `adapterserve adapters sign`, or list the
other files as ignored paths when signing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .limits import SERVED_FILES, SIGNATURE_FILE
from .records import AdapterInvalid, printable


def sign_folder(folder: Path, private_key: Path) -> Path:
    """Sign the adapter files of `folder` with an elliptic-curve private key (PEM); the
    signature is written to `folder/model.sig`."""
    from model_signing import hashing, signing

    folder = Path(folder)
    others = [entry.name for entry in folder.iterdir() if entry.name not in SERVED_FILES]
    config = hashing.Config().set_ignored_paths(paths=[*others, SIGNATURE_FILE], ignore_git_paths=True)
    signature = folder / SIGNATURE_FILE
    signing.Config().use_elliptic_key_signer(private_key=Path(private_key)).set_hashing_config(config).sign(folder, signature)
    return signature


def trusts_signer(private_key: Path, trusted_keys: tuple[str, ...]) -> bool:
    """Whether the public half of `private_key` is one of `trusted_keys` (PEM files)."""
    from cryptography.hazmat.primitives import serialization

    def public_bytes(key) -> bytes:
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    mine = public_bytes(serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None).public_key())
    return any(public_bytes(serialization.load_pem_public_key(Path(key).read_bytes())) == mine for key in trusted_keys)


def verify_folder(folder: Path, trusted_keys: tuple[str, ...], name: str) -> None:
    """Raise AdapterInvalid unless the adapter files in `folder` verify against its
    `model.sig` by one of `trusted_keys` (PEM public key files)."""
    folder = Path(folder)
    if not trusted_keys:
        raise AdapterInvalid(name, "signatures are required but no trusted key is configured (trusted_adapter_keys)")
    if not (folder / SIGNATURE_FILE).is_file():
        raise AdapterInvalid(name, f"not signed (no {SIGNATURE_FILE}); signatures are required")
    extra = [entry.name for entry in folder.iterdir() if entry.name not in SERVED_FILES]
    if extra:  # a folder read in place (the CLI's reports): verify a copy of its adapter files
        with tempfile.TemporaryDirectory(prefix="adapterserve-verify-") as copy:
            for entry in folder.iterdir():
                if entry.name in SERVED_FILES and entry.is_file():
                    shutil.copyfile(entry, Path(copy) / entry.name)
            return verify_folder(Path(copy), trusted_keys, name)
    reasons = []
    for key in trusted_keys:
        reason = _verify_with(folder, Path(key))
        if reason is None:
            return
        reasons.append(reason)
    raise AdapterInvalid(name, "signature refused: " + "; ".join(dict.fromkeys(reasons)))


def _verify_with(folder: Path, public_key: Path) -> str | None:
    """None when the signature verifies with this key, else why not."""
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).verify(folder, folder / SIGNATURE_FILE)
    except ValueError as exc:
        text = str(exc)
        if "Signature mismatch" in text:
            return "the files do not match what was signed (" + printable(text.partition(":")[2].strip(), 300) + ")"
        return "not signed by a trusted key (" + printable(text, 200) + ")"
    except Exception as exc:  # a damaged bundle, an unreadable key: refused, with the reason
        return f"the signature cannot be read ({type(exc).__name__}: {printable(str(exc), 200)})"
    return None
