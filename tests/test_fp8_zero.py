"""`precision: fp8` under DeepSpeed ZeRO-2 on 2 CPU ranks: FP8 GEMMs run, the losses are the single
engine's, and the ops outside the FP8 linears (attention, norms, LM head) run in the single engine's
dtype: bf16 under autocast, with fp32 weights and gradients.

Run as a script (`torchrun -m tests.test_fp8_zero RECIPE OUT`), each rank probes one ZeRO-2 step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instar.config.load import load_recipe
from instar.config.resolve import resolve_stage
from instar.data.batch import Batch
from instar.graph.runner import run_recipe
from instar.kernels.fp8.linear import GEMMS
from instar.trainer.batch import batch_layout
from tests.conftest import tiny_recipe, write_recipe

pytestmark = pytest.mark.dist
REPO = Path(__file__).resolve().parent.parent


def _recipe() -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": 4, "global_batch_size": 8}  # 4 rows a micro-batch
    recipe["defaults"]["eval"] = {}
    recipe["defaults"]["precision"] = "fp8"
    recipe["defaults"]["distributed"] = {"engine": "deepspeed", "zero_stage": 2, "nproc_per_node": 2}
    return recipe


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def _torchrun(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def test_fp8_on_zero2_computes_what_one_process_does(tmp_path: Path):
    from tests.test_distributed import _run

    path = write_recipe(tmp_path, _recipe())
    # One process, same global batch: 2 micro-batches of the same 4 rows each rank gets, so every
    # FP8 tensor is scaled from the same amax.
    run_recipe(load_recipe(path, ["run.name=one", "defaults.distributed.engine=single",
                                  "defaults.distributed.nproc_per_node=1"]), quiet=True)
    _run(["run", str(path), "--quiet", "run.name=two"], tmp_path)
    one, two = _records(tmp_path / "runs" / "one"), _records(tmp_path / "runs" / "two")
    assert [r["fp8_gemms"] for r in two] == [7 * 3] * 4  # rank 0's micro-batch: 7 linears x 3 GEMMs
    assert [r["fp8_gemms"] for r in one] == [7 * 3 * 2] * 4
    # Gradients reduced over ranks instead of accumulated in one process, clipped by DeepSpeed.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)


def test_delayed_scaling_resume_on_zero2_is_exact(tmp_path: Path):
    """Each rank's amax histories (its own activations and gradients) come back with the checkpoint."""
    from tests.test_distributed import _run

    recipe = _recipe()
    recipe["defaults"]["fp8"] = {"scaling": "delayed", "amax_history_len": 16}
    recipe["stages"]["pretrain"]["train"].update(checkpoint_every=2, keep_checkpoints=1)
    path = write_recipe(tmp_path, recipe)
    _run(["run", str(path), "--quiet"], tmp_path)
    stage_dir = tmp_path / "runs" / "t" / "pretrain"
    assert {f.name for f in stage_dir.glob("checkpoints/*/fp8_rank*.pt")} == {"fp8_rank0.pt", "fp8_rank1.pt"}
    first = load_file(str(stage_dir / "model" / "model.safetensors"))
    losses = [r["loss"] for r in _records(stage_dir.parent)]
    shutil.rmtree(stage_dir / "model")  # as if killed after the step-2 checkpoint
    assert "resuming from step-00000002" in _run(["run", str(path)], tmp_path)
    second = load_file(str(stage_dir / "model" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [r["loss"] for r in _records(stage_dir.parent)] == losses


def _spec(recipe_path: Path):
    return resolve_stage(load_recipe(recipe_path, []).recipe, "pretrain")


def _model(spec):
    from instar.data.tokenizer import build_char_tokenizer
    from instar.models.build import model_from_config
    from instar.models.swaps import apply_swaps

    model = model_from_config(tiny_recipe()["model"]["config"], build_char_tokenizer(), seed=0)
    apply_swaps(model, spec, "pretrain", causal_lm_loss=True)
    return model


def _probe(engine) -> dict[str, str | int]:
    """One training step: the output dtype of each kind of module, the loss's and the weights'
    dtypes, and how many FP8 GEMMs ran."""
    from instar.trainer.losses import causal_lm_loss

    model = getattr(engine.model, "module", engine.model)
    found: dict[str, str | int] = {}

    def record(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        if isinstance(out, torch.Tensor):
            found.setdefault(type(module).__name__, str(out.dtype))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    batch = Batch(ids, torch.roll(ids, -1, 1), torch.arange(64).expand(4, -1), torch.zeros_like(ids), True)
    before = GEMMS.total
    with engine.autocast():
        loss, _ = causal_lm_loss(engine.model, batch, ids.numel())
    engine.backward(loss)
    found["loss"] = str(loss.dtype)
    found["weight"] = str(model.model.layers[0].self_attn.q_proj.weight.dtype)
    engine.step(1e-3)
    found["fp8_gemms"] = GEMMS.total - before
    for hook in hooks:
        hook.remove()
    return found


def test_ops_outside_fp8_linears_run_in_the_single_engines_dtype(tmp_path: Path):
    from instar.trainer.single_engine import SingleEngine

    path = write_recipe(tmp_path, _recipe())
    single = _probe(SingleEngine(_model(_spec(path)), _spec(path), stage="pretrain"))
    assert single["Linear"] == "torch.bfloat16"  # the LM head, under bf16 autocast
    assert single["Float8Linear"] == "torch.bfloat16" and single["fp8_gemms"] == 7 * 3
    _torchrun(["-m", "tests.test_fp8_zero", str(path), str(tmp_path / "zero2.json")], REPO)
    assert json.loads((tmp_path / "zero2.json").read_text()) == single


if __name__ == "__main__":  # one rank of the ZeRO-2 probe, started by torchrun
    from instar.trainer.deepspeed_engine import DeepSpeedEngine

    spec = _spec(Path(sys.argv[1]))
    engine = DeepSpeedEngine(_model(spec), spec, batch_layout(spec.train, 2), "pretrain")
    found = _probe(engine)
    if engine.rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(found))
    engine.barrier()
    sys.stdout.flush()
    os._exit(0)  # as instar's worker: skips the exit-time teardown where ZeRO ranks on CPU sometimes abort
