"""`merge`: combine two or more parents in weight space (no training).

- `method: average` — Σ w_i θ_i (uniform unless `weights`), e.g. fusing fine-tuned siblings.
- `method: task_arithmetic` — θ₀ + λ Σ (θ_i − θ₀) with θ₀ the `base` stage (default: the nearest
  stage that every parent descends from) and λ = `scale`.
Either way the parents must descend from one common stage: weights of models trained from
different initialisations do not line up, and averaging them gives noise.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from instar.config.schema import Recipe, StageSpec
from instar.trainer.kinds.base import StageKind


class MergeSpec(StageSpec):
    method: Literal["average", "task_arithmetic"] = "average"
    weights: list[float] | None = None
    scale: float = Field(default=1.0, gt=0)
    base: str | None = None


def common_base(recipe: Recipe, parents: list[str]) -> str | None:
    """The nearest stage every parent descends from (the latest in topological order), or None."""
    from instar.graph.dag import ancestors

    shared = set.intersection(*(ancestors(recipe.stages, p) | {p} for p in parents))
    if not shared:
        return None
    # The nearest shared ancestor is the one with the most ancestors of its own.
    return max(shared, key=lambda s: (len(ancestors(recipe.stages, s)), list(recipe.stages).index(s)))


class MergeKind(StageKind):
    name = "merge"
    Spec = MergeSpec
    min_parents = 2
    max_parents = None
    row_format = None

    @classmethod
    def check(cls, name: str, spec: MergeSpec, recipe: Recipe) -> list[str]:
        from instar.graph.dag import ancestors

        problems = []
        parents = [p for p in spec.after if p in recipe.stages]
        if spec.data is not None:
            problems.append(f"stages.{name}.data: a merge stage reads no data; remove `data`")
        if spec.weights is not None and len(spec.weights) != len(spec.after):
            problems.append(f"stages.{name}.weights: {len(spec.weights)} weights for {len(spec.after)} parents")
        if spec.weights is not None and spec.method != "average":
            problems.append(f"stages.{name}.weights: only used by method: average (use `scale` for task_arithmetic)")
        if len(parents) >= 2:
            if spec.base is not None:
                if spec.base not in recipe.stages:
                    problems.append(f"stages.{name}.base: '{spec.base}' is not a stage of this recipe")
                else:
                    outside = [p for p in parents if spec.base not in ancestors(recipe.stages, p)]
                    if outside:
                        problems.append(f"stages.{name}.base: '{spec.base}' is not an ancestor of "
                                        f"{', '.join(outside)}; the base must be a stage every parent descends from")
            elif common_base(recipe, parents) is None:
                problems.append(f"stages.{name}: parents {', '.join(parents)} share no base stage (no common "
                                f"ancestor), so their weights do not line up; merge models fine-tuned from one stage")
        return problems

    def run(self) -> dict[str, Any]:
        import time

        from instar.eval.runner import Evaluator
        from instar.merge.ops import check_compatible, task_arithmetic, weighted_average
        from instar.models.build import load_pretrained
        from instar.models.export import write_artifact
        from instar.trainer.jsonl_log import JsonlLog
        from instar.trainer.loop import artifact_meta
        from instar.trainer.setup import stage_tokenizer

        ctx, spec = self.ctx, self.ctx.spec
        t0 = time.perf_counter()
        tokenizer = stage_tokenizer(ctx, needs_chat_template=False)
        models = {p: load_pretrained(ctx.parent_model_dir(p)) for p in ctx.parents}
        states = {p: m.state_dict() for p, m in models.items()}
        check_compatible(states)
        if spec.method == "average":
            merged = weighted_average(list(states.values()), spec.weights)
        else:
            base = spec.base or common_base(ctx.loaded.recipe, ctx.parents)
            base_state = load_pretrained(ctx.parent_model_dir(base)).state_dict()
            check_compatible({base: base_state, **states})
            merged = task_arithmetic(base_state, list(states.values()), spec.scale)
        model = models[ctx.parents[0]]
        model.load_state_dict(merged)
        final: dict[str, Any] = {"steps": 0, "merge_seconds": round(time.perf_counter() - t0, 2)}
        evaluator = Evaluator(ctx.spec.eval, tokenizer, ctx.loaded.base_dir, ctx.run_dir)
        if evaluator.enabled:
            record = evaluator(model, 0)
            log = JsonlLog(ctx.stage_dir / "eval.jsonl")
            log.reset()
            log.write(record)
            final.update({k: v for k, v in record.items() if k.startswith("exact_match/")})
        write_artifact(ctx.model_dir, model, tokenizer, artifact_meta(ctx, final))
        return final
