"""Settings precedence: YAML file < ADAPTERSERVE_* environment < CLI flags."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from adapterserve.cli import app
from adapterserve.config import Settings, load_settings


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("port: 9001\nmax_loras: 2\nmax_num_seqs: 7\n")
    assert load_settings(config).port == 9001
    monkeypatch.setenv("ADAPTERSERVE_PORT", "9002")
    monkeypatch.setenv("ADAPTERSERVE_MAX_LORAS", "3")
    settings = load_settings(config, port=9003)
    assert (settings.port, settings.max_loras, settings.max_num_seqs) == (9003, 3, 7)


def test_unknown_and_invalid_fields_are_refused(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("portt: 1\n")
    with pytest.raises(ValidationError):
        load_settings(config)
    with pytest.raises(ValidationError):
        Settings(max_loras=0)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_serve_help_lists_every_field():
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.output, name
