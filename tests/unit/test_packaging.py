"""The wheel holds every package of the source tree, the demo recipes and the kernel's
sources, and nothing of the checkout's layout. (The wheel installed as the image installs
it, serving from outside the checkout: tests/integration/test_wheel.py.)"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.wheel_env import ROOT, build_wheel

DEMO_RECIPES = ("pirate", "french", "json", "sentiment", "topic")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to list the sources")
    return zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("packaging"))).namelist()


def package_folders() -> list[str]:
    """Every folder of the source tree that is a Python package (symlinked ones included),
    as a path inside the wheel."""
    source = ROOT / "server"
    found = []
    for folder, dirs, files in os.walk(source / "adapterserve", followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.append(Path(folder).relative_to(source).as_posix())
    return found


def test_every_package_folder_is_in_the_wheel(wheel_names):
    folders = package_folders()
    # the ones a hand-written list once left out, and the demo recipes' symlinked folder
    assert {"adapterserve/tenants", "adapterserve/rayserve", "adapterserve/engine_plugins/cpu_lora", "adapterserve/demo_recipes"} <= set(folders)
    missing = [f for f in folders if f"{f}/__init__.py" not in wheel_names]
    assert not missing, f"package folders missing from the wheel: {missing}"
    modules = [
        Path(folder, name).as_posix() for folder, _, files in os.walk(ROOT / "server" / "adapterserve", followlinks=True)
        for name in files if name.endswith(".py")
    ]
    for module in modules:
        assert Path(module).relative_to(ROOT / "server").as_posix() in wheel_names


def test_the_wheel_holds_the_demo_recipes_and_no_server_package(wheel_names):
    for recipe in DEMO_RECIPES:
        assert f"adapterserve/demo_recipes/{recipe}/recipe.yaml" in wheel_names
        assert f"adapterserve/demo_recipes/{recipe}/data.jsonl" in wheel_names
    assert not [n for n in wheel_names if n.startswith(("server/", "tests/", "adapters/", "bench/"))]
    for source in ("lora_kernel.cpp", "lora_op.cpp"):  # built on the serving machine (native.py)
        assert f"adapterserve/engine_plugins/cpu_lora/{source}" in wheel_names
