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
from instar.data.batch import Batch
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


def _batch(step: int, rows: slice, vocab: int) -> Batch:
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(step))[rows]
    return Batch(ids, torch.roll(ids, -1, 1), torch.arange(64).expand(len(ids), -1), torch.zeros_like(ids), True)


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


def _play_single(path: Path, out: Path) -> dict:
    from instar.trainer.single_engine import SingleEngine

    found = _play(SingleEngine(_model(), _spec(path), stage="pretrain"), out)
    assert found["dtypes"]["Linear"] == "torch.bfloat16"  # q/k/v/o, MLP and LM head: under bf16 autocast
    assert found["weight_dtype"] == "torch.float32" and found["refused_step_kept_state"]
    assert found["applied"] == ALLOW
    return found


def test_bf16_on_one_process_is_an_autocast_forward_over_fp32_weights(tmp_path: Path):
    _play_single(write_recipe(tmp_path, _recipe(2)), tmp_path / "one.safetensors")


@pytest.mark.dist
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bf16_and_refused_steps_mean_the_same_on_both_engines(tmp_path: Path, zero: int):
    from tests.test_fp8_zero import _torchrun

    path = write_recipe(tmp_path, _recipe(zero))
    single = _play_single(path, tmp_path / "one.safetensors")

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
    _check_checkpoint(tmp_path / "ckpt", got, zero)


class Payload:
    """Unpickling it runs code: it touches a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _check_checkpoint(ckpt: Path, final: dict[str, torch.Tensor], zero: int) -> None:
    """The checkpoint the ranks wrote (and loaded back) consolidates to their final weights; once a
    file of it holds a pickled object, it is refused before anything unpickles it."""
    from instar.errors import ContractError
    from instar.trainer.deepspeed_engine import TAG, DeepSpeedEngine
    from instar.trainer.single_engine import load_weights

    model = _model()
    load_weights(model, DeepSpeedEngine.consolidated_weights(ckpt), "the test's checkpoint")
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in final.items())

    file = ckpt / TAG / ("mp_rank_00_model_states.pt" if zero == 0 else "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    content = torch.load(file, weights_only=False)  # written by this test's ranks
    marker = ckpt / "unpickled"
    torch.save({**content, "payload": Payload(marker)}, file)
    with pytest.raises(ContractError, match=rf"{file.name} holds more than .*Unsupported global"):
        DeepSpeedEngine.consolidated_weights(ckpt)
    assert not marker.exists()


def test_load_weights_is_strict_but_takes_a_tied_tensor_under_one_name():
    from instar.errors import ContractError
    from instar.trainer.single_engine import load_weights, tied_groups

    source, target = _model(), _model()
    assert tied_groups(target) == [["model.embed_tokens.weight", "lm_head.weight"]]
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    weights = {k: v for k, v in source.state_dict().items() if k != "model.embed_tokens.weight"}
    load_weights(target, weights, "x")  # the tied head alone fills the embedding too
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    with pytest.raises(ContractError, match=r"src does not fit LlamaForCausalLM: missing keys \['model.norm.weight'\]"):
        load_weights(target, {k: v for k, v in weights.items() if k != "model.norm.weight"}, "src")
    with pytest.raises(ContractError, match=r"unexpected keys \['extra'\]"):
        load_weights(target, {**weights, "extra": torch.zeros(1)}, "src")


if __name__ == "__main__":  # one rank of the ZeRO run, started by torchrun
    from instar.trainer.deepspeed_engine import DeepSpeedEngine

    spec = _spec(Path(sys.argv[1]))
    engine = DeepSpeedEngine(_model(), spec, batch_layout(spec.train, 2), "pretrain")
    found = _play(engine, Path(sys.argv[2]))
    ckpt = Path(sys.argv[2]).parent / "ckpt"
    if engine.rank == 0:
        Path(sys.argv[3]).write_text(json.dumps(found))
        ckpt.mkdir()
    engine.barrier()
    engine.save(ckpt)
    engine.barrier()
    engine.load(ckpt)  # what a resume reads passes the pickle check
    sys.stdout.flush()
    os._exit(0)  # as instar's worker: skips the exit-time teardown where ZeRO ranks on CPU sometimes abort
