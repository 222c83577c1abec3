"""Builds adapter folders for tests: valid LoRA adapters for a given base, and one broken
adapter for each validation failure the server must refuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterserve.registry.records import BaseModelInfo

PREFIX = "base_model.model."


def lora_tensors(base: BaseModelInfo, rank: int, targets: list[str], seed: int = 0, scale: float = 0.05) -> dict:
    """Random LoRA A/B pairs of the right shapes for every targeted linear of the base."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(base.linear_modules.items()):
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    return tensors


def write_lora(folder: Path, base: BaseModelInfo, rank: int = 8, targets=("q_proj", "v_proj"), seed: int = 0, config_overrides: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "base_model_name_or_path": base.name,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = tensors if tensors is not None else lora_tensors(base, rank, list(targets), seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def build_broken_corpus(store: Path, base: BaseModelInfo, outside: Path, max_rank: int) -> dict[str, str]:
    """One broken adapter per validation failure; returns name -> expected reason fragment."""
    expected = {}

    folder = write_lora(store / "not-lora", base, config_overrides={"peft_type": "PREFIX_TUNING"})
    expected[folder.name] = "not a PEFT LoRA adapter"

    folder = write_lora(store / "bad-targets", base, config_overrides={"target_modules": ["q_proj", "no_such_proj"]})
    expected[folder.name] = "target modules the base does not have"

    tensors = lora_tensors(base, 8, ["q_proj"])
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(8, tensors[key].shape[1] + 3)
    folder = write_lora(store / "bad-shapes", base, targets=("q_proj",), tensors=tensors)
    expected[folder.name] = "has shape"

    folder = write_lora(store / "rank-too-high", base, rank=max_rank * 2, targets=("q_proj",))
    expected[folder.name] = "above the engine's max_lora_rank"

    folder = write_lora(store / "pickled", base, targets=("q_proj",))
    tensors = {k: v for k, v in lora_tensors(base, 8, ["q_proj"]).items()}
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    expected[folder.name] = "pickle"

    folder = store / "no-config"
    folder.mkdir(parents=True)
    save_file(lora_tensors(base, 8, ["q_proj"]), str(folder / "adapter_model.safetensors"))
    expected[folder.name] = "missing adapter_config.json"

    folder = write_lora(store / "truncated", base, targets=("q_proj",))
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expected[folder.name] = "truncated"

    folder = write_lora(store / "other-base", base, targets=("q_proj",), config_overrides={"base_model_name_or_path": "meta-llama/Llama-3-8B"})
    expected[folder.name] = "trained for base"

    folder = write_lora(store / "bad name!", base, targets=("q_proj",))
    expected[folder.name] = "not a safe model name"

    write_lora(outside / "escapee", base, targets=("q_proj",))
    os.symlink(outside / "escapee", store / "escapee")
    expected["escapee"] = "outside the adapter store"

    expected.update(_hostile_values(store, base, max_rank))
    expected.update(_hostile_configs(store, base))
    expected.update(_hostile_files(store, base))
    expected.update(_hostile_heads(store, base, max_rank))
    return expected


def _with_tensor(base: BaseModelInfo, change, targets=("q_proj",), key: int = 0) -> dict:
    """Valid rank-8 tensors with one (the first A, or `key`-th by name) changed by `change(tensor) -> tensor`."""
    tensors = lora_tensors(base, 8, list(targets))
    key = sorted(tensors)[key]
    tensors[key] = change(tensors[key])
    return tensors


def _hostile_values(store: Path, base: BaseModelInfo, max_rank: int) -> dict[str, str]:
    """Weights and numbers that are well-formed but not values the engine may serve."""
    expected = {}

    def nan(t):
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    def inf(t):
        t = t.clone()
        t[-1, -1] = float("-inf")
        return t

    write_lora(store / "nan-weights", base, targets=("q_proj",), tensors=_with_tensor(base, nan))
    expected["nan-weights"] = "NaN or infinite"
    write_lora(store / "inf-weights", base, targets=("q_proj",), tensors=_with_tensor(base, inf))
    expected["inf-weights"] = "NaN or infinite"
    write_lora(store / "int8-weights", base, targets=("q_proj",), tensors=_with_tensor(base, lambda t: (t * 100).to(torch.int8)))
    expected["int8-weights"] = "must be F32, F16 or BF16"
    def near_max(t):
        return torch.full_like(t, 3e38)  # finite in float32 and bf16; times the scaling 2 it is not

    write_lora(store / "overflow-with-scaling", base, targets=("q_proj",), tensors=_with_tensor(base, near_max, key=-1))
    expected["overflow-with-scaling"] = "overflows"
    write_lora(store / "float64-weights", base, targets=("q_proj",), tensors=_with_tensor(base, lambda t: t.double()))
    expected["float64-weights"] = "must be F32, F16 or BF16"
    cases = {
        "alpha-huge": ({"lora_alpha": 1e30}, "LoRA scaling"),
        "alpha-string": ({"lora_alpha": "16"}, "'lora_alpha' must be a finite number"),
        "alpha-pattern-huge": ({"alpha_pattern": {"q_proj": 1e9}}, "LoRA scaling"),
        "alpha-pattern-list": ({"alpha_pattern": [1, 2]}, "'alpha_pattern' must map"),
        "rank-string": ({"r": "eight"}, "'r' must be a positive integer"),
        "rank-zero": ({"r": 0}, "'r' must be a positive integer"),
        "rank-negative": ({"r": -8}, "'r' must be a positive integer"),
        "rank-bool": ({"r": True}, "'r' must be a positive integer"),
        "rank-float": ({"r": 8.5}, "'r' must be a positive integer"),
        "rank-pattern-bad": ({"rank_pattern": {"q_proj": "x"}}, "'rank_pattern' must map"),
        "rank-pattern-too-high": ({"rank_pattern": {"q_proj": max_rank * 4}}, "above the engine's max_lora_rank"),
        "rslora-string": ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
        "dora": ({"use_dora": True}, "DoRA"),
        "bias-all": ({"bias": "all"}, "adapter bias is not supported"),
        "targets-int": ({"target_modules": 5}, "'target_modules' must be a list"),
        "targets-nested": ({"target_modules": [["q_proj"]]}, "'target_modules' must be a list"),
        "targets-empty": ({"target_modules": []}, "names no target_modules"),
        "modules-to-save-int": ({"modules_to_save": 5}, "'modules_to_save' must be a list"),
        "modules-to-save-causal": ({"modules_to_save": ["lm_head"]}, "only served for SEQ_CLS"),
        "peft-type-list": ({"peft_type": ["LORA"]}, "not a PEFT LoRA adapter"),
        "base-name-int": ({"base_model_name_or_path": 7}, "'base_model_name_or_path' must be a string"),
        "base-name-markup": ({"base_model_name_or_path": "[/bold]x[/red]"}, "trained for base '[/bold]x[/red]'"),
    }
    for name, (overrides, fragment) in cases.items():
        write_lora(store / name, base, targets=("q_proj",), config_overrides=overrides)
        expected[name] = fragment
    return expected


def _raw_config(store: Path, base: BaseModelInfo, name: str, text: str | bytes) -> None:
    folder = write_lora(store / name, base, targets=("q_proj",))
    path = folder / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _hostile_configs(store: Path, base: BaseModelInfo) -> dict[str, str]:
    """adapter_config.json files no reader should trust."""
    valid = json.loads((write_lora(store / "alpha-nan", base, targets=("q_proj",)) / "adapter_config.json").read_text())
    _raw_config(store, base, "alpha-nan", json.dumps({**valid, "lora_alpha": float("nan")}))
    _raw_config(store, base, "rank-overflow", json.dumps(valid).replace('"r": 8', '"r": 1e999'))
    _raw_config(store, base, "config-deep", "[" * 100_000 + "]" * 100_000)
    _raw_config(store, base, "config-deep-object", '{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _raw_config(store, base, "config-list", "[1, 2, 3]")
    _raw_config(store, base, "config-not-json", "{\"peft_type\": ")
    _raw_config(store, base, "config-binary", b"\xff\xfe\x00garbage")
    _raw_config(store, base, "config-huge", json.dumps({**valid, "padding": "x" * 300_000}))
    return {
        "alpha-nan": "not valid JSON",
        "rank-overflow": "'r' must be a positive integer",
        "config-deep": "nested too deeply",
        "config-deep-object": "nested too deeply",
        "config-list": "not a JSON object",
        "config-not-json": "not valid JSON",
        "config-binary": "not valid JSON",
        "config-huge": "larger than",
    }


def _hostile_files(store: Path, base: BaseModelInfo) -> dict[str, str]:
    """Weights files and folder entries that are not what they claim."""
    expected = {}
    folder = write_lora(store / "no-tensors", base, targets=("q_proj",), tensors={})
    expected[folder.name] = "holds no tensors"

    folder = write_lora(store / "header-too-long", base, targets=("q_proj",))
    (folder / "adapter_model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    expected[folder.name] = "declares a header"

    folder = write_lora(store / "header-lies", base, targets=("q_proj",))
    header = json.dumps({f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [8, 1_000_000], "data_offsets": [0, 16]}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    expected[folder.name] = "offsets that do not match"

    folder = write_lora(store / "header-garbage", base, targets=("q_proj",))
    (folder / "adapter_model.safetensors").write_bytes((12).to_bytes(8, "little") + b"not json at all")
    expected[folder.name] = "not JSON"

    folder = write_lora(store / "weights-is-folder", base, targets=("q_proj",))
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    expected[folder.name] = "missing adapter_model.safetensors"

    folder = write_lora(store / "no-lora-tensors", base, targets=("q_proj",), tensors={"something.weight": torch.zeros(2, 2)})
    expected[folder.name] = "holds no LoRA A/B tensors"

    os.symlink(store / "self-loop", store / "self-loop")  # resolving it never ends
    expected["self-loop"] = "could not be read"

    (store / ".a-file").write_text("not an adapter")
    os.symlink(store / ".a-file", store / "file-link")
    expected["file-link"] = "not a folder"

    for name in ("trailing-newline\n", "-leading-dash", "with:colon", "x" * 65, "[red]rich-markup"):
        write_lora(store / name, base, targets=("q_proj",))
        expected[name] = "not a safe model name"
    return expected


def _head(store: Path, base: BaseModelInfo, name: str, score_shape, labels=None, modules_to_save=("score",)) -> Path:
    tensors = lora_tensors(base, 8, ["q_proj"])
    tensors[f"{PREFIX}score.modules_to_save.default.weight"] = torch.zeros(tuple(score_shape))
    folder = write_lora(
        store / name, base, targets=("q_proj",), tensors=tensors,
        config_overrides={"task_type": "SEQ_CLS", "modules_to_save": list(modules_to_save)},
    )
    if labels is not None:
        (folder / "labels.json").write_text(labels if isinstance(labels, str) else json.dumps({"labels": labels}))
    return folder


def _hostile_heads(store: Path, base: BaseModelInfo, max_rank: int) -> dict[str, str]:
    hidden = base.hidden_size
    _head(store, base, "head-0d-score", ())
    _head(store, base, "head-wrong-hidden", (2, hidden + 1))
    _head(store, base, "head-too-many-labels", (10_000, hidden))
    _head(store, base, "head-no-score-listed", (2, hidden), modules_to_save=("classifier",))
    _head(store, base, "head-labels-mismatch", (2, hidden), labels=["a", "b", "c"])
    _head(store, base, "head-labels-not-json", (2, hidden), labels="{")
    _head(store, base, "head-labels-not-strings", (2, hidden), labels=[1, {"x": 2}])
    return {
        "head-0d-score": "score weight has shape",
        "head-wrong-hidden": "input size",
        "head-too-many-labels": "labels is outside",
        "head-no-score-listed": "must list 'score'",
        "head-labels-mismatch": "names 3 labels",
        "head-labels-not-json": "is not valid",
        "head-labels-not-strings": "a list of non-empty strings",
    }


def signing_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A P-256 key pair as PEM files, private and public (what `openssl ecparam -name
    prime256v1 -genkey` makes), for signing adapters."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    private_path, public_path = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private_path.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path
