"""The package works outside a checkout: a wheel built from the sources, installed (not
editable) into a fresh environment, runs the CLI from another directory and finds the demo
recipes inside itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPES = ("pirate", "french", "json", "sentiment")


def tracked_sources(destination: Path) -> Path:
    """A copy of the checkout's tracked files: the build never writes into the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the sources")
    work = tmp_path_factory.mktemp("packaging")
    sources = tracked_sources(work / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(sources)], check=True)
    (wheel,) = (work / "dist").glob("adapterserve-*.whl")
    environment = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True)
    subprocess.run([*pip, "--python", str(environment / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)], check=True)
    # the dependencies come from this environment, appended after the fresh one's own
    # site-packages (a path line in a .pth file: this environment's editable hooks stay off)
    fresh_site = Path(subprocess.run(
        [str(environment / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = work / "elsewhere"
    outside.mkdir()
    return wheel, environment, outside


def run(environment: Path, outside: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(environment / "bin" / command[0]), *command[1:]], cwd=outside, env=env, capture_output=True, text=True, timeout=300,
    )


def test_the_wheel_holds_the_demo_recipes_and_no_server_package(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in DEMO_RECIPES:
        assert f"adapterserve/demo_recipes/{recipe}/recipe.yaml" in names
        assert f"adapterserve/demo_recipes/{recipe}/data.jsonl" in names
    assert not [n for n in names if n.startswith("server/")]
    assert "adapterserve/engine_plugins/cpu_lora/punica.py" in names
    for source in ("lora_kernel.cpp", "lora_op.cpp"):  # built on the serving machine (native.py)
        assert f"adapterserve/engine_plugins/cpu_lora/{source}" in names


def test_the_installed_package_imports_from_the_fresh_environment(installed):
    _, environment, outside = installed
    found = run(environment, outside, "python", "-c", "import adapterserve; print(adapterserve.__file__)")
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(environment)
    recipes = run(environment, outside, "python", "-c", (
        "from adapterserve.config import Settings; from adapterserve.training.recipes import demo_recipes; "
        "s = Settings(); print(s.demo_recipes_dir); print(' '.join(sorted(r.name for r in demo_recipes(s.demo_recipes_dir))))"
    ))
    assert recipes.returncode == 0, recipes.stderr[-3000:]
    folder, names = recipes.stdout.strip().splitlines()[-2:]
    assert Path(folder).is_relative_to(environment)  # inside the installed package, not the checkout
    assert set(DEMO_RECIPES) <= set(names.split())


def test_the_cli_runs_outside_the_checkout(installed):
    _, environment, outside = installed
    helped = run(environment, outside, "adapterserve", "adapters", "build", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage" in helped.stdout
    listed = run(environment, outside, "adapterserve", "adapters", "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "Traceback" not in listed.stderr
    for name in DEMO_RECIPES:  # the demo store, built from the recipes the wheel carries
        assert name in listed.stdout, listed.stdout
