"""`merge`: combine two or more parents in weight space (no training).

- `method: average` — Σ w_i θ_i (uniform unless `weights`), e.g. fusing fine-tuned siblings.
- `method: task_arithmetic` — θ₀ + λ Σ (θ_i − θ₀) with θ₀ the `base` stage (default: the nearest
  stage that every parent descends from) and λ = `scale`.
Either way the parents must descend from one common stage: weights of models trained from
different initialisations do not line up, and averaging them gives noise.
"""

from __future__ import annotations

from typing import Any

from instar.kinds.merge import MergeDefinition, common_base
from instar.trainer.kinds.base import StageKind


class MergeKind(MergeDefinition, StageKind):
    def run(self) -> dict[str, Any]:
        import time

        from instar.eval.runner import Evaluator
        from instar.merge.ops import check_compatible, task_arithmetic, weighted_average
        from instar.models.build import load_pretrained
        from instar.trainer.finish import finish_stage
        from instar.trainer.jsonl_log import JsonlLog
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
        eval_log = JsonlLog(ctx.stage_dir / "eval.jsonl")
        eval_log.reset()
        return finish_stage(ctx, model, tokenizer, final, evaluator, 0, eval_log)
