"""A lean KV-cached decoder for Llama-architecture models (used by `generate.decode_batch`).

HF's forward spends much of a small model's decode step outside arithmetic: building the 4D mask,
growing the DynamicCache by `torch.cat`, recomputing rotary cos/sin, module and kwargs plumbing.
This decoder keeps only the arithmetic, in HF's own op order (on the CPU its logits are bitwise
HF's wherever the vectorised/scalar split of elementwise kernels falls alike; tests hold 1e-5):

- a static K/V cache per layer [batch, kv_heads, prompt + new tokens, head_dim], written in place;
- rotary cos/sin computed once for every position by the model's own rotary module;
- q/k/v and gate/up weights concatenated once per call (`torch.cat` of the live parameters, so
  it is right under ZeRO-3's `generation_model()` where they are gathered): one GEMM each;
- the model's own embedding, norm, activation and LM-head modules (fused RMSNorm swaps included);
- SDPA called exactly as transformers' `sdpa_attention_forward` calls it (same mask, same GQA
  handling), only the last position through the LM head, under whatever autocast is active;
- identical prompt rows (a GRPO group's copies) prefilled once, their cache rows copied;
- on the CPU in fp32, the step GEMMs' weights prepacked for MKL once per call (same bits as
  F.linear from 4 rows up; used from PACK_MIN_ROWS rows).

It returns None (and the caller takes the HF path) for anything it does not reproduce exactly:
another architecture, biases, linears that are not plain `nn.Linear` (FP8, LoRA, ...), non-default
RoPE, non-SDPA attention, hooks or patched forwards, attention dropout while training.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F


PACK_MIN_ROWS = 8


def why_not(model: torch.nn.Module) -> str | None:
    """None if `LlamaDecoder` reproduces `model`'s forward; otherwise why not."""
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:  # pragma: no cover - transformers always has Llama
        return "transformers has no Llama"
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        return "not a Llama config"
    if not isinstance(model, ml.LlamaForCausalLM) or type(model).forward is not ml.LlamaForCausalLM.forward:
        return "not LlamaForCausalLM's forward"
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, ml.LlamaModel) or type(backbone).forward is not ml.LlamaModel.forward:
        return "not LlamaModel's forward"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} is not 'sdpa'"
    if not getattr(cfg, "is_causal", True) or getattr(cfg, "pretraining_tp", 1) != 1:
        return "non-causal or tensor-parallel-pretrained config"
    if getattr(cfg, "sliding_window", None) is not None or getattr(cfg, "layer_types", None) not in (
            None, ["full_attention"] * cfg.num_hidden_layers):
        return "sliding-window or hybrid attention layers"
    rotary = getattr(backbone, "rotary_emb", None)
    if type(rotary) is not ml.LlamaRotaryEmbedding or getattr(rotary, "rope_type", None) != "default":
        return "non-default RoPE"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module hooks"
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return f"hooks or a patched forward on {type(module).__name__}"
    layers = backbone.layers
    if len(layers) != cfg.num_hidden_layers or not len(layers):
        return "layer count differs from the config"
    hidden = cfg.hidden_size
    weights = []
    for layer in layers:
        if type(layer) is not ml.LlamaDecoderLayer:
            return f"decoder layer {type(layer).__name__}"
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not ml.LlamaAttention or type(mlp) is not ml.LlamaMLP:
            return f"attention {type(attn).__name__} / MLP {type(mlp).__name__}"
        if attn.training and attn.attention_dropout > 0:
            return "attention dropout in training mode"
        hd, heads, kv = attn.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        inter = mlp.intermediate_size
        shapes = {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
                  "o_proj": (hidden, heads * hd)}
        for name, shape in shapes.items():
            lin = getattr(attn, name)
            if type(lin) is not torch.nn.Linear or lin.bias is not None or tuple(lin.weight.shape) != shape:
                return f"self_attn.{name} is not a plain bias-free nn.Linear of shape {shape}"
            weights.append(lin.weight)
        for name, shape in {"gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                            "down_proj": (hidden, inter)}.items():
            lin = getattr(mlp, name)
            if type(lin) is not torch.nn.Linear or lin.bias is not None or tuple(lin.weight.shape) != shape:
                return f"mlp.{name} is not a plain bias-free nn.Linear of shape {shape}"
            weights.append(lin.weight)
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return "linear weights of mixed dtypes or devices"
    return None


def _hf_gqa_rule():
    """transformers' own "may SDPA take enable_gqa with this mask" rule, when it has one."""
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

        return use_gqa_in_sdpa
    except ImportError:  # pragma: no cover - older transformers: the CUDA/CPU rule it had
        return lambda mask, key, value: (os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1"
                                         or (mask is None and key.shape[-1] == value.shape[-1] <= 256))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class LlamaDecoder:
    """Prefill and one-token steps of a Llama model over a static KV cache; see the module doc.

    `prefill` takes the left-padded batch (ids, 0/1 mask, positions) and returns the last
    position's logits [batch, vocab]; each `step` takes one new token per row and returns the
    logits after it. Positions continue from each row's last prompt position."""

    def __init__(self, model: torch.nn.Module, max_new_tokens: int):
        cfg = model.config
        backbone = model.model
        self.model, self.backbone, self.max_new = model, backbone, max_new_tokens
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                attn.o_proj.weight,
                layer.post_attention_layernorm,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                mlp.down_proj.weight,
                mlp.act_fn,
            ))
        head = model.lm_head
        self.head_weight = head.weight if type(head) is torch.nn.Linear and head.bias is None else None
        self.packed = None
        attn0 = backbone.layers[0].self_attn
        self.head_dim, self.scaling = attn0.head_dim, attn0.scaling
        self.inter = backbone.layers[0].mlp.intermediate_size
        self.gqa_rule = _hf_gqa_rule()

    # ------------------------------------------------------------------ GEMMs

    def _pack(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        """MKL-prepacked copies of the decode steps' weights (`rows` tokens per step): the
        [rows, hidden] GEMMs of a step are too small for MKL to amortise packing the weight on
        every call. Only where the packed GEMM gives F.linear's bits: fp32 on the CPU without
        autocast, and at least PACK_MIN_ROWS rows (MKL takes another path below that)."""
        self.packed = None
        weights = [w for layer in self.layers for w in (layer[1], layer[2], layer[4], layer[5])]
        if self.head_weight is not None:
            weights.append(self.head_weight)
        if (rows < PACK_MIN_ROWS or device.type != "cpu" or dtype != torch.float32
                or any(w.dtype != torch.float32 for w in weights) or torch.is_autocast_enabled("cpu")
                or not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_linear")):
            return
        self.packed = {id(w): (torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w) for w in weights}
        self.rows = rows

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] * x.shape[1] == self.rows:
            packed, original = self.packed[id(weight)]
            return torch.ops.mkl._mkl_linear(x, packed, original, None, self.rows)
        return F.linear(x, weight)

    # ------------------------------------------------------------------ one layer

    def _attention(self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """`x` [batch, t, hidden] at cache columns start..start+t; returns o_proj's output."""
        _, qkv_w, o_w, *_ = self.layers[index]
        batch, t, _ = x.shape
        hd, nq, nkv = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = self._linear(x, qkv_w)
        # RoPE on q and k at once ([batch, t, heads + kv_heads, head_dim]): the same products and
        # sums per element as HF's apply_rotary_pos_emb, in half the kernel launches.
        qk = qkv[..., :nq + nkv].view(batch, t, -1, hd)
        v = qkv[..., nq + nkv:].view(batch, t, -1, hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        qk = (qk * cos) + (_rotate_half(qk) * sin)
        q = qk[:, :, :self.heads].transpose(1, 2)
        k = qk[:, :, self.heads:].transpose(1, 2)
        if self.k_cache[index] is None:  # dtypes as HF's cache holds them (fp32 keys, bf16 values under autocast)
            length = start + t + self.max_new
            self.k_cache[index] = k.new_empty((batch, self.kv_heads, length, hd))
            self.v_cache[index] = v.new_empty((batch, self.kv_heads, length, hd))
        self.k_cache[index][:, :, start:start + t] = k
        self.v_cache[index][:, :, start:start + t] = v
        if start == 0:  # prefill: attend to the fresh tensors, as HF does with an empty cache
            keys, values = k, v
        else:
            keys = self.k_cache[index][:, :, :start + t]
            values = self.v_cache[index][:, :, :start + t]
        # transformers' sdpa_attention_forward, step by step.
        extra = {}
        if self.groups > 1:
            if self.gqa_rule(mask, keys, values):
                extra["enable_gqa"] = True
            elif t == 1:
                q = q.reshape(batch, self.kv_heads, self.groups, hd)
            else:
                keys = keys[:, :, None].expand(batch, self.kv_heads, self.groups, *keys.shape[2:]).reshape(
                    batch, self.heads, *keys.shape[2:])
                values = values[:, :, None].expand(batch, self.kv_heads, self.groups, *values.shape[2:]).reshape(
                    batch, self.heads, *values.shape[2:])
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                             is_causal=t > 1 and mask is None, **extra)
        out = out.reshape(out.shape[0], -1, t, values.shape[-1]).transpose(1, 2).contiguous()
        return self._linear(out.reshape(batch, t, -1).contiguous(), o_w)

    def _forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                 mask: torch.Tensor | None, expand: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, vocab] of the last position (rows repeated as `expand` says, so that the
        LM head's GEMM has the batch's row count, as HF's has)."""
        # Modules are called through .forward: why_not() checked that none has hooks.
        h = self.backbone.embed_tokens.forward(ids)
        for index, (norm1, _, _, norm2, gu_w, down_w, act) in enumerate(self.layers):
            h = h + self._attention(index, norm1.forward(h), cos, sin, start, mask)
            gu = self._linear(norm2.forward(h), gu_w)
            # the activation sees a contiguous gate, as HF's does (same vectorised/scalar split)
            h = h + self._linear(act.forward(gu[..., :self.inter].contiguous()) * gu[..., self.inter:], down_w)
        h = self.backbone.norm.forward(h)
        if self.head_weight is not None and self.packed is not None and ids.shape[1] == 1:
            return self._linear(h, self.head_weight)[:, -1]
        last = h[:, -1:, :] if expand is None else h[:, -1:, :][expand]
        return self.model.lm_head(last)[:, -1]

    # ------------------------------------------------------------------ public

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """The last prompt position's logits [batch, vocab]; fills the cache. Identical rows (a GRPO
        group's copies of one prompt) are run once and their cache rows copied."""
        batch, prompt = input_ids.shape
        self.k_cache: list[torch.Tensor | None] = [None] * len(self.layers)
        self.v_cache: list[torch.Tensor | None] = [None] * len(self.layers)
        self.length = self.prompt = prompt
        device = input_ids.device
        # cos/sin for every position, from the model's own rotary module (its dtype follows the
        # embedding output's, as HF's does); a table length that is a multiple of 32 keeps every
        # element on the vectorised cos/sin path, as HF's [batch, t, head_dim] calls are.
        probe = self.backbone.embed_tokens(input_ids[:1, :1])
        positions = -(-(prompt + self.max_new) // 32) * 32
        cos, sin = self.backbone.rotary_emb(probe, torch.arange(positions, device=device)[None])
        self.cos_table, self.sin_table = cos[0], sin[0]
        steps = position_ids[:, -1:] + 1 + torch.arange(max(self.max_new - 1, 1), device=device)
        # each row's positions for the decode steps (cos/sin slices, no indexing per step)
        self.step_cos, self.step_sin = self.cos_table[steps], self.sin_table[steps]
        keys = attention_mask.bool()
        if bool(keys.all()):
            self.step_mask = None
        else:
            full = torch.ones(batch, prompt + self.max_new, dtype=torch.bool, device=device)
            full[:, :prompt] = keys
            self.step_mask = full[:, None, None, :]
        first: dict[tuple, int] = {}
        rows = [first.setdefault(tuple(row), len(first)) for row in torch.cat([input_ids, attention_mask], 1).tolist()]
        unique = None
        if len(first) < batch:
            unique = torch.tensor([rows.index(i) for i in range(len(first))], device=device)
            input_ids, keys, position_ids = input_ids[unique], keys[unique], position_ids[unique]
        mask = None
        if not bool(keys.all()):  # HF's mask: causal and key padding (its packed-sequence split only touches pad rows)
            causal = torch.ones(prompt, prompt, dtype=torch.bool, device=device).tril()
            mask = causal[None, None] & keys[:, None, None, :]
        expand = None if unique is None else torch.tensor(rows, device=device)
        with torch.no_grad():
            logits = self._forward(input_ids, self.cos_table[position_ids], self.sin_table[position_ids], 0, mask,
                                   expand)
            if expand is not None:
                self.k_cache = [k[expand] for k in self.k_cache]
                self.v_cache = [v[expand] for v in self.v_cache]
            self._pack(batch, probe.dtype, device)
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits after feeding `token` [batch] at each row's next position."""
        start = self.length
        step = start - self.prompt
        self.length += 1
        mask = None if self.step_mask is None else self.step_mask[..., :self.length]
        with torch.no_grad():
            return self._forward(token[:, None], self.step_cos[:, step:step + 1], self.step_sin[:, step:step + 1],
                                 start, mask)


_announced: set[str] = set()


def llama_decoder(model: torch.nn.Module, max_new_tokens: int) -> LlamaDecoder | None:
    """A `LlamaDecoder` for `model`, or None where it would not reproduce the model's forward
    (set INSTAR_FAST_DECODE=0 to always take the HF path). The first time each reason declines
    it, stderr says so: sampling several times slower should never be silent."""
    if os.environ.get("INSTAR_FAST_DECODE", "1") == "0":
        return None
    why = why_not(model)
    if why is not None:
        if why not in _announced:
            _announced.add(why)
            print(f"instar: sampling through transformers' forward, not the lean decoder ({why})", file=sys.stderr,
                  flush=True)
        return None
    return LlamaDecoder(model, max_new_tokens)
