"""Server configuration: a YAML file < environment (ADAPTERSERVE_*) < CLI flags.

Every field carries a description; the CLI builds its `serve` flags from them, so
`adapterserve serve --help` always lists exactly what can be set here.

Kept as one module: one declarative schema (a field per setting, grouped by concern in
the order of the class: server, tenants, mode and stores, engine, limits, metrics, Ray).
Splitting it into nested models would rename every flag and variable users have set.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# vLLM's LoRAConfig accepts only these max ranks (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def fitted_lora_rank(largest: int) -> int:
    """The smallest vLLM rank that holds `largest` (at least 8: vLLM's smallest practical slot)."""
    return next((r for r in VLLM_LORA_RANKS if r >= max(largest, 8)), VLLM_LORA_RANKS[-1])


def fitted_lora_modules(setting, records) -> frozenset[str] | None:
    """The modules the engines' LoRA slots hold: as set (`Settings.fixed_lora_modules`:
    None for every module), or for auto those the adapters `records` train, with those the
    fine-tuning jobs train (their adapters must fit); every module (None) with no adapter."""
    if setting != "auto":
        return setting
    trained = {module for record in records for module in record.lora_modules}
    if not trained:
        return None
    from adapterserve.finetuning.defaults import LORA_DEFAULTS

    return frozenset(trained | set(LORA_DEFAULTS["target_modules"]))


MiB = 1024 * 1024


def default_cache_dir() -> Path:
    """Where prepared models and built adapters live (never inside the git tree)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "adapterserve"


def demo_recipes_path() -> Path:
    """The demo recipes shipped with the package (the checkout's adapters/ folder in an
    editable install, adapterserve/demo_recipes in a wheel)."""
    from importlib.resources import files

    return Path(str(files("adapterserve.demo_recipes")))


class Mode(str, Enum):
    shared = "shared"
    dedicated = "dedicated"


class BaseMismatch(str, Enum):
    warn = "warn"
    refuse = "refuse"


class Settings(BaseSettings):
    """Everything `adapterserve serve` can be told."""

    model_config = SettingsConfigDict(
        env_prefix="ADAPTERSERVE_",
        extra="forbid",
        validate_default=True,
    )

    # --- network -----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    api_key: SecretStr | None = Field(
        None, description="If set, every /v1 request needs 'Authorization: Bearer <key>'."
    )
    keys_file: Path | None = Field(
        None,
        description="YAML file of tenant API keys (hashed), each with its models, scopes and limits; "
        "see `adapterserve keys`. Re-read when it changes. Without it: --api-key, or open.",
    )
    allowed_hosts: list[str] | None = Field(
        None, description="Host header names the server answers (a port is ignored; `*`: any); others get a 400 "
        "(DNS rebinding). Unset: localhost, 127.0.0.1 and ::1 when --host is a loopback address, else any.",
    )
    max_connections: int = Field(
        512, gt=0, description="Connections and requests handled at once; beyond, new ones get a 503 (uvicorn's limit_concurrency).",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive).",
    )
    header_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a connection has to send a request's headers (from its opening or its last "
        "response) before it is closed: slow-header clients cannot hold connections open.",
    )
    metrics_api_key: SecretStr | None = Field(
        None, description="Bearer key for /metrics and /health's details on a server with keys (for Prometheus); "
        "the admin key, the API key of a single-key server and keys-file keys with the metrics scope work too. "
        "A server without any key serves both openly.",
    )
    admin_api_key: SecretStr | None = Field(
        None,
        description="Bearer key for the admin endpoints (load/unload/reload adapters). "
        "Unset: the admin endpoints answer 403.",
    )

    # --- what is served ----------------------------------------------------------
    mode: Mode = Field(
        Mode.shared,
        description="shared: one base + adapters swapped per request; "
        "dedicated: one engine per fully fine-tuned model.",
    )
    base_model: Path | None = Field(
        None,
        description="Local Hugging Face-format causal LM folder to serve as the base. "
        "Unset: the embedded SmolLM2-135M-Instruct (prepared once into the cache).",
    )
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model. Default: the base folder's name."
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Cache for the prepared default model, built adapters and merged models.",
    )
    adapter_dirs: list[Path] = Field(
        default_factory=list,
        description="Adapter store directories; every valid adapter folder in them is served "
        "under its folder name. The built demo adapters are added unless --no-demo-adapters.",
    )
    adapter_sources: list[str] = Field(
        default_factory=list,
        description="Adapter sources, in order (the first holding a name wins): local directories (as "
        "adapter_dirs), s3://bucket/prefix (each <prefix>/<name>/ is one adapter; endpoint and credentials "
        "from the standard AWS environment and config files), hf://org/repo[@revision] (one adapter per "
        "repo, from the local Hugging Face cache when the Hub cannot be reached) and "
        "https://host/adapter.tar.gz#sha256=<hex> (or .zip; the archive's sha256 pinned).",
    )
    adapter_fetch_timeout_s: float = Field(
        120.0, gt=0, description="Most seconds one fetch of an adapter from a remote source may take "
        "(retries and back-off included); a slower one is refused.",
    )
    adapters_validated_at_start: int | None = Field(
        None, ge=0, description="At most this many adapters are fetched, validated and registered before the server is "
        "ready (unset: no count limit; adapter_validation_budget_s still applies); the sources' other adapters are "
        "listed (in /v1/models) and validated on their first request.",
    )
    adapter_validation_budget_s: float = Field(
        10.0, gt=0, description="Seconds the start (and each scan) may spend fetching and validating adapters; the "
        "adapters not reached by then are listed and validated on their first request. A store of tens of adapters "
        "is validated whole; one of thousands is ready within a minute.",
    )
    require_signed_adapters: bool = Field(
        False, description="Serve only adapters whose files verify against an OpenSSF Model Signing signature "
        "(model.sig in the adapter's folder) by one of trusted_adapter_keys.",
    )
    trusted_adapter_keys: list[Path] = Field(
        default_factory=list, description="Public keys (PEM, elliptic curve) whose adapter signatures are trusted.",
    )
    adapter_scan_interval_s: float = Field(
        30.0, ge=0, description="Seconds between scans of the stores for new, changed and removed adapter "
        "folders (0: no periodic scan).",
    )
    discover_on_request: bool = Field(
        True, description="A request naming an adapter folder that is in a store but not registered yet "
        "validates and registers it on the spot (a name found in no store is looked up again after 10 s; two "
        "lookups at a time).",
    )
    pinned_adapters: list[str] = Field(
        default_factory=list, description="Adapters kept in the engine's CPU cache, never evicted (never "
        "loaded again from disk); fewer than max_cpu_loras, so other adapters can be loaded.",
    )
    demo_adapters: bool = Field(
        True,
        description="Serve the demo adapters from adapters/ (built into the cache on first run).",
    )
    demo_recipes_dir: Path = Field(
        default_factory=lambda: demo_recipes_path(),
        description="Folder of demo adapter recipes (recipe.yaml + data.jsonl per adapter).",
    )
    base_mismatch: BaseMismatch = Field(
        BaseMismatch.warn,
        description="What to do with an adapter trained for another base: warn and serve, or refuse.",
    )

    # --- fine-tuning API -----------------------------------------------------------
    fine_tuning_dir: Path | None = Field(
        None, description="Where uploaded files, jobs and the models they produce are kept (an SQLite database and "
        "folders; put it on a persistent volume). Default: <cache-dir>/fine_tuning.",
    )
    fine_tuning_adapter_source: str | None = Field(
        None, description="Ray Serve: the S3 source (one of --adapter-sources) fine-tuned adapters are uploaded to; "
        "every replica reads it. Without it, fine-tuning is not available on Ray Serve.",
    )
    fine_tuning_signing_key: Path | None = Field(
        None, description="Private key (PEM, elliptic curve) that signs each adapter a fine-tuning job trains "
        "(model.sig, as `adapterserve adapters sign` does) before it is served. With require_signed_adapters, jobs "
        "are accepted only with it, and its public key must be one of trusted_adapter_keys.",
    )
    fine_tuning_pauses_while_serving: bool = Field(
        True, description="Pause a job's trainer while the engines on this machine have requests; it trains in the "
        "gaps (on 2 cores a trainer beside serving cut its throughput to a third, at any scheduling priority).",
    )
    fine_tuning_threads: int = Field(
        1, gt=0, description="Threads of a fine-tuning job's trainer (a process at low priority, so serving goes first).",
    )
    fine_tuning_max_file_bytes: int = Field(64 * 1024**2, gt=0, description="Largest training file accepted by POST /v1/files.")
    fine_tuning_max_stored_bytes: int = Field(
        1024**3, gt=0, description="Bytes of files one tenant (or a server without keys) may keep stored.",
    )
    fine_tuning_max_active_jobs: int = Field(
        4, gt=0, description="Jobs one tenant may have queued or running at once (they train one at a time).",
    )

    # --- dedicated mode -----------------------------------------------------------
    dedicated_models: list[Path] = Field(
        default_factory=list,
        description="Dedicated mode: full model folders, or directories of them. Default: the demo "
        "adapters merged into full models (built and merged on first run).",
    )
    max_resident_models: int | None = Field(
        None, gt=0, description="Dedicated mode: engines kept up at once; others are swapped in (LRU). Default: all."
    )
    memory_budget_bytes: int | None = Field(
        None, gt=0, description="Dedicated mode: refuse to start when the resident engines would need more memory."
    )
    model_start_wait_s: float = Field(
        120.0, gt=0, description="Dedicated mode: how long a request waits for its model's engine to start before a 503."
    )

    # --- engine ------------------------------------------------------------------
    dtype: str = Field(
        "auto",
        description="Weight dtype of the engines (auto, bfloat16, float16, float32). auto: bfloat16 on a GPU, "
        "and on a CPU with native bf16 (AVX512-BF16/AMX) where it measures >= 1.15x faster than float32 "
        "(a probe, kept once per CPU); else float32.",
    )
    max_model_len: int = Field(2048, gt=0, description="Context length (prompt + output tokens).")
    max_num_seqs: int = Field(32, gt=0, description="Sequences the engine batches at once.")
    kv_cache_memory_bytes: int = Field(
        256 * MiB,
        gt=0,
        description="KV cache size per engine in bytes. Set explicitly so memory is deterministic "
        "(on CPU, vLLM's gpu_memory_utilization is a share of host RAM).",
    )
    # 16: vLLM's scheduler admits at most max_loras adapters into a batch, so with fewer
    # slots than the adapters in traffic the batch shrinks (8 adapters mixed over 4 slots:
    # 0.64 of base-only throughput, over 16: 0.81-0.90 across runs; bench/RESULTS.md). Slots fitted to rank 8
    # cost ~12 MiB each in float32 for the embedded model.
    max_loras: int = Field(16, gt=0, description="LoRA adapters in one batch (engine slots).")
    max_lora_rank: str = Field(
        "auto",
        description="Largest LoRA rank the engine's slots hold (smaller ranks are padded to it): auto fits "
        "it to the largest rank in the stores at start-up, or one of vLLM's ranks (8, 16, 32, 64, 128, 256, 320, 512).",
    )
    # "all" by default: slots narrowed to the stores' adapters at start would refuse an adapter
    # training other modules that arrives later (a source lists thousands, validated on first
    # use). The demo adapters train all seven modules of a Llama layer, so nothing is saved there.
    lora_target_modules: str = Field(
        "all",
        description="Modules the engine's LoRA slots hold, by leaf name: all (every module vLLM supports), auto "
        "(fitted at start-up to the modules the adapters in the stores train, with those fine-tuning jobs "
        "train; all when the stores are empty), or a comma-separated list (q_proj,v_proj). An adapter training "
        "another module is then refused with the reason. A slot of a module no adapter trains costs memory only "
        "(16 slots of rank 8 over SmolLM2-135M: 78 MB for all seven modules, 21 MB for q_proj and v_proj).",
    )
    max_cpu_loras: int = Field(
        16, gt=0, description="LoRA adapters kept in the engine's CPU cache (LRU) beyond the slots."
    )
    max_cls_labels: int = Field(
        16, gt=0, description="Most labels a head adapter may have (vLLM's max_lora_cls_labels)."
    )
    grouped_lora_ops: bool = Field(
        True,
        description="On the CPU, replace vLLM's per-token LoRA path by adapterserve's: copy-free ops, "
        "fused layer slots, one call per layer (a vLLM plugin active in every engine process).",
    )
    cpu_lora_kernel: bool = Field(
        True,
        description="With grouped_lora_ops: apply small batches' LoRA layers token by token in adapterserve's "
        "C++ kernel (built for this CPU with g++ at the first engine start; the PyTorch forms serve where it "
        "cannot be built).",
    )
    cpu_lora_autotune: bool = Field(
        True,
        description="With grouped_lora_ops: choose the CPU LoRA path's form per batch size (the kernel, dense or "
        "grouped matmuls) by a short measurement on this CPU at an engine's first start (~2-3 s, kept in the cache "
        "dir per CPU, torch and layer shapes; shown in /admin/engines); off: the rules measured by hand.",
    )
    engine_reserved_cpus: int | None = Field(
        None, ge=0,
        description="CPUs vLLM keeps free of an engine worker's threads for its scheduler and the API server "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU). Unset: that variable if set, else none on machines with at most 2 CPUs "
        "(measured faster there), vLLM's default of 1 on larger ones. Applies to an engine whose model runs in a "
        "worker process of its own (--engine-worker-process, the default above 2 CPUs).",
    )
    engine_worker_process: bool | None = Field(
        None,
        description="Run each engine's model in a worker process of its own (vLLM's multiprocessing executor, what "
        "vLLM's CPU platform does: it binds the worker's threads to cores) or in the engine core's process (vLLM's "
        "uniprocessing executor, VLLM_ENABLE_V1_MULTIPROCESSING=0: one process and its ~400 MB less per engine, "
        "no scheduler process polling beside the worker). Unset: in the engine core's process on machines with at "
        "most 2 CPUs (measured faster there), a worker process on larger ones.",
    )
    enforce_eager: bool = Field(
        False,
        description="Skip graph compilation. Compiled (the default) serves faster (on the CPU with LoRA too: "
        "adapterserve's adapter step is an op the compiler keeps whole) but the first start of an engine "
        "configuration compiles for ~1-2 min on 2 CPUs; later starts load the cached result (~5 s).",
    )
    engine_start_timeout_s: float = Field(
        600.0, gt=0, description="Seconds an engine may take to become ready (a first start compiles for minutes); "
        "past it, its processes are stopped and its start fails (a restart is tried again after the back-off).",
    )
    tool_call_parser: str | None = Field(
        "hermes",
        description="Tool calling in the generation engines (vLLM's --tool-call-parser, with "
        "--enable-auto-tool-choice): how tool calls are read from the model's output (hermes, llama3_json, "
        "mistral, pythonic, ...: the format its chat template teaches). tool_choice 'required' or a named function "
        "work with any model (answered through structured output); with 'auto' the model decides, and one whose "
        "chat template does not render tools answers in text. Empty: no tool calling (tool_choice other than "
        "'none' gets a 400).",
    )

    # --- request limits and recovery -------------------------------------------------
    max_request_body_bytes: int = Field(
        8 * MiB, gt=0, description="Largest request body in bytes; larger bodies get a 413."
    )
    max_json_depth: int = Field(
        32, gt=0, description="Deepest nesting of lists and objects in a request body; deeper gets a 400."
    )
    max_n: int = Field(8, gt=0, description="Most choices (`n`) one request may ask for.")
    max_output_tokens: int = Field(
        4096, gt=0, description="Most tokens (`max_tokens`, `max_completion_tokens`, `max_output_tokens`) one "
        "request may ask for; also what a request that names no limit gets (within the context).",
    )
    max_inputs_per_request: int = Field(
        32, gt=0, description="Most prompts in one /v1/completions request and inputs in one /v1/classify request.",
    )
    quarantine_nonfinite: bool | None = Field(
        None, description="Take an adapter offline (until reloaded) when a request of it produces NaN logits. Unset: "
        "on without a keys file, off with tenants (any tenant allowed a shared adapter could otherwise take it "
        "offline for all; the request that overflowed still fails, and no other request is affected).",
    )
    engine_restart_backoff_s: float = Field(
        2.0, gt=0, description="First wait before restarting an engine that died; doubled after each failed restart."
    )
    engine_restart_backoff_max_s: float = Field(
        120.0, gt=0, description="Longest wait between restarts of an engine that keeps dying."
    )

    # --- metrics -----------------------------------------------------------------
    metrics_max_models: int = Field(
        50,
        gt=0,
        description="Most model names with series of their own in the per-model metrics; the "
        "busiest by traffic get them, the rest count as `other`.",
    )
    # Each read costs CPU: an engine process's USS walks its page tables (~160 ms for a
    # 1.6 GB worker on a 2-core machine), taken from the engines on small machines.
    metrics_refresh_s: float = Field(
        15.0, gt=0, description="Seconds between reads of the engines' memory and adapter tiers."
    )

    # --- Ray Serve (the `ray` extra) -----------------------------------------------
    ray: bool = Field(
        False, description="Serve on Ray Serve: an ingress with this API in front of --replicas engine "
        "replicas (shared mode), adapter requests routed to a replica that holds the adapter.",
    )
    replicas: int = Field(2, gt=0, description="Engine replicas on Ray Serve (each one shared-mode host).")
    ray_address: str | None = Field(
        None, description="Ray cluster to deploy to (host:port of its GCS); default: start a local one.",
    )
    ray_adapter_affinity: bool = Field(
        True, description="Route adapter requests by the adapter's name (Ray Serve multiplexing); off: "
        "Ray's default balancing for every request (for comparison).",
    )
    ray_max_adapters_per_replica: int | None = Field(
        None, gt=0, description="Adapters one replica keeps loaded (least recently used leave its engine); "
        "default: max_cpu_loras.",
    )
    ray_replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each engine replica.")

    # --- logging -----------------------------------------------------------------
    log_level: str = Field("info", description="Log level of the server (debug, info, warning).")

    @field_validator("max_lora_rank", mode="before")
    @classmethod
    def _known_rank(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text != "auto" and (not text.isdigit() or int(text) not in VLLM_LORA_RANKS):
            raise ValueError(f"max_lora_rank must be auto or one of vLLM's ranks {VLLM_LORA_RANKS}, not {value!r}")
        return text

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> str:
        text = ",".join(value) if isinstance(value, (list, tuple)) else str(value).strip()
        names = [n.strip() for n in text.split(",")]
        if text.lower() in ("auto", "all"):
            return text.lower()
        if not all(n.isidentifier() for n in names):
            raise ValueError(f"lora_target_modules must be auto, all or module names (q_proj,v_proj), not {value!r}")
        return ",".join(names)

    @property
    def fixed_lora_modules(self) -> frozenset[str] | None | str:
        """The configured LoRA modules: "auto" (fitted by the host at start-up), None for
        every module, or the names."""
        if self.lora_target_modules in ("auto", "all"):
            return None if self.lora_target_modules == "all" else "auto"
        return frozenset(self.lora_target_modules.split(","))

    @property
    def fixed_lora_rank(self) -> int | None:
        """The configured max LoRA rank, or None for auto (fitted by the host at start-up)."""
        return None if self.max_lora_rank == "auto" else int(self.max_lora_rank)

    @field_validator("tool_call_parser")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("adapter_sources")
    @classmethod
    def _sources_parse(cls, value: list[str]) -> list[str]:
        from adapterserve.registry.sources import open_source

        for spec in value:
            open_source(spec)  # a malformed source is a settings error now, not a surprise later
        return value

    @model_validator(mode="after")
    def _fine_tuning_source_is_read(self) -> "Settings":
        spec = self.fine_tuning_adapter_source
        if spec is not None and (not spec.startswith("s3://") or spec.rstrip("/") not in [s.rstrip("/") for s in self.adapter_sources]):
            raise ValueError("fine_tuning_adapter_source must be an s3:// source that is also one of adapter_sources "
                             "(the replicas serve what they read)")
        return self

    @model_validator(mode="after")
    def _signed_needs_keys(self) -> "Settings":
        if self.require_signed_adapters and not self.trusted_adapter_keys:
            raise ValueError("require_signed_adapters needs trusted_adapter_keys (public keys, PEM)")
        return self  # the keys' files are read where the registry is opened (registry/store.limits_from)

    @model_validator(mode="after")
    def _reserved_cpus_need_a_worker(self) -> "Settings":
        if self.engine_reserved_cpus is not None and self.engine_worker_process is False:
            raise ValueError("engine_reserved_cpus applies to an engine's worker process (vLLM binds its threads); "
                             "with engine_worker_process false the model runs in the engine core's process: unset one")
        return self

    @field_validator("served_model_name")
    @classmethod
    def _no_colon(cls, value: str | None) -> str | None:
        if value is not None and (":" in value or not value.strip()):
            raise ValueError("served_model_name must be non-empty and must not contain ':'")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI flags (passed as init kwargs) > environment > YAML file.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    # --- derived -----------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def built_adapters_dir(self) -> Path:
        return self.cache_dir / "adapters"

    @property
    def snapshots_dir(self) -> Path:
        """Server-owned, validated copies of the adapters the engines load."""
        return self.cache_dir / "snapshots"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the YAML file, then the environment, then the non-None overrides."""
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": config_file})

    explicit = {key: value for key, value in overrides.items() if value is not None}
    return _FromFile(**explicit)
