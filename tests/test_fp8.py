"""FP8: tensorwise scaling (reference and Triton), the FP8 linear's three GEMMs, model conversion,
and a pretrain stage with `precision: fp8`.

Accuracy is measured as SQNR (dB) against fp32: >= 25 on a GEMM, >= 18 on outputs and input
gradients, >= 17 on weight gradients. Scales for all-zero, inf and NaN inputs follow
TransformerEngine (scale 1). Triton's interpreter drops a carry in a few % of FP8 casts, so on
CPU the Triton quantiser is checked to one FP8 step; bit-exactness is a `gpu` test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from instar.config.load import load_recipe
from instar.config.schema import Fp8Config
from instar.errors import RecipeError, TrainingError
from instar.graph.runner import run_recipe
from instar.kernels.fp8 import reference
from instar.kernels.fp8.linear import GEMMS, Float8Linear, fp8_gemm
from instar.kernels.fp8.reference import E4M3, E5M2
from instar.models.fp8 import Fp8GemmCheck, convert_to_float8
from tests.conftest import tiny_recipe, write_recipe

FORMATS = [E4M3, E5M2]


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.detach().double(), approx.detach().double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean()))


def _triton():
    from instar.kernels.fp8 import triton as fast

    return fast


@pytest.mark.parametrize("dtype", FORMATS)
def test_scale_rules_follow_transformer_engine(dtype):
    fmax = torch.finfo(dtype).max
    s = reference.scale_from_amax(torch.tensor([0.0, float("inf"), float("nan"), 2.0, 1e-45]), dtype)
    assert s[:3].tolist() == [1.0, 1.0, 1.0]
    assert s[3].item() == pytest.approx(fmax / 2.0)
    assert s[4].item() == torch.finfo(torch.float32).max  # fmax / tiny overflows fp32: clamp to fp32 max


@pytest.mark.parametrize("dtype", FORMATS)
def test_quantize_saturates_and_keeps_nan(dtype):
    fmax = torch.finfo(dtype).max
    x = torch.tensor([[1.0, -float("inf"), 3.0, float("inf")] * 4] * 16)
    q = reference.quantize(x, dtype)
    assert q.amax.item() == float("inf") and q.scale_inv.item() == 1.0
    assert q.data.float()[0, :4].tolist() == [1.0, -fmax, 3.0, fmax]
    nan = reference.quantize(torch.tensor([[1.0, float("nan")] * 8] * 16), dtype)
    assert torch.isnan(nan.amax) and nan.scale_inv.item() == 1.0 and torch.isnan(nan.data.float()[0, 1])
    zero = reference.quantize(torch.zeros(16, 32), dtype, transpose=True)
    assert zero.scale_inv.item() == 1.0 and zero.data.float().abs().sum() == 0 and zero.data_t.shape == (32, 16)


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("make", [lambda: torch.randn(48, 80) * 3, lambda: torch.randn(33, 17).bfloat16() * 1e-3,
                                  lambda: torch.zeros(16, 32), lambda: torch.full((16, 16), float("inf")),
                                  lambda: torch.tensor([[1.0, float("nan")] * 8] * 16)])
def test_triton_quantize_matches_reference(dtype, make):
    torch.manual_seed(0)
    x = make()
    ref = reference.quantize(x, dtype, transpose=True)
    ours = _triton().quantize(x, dtype, transpose=True)
    torch.testing.assert_close(ours.amax, ref.amax, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(ours.scale_inv, ref.scale_inv, atol=0, rtol=2.5e-7)  # within one fp32 ulp
    # The interpreter's cast rounds wrongly on a few % of values: one FP8 step off, or a dropped
    # carry (a value that should round up to the next power of two comes out half as big, or a value
    # that should round up to the smallest subnormal comes out 0: seen once in 40 seeds). On GPU the
    # two are bit-equal (test below).
    nan = torch.isnan(ref.data.float())  # the interpreter casts NaN to a number: checked on GPU only
    differ = (ours.data.view(torch.uint8) != ref.data.view(torch.uint8)) & ~nan
    assert differ.float().mean() <= 0.1
    ratio = ours.data.float()[differ] / ref.data.float()[differ]
    smallest = torch.finfo(dtype).smallest_normal * 2.0 ** -{torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    lost_subnormal = (ours.data.float()[differ] == 0) & (ref.data.float()[differ].abs() == smallest)
    assert ((ratio >= 0.5) & (ratio <= 1.25) | lost_subnormal).all()
    assert torch.equal(ours.data_t.view(torch.uint8), ours.data.t().contiguous().view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FORMATS)
def test_triton_quantize_is_bit_exact_on_gpu(dtype):
    torch.manual_seed(0)
    nan = torch.tensor([[1.0, float("nan")] * 8] * 16, device="cuda")
    for x in (torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16) * 7, torch.randn(64, 48, device="cuda"), nan):
        ref = reference.quantize(x, dtype, transpose=True)
        ours = _triton().quantize(x, dtype, transpose=True)
        assert torch.equal(torch.isnan(ours.data.float()), torch.isnan(ref.data.float()))
        assert torch.equal(torch.isnan(ours.amax), torch.isnan(ref.amax))
        # NaN payloads may differ; compare bits elsewhere (on uint8 views: CUDA has no masked_fill_
        # for FP8 dtypes in torch 2.11, seen on an H200).
        x_nan = torch.isnan(ref.data.float())
        ours_bits, ref_bits = ours.data.view(torch.uint8).clone(), ref.data.view(torch.uint8).clone()
        ours_bits[x_nan], ref_bits[x_nan] = 0, 0
        torch.testing.assert_close(ours.scale_inv, ref.scale_inv, atol=0, rtol=2.5e-7)
        # Equal bits, except where a one-ulp difference of the scale moves a value across a
        # rounding boundary (vanishingly rare).
        assert (ours_bits != ref_bits).float().mean() <= 1e-5
        assert torch.equal(ours.data_t.view(torch.uint8), ours.data.t().contiguous().view(torch.uint8))


def test_fp8_gemm_sqnr():
    torch.manual_seed(0)
    a, b = torch.randn(64, 256), torch.randn(128, 256)
    qa, qb = reference.quantize(a, E4M3), reference.quantize(b, E4M3)
    out = fp8_gemm(qa.data, qa.scale_inv, qb.data.t(), qb.scale_inv, torch.float32)
    assert sqnr(a @ b.t(), out) >= 25


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("scaling", [0, 4])
def test_float8_linear_sqnr_and_gemm_count(monkeypatch, backend, scaling):
    monkeypatch.setenv("INSTAR_KERNELS", backend)
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    f8 = Float8Linear.from_linear(lin, amax_history_len=scaling)
    assert f8.weight is lin.weight and f8.bias is lin.bias
    x = torch.randn(3, 37, 128)  # 111 tokens: not a multiple of 16, padded inside
    x_ref, x8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lin(x_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    dw_ref, db_ref = lin.weight.grad.clone(), lin.bias.grad.clone()
    lin.weight.grad = lin.bias.grad = None
    before = GEMMS.total
    for _ in range(2):  # twice: the second use scales from the history when delayed
        lin.weight.grad = lin.bias.grad = None
        y8 = f8(x8)
        y8.backward(dy)
    assert GEMMS.total - before == 6  # forward, input grad, weight grad, twice
    assert y8.dtype == torch.float32 and y8.shape == y.shape
    assert sqnr(y, y8) >= 18
    assert sqnr(x_ref.grad, x8.grad / 2) >= 18
    assert sqnr(dw_ref, lin.weight.grad) >= 17
    torch.testing.assert_close(lin.bias.grad, db_ref)


def test_float8_linear_under_bf16_autocast_matches_bf16():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 96, bias=False)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16, y8 = lin(x), f8(x)
    assert y8.dtype == torch.bfloat16
    assert sqnr(y_bf16, y8) >= 18


def test_delayed_scaling_uses_the_history():
    lin = Float8Linear.from_linear(torch.nn.Linear(16, 16, bias=False), amax_history_len=3)
    for scale in (1.0, 4.0, 2.0, 3.0):
        lin(torch.full((16, 16), scale))
    assert lin.histories["input"].values.tolist() == [3.0, 2.0, 4.0]  # newest first, length 3
    lin.histories["input"].record(torch.tensor(float("nan")))
    assert lin.histories["input"].values.tolist() == [0.0, 3.0, 2.0]  # a non-finite step is not kept


def _tiny_model():
    from instar.data.tokenizer import build_char_tokenizer
    from instar.models.build import model_from_config

    return model_from_config(tiny_recipe()["model"]["config"], build_char_tokenizer(), seed=0)


def test_conversion_swaps_eligible_linears_only():
    model = _tiny_model()
    keys = set(model.state_dict())
    n = convert_to_float8(model, Fp8Config(), "s")
    assert n == 7  # q, k, v, o, gate, up, down of the one layer
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert set(model.state_dict()) == keys
    delayed = convert_to_float8(_tiny_model(), Fp8Config(scaling="delayed", amax_history_len=8), "s")
    assert delayed == 7


def test_fp8_with_nothing_eligible_is_a_recipe_error():
    model = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Linear(24, 7))
    model.get_output_embeddings = lambda: None
    with pytest.raises(RecipeError, match=r"stages\.s\.precision: fp8 found no linear layer.*0 \(10x24\)"):
        convert_to_float8(model, Fp8Config(), "s")


def test_a_step_without_fp8_gemms_fails_loudly():
    check = Fp8GemmCheck(True, "pretrain")
    with pytest.raises(TrainingError, match="precision is fp8 but this step ran no FP8 GEMM"):
        check.step_metrics()
    assert Fp8GemmCheck(False, "pretrain").step_metrics() == {}


def _pretrain(precision: str, steps: int = 8, **extra) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": steps}
    recipe["defaults"]["eval"] = {}
    recipe["defaults"]["precision"] = precision
    recipe["defaults"].update(extra)
    return recipe


def test_pretrain_stage_in_fp8(tmp_path: Path):
    bf16 = write_recipe(tmp_path, _pretrain("bf16"), "bf16.yaml")
    fp8 = write_recipe(tmp_path, _pretrain("fp8", kernels={"rmsnorm": True, "fused_ce": True}), "fp8.yaml")
    run_recipe(load_recipe(bf16, ["run.name=bf16"]), quiet=True)
    run_recipe(load_recipe(fp8, ["run.name=fp8"]), quiet=True)
    rec = {name: [json.loads(x) for x in (tmp_path / f"runs/{name}/pretrain/metrics.jsonl").read_text().splitlines()]
           for name in ("bf16", "fp8")}
    assert all(r["fp8_gemms"] == 7 * 3 for r in rec["fp8"])  # 7 linears x 3 GEMMs, one micro-batch a step
    assert "fp8_gemms" not in rec["bf16"][0]
    first, last = rec["fp8"][0]["loss"], rec["fp8"][-1]["loss"]
    assert last < first  # it learns
    assert last == pytest.approx(rec["bf16"][-1]["loss"], rel=0.05)
    assert (tmp_path / "runs/fp8/pretrain/model/DONE").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linear_on_gpu(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 2048, device="cuda", dtype=dtype)
    f8 = Float8Linear.from_linear(lin)
    x = torch.randn(2, 500, 1024, device="cuda", dtype=dtype)
    x_ref, x8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lin(x_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    dw_ref = lin.weight.grad.clone()
    lin.weight.grad = lin.bias.grad = None
    before = GEMMS.total
    y8 = f8(x8)
    y8.backward(dy)
    assert GEMMS.total - before == 3
    assert sqnr(y, y8) >= 18 and sqnr(x_ref.grad, x8.grad) >= 18 and sqnr(dw_ref, lin.weight.grad) >= 17


def test_delayed_scaling_resume_is_exact(tmp_path: Path):
    """The amax histories are per-rank training state: a stage resumed from its step-3 checkpoint
    reproduces the uninterrupted run bit for bit, and the histories stay out of the HF export."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    recipe = _pretrain("fp8", steps=6, fp8={"scaling": "delayed", "amax_history_len": 16})
    recipe["stages"]["pretrain"]["train"].update(checkpoint_every=3, keep_checkpoints=1)
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path, ["run.name=whole"]), quiet=True)
    whole, resumed = tmp_path / "runs/whole/pretrain", tmp_path / "runs/resumed/pretrain"
    assert (whole / "checkpoints/step-00000003/fp8_rank0.pt").is_file()
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "model")  # as if killed after the step-3 checkpoint
    run_recipe(load_recipe(path, ["run.name=resumed"]), quiet=True)

    assert [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("amax" in k or "histor" in k for k in a)
    _, info = LlamaForCausalLM.from_pretrained(resumed / "model", output_loading_info=True)
    assert not any(info.values()), info  # no missing or unexpected keys
