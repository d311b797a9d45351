"""Does preference optimisation and RL improve the tiny model — honestly measured?

For each seed, runs the tiny pipeline's main line (pretrain -> cpt -> sft -> dpo -> grpo, settings
from recipes/tiny/pipeline.yaml) and two controls that continue SFT for the same number of
optimizer steps with the same rows per step, on the same prompts with their right answers:

  sft ──> dpo ──────> grpo
   └────> ctl_dpo ──> ctl_grpo      ctl_dpo: the prompts dpo trained on (its pairs.jsonl), chosen
                                     answers; ctl_grpo: the prompts grpo drew (rollouts.jsonl), answers

Held-out greedy exact match (chat format, ~530 problems never trained on) is compared per stage.
Usage:  python bench/post_training.py [--seeds 0 1 2] [--write] [stage.overrides=...]
--write puts the table into bench/RESULTS.md (section `post-training`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import markers, write_section  # noqa: E402

MAIN = ("pretrain", "cpt", "sft", "dpo", "grpo")
COMPARED = ("sft", "dpo", "ctl_dpo", "grpo", "ctl_grpo")


def _instar(recipe: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "instar.cli", "run", str(recipe), "--quiet", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _control(stage: dict, parent: str, data: Path, lr: float) -> dict:
    """An sft stage with `stage`'s steps and rows per step (micro x accumulation) on `data`."""
    train = stage.get("train", {})
    return {"kind": "sft", "after": [parent], "data": {"path": str(data)},
            "train": {"steps": train["steps"], "lr": lr,
                      "micro_batch_size": train.get("micro_batch_size", 8), "grad_accum": train.get("grad_accum", 1)}}


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict[str, float]:
    base = yaml.safe_load((ROOT / "recipes/tiny/pipeline.yaml").read_text())
    base["run"].update(name=f"seed{seed}", output_dir=str(out), seed=seed)
    base["stages"] = {k: base["stages"][k] for k in MAIN}
    main_path = _write(out / f"seed{seed}-main.yaml", [])
    main_path.write_text(yaml.safe_dump(base, sort_keys=False))
    _instar(main_path, overrides)
    run_dir = out / f"seed{seed}"
    # The controls: same steps, rows per step and learning rate as SFT, on dpo's and grpo's prompts.
    pairs = [json.loads(x) for x in (run_dir / "dpo" / "pairs.jsonl").read_text().splitlines()]
    sft_lr = base["stages"]["sft"]["train"]["lr"]
    resolved = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())["stages"]
    dpo_data = _write(out / f"seed{seed}-ctl_dpo.jsonl", [_chat(p["prompt"], p["chosen"]) for p in pairs])
    grpo_rows = [json.loads(x) for x in (run_dir / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    grpo_data = _write(out / f"seed{seed}-ctl_grpo.jsonl", [_chat(r["prompt"], r["answer"]) for r in grpo_rows])
    study = copy.deepcopy(base)
    study["stages"]["ctl_dpo"] = _control(resolved["dpo"], "sft", dpo_data, sft_lr)
    study["stages"]["ctl_grpo"] = _control(resolved["grpo"], "ctl_dpo", grpo_data, sft_lr)
    study_path = out / f"seed{seed}-study.yaml"
    study_path.write_text(yaml.safe_dump(study, sort_keys=False))
    _instar(study_path, overrides)
    acc = {}
    for stage in COMPARED:
        meta = json.loads((run_dir / stage / "model" / "instar.json").read_text())
        acc[stage] = meta["metrics"]["exact_match/chat"]
    return acc


def table(results: dict[int, dict[str, float]]) -> str:
    seeds = sorted(results)
    lines = ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for stage in COMPARED:
        vals = [results[s][stage] for s in seeds]
        lines.append(f"| {stage} | " + " | ".join(f"{100 * v:.1f} %" for v in vals)
                     + f" | **{100 * statistics.mean(vals):.1f} %** |")
    beats = {st: all(results[s][st] > max(results[s]["sft"], results[s][f"ctl_{st}"]) for s in seeds)
             for st in ("dpo", "grpo")}
    lines.append("")
    lines += [f"- {st} beats both sft and its control on every seed: **{'yes' if ok else 'no'}**"
              for st, ok in beats.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "post-training-study")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args, overrides = parser.parse_known_args()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(seed, args.out, overrides)
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results[seed].items()), flush=True)
    text = table(results)
    print(text)
    if args.write:
        start, end = markers("post-training")
        write_section("post-training", f"{start}\n## Post-training: does dpo / grpo beat continued SFT?\n\n"
                      f"`python bench/post_training.py --write {' '.join(overrides)}` "
                      f"({time.strftime('%Y-%m-%d')}). Held-out greedy exact match "
                      f"(chat) after each stage; controls continue SFT for the same steps on the same prompts.\n\n"
                      f"{text}\n{end}")


if __name__ == "__main__":
    main()
