"""The lean Llama decoder (instar/eval/fast_decode.py) against HF's forward: per-step logits,
decoded tokens (greedy and seeded sampling), bf16 autocast, and the models it must leave to HF."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instar.eval.fast_decode import LlamaDecoder, llama_decoder, why_not
from instar.eval.generate import _hf_decoder, decode_batch, greedy_pick, left_padded, sampling_pick

PAD = 0


def _llama(hidden=64, heads=4, kv=2, inter=88, layers=2, vocab=97, tie=False, head_dim=None, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie, head_dim=head_dim,
                      pad_token_id=PAD, max_position_embeddings=256, **extra)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init: logits far from uniform
            p.normal_(0.0, 0.2)
    return model


SHAPES = {
    "gqa": {},
    "mha_tied": {"hidden": 48, "heads": 3, "kv": 3, "inter": 100, "tie": True},
    "mqa_head_dim": {"hidden": 64, "heads": 8, "kv": 1, "head_dim": 16, "inter": 72, "layers": 3},
    "bench_shape": {"hidden": 256, "heads": 8, "kv": 4, "inter": 688, "layers": 2, "vocab": 512, "tie": True},
}
LENGTHS = {"equal": [5, 5, 5], "left_padded_odd": [3, 7, 1, 6, 9], "grpo_groups": [11, 11, 11, 11, 4, 4, 4, 4],
           "eight_long": [33] * 8}


def _prompts(model, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    unique: dict[int, list[int]] = {}
    out = []
    for i, n in enumerate(lengths):  # equal neighbouring lengths in "grpo_groups" repeat one prompt
        key = n if len(set(lengths)) < len(lengths) and lengths.count(n) == 4 else i
        if key not in unique:
            unique[key] = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(unique[key])
    return out


def _step_logits(model, prompts, steps, lean: bool):
    """Logits of the prompt's last position and of `steps` teacher-forced greedy steps (the
    tokens are HF's argmax, fed to both paths)."""
    ids, mask = left_padded(prompts, PAD, torch.device("cpu"))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits, advance = _hf_decoder(model, ids, mask, pos)
        ref = [logits]
        for _ in range(steps):
            ref.append(advance(ref[-1].argmax(-1)))
        if not lean:
            return ref, ref
        decoder = llama_decoder(model, steps + 1)
        assert isinstance(decoder, LlamaDecoder)
        got = [decoder.prefill(ids, mask, pos)]
        for r in ref[:-1]:
            got.append(decoder.step(r.argmax(-1)))
    return ref, got


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_lean_logits_equal_hf_forward(shape, lengths):
    model = _llama(**SHAPES[shape])
    assert why_not(model) is None
    ref, got = _step_logits(model, _prompts(model, LENGTHS[lengths]), 10, lean=True)
    for step, (r, g) in enumerate(zip(ref, got)):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert torch.allclose(g, r, rtol=0, atol=1e-5), f"step {step}: max diff {(g - r).abs().max():.2e}"


def _both_paths(monkeypatch, model, prompts, max_new, stop_ids, make_pick):
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("INSTAR_FAST_DECODE", flag)
        with torch.inference_mode():
            out[flag] = decode_batch(model, prompts, max_new, stop_ids, PAD, make_pick())
    return out["0"], out["1"]


@pytest.mark.parametrize("shape", ["gqa", "mqa_head_dim", "bench_shape"])
def test_lean_tokens_equal_hf_path(monkeypatch, shape):
    model = _llama(**SHAPES[shape])
    prompts = _prompts(model, LENGTHS["grpo_groups"]) + _prompts(model, [2, 13], seed=5)
    rows = len(prompts)
    stop = [7]
    hf, lean = _both_paths(monkeypatch, model, prompts, 24, stop, lambda: greedy_pick)
    assert hf == lean
    gens = lambda: [torch.Generator().manual_seed(100 + r) for r in range(rows)]  # noqa: E731
    for top_p in (1.0, 0.8):
        hf, lean = _both_paths(monkeypatch, model, prompts, 24, stop, lambda: sampling_pick(1.0, top_p, gens()))
        assert hf == lean
        assert len({tuple(x) for x in lean[:4]}) > 1  # the copies of one prompt were sampled independently


def test_lean_greedy_batched_equals_one_by_one():
    model = _llama(**SHAPES["gqa"])
    prompts = _prompts(model, LENGTHS["left_padded_odd"])
    with torch.inference_mode():
        batched = decode_batch(model, prompts, 12, [], PAD, greedy_pick)
        alone = [decode_batch(model, [p], 12, [], PAD, greedy_pick)[0] for p in prompts]
    assert batched == alone


def test_lean_under_bf16_autocast_matches_hf():
    model = _llama(**SHAPES["bench_shape"])
    prompts = _prompts(model, LENGTHS["grpo_groups"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = _step_logits(model, prompts, 6, lean=True)
    for r, g in zip(ref, got):
        assert r.dtype == g.dtype == torch.bfloat16
        scale = r.float().abs().max()
        assert torch.allclose(g.float(), r.float(), rtol=0, atol=2e-2 * scale)


class _ScaledLinear(torch.nn.Linear):
    """A linear subclass with its own forward (as LoRA or FP8 layers have)."""

    def forward(self, x):
        return super().forward(x) * 3.0


def _swap(module, name, new):
    old = getattr(module, name)
    new.weight = old.weight
    setattr(module, name, new)


def _fallback_models():
    scaled = _llama()
    for layer in scaled.model.layers:
        lin = layer.mlp.up_proj
        _swap(layer.mlp, "up_proj", _ScaledLinear(lin.in_features, lin.out_features, bias=False))
    hooked = _llama()
    hooked.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * 0.5)
    eager = _llama()
    eager.config._attn_implementation = "eager"
    return {
        "attention_bias": _llama(attention_bias=True),
        "mlp_bias": _llama(mlp_bias=True),
        "linear_subclass": scaled,
        "forward_hook": hooked,
        "llama3_rope": _llama(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32}),
        "eager_attention": eager,
    }


@pytest.mark.parametrize("name", list(_fallback_models()))
def test_models_it_does_not_reproduce_take_the_hf_path(monkeypatch, name):
    model = _fallback_models()[name]
    assert why_not(model) is not None
    assert llama_decoder(model, 4) is None
    prompts = _prompts(model, LENGTHS["left_padded_odd"])
    hf, default = _both_paths(monkeypatch, model, prompts, 10, [], lambda: greedy_pick)
    assert default == hf
    # and what HF computes is not what the plain model computes (the variant matters)
    if name not in ("linear_subclass", "forward_hook"):
        return  # other weights or positions by construction, or (eager) the same function
    plain = _llama()
    with torch.inference_mode():
        base = decode_batch(plain, prompts, 10, [], PAD, greedy_pick)
    assert base != default


def test_taking_the_hf_path_is_announced_once_per_reason(monkeypatch, capsys):
    import instar.eval.fast_decode as fd

    monkeypatch.setattr(fd, "_announced", set())
    model = _fallback_models()["eager_attention"]
    assert llama_decoder(model, 4) is None and llama_decoder(model, 4) is None
    err = capsys.readouterr().err
    assert err.count("not the lean decoder") == 1 and "'eager'" in err
    monkeypatch.setenv("INSTAR_FAST_DECODE", "0")  # asked for: nothing to announce
    assert llama_decoder(_llama(), 4) is None
    assert capsys.readouterr().err == ""


def test_float8_linear_swap_takes_the_hf_path():
    from instar.kernels.fp8.linear import Float8Linear

    model = _llama(hidden=64, heads=4, kv=2, inter=96)
    attn = model.model.layers[1].self_attn
    attn.q_proj = Float8Linear.from_linear(attn.q_proj)
    assert "q_proj" in why_not(model)


def test_fused_rmsnorm_swap_keeps_the_lean_path_and_matches():
    from instar.models.swaps import fuse_rmsnorms

    model = _llama(**SHAPES["gqa"])
    assert fuse_rmsnorms(model) == 2 * 2 + 1
    assert why_not(model) is None
    ref, got = _step_logits(model, _prompts(model, LENGTHS["left_padded_odd"]), 6, lean=True)
    for r, g in zip(ref, got):
        assert torch.allclose(g, r, rtol=0, atol=1e-5)
