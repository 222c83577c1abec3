"""What one engine loads and how big it may grow (`EngineSpec`), as the flags `vllm serve`
would take, parsed by vLLM's own parser so every default is vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adapterserve.dtypes import resolve_dtype

from .engine_environment import engine_environment

Runner = Literal["generate", "pooling"]


@dataclass
class EngineSpec:
    """What one engine loads and how big it may grow."""

    name: str  # the engine's id in logs and metrics: "generate", "classify", or a model name
    model_path: Path
    served_model_name: str
    runner: Runner = "generate"
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    enforce_eager: bool = False  # compiled, as vLLM's default
    enable_lora: bool = False
    max_loras: int = 16
    max_lora_rank: int = 64
    lora_target_modules: tuple[str, ...] | None = None  # None: every module vLLM supports
    max_cpu_loras: int = 16
    # pooling engines: label count of the widest head (vLLM sizes the score layer by it)
    num_labels: int | None = None
    max_lora_cls_labels: int | None = None
    # vLLM's Prometheus logger unregisters every vllm: metric of the process when it
    # starts, so only one engine per process can report vLLM's own metrics.
    log_stats: bool = True
    # generation engines: vLLM's --tool-call-parser (None: no tool calling)
    tool_call_parser: str | None = None
    # an engine not ready after this long is stopped and its start fails (engine_start_timeout_s)
    start_timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)
    # what the engine's processes read of the settings (hosting/engine_environment.py)
    environment: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings, name: str, model_path: Path, served_model_name: str, **extra) -> "EngineSpec":
        """The engine-wide settings (dtype, context, KV cache, LoRA limits), then `extra`
        (which wins: the shared host passes the LoRA rank it fitted to the stores)."""
        values = dict(
            name=name,
            model_path=model_path,
            served_model_name=served_model_name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
            enforce_eager=settings.enforce_eager,
            max_loras=settings.max_loras,
            max_lora_rank=settings.fixed_lora_rank or 64,
            max_cpu_loras=settings.max_cpu_loras,
            start_timeout_s=settings.engine_start_timeout_s,
            tool_call_parser=settings.tool_call_parser,
        )
        values = {**values, **extra}
        values.setdefault("environment", engine_environment(settings, values.get("runner", "generate")))
        return cls(**values)

    def cli_args(self) -> list[str]:
        """The same flags `vllm serve` would take for this engine."""
        args = [
            "--model", str(self.model_path),
            "--served-model-name", self.served_model_name,
            "--dtype", resolve_dtype(self.dtype),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
            "--disable-uvicorn-access-log",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.enable_lora:
            args += [
                "--enable-lora",
                "--max-loras", str(self.max_loras),
                "--max-lora-rank", str(self.max_lora_rank),
                "--max-cpu-loras", str(max(self.max_cpu_loras, self.max_loras)),
            ]
            if self.lora_target_modules:
                args += ["--lora-target-modules", *self.lora_target_modules]
        if self.runner == "generate" and self.tool_call_parser:
            # vLLM 0.32 reads tool calls (for every tool_choice) only with auto tool choice on
            args += ["--tool-call-parser", self.tool_call_parser, "--enable-auto-tool-choice"]
        if self.runner == "pooling":
            args += ["--runner", "pooling", "--convert", "classify"]
            if self.num_labels is not None:
                args += ["--hf-overrides", f'{{"num_labels": {self.num_labels}}}']
            if self.max_lora_cls_labels is not None:
                args += ["--max-lora-cls-labels", str(self.max_lora_cls_labels)]
        return args + self.extra_args


def parse_vllm_args(cli_args: list[str]):
    """vLLM's own server argument namespace for these flags (all defaults filled in)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="adapterserve-engine"))
    return parser.parse_args(cli_args)
