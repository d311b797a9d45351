"""`mask_inputs`: Masked Thought-style input masking of the learnt tokens.

Each input token that is itself a target (a response token: the target of the position before it)
is replaced by a mask token with probability `rate`, which rises linearly from 0 over the first
`ramp` share of the stage's steps. The prompt's tokens and every target are left alone, so the
model still predicts the true next token, from a context with some of its own earlier answer
hidden. (Masked Thought, "Masking Reasoning Steps Makes Language Models Better Reasoners".)
"""

from __future__ import annotations

import zlib
from typing import Literal

from pydantic import Field

from instar.errors import ContractError
from instar.methods.input_transforms import InputTransform, TransformSpec


class MaskInputsSpec(TransformSpec):
    name: Literal["mask_inputs"] = "mask_inputs"
    rate: float = Field(gt=0, le=1)  # the probability a learnt input token is masked (after the ramp)
    ramp: float = Field(default=0.0, ge=0, le=1)  # share of the steps over which the rate rises from 0
    token: str | None = None  # the mask token; default: the tokenizer's pad token


class MaskInputs(InputTransform):
    Spec = MaskInputsSpec

    def __init__(self, spec: MaskInputsSpec, tokenizer, seed: int, total_steps: int):
        super().__init__(spec, tokenizer, seed, total_steps)
        token = spec.token if spec.token is not None else tokenizer.pad_token
        self.mask_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if self.mask_id is None or self.mask_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ContractError(f"transforms mask_inputs: the tokenizer has no token {token!r} to mask with; "
                                f"set `token` to one of its tokens")

    def rate_at(self, step: int) -> float:
        ramp_steps = self.spec.ramp * self.total_steps
        return self.spec.rate * (min(1.0, step / ramp_steps) if ramp_steps else 1.0)

    def __call__(self, batch, step: int, first_row: int):
        import torch

        from instar.data.example import IGNORE

        rate = self.rate_at(step)
        ids, targets = batch.input_ids, batch.targets
        learnt = torch.zeros_like(ids, dtype=torch.bool)
        learnt[:, 1:] = targets[:, :-1] != IGNORE  # input j is the target of position j - 1
        draws = torch.stack([
            torch.rand(ids.shape[1], generator=torch.Generator().manual_seed(
                zlib.crc32(f"{self.seed}:{step}:{first_row + r}".encode())))
            for r in range(ids.shape[0])]).to(ids.device)
        return batch.replace(input_ids=ids.masked_fill(learnt & (draws < rate), self.mask_id))
