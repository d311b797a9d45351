"""Golden losses: the first optimizer steps of one seeded tiny chain, one fixture per kind.

    python -m tests.golden_losses --write     # or `make golden`: regenerate tests/assets/losses/*.json
    python -m tests.golden_losses             # run the chain and print how far it is from the fixtures

Regenerate only when a change of the numbers is meant (say why in the commit); tests/test_golden_losses.py
compares every run with the fixtures, so a drift in a shared path (packing, masking, loss normalisation,
attention, a kind's objective) shows at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent / "assets" / "losses"
COMMAND = "python -m tests.golden_losses --write  (or: make golden)"
# fp32 matmuls differ in the last bits between CPUs (MKL picks code paths per instruction set);
# a real change of packing, masking or normalisation moves the losses by far more.
REL, ABS = 1e-4, 1e-6

# One chain, fp32, one process, no eval and no checkpoints: pretrain -> cpt -> sft -> {dpo, kto, grpo}.
# Rows of several documents (packing, block-diagonal mask, restarting positions) and grad_accum 2
# (the step's target count normalises every micro-batch) are in every language-model stage.
RECIPE = {
    "run": {"name": "golden", "output_dir": "OUT", "seed": 0},
    "model": {
        "tokenizer": "instar-char",
        "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
                   "tie_word_embeddings": True},
    },
    "defaults": {
        "precision": "fp32",
        "distributed": {"engine": "single", "device": "cpu"},
        "train": {"steps": 8, "micro_batch_size": 4, "global_batch_size": 8, "seq_len": 64, "lr": 3e-3,
                  "warmup_ratio": 0.0, "checkpoint_every": 0},
        "eval": {},
    },
    "stages": {
        "pretrain": {"kind": "pretrain", "data": {"generate": {"split": "pretrain", "rows": 200}}},
        "cpt": {"kind": "cpt", "after": ["pretrain"], "replay": 0.3,
                "data": {"generate": {"split": "cpt", "rows": 100}}},
        "sft": {"kind": "sft", "after": ["cpt"], "data": {"generate": {"split": "sft", "rows": 100}}},
        "dpo": {"kind": "dpo", "after": ["sft"], "loss": "sigmoid", "beta": 0.1,
                "data": {"generate": {"split": "dpo", "rows": 32}}},
        # A reference other than the parent: KTO's KL estimate z is then above its floor of 0.
        "kto": {"kind": "kto", "after": ["sft"], "beta": 0.5, "reference": "cpt",
                "data": {"generate": {"split": "dpo", "rows": 16}}},
        "grpo": {"kind": "grpo", "after": ["sft"], "beta": 0.04, "group_size": 4, "max_new_tokens": 6,
                 "rewards": [{"fn": "tests.grpo_rewards:ones"}],
                 "data": {"generate": {"split": "prompts", "rows": 32}},
                 "train": {"micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-2}},
    },
}
# What each kind's fixture keeps of metrics.jsonl, per step (`tokens` is compared exactly).
FIELDS = {
    "pretrain": ("loss", "grad_norm", "tokens"),
    "cpt": ("loss", "grad_norm", "tokens"),
    "sft": ("loss", "grad_norm", "tokens"),
    "dpo": ("loss", "grad_norm", "rewards/margin", "rewards/accuracy"),
    "kto": ("loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected"),
    "grpo": ("loss", "grad_norm", "reward/mean", "kl"),
}
KINDS = tuple(FIELDS)


def recipe(stages: tuple[str, ...] = KINDS, **defaults) -> dict:
    """The golden recipe with only `stages` (ancestors first), `defaults` merged over its defaults."""
    import copy

    out = copy.deepcopy(RECIPE)
    out["stages"] = {name: out["stages"][name] for name in stages}
    out["defaults"].update(defaults)
    return out


def steps_of(run_dir: Path, kind: str) -> list[dict]:
    """The fixture's fields of each optimizer step the stage logged (the stage is named after its kind)."""
    rows = [json.loads(x) for x in (run_dir / kind / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{f: r[f] for f in FIELDS[kind]}} for r in rows]


def run_chain(folder: Path, stages: tuple[str, ...] = KINDS) -> Path:
    """Runs the golden chain (in this process) under `folder`; returns the run directory."""
    from instar.config.load import load_recipe
    from instar.graph.runner import run_recipe
    from tests.conftest import write_recipe

    run_recipe(load_recipe(write_recipe(folder, recipe(stages))), quiet=True)
    return folder / "runs" / "golden"


def load(kind: str) -> dict:
    return json.loads((ASSETS / f"{kind}.json").read_text())


def differences(kind: str, got: list[dict], want: list[dict]) -> list[str]:
    """One line per value outside the tolerance (or a different step count / token count)."""
    if [r["step"] for r in got] != [r["step"] for r in want]:
        return [f"{kind}: steps {[r['step'] for r in got]} != fixture's {[r['step'] for r in want]}"]
    out = []
    for g, w in zip(got, want):
        for field, value in w.items():
            ok = g[field] == value if field in ("step", "tokens") else \
                math.isclose(g[field], value, rel_tol=REL, abs_tol=ABS)
            if not ok:
                out.append(f"{kind} step {w['step']} {field}: {g[field]!r} != fixture {value!r}")
    return out


def write(kind: str, steps: list[dict]) -> Path:
    import torch
    import transformers

    stage = RECIPE["stages"][kind]
    body = {
        "kind": kind,
        "regenerate": COMMAND,
        "made_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "python": sys.version.split()[0]},
        "stage": {k: v for k, v in stage.items() if k != "after"},
        "steps": steps,
    }
    ASSETS.mkdir(parents=True, exist_ok=True)
    path = ASSETS / f"{kind}.json"
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden_losses", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/assets/losses/<kind>.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_chain(Path(tmp))
        observed = {kind: steps_of(run_dir, kind) for kind in KINDS}
    if args.write:
        for kind, steps in observed.items():
            print(f"wrote {write(kind, steps)}")
        return 0
    problems = [line for kind in KINDS for line in differences(kind, observed[kind], load(kind)["steps"])]
    print("\n".join(problems) or "every kind equals its fixture")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
