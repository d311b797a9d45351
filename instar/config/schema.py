"""Typed recipe models (pydantic v2, unknown keys forbidden).

A recipe has four sections: `run`, `model`, `defaults` and `stages`. Every stage inherits
`defaults` (train, eval, optimizer, precision, distributed) and may override any field.
Kind-specific stage settings live in the kind's own spec class (see `instar.trainer.kinds`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator


class Strict(BaseModel):
    # `.inf` / `.nan` in a recipe are refused: an infinite lr trains nothing and used to export NaNs.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# A name that is one plain folder: no separators, no leading dot, short enough for any file system.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_STAGE_NAME = 64
# What instar writes into the run directory beside the stage folders (compared case-insensitively,
# for case-insensitive file systems). Names starting with a dot (.lock, temp files) fail the pattern.
RESERVED_RUN_NAMES = ("data", "slurm", "tensorboard", "wandb", "graph.json", "recipe.resolved.yaml", "report.html")


def stage_name_problem(name: object) -> str | None:
    """Why `name` cannot be a stage (its folder under the run directory), or None."""
    if not isinstance(name, str):
        return f"a stage name is text, got {type(name).__name__} {name!r}; quote it or rename the stage"
    if len(name) > MAX_STAGE_NAME:
        return f"a stage name has at most {MAX_STAGE_NAME} characters, this one {len(name)}; shorten it"
    if not re.match(NAME_PATTERN, name):
        return (f"stage name {name!r} must start with a letter or digit and hold only letters, digits, "
                f"'_', '.' and '-' (it is a folder of the run directory); rename it")
    if name.lower() in RESERVED_RUN_NAMES:
        return (f"stage name {name!r} is reserved: instar writes `{name}` into the run directory "
                f"(reserved: {', '.join(RESERVED_RUN_NAMES)}); rename the stage")
    return None


class RunConfig(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    output_dir: str = "runs"
    seed: int = Field(default=0, ge=0, lt=1 << 64)  # torch.manual_seed takes at most 64 bits


class ModelConfig(Strict):
    """The model the root stages start from: an HF config mapping or a local HF directory."""

    config: dict[str, Any] | None = None
    path: str | None = None
    tokenizer: str | None = None  # "instar-char" (built in) or a local HF tokenizer folder; default: `path`'s, else instar-char

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of `model.config` (an HF config mapping) or `model.path`")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`model.config` needs a `model_type` (e.g. llama)")
        if self.tokenizer is None:
            self.tokenizer = self.path if self.path is not None else "instar-char"
        return self


class GenerateSpec(Strict):
    """Data made by a built-in generator, written into the run directory as JSONL."""

    task: Literal["arithmetic"] = "arithmetic"
    split: str
    rows: int = 0
    seed: int = 0
    max_operand: int | None = None


class DataSpec(Strict):
    """Where a stage's rows come from: a JSONL file, a built-in generator, or (pretrain/cpt) a folder
    of memmap token shards written by `instar data tokenize` (instar/data/shards.py)."""

    path: str | None = None
    generate: GenerateSpec | None = None
    shards: str | None = None
    on_bad_row: Literal["error", "skip"] = "error"
    max_rows: int | None = Field(default=None, gt=0)  # with shards: the first max_rows documents

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if sum(x is not None for x in (self.path, self.generate, self.shards)) != 1:
            raise ValueError("give exactly one of `path` (a JSONL file), `generate` (a built-in generator) or "
                             "`shards` (a folder written by `instar data tokenize`)")
        return self


# Adam's decay rates: 1 would never forget a moment, and outside [0, 1) the moments diverge.
Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerConfig(Strict):
    name: Literal["adamw"] = "adamw"
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class TrainConfig(Strict):
    steps: int = Field(default=100, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    micro_batch_size: int = Field(default=32, gt=0)  # rows per rank per forward pass
    grad_accum: int = Field(default=1, gt=0)
    # Rows per optimizer step over all ranks. When set, grad_accum is derived from it and the world
    # size, so a stage keeps its batch (and can resume) when the number of ranks changes.
    global_batch_size: int | None = Field(default=None, gt=0)
    seq_len: int = Field(default=128, gt=1, le=1 << 20)  # also at most the model's max positions (load.py)
    packing: bool = True
    warmup_ratio: float = Field(default=0.05, ge=0, le=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=100, ge=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=10, gt=0)
    max_bad_steps: int = Field(default=5, gt=0)


class ExactMatchConfig(Strict):
    data: DataSpec = DataSpec(generate=GenerateSpec(split="heldout"))
    formats: list[Literal["plain", "chat"]] = ["plain", "chat"]
    max_rows: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=256, gt=0)

    @model_validator(mode="after")
    def _rows(self) -> "ExactMatchConfig":
        if self.data.shards is not None:
            raise ValueError("exact-match eval reads {prompt, answer} rows: give `data.path` or `data.generate`, "
                             "not token `shards`")
        return self


class EvalConfig(Strict):
    every: int = Field(default=0, ge=0)  # steps between evals; 0 = only at the end
    exact_match: ExactMatchConfig | None = None


class DistributedConfig(Strict):
    """How a stage runs: in this process (`single`), or data-parallel on DeepSpeed ZeRO under
    torchrun with `nproc_per_node` ranks on each of `nnodes` nodes."""

    engine: Literal["single", "deepspeed"] = "single"
    # auto: this rank's GPU when torch sees CUDA, else the CPU. `cpu` keeps a single-process stage
    # off the GPU; DeepSpeed follows its own accelerator (DS_ACCELERATOR), which must agree.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    zero_stage: int = Field(default=2, ge=0, le=3)
    nproc_per_node: int = Field(default=1, gt=0)
    nnodes: int = Field(default=1, gt=0)
    rdzv_endpoint: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\[\]:-]+:\d+$")  # host:port of node 0
    offload_optimizer: bool = False
    offload_param: bool = False
    deepspeed_config: dict[str, Any] = {}  # merged over the generated DeepSpeed config

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _consistent(self) -> "DistributedConfig":
        if self.engine == "single" and self.world_size > 1:
            raise ValueError("engine `single` runs one process; use `engine: deepspeed` for "
                             f"nproc_per_node x nnodes = {self.world_size} ranks")
        return self


# fp32: fp32 weights, optimizer and math. bf16: fp32 weights, gradients and optimizer, the forward
# under bf16 autocast (on the single engine and DeepSpeed alike). bf16-pure: bf16 weights and AdamW
# state, no fp32 copy (updates smaller than half a bf16 ulp are lost). collage-light / collage-plus: bf16 weights kept exact as two bf16 parts by the
# Collage optimizer (plus: Adam's second moment too), no fp32 copy.
Precision = Literal["fp32", "bf16", "bf16-pure", "fp8", "collage-light", "collage-plus"]


class KernelsConfig(Strict):
    """Fused kernels swapped into the model: Triton on CUDA, their plain-torch reference elsewhere."""

    rmsnorm: bool = False  # Llama-style RMSNorm modules -> one fused forward/backward kernel each
    fused_ce: bool = False  # LM head + next-token cross-entropy without the tokens x vocab logits


class Fp8Config(Strict):
    """How `precision: fp8` scales tensors into FP8: from the current tensor's amax (`dynamic`), or
    from the largest amax of the last `amax_history_len` steps (`delayed`, TransformerEngine's default)."""

    scaling: Literal["dynamic", "delayed"] = "dynamic"
    amax_history_len: int = Field(default=16, gt=0)


class WandbConfig(Strict):
    """Weights & Biases, offline: the run is written under `<run_dir>/wandb/` and can be uploaded
    later with `wandb sync`; nothing is sent while training."""

    project: str = "instar"
    mode: Literal["offline"] = "offline"


class LoggingConfig(Strict):
    """Where rank 0 mirrors each step's metrics.jsonl record (and eval results), tagged
    `<stage>/<metric>`, besides metrics.jsonl itself. Never part of a fingerprint."""

    tensorboard: bool = False  # event files under <run_dir>/tensorboard/<stage>/
    wandb: WandbConfig | None = None


# Fields that change how a stage is observed or laid out on ranks, but not what it computes;
# kept out of fingerprints. (The global batch, which topology can change, is fingerprinted
# separately, resolved.)
COSMETIC_TRAIN_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "grad_accum", "global_batch_size")
COSMETIC_SECTIONS = ("logging",)  # whole stage sections that only change how a run is observed
TOPOLOGY_FIELDS = ("engine", "zero_stage", "nproc_per_node", "nnodes", "rdzv_endpoint", "offload_optimizer",
                   "offload_param")


class Defaults(Strict):
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    precision: Precision = "fp32"
    fp8: Fp8Config = Fp8Config()
    kernels: KernelsConfig = KernelsConfig()
    distributed: DistributedConfig = DistributedConfig()
    logging: LoggingConfig = LoggingConfig()


class StageSpec(Strict):
    """Settings every stage kind shares. A kind adds its own fields in a subclass."""

    kind: str
    after: list[str] = []
    data: DataSpec | None = None
    tokenizer: str | None = None  # defaults to the parent's tokenizer, or `model.tokenizer` for roots
    train: TrainConfig | None = None
    eval: EvalConfig | None = None
    optimizer: OptimizerConfig | None = None
    precision: Precision | None = None
    fp8: Fp8Config | None = None
    kernels: KernelsConfig | None = None
    distributed: DistributedConfig | None = None
    logging: LoggingConfig | None = None


class Recipe(Strict):
    run: RunConfig
    model: ModelConfig
    defaults: Defaults = Defaults()
    stages: dict[str, SerializeAsAny[StageSpec]]
