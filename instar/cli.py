"""`instar run | plan | validate | status | report | data` — the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from instar.console import fmt_value
from instar.errors import InstarError



def _results_table(results) -> None:
    from rich.table import Table

    from instar.console import console

    table = Table(title="stages (acc: greedy exact match on held-out problems, as `a+b=` text and as a chat turn)",
                  title_justify="left")
    for col in ("stage", "kind", "", "steps", "loss", "acc a+b=", "acc chat", "time s"):
        table.add_column(col, justify="left" if col in ("stage", "kind", "") else "right", no_wrap=True)
    for r in results:
        m = r.metrics
        seconds = m.get("train_seconds", m.get("merge_seconds"))
        table.add_row(r.name, r.kind, "cached" if r.cached else "ran", fmt_value(m.get("steps")), fmt_value(m.get("loss")),
                      fmt_value(m.get("exact_match/plain"), pct=True), fmt_value(m.get("exact_match/chat"), pct=True),
                      fmt_value(seconds))
    console.print(table)


def cmd_validate(args) -> int:
    from instar.config.load import check_model, load_recipe
    from instar.graph.dag import StageGraph

    loaded = load_recipe(args.recipe, args.overrides)
    graph = StageGraph(loaded.recipe)
    check_model(loaded)
    print(f"{args.recipe}: valid ({len(graph.stages)} stages: {' -> '.join(graph.topo_order())})")
    return 0


def cmd_plan(args) -> int:
    from rich.table import Table

    from instar.config.load import check_model, load_recipe
    from instar.console import console
    from instar.graph.plan import make_plan

    loaded = load_recipe(args.recipe, args.overrides)
    check_model(loaded)
    table = Table(title=f"plan for {loaded.run_dir}", title_justify="left")
    for col in ("stage", "kind", "parents", "fingerprint", "state"):
        table.add_column(col)
    for sp in make_plan(loaded):
        table.add_row(sp.name, sp.kind, ", ".join(sp.parents) or "-", sp.fingerprint,
                      "cached" if sp.cached else "pending")
    console.print(table)
    return 0


def cmd_run(args) -> int:
    import time

    from instar.config.load import load_recipe
    from instar.console import say
    from instar.graph.runner import run_recipe

    t0 = time.perf_counter()
    loaded = load_recipe(args.recipe, args.overrides)
    results = run_recipe(loaded, quiet=args.quiet, node_rank=args.node_rank)
    if not args.quiet:
        _results_table(results)
        say(f"run directory: {loaded.run_dir}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_status(args) -> int:
    from rich.table import Table

    from instar.console import console
    from instar.graph.runner import load_graph
    from instar.graph.state import stage_status

    run_dir = Path(args.run_dir)
    graph = load_graph(run_dir)
    table = Table(title=f"{run_dir}", title_justify="left")
    for col in ("stage", "kind", "parents", "state", "steps", "loss", "acc a+b=", "acc chat", "note"):
        table.add_column(col, no_wrap=col != "note")
    failed = 0
    slurm_lines: list[str] = []  # printed plainly below the table: log paths are long
    for stage in graph["stages"]:  # load_graph checked the names; the rest may be damaged, as report allows
        status, details = stage_status(run_dir / stage["name"], str(stage.get("fingerprint", "")))
        parents = stage.get("parents") if isinstance(stage.get("parents"), list) else []
        m = details.get("metrics", {}) if status == "done" else {}
        note = ""
        if status in ("failed", "cancelled", "stopped"):
            failed += status != "stopped"
            note = (details.get("error") or "").strip().splitlines()[-1][:120] if details.get("error") else ""
        if details.get("executor") == "slurm" and status != "done":
            slurm_lines.append(f"{stage['name']}: {status}, Slurm job {details.get('slurm')}, log {details.get('log')}"
                               + (f"\n  {details['error']}" if details.get("error") else ""))
        table.add_row(stage["name"], str(stage.get("kind", "?")), ", ".join(map(str, parents)) or "-", status,
                      fmt_value(m.get("steps")), fmt_value(m.get("loss")), fmt_value(m.get("exact_match/plain"), pct=True),
                      fmt_value(m.get("exact_match/chat"), pct=True), note)
    console.print(table)
    for line in slurm_lines:
        print(line)
    return 0


def cmd_submit(args) -> int:
    from instar.config.load import check_model, load_recipe

    if args.executor == "local":  # the stages run here, one after another: that is `instar run`
        return cmd_run(argparse.Namespace(**vars(args), node_rank=0))
    from instar.graph.submit import submit_recipe
    from instar.launch.slurm import SlurmOptions

    opts = SlurmOptions(partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        cpus_per_task=args.cpus_per_task, time=args.time, account=args.account, qos=args.qos,
                        sbatch_lines=args.sbatch, container_image=args.container_image,
                        signal_seconds=args.signal_seconds)
    loaded = load_recipe(args.recipe, args.overrides)
    check_model(loaded)
    results = submit_recipe(loaded, opts, dry_run=args.dry_run, quiet=args.quiet)
    if not args.dry_run and not args.quiet:
        counts = {a: sum(r.action == a for r in results) for a in ("submitted", "queued", "done")}
        print(f"{counts['submitted']} job(s) submitted, {counts['queued']} still queued or running, "
              f"{counts['done']} stage(s) already done; `instar status {loaded.run_dir}` follows them")
    return 0


def cmd_report(args) -> int:
    from instar.report import write_report

    print(write_report(Path(args.run_dir), args.out))
    return 0


def cmd_data_arithmetic(args) -> int:
    from instar.data.arithmetic import write_arithmetic

    paths = write_arithmetic(Path(args.out_dir), seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def cmd_data_tokenize(args) -> int:
    from instar.data.shards import write_shards
    from instar.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, Path.cwd())
    index = write_shards(Path(args.input), Path(args.out_dir), tokenizer, args.tokenizer,
                         shard_tokens=args.shard_tokens)
    print(f"{args.out_dir}: {index['documents']} documents, {index['tokens']} tokens ({index['dtype']}) in "
          f"{len(index['shards'])} shard(s); use it as `data: {{shards: {args.out_dir}}}` in a pretrain/cpt stage")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instar", description="Train a language model through a graph of stages.")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_cmd(name: str, help_text: str, fn):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. stages.sft.train.lr=1e-5")
        p.set_defaults(fn=fn)
        return p

    run = recipe_cmd("run", "run every stage whose artifact is missing or stale", cmd_run)
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--node-rank", type=int, default=0,
                     help="this node's rank for stages with distributed.nnodes > 1 (node 0 owns the run state)")
    recipe_cmd("plan", "show the stages in order with fingerprints and cached/pending", cmd_plan)
    submit = recipe_cmd("submit", "queue every pending stage on a scheduler (one Slurm job per stage, chained "
                                  "by their dependencies)", cmd_submit)
    submit.add_argument("--executor", default="slurm", choices=["slurm", "local"],
                        help="slurm: one sbatch job per stage (default); local: run here, like `instar run`")
    submit.add_argument("--partition", help="Slurm partition")
    submit.add_argument("--nodes", type=int, help="nodes per multi-rank stage (must match distributed.nnodes)")
    submit.add_argument("--gpus-per-node", type=int, help="GPUs per node (one for single-process stages)")
    submit.add_argument("--cpus-per-task", type=int, help="CPUs per node (one task per node runs torchrun)")
    submit.add_argument("--time", help="time limit per job, e.g. 4:00:00")
    submit.add_argument("--account", help="Slurm account to charge")
    submit.add_argument("--qos", help="Slurm quality of service")
    submit.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --sbatch=--mem=64G (repeatable)")
    submit.add_argument("--container-image", help="run the ranks in this image (pyxis: srun --container-image)")
    submit.add_argument("--signal-seconds", type=int, default=120,
                        help="seconds before the time limit at which a stage checkpoints and requeues (default 120)")
    submit.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch calls; queue nothing")
    submit.add_argument("--quiet", action="store_true", help="no progress output")
    recipe_cmd("validate", "check a recipe without running anything", cmd_validate)
    status = sub.add_parser("status", help="show each stage's state and final metrics")
    status.add_argument("run_dir")
    status.set_defaults(fn=cmd_status)
    report = sub.add_parser("report", help="write report.html: stage graph, training curves, eval accuracy, "
                                           "final metrics")
    report.add_argument("run_dir")
    report.add_argument("--out", help="where to write the page (default: RUN_DIR/report.html)")
    report.set_defaults(fn=cmd_report)
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    arith = data_sub.add_parser("arithmetic", help="write the built-in arithmetic-world data as JSONL")
    arith.add_argument("out_dir")
    arith.add_argument("--seed", type=int, default=0)
    arith.set_defaults(fn=cmd_data_arithmetic)
    tok = data_sub.add_parser("tokenize", help="tokenise {\"text\"} JSONL rows into memmap token shards "
                                               "(pretrain/cpt `data: {shards: OUT_DIR}`)")
    tok.add_argument("input", help="JSONL file of {\"text\": ...} rows")
    tok.add_argument("out_dir", help="folder to create (index.json, tokens-*.bin, offsets-*.bin)")
    tok.add_argument("--tokenizer", required=True,
                     help="instar-char or a local tokenizer folder; must be the training stage's tokenizer")
    tok.add_argument("--shard-tokens", type=int, default=256 * 2**20,
                     help="tokens per shard file before a new one starts (default 268435456)")
    tok.set_defaults(fn=cmd_data_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`run r.yaml --quiet a.b=1`), which argparse's positional
    # parsing does not allow: collect the leftover key=value words ourselves.
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if "=" not in word or word.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except InstarError as exc:
        print(f"{exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
