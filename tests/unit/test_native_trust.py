"""Native code is built and loaded only where the server's user alone can write: the
kernel's directory is created 0700 and must be ours, and a library planted there (or made
writable by others) is never loaded but built again."""

from __future__ import annotations

import os
import shutil

import pytest

from adapterserve.engine_plugins.cpu_lora import native

pytestmark = pytest.mark.skipif(shutil.which(native.COMPILER) is None, reason="needs g++")


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "kernels"
    monkeypatch.setenv(native.ENV_DIR, str(folder))
    return folder


def test_the_directory_is_made_the_servers_alone(kernels):
    built = native.built_kernel_path()
    assert built.parent == kernels
    assert oct(kernels.stat().st_mode & 0o777) == "0o700"
    assert native.is_trusted_library(built)


def test_a_library_others_may_write_is_built_again_not_loaded(kernels):
    built = native.built_kernel_path()
    built.write_bytes(b"planted, not a library")
    os.chmod(built, 0o666)  # as if another user had put it there
    again = native.built_kernel_path()
    assert again == built and native.is_trusted_library(again)
    assert again.read_bytes()[:4] == b"\x7fELF"  # rebuilt by us


def test_a_link_in_place_of_the_library_is_not_followed(kernels, tmp_path):
    built = native.built_kernel_path()
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(built, elsewhere)
    built.unlink()
    built.symlink_to(elsewhere)
    assert native.built_kernel_path() == built and not built.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's needs root")
def test_a_directory_of_another_user_is_refused(kernels):
    kernels.mkdir(parents=True)
    os.chown(kernels, 4242, -1)
    with pytest.raises(native.UntrustedNativeCode, match="4242"):
        native.built_kernel_path()
