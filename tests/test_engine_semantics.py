"""One meaning per setting on both engines: `precision: bf16` is fp32 weights with the forward under
bf16 autocast, and a step the loop refuses (`allow=False`, a non-finite loss) changes nothing, on
one process and on DeepSpeed ZeRO 1-3 (2 CPU ranks).

Run as a script (`torchrun -m tests.test_engine_semantics RECIPE OUT`), each rank plays the same
three steps as `_play` on one process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from instar.config.load import load_recipe
from instar.config.resolve import resolve_stage
from instar.trainer.batch import batch_layout
from instar.trainer.losses import causal_lm_loss
from tests.conftest import tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parent.parent
ALLOW = [True, False, True]  # the loop's verdict per step: step 2 had a non-finite loss


def _recipe(zero: int) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 3, "global_batch_size": 8}  # 4 rows a micro-batch
    recipe["defaults"]["eval"] = {}
    recipe["defaults"]["precision"] = "bf16"
    recipe["defaults"]["distributed"] = {"engine": "deepspeed", "zero_stage": zero, "nproc_per_node": 2}
    if zero == 3:  # really partition the tiny model's parameters
        recipe["defaults"]["distributed"]["deepspeed_config"] = {
            "zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return recipe


def _spec(recipe_path: Path):
    return resolve_stage(load_recipe(recipe_path, []).recipe, "pretrain")


def _model():
    from instar.data.tokenizer import build_char_tokenizer
    from instar.models.build import model_from_config

    return model_from_config(tiny_recipe()["model"]["config"], build_char_tokenizer(), seed=0)


def _batch(step: int, rows: slice, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(step))[rows]
    return {"input_ids": ids, "position_ids": torch.arange(64).expand(len(ids), -1),
            "doc_ids": torch.zeros_like(ids), "targets": torch.roll(ids, -1, 1)}


def _optimizer_state(engine) -> list[torch.Tensor]:
    """This rank's optimizer state (its partition under ZeRO 1-3)."""
    optimizer = getattr(engine, "_client_optimizer", None) or engine.optimizer
    return [t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _play(engine, out: Path) -> dict:
    """Three steps of 8 rows (this rank's share of each), the second refused. Records the dtype each
    kind of module outputs in the first forward, the weights' dtype, each step's global loss, norm
    and verdict, and whether the refused step left the weights and optimizer state as they were.
    Rank 0 writes the final weights to `out`."""
    model = getattr(engine.model, "module", engine.model)
    per_rank = 8 // engine.world_size
    found: dict = {"dtypes": {}, "loss": [], "grad_norm": [], "applied": []}

    def record(module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        if isinstance(output, torch.Tensor):
            found["dtypes"].setdefault(type(module).__name__, str(output.dtype))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    for step, allow in enumerate(ALLOW):
        if not allow:
            full = engine.export_model()
            weights = {k: v.clone() for k, v in full.state_dict().items()} if full is not None else {}
            state = _optimizer_state(engine)
        loss_sum = 0.0
        mine = range(engine.rank * per_rank, (engine.rank + 1) * per_rank)
        for start in range(mine.start, mine.stop, 4):  # micro-batches of 4 rows
            with engine.autocast():
                loss, _ = causal_lm_loss(engine.model, _batch(step, slice(start, start + 4), model.config.vocab_size),
                                         8 * 64)
            engine.backward(loss)
            loss_sum += float(loss.detach())
        for hook in hooks:
            hook.remove()
        hooks = []
        found["loss"].append(engine.all_reduce_sum(loss_sum))
        norm, applied = engine.step(1e-2, allow=allow)
        found["grad_norm"].append(norm)
        found["applied"].append(applied)
        if not allow:
            full = engine.export_model()
            kept = full is None or all(torch.equal(v, weights[k]) for k, v in full.state_dict().items())
            kept = kept and _same(state, _optimizer_state(engine))
            found["refused_step_kept_state"] = engine.all_reduce_sum(float(not kept)) == 0
    found["weight_dtype"] = str(next(model.parameters()).dtype)
    full = engine.export_model()
    if full is not None:
        from instar.trainer.single_engine import unique_state_dict

        save_file(unique_state_dict(full), str(out))
    return found


@pytest.mark.dist
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bf16_and_refused_steps_mean_the_same_on_both_engines(tmp_path: Path, zero: int):
    from instar.trainer.single_engine import SingleEngine
    from tests.test_fp8_zero import _torchrun

    path = write_recipe(tmp_path, _recipe(zero))
    single = _play(SingleEngine(_model(), _spec(path), "pretrain"), tmp_path / "one.safetensors")
    assert single["dtypes"]["Linear"] == "torch.bfloat16"  # under bf16 autocast
    assert single["weight_dtype"] == "torch.float32" and single["refused_step_kept_state"]
    assert single["applied"] == ALLOW

    _torchrun(["-m", "tests.test_engine_semantics", str(path), str(tmp_path / "two.safetensors"),
               str(tmp_path / "two.json")], REPO)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["dtypes"] == single["dtypes"] and two["weight_dtype"] == "torch.float32"
    assert two["applied"] == ALLOW and two["refused_step_kept_state"]
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-6)
    applied = [i for i, ok in enumerate(ALLOW) if ok]  # a refused step's norm: inf under ZeRO, unused
    assert [two["grad_norm"][i] for i in applied] == pytest.approx([single["grad_norm"][i] for i in applied],
                                                                   rel=1e-5)
    want, got = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)


if __name__ == "__main__":  # one rank of the ZeRO run, started by torchrun
    from instar.trainer.deepspeed_engine import DeepSpeedEngine

    spec = _spec(Path(sys.argv[1]))
    engine = DeepSpeedEngine(_model(), spec, batch_layout(spec.train, 2), "pretrain")
    found = _play(engine, Path(sys.argv[2]))
    if engine.rank == 0:
        Path(sys.argv[3]).write_text(json.dumps(found))
    engine.barrier()
    sys.stdout.flush()
    os._exit(0)  # as instar's worker: skips the exit-time teardown where ZeRO ranks on CPU sometimes abort
