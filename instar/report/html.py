"""Assemble report.html: one self-contained page (inline SVG graph, PNG plots as data URIs, inline
CSS, no scripts, nothing fetched). Every piece of text from the run is HTML-escaped."""

from __future__ import annotations

import time
from html import escape

from instar.console import fmt_value
from instar.report.collect import RunReport
from instar.report.graph_svg import STATE_COLORS, graph_svg
from instar.report.plots import Series, curves_png, data_uri, eval_bars_png, stage_colors

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       padding: 0 16px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.25em; margin-top: 34px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
.meta { color: #555; font-size: 0.92em; }
.meta code, td code { font-size: 0.95em; }
.graph { overflow-x: auto; border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px; background: #fcfcfc; }
.legend span { display: inline-block; margin-right: 14px; font-size: 0.88em; }
.legend i, .swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 5px;
                     vertical-align: -1px; border: 1px solid rgba(0, 0, 0, 0.25); }
.swatch { border-radius: 50%; }
table { border-collapse: collapse; font-size: 0.92em; width: 100%; }
th, td { padding: 5px 9px; border-bottom: 1px solid #e5e5e5; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; }
th.l, td.l { text-align: left; }
td.note { white-space: normal; color: #555; text-align: left; min-width: 200px; }
tr.total td { font-weight: 600; border-top: 2px solid #ccc; }
.state { font-weight: 600; padding: 1px 7px; border-radius: 9px; border: 1px solid; font-size: 0.9em; }
.notes { background: #fff8e1; border: 1px solid #ffe082; border-radius: 6px; padding: 8px 14px; }
.notes li { margin: 2px 0; }
figure { margin: 8px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.empty { color: #666; font-style: italic; }
footer { margin-top: 40px; color: #888; font-size: 0.85em; }
"""

TRAIN_FAMILIES = [
    ("loss", "Loss", "training loss per optimizer step (log scale when it spans more than 20\u00d7)",
     [Series("loss", "loss")], ("loss",)),
    ("lr", "Learning rate", "learning rate per optimizer step", [Series("lr", "learning rate")], ()),
    ("grad_norm", "Gradient norm", "gradient norm before clipping, per optimizer step",
     [Series("grad_norm", "grad norm")], ("grad_norm",)),
]




def _state_badge(state: str) -> str:
    fill, stroke = STATE_COLORS.get(state, STATE_COLORS["pending"])
    return (f'<span class="state state-{escape(state)}" style="background:{fill};color:{stroke};'
            f'border-color:{stroke}">{escape(state)}</span>')


def _figure(name: str, png: bytes | None, alt: str, caption: str, empty: str) -> str:
    if png is None:
        return f'<p class="empty" data-plot="{escape(name)}">{escape(empty)}</p>'
    return (f'<figure><img class="plot" data-plot="{escape(name)}" alt="{escape(alt)}" src="{data_uri(png)}">'
            f'<figcaption class="meta">{escape(caption)}</figcaption></figure>')


def _table(run: RunReport, swatches: dict[str, str]) -> str:
    head = "".join(f'<th class="{"l" if c in ("stage", "kind", "state", "note") else ""}">{c}</th>'
                   for c in ("stage", "kind", "state", "steps", "final loss", "acc a+b=", "acc chat",
                             "time (s)", "note"))
    rows = []
    for s in run.stages:
        swatch = f'<i class="swatch" style="background:{swatches[s.name]}"></i>' if s.name in swatches else ""
        rows.append(f'<tr data-stage="{escape(s.name)}"><td class="l">{swatch}{escape(s.name)}</td>'
                    f'<td class="l">{escape(s.kind)}</td><td class="l">{_state_badge(s.state)}</td>'
                    f"<td>{fmt_value(s.last_step)}</td><td>{fmt_value(s.final('loss'))}</td>"
                    f"<td>{fmt_value(s.final('exact_match/plain'), pct=True)}</td>"
                    f"<td>{fmt_value(s.final('exact_match/chat'), pct=True)}</td><td>{fmt_value(s.seconds)}</td>"
                    f'<td class="note">{escape("; ".join(s.notes()))}</td></tr>')
    seconds = [s.seconds for s in run.stages if s.seconds is not None]
    total = (f'<tr class="total"><td class="l">total</td><td></td><td></td><td></td><td></td><td></td><td></td>'
             f'<td>{fmt_value(round(sum(seconds), 2))}</td><td class="note">wall time of the stages that finished'
             f'</td></tr>') if seconds else ""
    return (f'<table class="stages"><caption class="meta" style="caption-side:bottom;text-align:left">'
            f"acc: greedy exact match on held-out problems, as <code>a+b=</code> text and as a chat turn; "
            f"time: the stage's training (or merge) wall time</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}{total}</tbody></table>")


def _notes(run: RunReport) -> str:
    items = []
    for s in run.stages:
        if s.state in ("interrupted", "failed", "stopped", "running") or s.cut_off:
            items.append(f"<li><b>{escape(s.name)}</b>: {escape('; '.join(s.notes()))}</li>")
        elif s.status == "done" and not s.has_eval:
            items.append(f"<li><b>{escape(s.name)}</b>: no eval for this stage (no exact-match result); "
                         f"its accuracy bars are left out</li>")
    pending = [s.name for s in run.stages if s.state == "pending"]
    if pending:
        items.append(f"<li>not run yet: {escape(', '.join(pending))}</li>")
    return f'<ul class="notes">{"".join(items)}</ul>' if items else ""


def _extra_family(keys: set[str], prefixes: tuple[str, ...], first: tuple[str, ...],
                  exact: tuple[str, ...] = ()) -> list[Series]:
    chosen = [k for k in keys if k.startswith(prefixes) or k in exact]
    chosen.sort(key=lambda k: (first.index(k) if k in first else len(first), k))
    return [Series(k, k) for k in chosen[:4]]


def render(run: RunReport) -> str:
    """The whole page as one string."""
    colors = stage_colors(run)
    from matplotlib.colors import to_hex

    swatches = {name: to_hex(c) for name, c in colors.items()}
    done = sum(s.status == "done" for s in run.stages)
    legend = "".join(f'<span><i style="background:{fill};border-color:{stroke}"></i>{state}</span>'
                     for state, (fill, stroke) in STATE_COLORS.items())
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>instar report: {escape(run.name)}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>instar report: {escape(run.name)}</h1>",
           f'<p class="meta">run directory <code>{escape(str(run.run_dir))}</code><br>'
           f"recipe <code>{escape(run.recipe or '?')}</code>"
           + (f" with overrides <code>{escape(' '.join(run.overrides))}</code>" if run.overrides else "")
           + f"<br>{done} of {len(run.stages)} stages done \u00b7 generated "
           f"{escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
           _notes(run),
           "<h2>Stage graph</h2>",
           f'<div class="graph">{graph_svg(run, swatches)}</div>',
           f'<p class="legend">{legend}<span>\u2022 the dot beside a name is the stage\'s colour in the '
           f"plots; the second line is its kind and state, the third its fingerprint</span></p>",
           "<h2>Final metrics</h2>", _table(run, swatches),
           "<h2>Training curves</h2>"]
    for name, heading, caption, series, log_keys in TRAIN_FAMILIES:
        out.append(f"<h3>{heading}</h3>")
        out.append(_figure(name, curves_png(run, series, log_keys), f"{heading} per stage", caption,
                           "No stage has logged training steps yet."))
    out.append("<h2>Eval accuracy</h2>")
    out.append(_figure("eval", eval_bars_png(run), "final exact match per stage",
                       "bars: final exact match per stage (plain a+b= and chat); a stage without eval has none",
                       "No stage has an eval result yet (no exact-match eval in eval.jsonl or the artifacts)."))
    keys = run.metric_keys()
    grpo = _extra_family(keys, ("reward/",), ("reward/mean", "kl"), exact=("kl",))
    if grpo:
        out.append("<h2>GRPO reward and KL</h2>")
        out.append(_figure("grpo", curves_png(run, grpo), "GRPO reward and KL per stage",
                           "GRPO stages: mean reward of the sampled completions and KL to the reference", ""))
    dpo = _extra_family(keys, ("rewards/",), ("rewards/margin", "rewards/accuracy"))
    if dpo:
        out.append("<h2>DPO reward margin and accuracy</h2>")
        out.append(_figure("dpo", curves_png(run, dpo),
                           "DPO reward margin and accuracy per stage",
                           "DPO stages: chosen-minus-rejected reward margin and how often chosen wins", ""))
    out.append("<footer>written by <code>instar report</code> from graph.json, each stage's "
               "model/instar.json, metrics.jsonl and eval.jsonl</footer></body></html>")
    return "\n".join(out) + "\n"

