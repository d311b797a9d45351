"""The dpo kind: its losses in closed form, one-forward pair log-probs, and a real stage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instar.cli import main
from instar.config.load import load_recipe
from instar.data.packing import collate_rows
from instar.data.tokenizer import build_char_tokenizer
from instar.graph.runner import run_recipe
from instar.models.build import model_from_config
from instar.methods.preference import preference_losses, segment_logps
from instar.data.chat import chat_examples
from instar.trainer.losses import forward_logits
from tests.conftest import tiny_recipe, write_recipe


def _spec(**kw):
    base = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "alpha": 0.8, "nll_coef": 0.0}
    return SimpleNamespace(**{**base, **kw})


def test_losses_closed_form():
    pc, pr = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-2.5, -1.0]), torch.tensor([-2.5, -1.0])
    nc, nr = torch.tensor([2.0, 4.0]), torch.tensor([3.0, 2.0])
    h = (pc - rc) - (pr - rr)  # [1.0, 0.5]
    sig, wc, wr = preference_losses(pc, pr, rc, rr, nc, nr, _spec())
    assert torch.allclose(sig, torch.log1p(torch.exp(-0.1 * h)))
    assert torch.allclose(wc, 0.1 * (pc - rc)) and torch.allclose(wr, 0.1 * (pr - rr))
    smooth, _, _ = preference_losses(pc, pr, rc, rr, nc, nr, _spec(label_smoothing=0.2))
    assert torch.allclose(smooth, 0.8 * torch.log1p(torch.exp(-0.1 * h)) + 0.2 * torch.log1p(torch.exp(0.1 * h)))
    ipo, _, _ = preference_losses(pc, pr, rc, rr, nc, nr, _spec(loss="ipo"))
    hm = (pc - rc) / nc - (pr - rr) / nr
    assert torch.allclose(ipo, (hm - 5.0) ** 2)
    hinge, _, _ = preference_losses(pc, pr, rc, rr, nc, nr, _spec(loss="hinge", beta=1.0))
    assert torch.allclose(hinge, torch.tensor([0.0, 0.5]))
    redi, _, _ = preference_losses(pc, pr, rc, rr, nc, nr, _spec(loss="redi", alpha=0.5))
    assert torch.allclose(redi, -pc / nc + 0.5 * pr / nr)
    nll, _, _ = preference_losses(pc, pr, rc, rr, nc, nr, _spec(nll_coef=2.0))
    assert torch.allclose(nll, sig + 2.0 * (-pc / nc))
    # policy == reference: the sigmoid loss is exactly ln 2
    at_ref, _, _ = preference_losses(pc, pr, pc, pr, nc, nr, _spec())
    assert torch.allclose(at_ref, torch.full((2,), math.log(2.0)))


def test_pair_log_probs_in_one_forward_equal_separate_forwards():
    tok = build_char_tokenizer()
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    model = model_from_config(cfg, tok, seed=0).eval()
    convs = [{"messages": [{"role": "user", "content": "12+34"}, {"role": "assistant", "content": a}]}
             for a in ("46", "47", "3")]
    chosen, rejected, other = chat_examples(tok, convs, "last_turn")
    from instar.data.packing import Example

    pair = Example(chosen.input_ids + rejected.input_ids, chosen.targets + rejected.targets,
                   segments=(len(chosen.input_ids), len(rejected.input_ids)))
    pair2 = Example(other.input_ids + chosen.input_ids, other.targets + chosen.targets,
                    segments=(len(other.input_ids), len(chosen.input_ids)))
    batch = collate_rows([[pair, pair2]], tok.pad_token_id, 100)  # two pairs packed in one row
    with torch.no_grad():
        pc, pr, nc, nr = segment_logps(forward_logits(model, batch), batch)

        def alone(ex):
            b = collate_rows([[ex]], tok.pad_token_id, len(ex.input_ids))
            logp = torch.log_softmax(forward_logits(model, b).float(), -1)[0].detach()
            t = torch.tensor(ex.targets)
            keep = t != -100
            return float(logp[keep].gather(-1, t[keep][:, None]).sum()), int(keep.sum())

    expected = [alone(chosen), alone(rejected), alone(other), alone(chosen)]
    assert torch.allclose(pc, torch.tensor([expected[0][0], expected[2][0]]), atol=1e-5)
    assert torch.allclose(pr, torch.tensor([expected[1][0], expected[3][0]]), atol=1e-5)
    assert nc.tolist() == [expected[0][1], expected[2][1]] and nr.tolist() == [expected[1][1], expected[3][1]]
    assert expected[0][1] == 3  # "46" + EOS: the completion and its EOS carry the loss, the prompt does not


def _dpo_recipe() -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"], "sft": recipe["stages"]["sft"]}
    recipe["stages"]["sft"]["after"] = ["pretrain"]
    recipe["stages"]["dpo"] = {"kind": "dpo", "after": ["sft"], "beta": 0.1, "nll_coef": 0.1,
                               "data": {"generate": {"split": "dpo", "rows": 64}}, "train": {"steps": 4}}
    return recipe


def test_dpo_stage_runs_starts_at_ln2_and_learns_the_margin(tmp_path: Path, capsys):
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"]["nll_coef"] = 0.0
    recipe["stages"]["dpo"]["data"]["generate"]["rows"] = 8  # few pairs, many epochs: the margin must open
    recipe["stages"]["dpo"]["train"] = {"steps": 30, "lr": 3e-3, "warmup_ratio": 0}
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path), quiet=True)
    records = [json.loads(x) for x in (tmp_path / "runs/t/dpo/metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert records[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    late = records[-5:]
    assert sum(r["rewards/margin"] for r in late) / 5 > 0.05
    assert sum(r["rewards/accuracy"] for r in late) / 5 > 0.7
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy"} <= set(records[-1])
    assert "not ln 2" not in capsys.readouterr().out


def test_named_ancestor_reference_is_used(tmp_path: Path, capsys):
    """reference: pretrain (not the parent sft): the step-0 loss is no longer ln 2, since policy and
    reference differ, and no mix-up warning is given for a reference the recipe chose."""
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"].update(nll_coef=0.0, reference="pretrain")
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path)]) == 0
    first = json.loads((tmp_path / "runs/t/dpo/metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2.0)) > 1e-4 and first["rewards/margin"] != 0
    assert "not ln 2" not in capsys.readouterr().out


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "1+1", "chosen": "2"}, "rejected: Field required"),
    ({"prompt": "1+1", "chosen": "", "rejected": "3"}, "empty completion"),
    ({"prompt": "1+1", "chosen": "2", "rejected": "2"}, "chosen and rejected are identical"),
])
def test_bad_preference_rows(tmp_path: Path, capsys, row, needle):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+2", "chosen": "3", "rejected": "4"}) + "\n" + json.dumps(row) + "\n")
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"]["data"] = {"path": "pairs.jsonl"}
    assert main(["run", str(write_recipe(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: bad row" in err and needle in err


def test_overlong_pair_and_unknown_reference(tmp_path: Path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+2" * 30, "chosen": "3", "rejected": "4"}) + "\n")
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"]["data"] = {"path": "pairs.jsonl"}
    assert main(["run", str(write_recipe(tmp_path, recipe))]) == 2
    assert "preference row 1 needs" in capsys.readouterr().err
    recipe["stages"]["dpo"]["reference"] = "nope"
    assert main(["validate", str(write_recipe(tmp_path, recipe))]) == 2
    assert "stages.dpo.reference: 'nope' is not a stage" in capsys.readouterr().err


def test_cached_reference_log_probs_equal_on_the_fly(tmp_path: Path):
    """One no-grad pass over the data, saved under the stage and keyed by the reference's fingerprint,
    gives the same training as computing the reference on every batch (packed rows included)."""
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"]["train"] = {"steps": 4, "micro_batch_size": 2, "grad_accum": 2}
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path, ["run.name=cached"]), quiet=True)
    cache = list((tmp_path / "runs/cached/dpo/reference_logps").glob("sft-*.pt"))
    assert len(cache) == 1 and torch.load(cache[0], weights_only=True).shape == (64, 2)
    run_recipe(load_recipe(path, ["run.name=fly", "stages.dpo.reference_logps=on_the_fly"]), quiet=True)
    assert not (tmp_path / "runs/fly/dpo/reference_logps").exists()
    cached, fly = (
        [json.loads(x) for x in (tmp_path / f"runs/{name}/dpo/metrics.jsonl").read_text().splitlines()]
        for name in ("cached", "fly"))
    for a, b in zip(cached, fly):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], rel=1e-4, abs=1e-6)


def test_reference_is_held_in_the_compute_precision(tmp_path: Path, capsys):
    """precision bf16 (fp32 masters + autocast): the frozen reference is a bf16 copy (half the bytes
    of the fp32 weights), and the step-0 loss stays within the ln 2 check's 1e-3."""
    from safetensors.torch import load_file

    recipe = _dpo_recipe()
    recipe["stages"]["dpo"].update(nll_coef=0.0, precision="bf16", train={"steps": 1})
    run_recipe(load_recipe(write_recipe(tmp_path, recipe)), quiet=False)
    record = json.loads((tmp_path / "runs/t/dpo/reference.json").read_text())
    weights = load_file(str(tmp_path / "runs/t/sft/model/model.safetensors"))
    assert record["dtype"] == "bfloat16" and record["zero_stage"] is None
    assert record["bytes_per_rank"] == [2 * sum(w.numel() for w in weights.values())]
    assert "not ln 2" not in capsys.readouterr().out
    # The cached values depend on the dtype: the same stage in fp32 computes its own, never the bf16 ones.
    run_recipe(load_recipe(write_recipe(tmp_path, recipe), ["stages.dpo.precision=fp32"]), quiet=True)
    assert len(list((tmp_path / "runs/t/dpo/reference_logps").glob("sft-*.pt"))) == 2


def test_a_reference_cache_of_the_wrong_shape_is_a_user_error(tmp_path: Path, capsys):
    """A cache file changed by hand (its key still matches): exit 2, naming the file and the fix."""
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"]["train"] = {"steps": 1}
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path)]) == 0
    (cache,) = (tmp_path / "runs/t/dpo/reference_logps").glob("sft-*.pt")
    torch.save(torch.zeros(3, 2), cache)
    assert main(["run", str(path), "stages.dpo.train.lr=1e-4"]) == 2  # dpo runs again, with the same pairs
    err = capsys.readouterr().err
    assert f"{cache}: holds (3, 2) reference log-probs for 64 pairs" in err and "delete it" in err


def test_on_policy_negatives_come_from_the_parent_model(tmp_path: Path):
    recipe = _dpo_recipe()
    recipe["stages"]["dpo"]["negatives"] = {"samples": 2, "max_new_tokens": 4, "temperature": 1.0}
    recipe["stages"]["dpo"]["train"] = {"steps": 2}
    path = write_recipe(tmp_path, recipe)
    run_recipe(load_recipe(path), quiet=True)
    data = [json.loads(x) for x in next((tmp_path / "runs/t/data").glob("arithmetic-dpo-*.jsonl")).read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "runs/t/dpo/pairs.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in pairs] == [d["prompt"] for d in data]  # a barely trained sft errs on all
    assert all(p["chosen"] == d["chosen"] and p["rejected"] != p["chosen"] for p, d in zip(pairs, data))
    assert sum(p["rejected"] != d["rejected"] for p, d in zip(pairs, data)) > len(data) // 2  # sampled, not near-miss
    # Other negatives from the same data file are other pairs: their reference log-probs get a cache
    # file of their own instead of the first run's (a stale cache would pair values with wrong rows).
    run_recipe(load_recipe(path, ["stages.dpo.negatives.temperature=0.5"]), quiet=True)
    caches = sorted((tmp_path / "runs/t/dpo/reference_logps").glob("sft-*.pt"))
    assert len(caches) == 2
    assert not torch.equal(*(torch.load(c, weights_only=True) for c in caches))
