"""Pretraining data loading in one process: memmap token shards vs the JSONL path.

Writes synthetic `{"text"}` corpora (word salad, lognormal document lengths around a mean), tokenises
them with `instar data tokenize` (instar-char: one token per character), then times the loader a
pretrain stage uses — sampler + Batcher packing (whole documents, no cross-document attention) +
collate into input_ids/targets/position_ids/doc_ids tensors — over the global batch, as every rank
does before taking its slice. Counted: real (non-padding) tokens per second. The JSONL path
(read + tokenise every row at stage start, then the same Batcher over Python lists) is timed on the
same corpus. The issue's target: >= 20 M tokens/s from shards in one process.

    .venv/bin/python bench/data_loading.py            # prints the table, writes its RESULTS.md section
    .venv/bin/python bench/data_loading.py --quick    # smaller corpora, prints only
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

WORDS = ("the of and model token shard data train loss graph stage a to in is was for on with as by at "
         "from this that which be are it an or have not but they their one all were we when there can").split()


def write_corpus(path: Path, tokens: int, mean: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    total = 0
    with path.open("w") as fh:
        while total < tokens:
            target = max(8, int(rng.lognormvariate(0, 0.8) * mean / 1.377))  # lognormal with mean `mean`
            words, n = [], 0
            while n < target:
                w = rng.choice(WORDS)
                words.append(w)
                n += len(w) + 1
            text = " ".join(words)
            fh.write(json.dumps({"text": text}) + "\n")
            total += len(text) + 2  # + bos, eos


def time_loader(sources, seq_len: int, global_batch: int, seconds: float) -> tuple[float, float]:
    """(real tokens per second, share of the batch's slots that hold a real token)"""
    from instar.data.packing import Batcher, count_tokens
    from instar.data.sampler import EpochSampler, MixtureSampler

    samplers = [EpochSampler(len(s), seed=1 + i) for i, s in enumerate(sources)]
    batcher = Batcher(sources, MixtureSampler(samplers, [1.0] * len(sources), seed=0), seq_len, True, 0)
    batcher.next_batch(global_batch)  # warm up
    tokens, slots, t0 = 0, 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        rows = batcher.next_rows(global_batch)
        batch = batcher.collate(rows)
        tokens += count_tokens(rows)  # not a torch reduction over the batch: that is slower than the loading
        slots += batch.doc_ids.numel()
    return tokens / dt, tokens / slots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller corpora, shorter timings; RESULTS.md untouched")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per timing (default 8, quick 1)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from instar.data.jsonl import read_rows
    from instar.data.formats import TextRow
    from instar.data.shards import TokenShards, write_shards
    from instar.data.tokenizer import build_char_tokenizer
    from instar.trainer.kinds.pretrain import text_examples

    seconds = args.seconds or (1.0 if args.quick else 8.0)
    tok = build_char_tokenizer()
    # (mean document length in tokens, corpus tokens, seq_len, global batch rows)
    # Packing never splits a document, so rows are long next to the documents (as in practice).
    cases = [(2048, 30_000_000, 8192, 8), (1024, 20_000_000, 4096, 8), (256, 8_000_000, 2048, 16),
             (64, 2_000_000, 2048, 16)]
    if args.quick:
        cases = [(m, n // 16, s, b) for m, n, s, b in cases]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for mean, n_tokens, seq_len, gb in cases:
            corpus = Path(tmp) / f"docs-{mean}.jsonl"
            write_corpus(corpus, n_tokens, mean)
            t0 = time.perf_counter()
            index = write_shards(corpus, Path(tmp) / f"shards-{mean}", tok, "instar-char")
            tokenize_s = time.perf_counter() - t0
            shards = TokenShards(Path(tmp) / f"shards-{mean}")
            shard_rate, fill = time_loader([shards], seq_len, gb, seconds)
            t0 = time.perf_counter()
            examples = text_examples(tok, read_rows(corpus, TextRow).rows)
            jsonl_start = time.perf_counter() - t0
            jsonl_rate, _ = time_loader([examples], seq_len, gb, seconds)
            del examples
            line = (f"| {mean:,} | {index['tokens'] / 1e6:.1f} M | {seq_len} x {gb} | {100 * fill:.0f}% | "
                    f"**{shard_rate / 1e6:.1f}** | "
                    f"{jsonl_rate / 1e6:.1f} | {jsonl_start:.1f} | {index['tokens'] / tokenize_s / 1e6:.2f} |")
            print(line, flush=True)
            lines.append(line)
    head = ("| mean doc tokens | corpus | rows (seq x batch) | fill | shards M tok/s | JSONL M tok/s | JSONL start s "
            "| tokenize M tok/s |\n|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(lines)
    if not args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import markers, write_section

        start, end = markers("data_loading")
        write_section("data_loading", f"{start}\n## Data loading (`bench/data_loading.py`, {date.today()}, one "
                      f"process, 2-core CPU)\n\nPacked pretraining batches per second from memmap token shards "
                      f"(`instar data tokenize`) and from the JSONL path, on synthetic corpora with lognormal "
                      f"document lengths (instar-char, one token per character). Tokens counted without "
                      f"padding; each timing {seconds:.0f} s. \"JSONL start\": reading and tokenising the "
                      f"corpus when a stage starts, which shards skip.\n\n{table}\n{end}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
