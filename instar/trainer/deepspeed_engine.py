"""DeepSpeed ZeRO 0-3 engine, data-parallel over the ranks torchrun started.

The loop hands `backward` each micro-batch's share of the step's global mean loss (summed
target losses / all target tokens of the step). DeepSpeed averages gradients over ranks and
divides by accumulation steps; `backward` undoes both so that the update is exactly the one a
single process would compute on the whole global batch.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from instar.trainer.batch import BatchLayout
from instar.trainer.deepspeed_config import deepspeed_config
from instar.errors import ContractError, RecipeError
from instar.trainer.engine import Engine
from instar.trainer.collage_optim import CollageAdamW, descent_metrics, state_bytes
from instar.trainer.single_engine import load_weights
from instar.config.precision import precision_policy
from instar.trainer.optim import build_optimizer, param_groups

TAG = "state"  # one DeepSpeed tag per instar checkpoint folder


def init_distributed() -> None:
    """Join the process group torchrun set up: gloo on CPU, NCCL on GPU."""
    import deepspeed

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():  # before init: NCCL then knows this rank's GPU instead of guessing
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend=backend)


@contextlib.contextmanager
def _overflow_verdict(zero_optimizer, zero_stage: int):
    """For one `step`, make the ZeRO 1-3 optimizer judge the gradients non-finite: it then takes
    its own overflow path (gradients and partitions cleared, no update, the engine counts the step
    as skipped and keeps its micro-step count), so a step the caller refused (a non-finite loss)
    is skipped as at stage 0. Every rank must enter it: the verdict replaces an all-reduce."""
    def forced(update_scale=True):  # stage 3: the check `step` starts with
        zero_optimizer.overflow = True
        return zero_optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

    if zero_stage == 3:
        patches = {"_overflow_check_and_loss_scale_update": forced}
    else:  # stages 1-2 run their overflow check only where check_grad_overflow is on (off in fp32)
        patches = {"check_grad_overflow": True, "has_overflow": lambda partition_gradients=True: True}
    saved = {name: zero_optimizer.__dict__[name] for name in patches if name in zero_optimizer.__dict__}
    zero_optimizer.__dict__.update(patches)
    try:
        yield
    finally:
        for name in patches:
            del zero_optimizer.__dict__[name]
        zero_optimizer.__dict__.update(saved)


def _check_pickles(ckpt_dir: Path) -> None:
    """Unpickle each file of a checkpoint with torch's weights_only loader (tensors memory-mapped,
    not read) before DeepSpeed reads it: DeepSpeed's own loaders (TorchCheckpointEngine.load behind
    load_checkpoint, and zero_to_fp32) pass weights_only=False, so this refuses a checkpoint holding
    anything besides tensors, plain containers and the DeepSpeed classes its ZeRO files hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for file in sorted((ckpt_dir / TAG).glob("*.pt")):
        try:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            lines = str(err).strip().splitlines()  # torch's advice first, then the line naming the global
            reason = next((line.strip() for line in lines if "Unpickler error" in line), lines[0]).split(". Please")[0]
            raise ContractError(f"{file} holds more than a DeepSpeed checkpoint's tensors and settings ({reason}), "
                                f"so instar does not unpickle it; delete {ckpt_dir} to resume from an earlier "
                                f"checkpoint (or start the stage over)") from None


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, spec, layout: BatchLayout, stage: str):
        import deepspeed

        init_distributed()
        self.zero_stage = spec.distributed.zero_stage
        self.precision = precision_policy(spec.precision)
        self.layout = layout
        self.config = deepspeed_config(spec, layout, stage)
        # bf16-pure / Collage: bf16 parameters and no fp32 copy (DeepSpeed would cast at ZeRO 1-3
        # anyway; at stage 0 its bf16 mode is off, see deepspeed_config._bf16_section).
        model = model.to(self.precision.param_dtype)
        groups = param_groups(model, spec.optimizer.weight_decay)
        # ZeRO 1-3 clip and skip non-finite steps themselves, on their own partitions; at stage 0
        # instar's guarded optimizer does.
        optimizer = build_optimizer(groups, self.precision, spec.optimizer, guarded=self.zero_stage == 0,
                                    max_grad_norm=spec.train.max_grad_norm)
        self._client_optimizer = optimizer
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.model = self.ds
        self.device = torch.device(self.ds.device)
        if spec.distributed.device != "auto" and self.device.type != spec.distributed.device:
            raise RecipeError(f"stages.{stage}.distributed.device={spec.distributed.device}, but DeepSpeed's "
                              f"accelerator put the model on {self.device}; set DS_ACCELERATOR="
                              f"{spec.distributed.device} or use device: auto")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._micro = 0
        assert self.world_size == layout.world_size, (self.world_size, layout.world_size)

    def autocast(self):
        if self.precision.autocast:  # as the single engine: fp32 weights, the forward under bf16 autocast
            # (DeepSpeed's forward keeps it on only because the config's torch_autocast section is on)
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks: scale by world size so they sum instead.
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.layout.grad_accum:
            self.ds.step()  # DeepSpeed's protocol: a step per micro-batch, a no-op off the boundary

    def step(self, lr: float, allow: bool = True) -> tuple[float, bool]:
        assert self._micro == self.layout.grad_accum, (self._micro, self.layout.grad_accum)
        self._micro = 0
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        if self.zero_stage == 0:
            self._client_optimizer.skip_next = not allow
            self.ds.step()
            return self._client_optimizer.last_grad_norm, self._client_optimizer.last_applied
        with contextlib.nullcontext() if allow else _overflow_verdict(self.ds.optimizer, self.zero_stage):
            self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), bool(self.ds.was_step_applied())

    def step_metrics(self) -> dict[str, float]:
        if not isinstance(self._client_optimizer, CollageAdamW):
            return {}
        stats = self._client_optimizer.pop_stats().double().to(self.device)  # this rank's partition (ZeRO 1-3)
        if self.zero_stage > 0:
            dist.all_reduce(stats)  # NCCL reduces device tensors only
        stats = stats.cpu()
        # optim_state_mb: what this rank holds (rank 0 logs it): 1/world of the whole under ZeRO 1-3.
        return {**descent_metrics(stats), "optim_state_mb": state_bytes(self._client_optimizer) / 2**20}

    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL: a device tensor
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)  # NCCL reduces device tensors only
        dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def save(self, ckpt_dir: Path) -> None:
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        _check_pickles(ckpt_dir)
        path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        assert path is not None, f"DeepSpeed found no checkpoint in {ckpt_dir}"

    @staticmethod
    def consolidated_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
        """Full fp32 weights from a checkpoint of any world size (for resuming on another one)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        _check_pickles(ckpt_dir)
        model_states = ckpt_dir / TAG / "mp_rank_00_model_states.pt"
        if not list((ckpt_dir / TAG).glob("*optim_states.pt")):  # ZeRO-0 keeps whole weights
            return torch.load(model_states, map_location="cpu", weights_only=True)["module"]
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=TAG)

    @contextlib.contextmanager
    def generation_model(self):
        """The HF model for sampling. ZeRO-3 gathers the weights once and lifts its hooks for the
        duration: hooked generation hangs when ranks generate different numbers of tokens, and
        is ~4x slower even with synced_gpus (measured on 2 CPU ranks: docs/cpu-testing.md)."""
        if self.zero_stage < 3:
            with self.hooks_lifted():
                yield self.ds.module
            return
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        with unwrap_model_for_generation(self.ds) as unwrapped, self.hooks_lifted():
            yield unwrapped.module

    @contextlib.contextmanager
    def hooks_lifted(self):
        """Detach the forward hooks DeepSpeed keeps on the top module (the engine's timers, flops
        profiler and ZeRO-3 parameter discovery; ZeRO-3's start-of-forward reset) while sampling.
        They serve training forwards and do not change what sampling computes (fp16 auto-cast, the
        one that touches inputs, casts floating tensors only; sampling feeds token ids), but
        fast_decode rightly refuses any hooked model, so with them attached every DeepSpeed
        rollout took the slower HF path. Put back in their order afterwards."""
        offload = getattr(self.ds.optimizer, "parameter_offload", None)
        handles = [getattr(self.ds, "module_forward_pre_hook", None), getattr(self.ds, "module_forward_post_hook", None),
                   getattr(offload, "fwd_pre_hook", None)]
        ids = {h.id for h in handles if h is not None}
        module = self.ds.module
        tables = [module._forward_pre_hooks, module._forward_hooks]
        saved = [list(table.items()) for table in tables]
        for table in tables:
            for hook_id in ids:
                table.pop(hook_id, None)
        try:
            yield
        finally:
            for table, items in zip(tables, saved):
                added = [(k, v) for k, v in table.items() if k not in dict(items)]
                table.clear()
                table.update(items + added)

    def export_model(self) -> torch.nn.Module | None:
        """On rank 0, the whole model (ZeRO-3 shards gathered from every rank); None elsewhere.
        Every rank must call it."""
        module = self.ds.module
        if self.zero_stage < 3:
            return module if self.rank == 0 else None
        state = self.ds._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        full = type(module)(module.config)  # tied as the config says, so the gather's one copy fills both
        load_weights(full, state, "DeepSpeed's gathered ZeRO-3 weights")
        return full.to(torch.float32) if module.dtype != torch.bfloat16 else full
