"""instar side by side with its peers on the same model, data and batch; prints a table of ratios
and writes its section of bench/RESULTS.md.

    .venv/bin/python bench/peers.py            # 3 runs of every contender (make bench)
    .venv/bin/python bench/peers.py --quick    # 1 short run each; prints, leaves RESULTS.md alone

Contenders (each run is a fresh process; instar always through `instar run` on a generated recipe):
- pretraining, tokens/s: a hand-written PyTorch loop, HF `Trainer`, instar `pretrain`;
- SFT, tokens/s: TRL `SFTTrainer` (assistant_only_loss) vs instar `sft`;
- DPO, pairs/s: TRL `DPOTrainer` (sigmoid) with its default live reference model, and with
  `precompute_ref_log_probs=True` (its reference pass runs once, before training, as instar caches
  the reference's log-probs by default, in its warm-up step), vs instar `dpo`;
- GRPO, prompts/s: TRL `GRPOTrainer` (no vLLM: HF generate) vs instar `grpo`;
- ZeRO-2 on 2 CPU ranks, tokens/s: the hand-written DeepSpeed loop vs instar (bench/zero.py's runs).

Model: bench/zero.py's (Llama vocab 512, hidden 256, intermediate 688, 4 layers, 8 heads, 4 KV
heads, tied embeddings), sequence 256, micro-batch 8 rows, fp32 everywhere (TRL's default bf16
autocast is switched off: this is a CPU), AdamW (0.9, 0.95), clipping 1.0. The tokenizer is
instar-char (100 ids; the model keeps vocab 512, instar allows a vocabulary larger than the
tokenizer's). Data is random text sized so that every contender sees the same tokens per step:
pretraining documents and SFT conversations are exactly 256 tokens (one per row, whether packed or
padded), a DPO pair is 128 + 128 tokens, a GRPO prompt is 64 tokens with 4 completions of up to 32.
Post-training contenders all start from the same weights (an instar `base` stage, 1 step).

Throughput, every contender alike: the first `--warmup` optimizer steps are dropped; units/s = units
of the timed steps / the sum of their step times, a step being timed from fetching its batch to the
end of its optimizer step (HF/TRL: between consecutive `on_step_end` callbacks; instar: its
metrics.jsonl; GRPO steps include generation on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import zero  # bench/zero.py: the model, the DeepSpeed peer and instar's ZeRO run
from results import markers, write_section

ROOT = Path(__file__).resolve().parent.parent
START, END = markers("peers")
MODEL, SEQ, MICRO = zero.MODEL, zero.SEQ, zero.MICRO
LR, POST_LR = 1e-3, 1e-5
GROUP, PROMPTS, MAX_NEW, PROMPT_CHARS = 4, MICRO // 4, 32, 56  # GRPO: 2 prompts x 4 = 8 sequences per step
TAG = "PEERS_RESULT "
# One thread per process, as bench/zero.py's ranks: steady on a 2-core machine other work shares
# (OpenMP threads that spin while another process holds the second core cost far more than they give).
ENV = {**zero.ENV, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1")}
ALPHABET = "abcdefghijklmnopqrstuvwxyz     "
# (instar contender, the peer it is compared with, target ratio of their units/s)
RATIOS = [("instar_pretrain", "plain", 0.95), ("instar_pretrain", "hf_trainer", 1.0), ("instar_sft", "trl_sft", 1.2),
          ("instar_dpo", "trl_dpo", 1.3), ("instar_dpo", "trl_dpo_cached", 1.0), ("instar_grpo", "trl_grpo", 1.5),
          ("instar_zero2", "deepspeed_zero2", 0.95)]
UNITS = {"plain": "tokens", "hf_trainer": "tokens", "instar_pretrain": "tokens", "trl_sft": "tokens",
         "instar_sft": "tokens", "trl_dpo": "pairs", "trl_dpo_cached": "pairs", "instar_dpo": "pairs",
         "trl_grpo": "prompts", "instar_grpo": "prompts", "deepspeed_zero2": "tokens", "instar_zero2": "tokens"}


# ---------------------------------------------------------------- data (the same files for everyone)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def write_data(work: Path, rows: int = 400) -> None:
    """`rows` rows per dataset (every contender wraps around them). Row sizes in instar-char tokens:
    a chat turn pair renders as <bos>Q: u\\nA: a<eos>\\n (u + a + 10)."""
    rng = random.Random(0)
    zero.write_data(work / "docs.jsonl", rows)  # <bos> + 254 + <eos> = 256
    with (work / "chat.jsonl").open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"messages": [{"role": "user", "content": _text(rng, 100)},
                                              {"role": "assistant", "content": _text(rng, SEQ - 110)}]}) + "\n")
    with (work / "prefs.jsonl").open("w") as fh:
        for _ in range(rows):  # chosen and rejected conversations are 128 tokens each
            fh.write(json.dumps({"prompt": _text(rng, 50), "chosen": _text(rng, 68), "rejected": _text(rng, 68)}) + "\n")
    with (work / "prompts.jsonl").open("w") as fh:
        for _ in range(rows):  # <bos>Q: p\nA:  = 64 tokens
            fh.write(json.dumps({"prompt": _text(rng, PROMPT_CHARS), "answer": str(rng.randint(0, 99))}) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- the peers (one per process)


def _report(name: str, step_s: list[float], warmup: int, units_per_step: float, tokens_per_step: float) -> None:
    timed = step_s[warmup:]
    print(TAG + json.dumps({"name": name, "unit": UNITS[name], "step_s": timed, "units_per_step": units_per_step,
                            "tokens_per_step": tokens_per_step,
                            "per_s": units_per_step * len(timed) / sum(timed)}), flush=True)


def _fresh_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from instar.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa"), tok


def _doc_ids(work: Path, tok) -> list[list[int]]:
    return [[tok.bos_token_id] + tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
            for r in read_jsonl(work / "docs.jsonl")]


def run_plain(work: Path, warmup: int, steps: int) -> None:
    """The plainest loop: fixed-size batches of ids, labels = ids, AdamW, clipping."""
    import torch

    model, tok = _fresh_model()
    docs = _doc_ids(work, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        ids = torch.tensor([docs[(step * MICRO + i) % len(docs)] for i in range(MICRO)])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # a loop logs its loss: read it like instar does
        times.append(time.perf_counter() - t0)
    _report("plain", times, warmup, MICRO * SEQ, MICRO * SEQ)


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds between consecutive optimizer-step ends (the first from the start of training)."""

        def __init__(self):
            self.times, self.last = [], None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepTimer()


def _hf_args(work: Path, warmup: int, steps: int, lr: float) -> dict:
    return dict(output_dir=str(work / "hf-out"), per_device_train_batch_size=MICRO, max_steps=warmup + steps,
                learning_rate=lr, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
                lr_scheduler_type="cosine", warmup_steps=1, logging_strategy="no", save_strategy="no",
                report_to="none", use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)


def run_hf_trainer(work: Path, warmup: int, steps: int) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, tok = _fresh_model()
    docs = _doc_ids(work, tok)
    timer = _step_timer()
    trainer = Trainer(model=model, args=TrainingArguments(**_hf_args(work, warmup, steps, LR)),
                      train_dataset=Dataset.from_dict({"input_ids": docs, "labels": docs}), callbacks=[timer])
    trainer.train()
    _report("hf_trainer", timer.times, warmup, MICRO * SEQ, MICRO * SEQ)


def _base(work: Path):
    from transformers import AutoTokenizer

    base = work / "instar" / "bench" / "base" / "model"
    return str(base), AutoTokenizer.from_pretrained(str(base))


def run_trl_sft(work: Path, warmup: int, steps: int) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    base, tok = _base(work)
    timer = _step_timer()
    args = SFTConfig(**_hf_args(work, warmup, steps, POST_LR), assistant_only_loss=True, max_length=SEQ, packing=False)
    trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(read_jsonl(work / "chat.jsonl")),
                         processing_class=tok, callbacks=[timer])
    assert all(len(r["input_ids"]) == SEQ for r in trainer.train_dataset), "SFT rows must be exactly SEQ tokens"
    trainer.train()
    _report("trl_sft", timer.times, warmup, MICRO * SEQ, MICRO * SEQ)


def run_trl_dpo(work: Path, warmup: int, steps: int, cached: bool = False) -> None:
    """TRL's DPOTrainer; `cached`: reference log-probs precomputed once before training (not timed)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base, tok = _base(work)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in read_jsonl(work / "prefs.jsonl")]
    timer = _step_timer()
    args = DPOConfig(**_hf_args(work, warmup, steps, POST_LR), beta=0.1, loss_type=["sigmoid"], max_length=None,
                     precompute_ref_log_probs=cached)
    trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer])
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == SEQ // 2, "a DPO side must be SEQ/2 tokens"
    trainer.train()
    _report("trl_dpo_cached" if cached else "trl_dpo", timer.times, warmup, MICRO, MICRO * SEQ)


def run_trl_grpo(work: Path, warmup: int, steps: int) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from instar.methods.rewards import exact_answer

    def exact(completions, answer, **kw):  # instar's built-in `exact` reward, in TRL's signature
        return [exact_answer("", c[0]["content"], a) for c, a in zip(completions, answer)]

    base, tok = _base(work)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in read_jsonl(work / "prompts.jsonl")]
    timer = _step_timer()
    args = GRPOConfig(**_hf_args(work, warmup, steps, POST_LR), num_generations=GROUP, max_completion_length=MAX_NEW,
                      temperature=1.0, beta=0.0, loss_type="grpo", scale_rewards="group", use_vllm=False,
                      log_completions=False)
    trainer = GRPOTrainer(model=base, reward_funcs=exact, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    _report("trl_grpo", timer.times, warmup, PROMPTS, 0)  # completion lengths vary: tokens not counted


PEERS = {"plain": run_plain, "hf_trainer": run_hf_trainer, "trl_sft": run_trl_sft, "trl_dpo": run_trl_dpo,
         "trl_dpo_cached": lambda work, warmup, steps: run_trl_dpo(work, warmup, steps, cached=True),
         "trl_grpo": run_trl_grpo}


# ---------------------------------------------------------------- instar, through `instar run`


def instar_recipe(work: Path, stage: str | None, name: str, steps: int) -> dict:
    """A recipe with a 1-step `base` pretrain stage and, unless `stage` is None, one timed stage
    `name` of kind `stage`. Every run writes into the same run directory, so `base` is trained once
    (by the first run) and found cached by the others."""
    defaults = {
        "precision": "fp32",
        "optimizer": {"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.0},
        "train": {"steps": steps, "micro_batch_size": MICRO, "seq_len": SEQ, "packing": True, "lr": POST_LR,
                  "max_grad_norm": 1.0, "checkpoint_every": 0, "log_every": 10},
        "eval": {},
    }
    base = {"kind": "pretrain", "data": {"path": str(work / "docs.jsonl")}, "train": {"steps": 1, "lr": LR}}
    timed = {
        "pretrain": {"kind": "pretrain", "data": {"path": str(work / "docs.jsonl")}, "train": {"lr": LR}},
        "sft": {"kind": "sft", "after": ["base"], "data": {"path": str(work / "chat.jsonl")}},
        "dpo": {"kind": "dpo", "after": ["base"], "beta": 0.1, "loss": "sigmoid",
                "data": {"path": str(work / "prefs.jsonl")}},
        "grpo": {"kind": "grpo", "after": ["base"], "group_size": GROUP, "max_new_tokens": MAX_NEW,
                 "temperature": 1.0, "beta": 0.0, "loss_type": "grpo", "scale_rewards": "group",
                 "data": {"path": str(work / "prompts.jsonl")}, "train": {"micro_batch_size": PROMPTS}},
    }
    stages = {"base": base}
    if stage is not None:
        stages[name] = timed[stage]
    return {"run": {"name": "bench", "output_dir": str(work / "instar"), "seed": 0},
            "model": {"tokenizer": "instar-char", "config": {"model_type": "llama", **MODEL}},
            "defaults": defaults, "stages": stages}


def run_instar_stage(work: Path, stage: str | None, warmup: int, steps: int, tag: str) -> dict | None:
    import yaml

    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(instar_recipe(work, stage, tag, warmup + steps), sort_keys=False))
    instar = Path(sys.executable).with_name("instar")
    proc = subprocess.run([str(instar), "run", str(path), "--quiet"], cwd=ROOT, env=ENV, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"instar run {path} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    if stage is None:
        return None
    rows = [json.loads(x) for x in (work / "instar" / "bench" / tag / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows]
    step_tokens = [t - p for t, p in zip(tokens, [0, *tokens[:-1]])]  # `tokens` is the stage's running total
    step_s = [n / r["tokens_per_s"] for n, r in zip(step_tokens, rows)][warmup:]
    units = {"pretrain": None, "sft": None, "dpo": MICRO, "grpo": PROMPTS}[stage]
    timed_tokens = step_tokens[warmup:]
    per_step = units if units is not None else sum(timed_tokens) / len(timed_tokens)
    return {"name": f"instar_{stage}", "unit": UNITS[f"instar_{stage}"], "step_s": step_s, "units_per_step": per_step,
            "tokens_per_step": sum(timed_tokens) / len(timed_tokens), "per_s": per_step * len(step_s) / sum(step_s)}


def run_peer(name: str, work: Path, warmup: int, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", name, "--work", str(work),
           "--warmup", str(warmup), "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, text=True, capture_output=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(TAG)), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{name} failed (code {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(line[len(TAG):])


def run_zero(side: str, work: Path, warmup: int, steps: int, tag: str) -> dict:
    res = zero.run_peer(2, warmup, steps) if side == "deepspeed_zero2" else zero.run_instar(2, warmup, steps, work, tag)
    return {"name": side, "unit": "tokens", "step_s": res["step_s"], "units_per_step": res["step_tokens"],
            "tokens_per_step": res["step_tokens"], "per_s": res["tokens_per_s"]}


# ---------------------------------------------------------------- report


def _mmm(values: list[float], fmt: str = "{:.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def report(results: dict[str, list[dict]], warmup: int, steps: int, load: float) -> str:
    from importlib.metadata import version

    med = {name: statistics.median(r["per_s"] for r in runs) for name, runs in results.items() if runs}
    lines = ["| instar | peer | unit | instar per s (min / median / max) | peer per s (min / median / max) "
             "| instar / peer | target |", "|---|---|---|---|---|---|---|"]
    for ours, peer, target in RATIOS:
        if ours not in med or peer not in med:
            continue
        ratio = med[ours] / med[peer]
        mark = "meets" if ratio >= target else "misses"
        lines.append(f"| {ours} | {peer} | {UNITS[ours]} | {_mmm([r['per_s'] for r in results[ours]], '{:.1f}')} | "
                     f"{_mmm([r['per_s'] for r in results[peer]], '{:.1f}')} | **{ratio:.3f}** | "
                     f">= {target} ({mark}) |")
    runs = max(len(v) for v in results.values())
    return "\n".join([
        START,
        "## instar vs its peers, one process on the CPU (`bench/peers.py`, `make bench`)",
        "",
        f"{date.today()}, {platform.platform()}, {platform.machine()} CPU x{os.cpu_count()}, Python "
        f"{platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}, "
        f"trl {version('trl')}, deepspeed {version('deepspeed')}. 1-minute load average when it started: {load:.2f}.",
        "",
        f"Llama vocab {MODEL['vocab_size']}, hidden {MODEL['hidden_size']}, intermediate {MODEL['intermediate_size']}, "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, {MODEL['num_key_value_heads']} KV "
        f"heads, tied embeddings; sequence {SEQ}, micro-batch {MICRO} rows, fp32, AdamW, clipping 1.0. {runs} run(s) "
        f"per contender, {warmup} warm-up + {steps} timed steps each. SFT rows are 256-token conversations, DPO "
        f"pairs 128 + 128 tokens, GRPO {PROMPTS} prompts x {GROUP} completions of up to {MAX_NEW} tokens per step. "
        f"ZeRO-2: 2 ranks x micro-batch {MICRO}. See the script's docstring for how every figure is timed.",
        "",
        *lines,
        END,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 run, 1 warm-up + 4 timed steps, 128 rows per dataset; leaves RESULTS.md")
    parser.add_argument("--repeats", type=int, default=None, help="runs per contender (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="contenders to run (default all)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one peer, in its own process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (4 if args.quick else 15)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.run:
        PEERS[args.run](Path(args.work), warmup, steps)
        return

    load = os.getloadavg()[0]
    names = args.only or list(UNITS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # --quick: fewer rows (less one-off work: TRL's dataset tokenisation, instar's reference pass)
        write_data(work, 128 if args.quick else 400)
        run_instar_stage(work, None, 0, 1, "prep")  # the `base` weights every post-training contender starts from
        for i in range(repeats):
            order = names if i % 2 == 0 else names[::-1]  # alternate to spread drift in the machine's load
            for name in order:
                t0 = time.perf_counter()
                if name in ("deepspeed_zero2", "instar_zero2"):
                    res = run_zero(name, work, warmup, steps, f"z2-{i}")
                elif name.startswith("instar_"):
                    res = run_instar_stage(work, name.removeprefix("instar_"), warmup, steps, f"{name}_{i}")
                else:
                    res = run_peer(name, work, warmup, steps)
                results[name].append(res)
                print(f"{name:16s} run {i + 1}: {res['per_s']:9.1f} {res['unit']}/s, "
                      + (f"{res['tokens_per_step']:.0f} tokens/step, " if res["tokens_per_step"] else "")
                      + f"step s "
                      f"{_mmm(res['step_s'], '{:.2f}')} ({time.perf_counter() - t0:.0f} s)", flush=True)
    section = report(results, warmup, steps, load)
    print()
    print(section)
    if args.quick or args.only:
        print("\n(--quick / --only: bench/RESULTS.md left as it was)")
        return
    write_section("peers", section)


if __name__ == "__main__":
    main()
