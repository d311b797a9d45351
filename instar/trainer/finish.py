"""How every stage ends (rank 0): the final eval, its accuracies in the stage's metrics, and the
artifact with its `instar.json`."""

from __future__ import annotations

from typing import Any

from instar import __version__
from instar.models.export import write_artifact


def artifact_meta(ctx, final: dict[str, Any]) -> dict[str, Any]:
    """The `instar.json` of a stage artifact."""
    return {
        "stage": ctx.name,
        "kind": ctx.spec.kind,
        "fingerprint": ctx.fingerprint,
        "parents": ctx.parents,
        "config": ctx.spec.model_dump(mode="json"),
        "data": ctx.data_hashes,
        "world_size": ctx.world_size,
        "instar_version": __version__,
        "metrics": final,
    }


def finish_stage(ctx, model, tokenizer, final: dict[str, Any], evaluator, step: int, eval_log,
                 mirrors=None) -> dict[str, Any]:
    """Evaluate `model` as the stage's `eval` asks (appended to eval.jsonl and the metric
    mirrors), add its accuracies to `final`, and write the artifact. Returns `final`."""
    record = evaluator(model, step) if evaluator.enabled else {}
    if record:
        eval_log.write(record)
        if mirrors is not None:
            mirrors.write(record)
    final.update({k: v for k, v in record.items() if k.startswith("exact_match/")})
    write_artifact(ctx.model_dir, model, tokenizer, artifact_meta(ctx, final))
    return final
