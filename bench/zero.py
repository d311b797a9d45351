"""instar's `pretrain` stage on 2 CPU ranks under DeepSpeed ZeRO against a hand-written DeepSpeed
loop on the same model and batch shape. Target: at ZeRO-2, instar's tokens/s >= 0.95x the
hand-written loop's. Also records ZeRO-1/2/3 tokens/s and peak RSS per rank for both. Writes its
section of bench/RESULTS.md.

    .venv/bin/python bench/zero.py                        # ZeRO-1/2/3, 3 runs per side each (~25 min on 2 cores)
    .venv/bin/python bench/zero.py --quick --repeats 1    # a smoke run of a few steps; leaves RESULTS.md alone

Model: LlamaConfig vocab 512, hidden 256, intermediate 688, 4 layers, 8 heads, 4 KV heads, tied
embeddings; sequence 256, micro-batch 8 per rank, 2 ranks (4096 tokens per optimizer step),
fp32, torch AdamW, gradient clipping 1.0, DS_ACCELERATOR=cpu, gloo, OMP_NUM_THREADS=1.

- The peer (`--peer`, started here with torchrun) trains on random token ids with
  `labels=input_ids` and plain causal attention: the plainest loop DeepSpeed allows.
- instar runs a temp recipe with one `pretrain` stage on random-letter documents of 254
  characters, so that every packed row is one document of exactly 256 tokens (<bos> + text + <eos>).
  instar also builds the global rows on every rank, checks whether a row needs a block-diagonal
  mask (these do not: one document from position 0, so SDPA's causal path is taken, as for the
  peer), builds per-document positions and all-reduces the loss every step: that is what the
  ratio measures.

Tokens/s, both sides: the first `--warmup` optimizer steps are dropped; tokens/s = global tokens of
the timed steps / the sum of their step times, a step timed on rank 0 from fetching its batch to the
end of the optimizer step (instar's `tokens_per_s` in metrics.jsonl is timed the same way).
Peak RSS per rank: the kernel's high-water mark (VmHWM in /proc/PID/status) of each rank's
process, read every 0.2 s while it runs, the same way for both sides; it covers everything the
rank did up to the last read (for instar that includes writing the stage's artifact).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from results import markers, write_section  # bench/results.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parent.parent
START, END = markers("zero")

MODEL = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
         "tie_word_embeddings": True}
SEQ, MICRO, RANKS, LR = 256, 8, 2, 1e-3
PEER_TAG = "ZERO_BENCH_PEER "
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- the hand-written DeepSpeed loop


def peer_main(zero: int, warmup: int, steps: int) -> None:
    """One rank of the hand-written loop (started by torchrun). Rank 0 prints one JSON line."""
    import resource

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    gen = torch.Generator().manual_seed(1000 + rank)
    times, losses = [], []
    dist.barrier()
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ), generator=gen)
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    peak_kib = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, os.getpid()], dtype=torch.int64)
    gathered = [torch.zeros_like(peak_kib) for _ in range(world)]
    dist.all_gather(gathered, peak_kib)
    if rank == 0:
        timed = times[warmup:]
        tokens = MICRO * SEQ * world
        print(PEER_TAG + json.dumps({
            "zero": zero, "world": world, "step_tokens": tokens, "step_s": timed,
            "tokens_per_s": tokens * len(timed) / sum(timed), "losses": losses,
            "ru_maxrss_kib": [int(g[0]) for g in gathered], "pids": [int(g[1]) for g in gathered],
        }), flush=True)
    dist.barrier()


# ---------------------------------------------------------------- peak memory by sampling


class RankMemory(threading.Thread):
    """Polls the processes under `root` whose command line contains `marker` (torchrun's workers,
    not torchrun itself) every `every` s and keeps each pid's VmHWM (peak RSS, KiB)."""

    def __init__(self, root: int, marker: str, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.marker, self.every = root, marker, every
        self.peak_kib: dict[int, int] = {}
        self.halt = threading.Event()

    def _workers(self) -> list[int]:
        parent: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        found = []
        for pid in parent:
            up = pid
            while up in parent and up != self.root and up > 1:
                up = parent[up]
            if up != self.root or pid == self.root:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.marker in cmd and "torchrun" not in cmd and "torch.distributed.run" not in cmd:
                found.append(pid)
        return found

    def run(self) -> None:
        known: set[int] = set()
        while not self.halt.is_set():
            if len(known) < RANKS:
                known.update(self._workers())
            for pid in known:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
                if m:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), int(m.group(1)))
            self.halt.wait(self.every)

    def stop(self) -> dict[int, int]:
        self.halt.set()
        self.join()
        return self.peak_kib


def run_sampled(cmd: list[str], marker: str, cwd: Path) -> tuple[str, dict[int, int]]:
    """Run `cmd` (an argument list), sampling its workers' memory; its output, and pid -> peak KiB."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = RankMemory(proc.pid, marker)
    sampler.start()
    out = proc.communicate()[0]
    peaks = sampler.stop()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with code {proc.returncode}:\n{out[-4000:]}")
    return out, peaks


# ---------------------------------------------------------------- the two sides


def run_peer(zero: int, warmup: int, steps: int) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc_per_node", str(RANKS), str(Path(__file__).resolve()), "--peer",
           "--zero", str(zero), "--warmup", str(warmup), "--steps", str(steps)]
    out, peaks = run_sampled(cmd, "--peer", ROOT)
    line = next((x for x in out.splitlines() if x.startswith(PEER_TAG)), None)
    if line is None:
        sys.exit(f"the peer printed no result:\n{out[-4000:]}")
    res = json.loads(line[len(PEER_TAG):])
    res["peak_rss_mib"] = [peaks.get(pid, 0) / 1024 for pid in res["pids"]]
    return res


def write_data(path: Path, rows: int) -> None:
    """Documents of 254 random letters and spaces: <bos> + 254 characters + <eos> = one 256-token
    row each (instar-char maps every one of these characters to one token)."""
    import random

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz     "
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(SEQ - 2))}) + "\n")


def run_instar(zero: int, warmup: int, steps: int, tmp: Path, tag: str) -> dict:
    import yaml

    data = tmp / "docs.jsonl"
    if not data.exists():
        write_data(data, 2000)
    recipe = {
        "run": {"name": "zero", "output_dir": str(tmp / tag), "seed": 0},
        "model": {"tokenizer": "instar-char", "config": {"model_type": "llama", **MODEL}},
        "defaults": {
            "precision": "fp32",
            "optimizer": {"name": "adamw", "betas": [0.9, 0.95], "weight_decay": 0.0},
            "train": {"steps": warmup + steps, "micro_batch_size": MICRO, "seq_len": SEQ, "packing": True,
                      "lr": LR, "max_grad_norm": 1.0, "checkpoint_every": 0, "log_every": 10},
            "eval": {},
            "distributed": {"engine": "deepspeed", "zero_stage": zero, "nproc_per_node": RANKS},
        },
        "stages": {"pretrain": {"kind": "pretrain", "data": {"path": str(data)}}},
    }
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    instar = Path(sys.executable).with_name("instar")
    out, peaks = run_sampled([str(instar), "run", str(path), "--quiet"], "instar.graph.worker", ROOT)
    stage = tmp / tag / "zero" / "pretrain"
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != warmup + steps:
        sys.exit(f"instar wrote {len(rows)} metric rows, expected {warmup + steps}:\n{out[-4000:]}")
    # `tokens` in metrics.jsonl is the running total of the stage; take differences if so.
    tokens = [r["tokens"] for r in rows]
    cumulative = len(tokens) > 1 and all(b > a for a, b in zip(tokens, tokens[1:]))
    step_tokens = [t - p for t, p in zip(tokens, [0, *tokens[:-1]])] if cumulative else tokens
    step_s = [n / r["tokens_per_s"] for n, r in zip(step_tokens, rows)]
    timed_tokens, timed_s = step_tokens[warmup:], step_s[warmup:]
    pids = {}
    for rank in range(RANKS):
        m = re.search(r"rank (\d+)/\d+ pid (\d+)", (stage / "logs" / f"rank{rank}.log").read_text())
        pids[int(m.group(1))] = int(m.group(2))
    if len(set(timed_tokens)) != 1:
        print(f"note: instar's timed steps had {sorted(set(timed_tokens))} tokens, not {MICRO * SEQ * RANKS} each")
    return {"zero": zero, "step_tokens": sum(timed_tokens) / len(timed_tokens), "step_s": timed_s,
            "tokens_per_s": sum(timed_tokens) / sum(timed_s), "losses": [r["loss"] for r in rows],
            "peak_rss_mib": [peaks.get(pids[r], 0) / 1024 for r in range(RANKS)]}


# ---------------------------------------------------------------- report


def _mmm(values: list[float], fmt: str = "{:.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def _median_tps(res: dict) -> float:
    """Tokens/s from the run's median step time (a cross-check that a few slow steps barely move)."""
    return res["step_tokens"] / statistics.median(res["step_s"])


def _mem(values: list[list[float]]) -> str:
    """Peak RSS per rank, the max over runs."""
    return ", ".join(f"{max(v[r] for v in values):.0f}" for r in range(RANKS))


def report(runs: dict[int, dict[str, list[dict]]], repeats: int, warmup: int, steps: int, load: float) -> str:
    """The RESULTS.md section for `runs` (ZeRO stage -> side -> results of its runs)."""
    from importlib.metadata import version

    z2 = runs[2]
    peer_tps = [r["tokens_per_s"] for r in z2["peer"]]
    inst_tps = [r["tokens_per_s"] for r in z2["instar"]]
    pair_ratios = [a / b for a, b in zip(inst_tps, peer_tps)]
    ratio = statistics.median(inst_tps) / statistics.median(peer_tps)
    by_median = statistics.median(map(_median_tps, z2["instar"])) / statistics.median(map(_median_tps, z2["peer"]))
    verdict = "meets" if ratio >= 0.95 else "misses"
    table = [
        "| ZeRO | runs | peer tokens/s | instar tokens/s | instar / peer | peer peak RSS MiB (rank 0, 1) "
        "| instar peak RSS MiB (rank 0, 1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for zero in (1, 2, 3):
        p, s = runs[zero]["peer"], runs[zero]["instar"]
        pt, st = [r["tokens_per_s"] for r in p], [r["tokens_per_s"] for r in s]
        table.append(f"| {zero} | {len(p)} | {_mmm(pt)} | {_mmm(st)} | "
                     f"{statistics.median(st) / statistics.median(pt):.3f} | {_mem([r['peak_rss_mib'] for r in p])} | "
                     f"{_mem([r['peak_rss_mib'] for r in s])} |")
    section = "\n".join([
        START,
        "## DeepSpeed ZeRO on 2 CPU ranks (`bench/zero.py`)",
        "",
        f"{date.today()}, {platform.platform()}, {platform.machine()} CPU x{os.cpu_count()}, Python "
        f"{platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}, "
        f"deepspeed {version('deepspeed')}. 1-minute load average when it started: {load:.2f} "
        f"(anything else running shares the 2 ranks' cores).",
        "",
        f"Llama vocab {MODEL['vocab_size']}, hidden {MODEL['hidden_size']}, intermediate "
        f"{MODEL['intermediate_size']}, {MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, "
        f"{MODEL['num_key_value_heads']} KV heads, tied embeddings; sequence {SEQ}, micro-batch {MICRO} per rank x "
        f"{RANKS} ranks = {MICRO * SEQ * RANKS} tokens per step; fp32, AdamW, clipping 1.0, gloo, "
        f"OMP_NUM_THREADS=1. {warmup} warm-up + {steps} timed steps per run. Peer: a hand-written "
        f"`deepspeed.initialize` loop on random ids with plain causal attention; instar: a `pretrain` stage "
        f"(`instar run`) on documents of exactly {SEQ} tokens (one per row, so both sides take SDPA's causal path).",
        "",
        f"- ZeRO-2, instar / peer tokens/s: **{ratio:.3f}** (median over {len(inst_tps)} run(s) each; target >= 0.95: "
        f"{verdict} it); per-pair ratios {_mmm(pair_ratios, '{:.3f}')}"
        + (" (min / median / max)" if len(pair_ratios) > 1 else "")
        + f"; from each run's median step time instead (less sensitive to other load): {by_median:.3f}",
        f"- tokens/s as min / median / max over {repeats} run(s) per ZeRO stage and side, interleaved.",
        "- peak RSS: each rank's VmHWM, read every 0.2 s while it runs (max over runs).",
        "",
        *table,
        END,
    ])
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 warm-up + 8 timed steps; print, leave RESULTS.md alone")
    parser.add_argument("--repeats", type=int, default=3, help="runs per ZeRO stage and side (instar and the peer), min/median/max")
    parser.add_argument("--warmup", type=int, default=None, help="steps dropped before timing (default 5, quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30, quick 8)")
    parser.add_argument("--zero", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # one rank of the peer loop
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    steps = args.steps if args.steps is not None else (8 if args.quick else 30)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.peer:
        peer_main(args.zero, warmup, steps)
        return

    load = os.getloadavg()[0]
    runs: dict[int, dict[str, list[dict]]] = {z: {"peer": [], "instar": []} for z in (1, 2, 3)}
    plan = [(zero, i) for i in range(args.repeats) for zero in (2, 1, 3)]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for zero, i in plan:
            order = ("peer", "instar") if i % 2 == 0 else ("instar", "peer")  # alternate to spread drift
            for side in order:
                t0 = time.perf_counter()
                res = (run_peer(zero, warmup, steps) if side == "peer"
                       else run_instar(zero, warmup, steps, tmp, f"z{zero}-{i}"))
                runs[zero][side].append(res)
                print(f"ZeRO-{zero} {side:6s} run {i + 1}: {res['tokens_per_s']:7.0f} tokens/s, peak RSS per rank "
                      f"{', '.join(f'{m:.0f}' for m in res['peak_rss_mib'])} MiB, step s min/median/max "
                      f"{_mmm(res['step_s'], '{:.2f}')}, first loss "
                      f"{res['losses'][0]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    section = report(runs, args.repeats, warmup, steps, load)
    print()
    print(section)
    if args.quick:
        print("\n(--quick: bench/RESULTS.md left as it was)")
        return
    write_section("zero", section)


if __name__ == "__main__":
    main()
