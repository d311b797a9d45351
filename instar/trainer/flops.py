"""Model FLOPs utilisation (MFU): the training FLOPs a step needed over what the GPUs could do.

FLOPs per trained token = 6·N + 12·L·H·Q·T (PaLM, appendix B; nanoGPT's `estimate_mfu`):
- 6·N: forward (2 FLOPs per weight: a multiply and an add) plus backward (4: the gradient with
  respect to the input and to the weight) for every weight a token is multiplied by. instar's N is
  every parameter *except embedding lookup tables* (`nn.Embedding` weights): a lookup does no
  arithmetic, but the LM head is a real d×V matmul, so it counts — with tied embeddings the shared
  matrix counts once, as the head. (Kaplan/Chinchilla's "non-embedding" N also drops the head;
  on small-vocabulary models that would undercount a large share of the work.)
- 12·L·H·Q·T: attention scores QKᵀ and the weighted sum AV, forward and backward, for L layers,
  H query heads of size Q over a context of T = `train.seq_len`. Like PaLM it ignores the causal
  mask (half the scores are never needed) and document masking, so it is the work of a dense
  T-token attention, the convention every published MFU number uses.

MFU counts the trained model only: recomputation, DPO's reference forward and GRPO's sampling are
not "model FLOPs" and lower it, as they should (they are time not spent training).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s per GPU, from the vendors' data sheets.
# Keyed by a substring of torch.cuda.get_device_name(); the longest matching substring wins
# ("H100 PCIe" over "H100", "GH200" over "H200", "L40S" over "L4"). fp8 is None where the GPU has
# no FP8 tensor cores. A GPU not listed gets no `mfu` (and one note), never a guessed peak.
PEAK_TFLOPS: list[tuple[str, float, float | None]] = [
    # (name substring, bf16, fp8)
    ("GB200", 2500.0, 5000.0),
    ("B200", 2250.0, 4500.0),
    ("H200 NVL", 835.0, 1671.0),
    ("H200", 989.4, 1978.9),  # SXM
    ("H100 NVL", 835.0, 1671.0),
    ("H100 PCIe", 756.0, 1513.0),
    ("H100", 989.4, 1978.9),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.0, 1513.0),
    ("H800", 989.4, 1978.9),
    ("H20", 148.0, 296.0),
    ("GH200", 989.4, 1978.9),
    ("A100", 312.0, None),  # SXM and PCIe alike
    ("A800", 312.0, None),
    ("L40S", 362.05, 733.0),
    ("L40", 181.05, 362.0),
    ("L4", 121.0, 242.5),
    ("A40", 149.7, None),
    ("MI300X", 1307.4, 2614.9),
    ("MI325X", 1307.4, 2614.9),
    ("MI250X", 383.0, None),
]


def peak_tflops(device_name: str) -> tuple[float, float | None] | None:
    """(bf16, fp8) dense peak TFLOP/s of the GPU called `device_name`, or None when not in the table.
    Among the table's names found in `device_name`, the longest wins ("H100 PCIe" over "H100")."""
    matches = [(name, bf16, fp8) for name, bf16, fp8 in PEAK_TFLOPS if name.lower() in device_name.lower()]
    if not matches:
        return None
    _, bf16, fp8 = max(matches, key=lambda m: len(m[0]))
    return bf16, fp8


@dataclass(frozen=True)
class FlopsModel:
    """What the formula needs from a model."""

    n_params: int  # N: parameters a token is multiplied by (see the module docstring)
    n_layers: int  # L
    n_heads: int  # H (query heads; grouped K/V heads do not change the score FLOPs)
    head_dim: int  # Q

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * self.n_params + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 keeps the full size in ds_numel


def matmul_params(model) -> int:
    """Every parameter (shared ones once) except embedding tables that are only looked up: an
    `nn.Embedding` weight counts only when it is also the LM head (tied embeddings)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    total = sum(_numel(p) for p in model.parameters())
    lookups = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return total - sum(_numel(w) for key, w in lookups.items() if w is not head_weight)


def flops_model(model) -> FlopsModel:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopsModel(matmul_params(model), int(config.num_hidden_layers), heads, int(head_dim))


class MfuMeter:
    """Turns a step's tokens and seconds into `mfu` for metrics.jsonl, on CUDA only.

    `mfu` is against the GPU's bf16 dense peak whatever the recipe's precision (so runs compare);
    with `precision: fp8` the step also gets `mfu_fp8` against the FP8 peak. On CPU nothing is
    logged; on a GPU missing from PEAK_TFLOPS nothing is logged and `note` says so once.
    """

    def __init__(self, model, seq_len: int, world_size: int, fp8: bool, device_name: str | None):
        self.note: str | None = None
        self.peak: tuple[float, float | None] | None = None
        if device_name is None:
            return
        self.peak = peak_tflops(device_name)
        if self.peak is None:
            self.note = (f"MFU not logged: '{device_name}' is not in instar.trainer.flops.PEAK_TFLOPS "
                         f"(add its dense bf16/fp8 TFLOP/s there)")
            return
        self.flops_per_token = flops_model(model).flops_per_token(seq_len)
        self.world_size, self.fp8 = world_size, fp8

    def step_metrics(self, tokens: int, seconds: float) -> dict[str, float]:
        """`tokens`: trained on by every rank together in `seconds`."""
        if self.peak is None or seconds <= 0:
            return {}
        achieved = tokens * self.flops_per_token / seconds / self.world_size  # per GPU
        bf16, fp8 = self.peak
        out = {"mfu": achieved / (bf16 * 1e12), "tflops": achieved / 1e12}
        if self.fp8 and fp8 is not None:
            out["mfu_fp8"] = achieved / (fp8 * 1e12)
        return out


def cuda_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
