"""Fused RMSNorm and fused linear + cross-entropy against HF's LlamaRMSNorm and F.cross_entropy.

Both backends are checked on CPU: the plain-torch reference and the Triton kernels under Triton's
interpreter (conftest sets TRITON_INTERPRET=1). Tolerances: fp32 atol 1e-5; bf16 Liger-Kernel's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from instar.config.load import load_recipe
from instar.errors import RecipeError
from instar.graph.runner import run_recipe
from instar.kernels.fused_ce import linear_cross_entropy
from instar.kernels.rmsnorm import rms_norm
from tests.conftest import tiny_recipe, write_recipe

BACKENDS = ["reference", "triton"]
# Liger-Kernel's test tolerances for bf16: RMSNorm atol 2e-1 rtol 2e-2; fused linear CE atol 5e-3 rtol 5e-2.
RMS_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-1, 2e-2)}
CE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 5e-2)}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("INSTAR_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 1000), (1, 5, 4096)])
def test_rmsnorm_matches_hf(backend, dtype, shape):
    torch.manual_seed(0)
    hf = LlamaRMSNorm(shape[-1], eps=1e-6)
    hf.weight.data = torch.randn(shape[-1]) * 0.5 + 1
    x = torch.randn(*shape, dtype=dtype) * 3
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = hf.weight.detach().clone().requires_grad_()
    y_hf, y = hf(x_hf), rms_norm(x_ours, w, 1e-6)
    assert y.dtype == y_hf.dtype
    dy = torch.randn_like(y_hf)
    y_hf.backward(dy)
    y.backward(dy)
    atol, rtol = RMS_TOL[dtype]
    torch.testing.assert_close(y, y_hf, atol=atol, rtol=rtol)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad, hf.weight.grad, atol=atol * 10 if dtype == torch.float32 else atol,
                               rtol=rtol)  # dw sums over rows: fp32 order of summation differs


def test_rmsnorm_bf16_weight_gives_bf16(backend):
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    w = (torch.randn(48) + 1).to(torch.bfloat16)
    hf = LlamaRMSNorm(48).to(torch.bfloat16)
    hf.weight.data = w.clone()
    y = rms_norm(x, w, hf.variance_epsilon)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, hf(x), atol=0, rtol=0)  # same bf16 roundings as HF


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v,chunk", [(37, 33, 101, 16), (64, 16, 3000, None), (5, 8, 70000, 2), (17, 24, 97, 64)])
def test_linear_ce_matches_cross_entropy(backend, dtype, n, h, v, chunk):
    torch.manual_seed(1)
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) * 0.3).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::4] = -100
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h_ours, w_ours = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    n_valid = int((targets != -100).sum())
    ref = F.cross_entropy((h_ref @ w_ref.t()).float(), targets, ignore_index=-100)
    ours = linear_cross_entropy(h_ours, w_ours, targets, chunk=chunk) / n_valid
    assert ours.dtype == torch.float32 and ours.ndim == 0
    (ref * 0.7).backward()
    (ours * 0.7).backward()
    atol, rtol = CE_TOL[dtype]
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h_ours.grad, h_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w_ours.grad, w_ref.grad, atol=atol, rtol=rtol)


def test_linear_ce_all_ignored_and_3d_input(backend):
    hidden = torch.randn(2, 3, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_linear_ce_under_autocast_runs_the_head_in_bf16(backend):
    torch.manual_seed(2)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
        ours = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(ours, ref, atol=5e-3 * 40, rtol=5e-2)
    ours.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_linear_ce_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 10\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.tensor([1, 10, -100]))


def _pretrain(kernels: dict | None, steps: int = 6) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": steps}
    recipe["defaults"]["eval"] = {}
    if kernels is not None:
        recipe["defaults"]["kernels"] = kernels
    return recipe


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("forced", ["reference", "triton"])
def test_pretrain_with_fused_kernels_follows_the_plain_run(tmp_path: Path, monkeypatch, forced):
    """A tiny pretrain stage with `kernels: {rmsnorm, fused_ce}` trains the same as without them."""
    plain = write_recipe(tmp_path, _pretrain(None), "plain.yaml")
    fused = write_recipe(tmp_path, _pretrain({"rmsnorm": True, "fused_ce": True}), "fused.yaml")
    run_recipe(load_recipe(plain, ["run.name=plain"]), quiet=True)
    monkeypatch.setenv("INSTAR_KERNELS", forced)
    run_recipe(load_recipe(fused, ["run.name=fused"]), quiet=True)
    a, b = _losses(tmp_path / "runs/plain"), _losses(tmp_path / "runs/fused")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)
    assert (tmp_path / "runs/fused/pretrain/model/DONE").exists()


def test_rmsnorm_on_a_model_without_one_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from instar.config.schema import KernelsConfig
    from instar.models.swaps import apply_swaps

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    spec = type("Spec", (), {"kernels": KernelsConfig(rmsnorm=True), "precision": "fp32"})()
    with pytest.raises(RecipeError, match=r"stages\.s\.kernels\.rmsnorm: the model has no Llama-style RMSNorm"):
        apply_swaps(model, spec, "s", causal_lm_loss=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 33), (4096, 4096), (5, 8192)])
def test_rmsnorm_compiled_kernels_match_hf_on_gpu(dtype, shape):
    torch.manual_seed(0)
    hf = LlamaRMSNorm(shape[-1], eps=1e-6).cuda()
    hf.weight.data = torch.randn(shape[-1], device="cuda") * 0.5 + 1
    x = torch.randn(*shape, dtype=dtype, device="cuda") * 3
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = hf.weight.detach().clone().requires_grad_()
    y_hf, y = hf(x_hf), rms_norm(x_ours, w, 1e-6)
    dy = torch.randn_like(y_hf)
    y_hf.backward(dy)
    y.backward(dy)
    atol, rtol = RMS_TOL[dtype]
    torch.testing.assert_close(y, y_hf, atol=atol, rtol=rtol)
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w.grad, hf.weight.grad, atol=atol * 100 if dtype == torch.float32 else atol * 10,
                               rtol=rtol * 10)  # 4096-row sums in another order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", [(37, 33, 101), (1000, 256, 32000), (64, 64, 128256)])
def test_linear_ce_compiled_kernel_matches_cross_entropy_on_gpu(dtype, n, h, v):
    torch.manual_seed(1)
    hidden = torch.randn(n, h, dtype=dtype, device="cuda")
    weight = (torch.randn(v, h, device="cuda") * h ** -0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::5] = -100
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h_ours, w_ours = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy((h_ref @ w_ref.t()).float(), targets, ignore_index=-100)
    ours = linear_cross_entropy(h_ours, w_ours, targets) / int((targets != -100).sum())
    ref.backward()
    ours.backward()
    atol, rtol = CE_TOL[dtype]
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(h_ours.grad, h_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(w_ours.grad, w_ref.grad, atol=atol, rtol=rtol)


def _spec(kind: str, engine: str = "single", zero_stage: int = 2):
    from types import SimpleNamespace

    from instar.config.schema import DistributedConfig, KernelsConfig

    return SimpleNamespace(kind=kind, precision="fp32", kernels=KernelsConfig(fused_ce=True),
                           distributed=DistributedConfig(engine=engine, zero_stage=zero_stage))


def test_fused_ce_is_announced_where_it_does_not_apply_and_refused_on_zero3(capsys):
    from instar.data.tokenizer import build_char_tokenizer
    from instar.models.build import model_from_config
    from instar.models.swaps import apply_swaps, uses_fused_ce
    from instar.trainer.kinds import get_kind

    def model():
        return model_from_config(tiny_recipe()["model"]["config"], build_char_tokenizer(), seed=0)

    def swaps(kind: str, *engine):  # the kind declares whether its loss is the causal-LM loss
        m = model()
        return m, apply_swaps(m, _spec(kind, *engine), kind[0], causal_lm_loss=get_kind(kind).causal_lm_loss)

    m, done = swaps("sft")
    assert done == {"fused_ce": 1} and uses_fused_ce(m)
    m, done = swaps("dpo")
    assert done == {} and not uses_fused_ce(m)
    assert "does not apply and is not used" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="not supported under ZeRO-3"):
        swaps("pretrain", "deepspeed", 3)


def test_kinds_declare_whether_their_loss_is_the_causal_lm_loss():
    from instar.trainer.kinds import get_kind, kind_names
    from instar.trainer.kinds.base import TrainingKind

    for name in kind_names():
        kind = get_kind(name)
        if issubclass(kind, TrainingKind):
            assert kind.causal_lm_loss == (kind.loss is TrainingKind.loss), name
