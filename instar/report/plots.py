"""The report's plots as PNG bytes (matplotlib, Agg; no display and no pyplot global state).

Curves put every stage on one x axis: stages follow each other in the graph's topological
order, each shifted by the steps of the stages before it, with a line (and colour) per stage.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from instar.report.collect import RunReport, StageReport, number

DPI = 100
WIDTH_IN = 11.0


@dataclass(frozen=True)
class Series:
    key: str  # the metrics.jsonl key
    label: str  # the y axis label


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(height_in: float, rows: int = 1):
    # Imported here so that `import instar.report` stays cheap and the CLI's other commands never
    # load matplotlib. Figure + FigureCanvasAgg needs no backend selection and no pyplot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def stage_colors(run: RunReport) -> dict[str, tuple]:
    """One colour per stage, the same in every plot (and in the graph's legend order)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(run.stages) <= 10 else "tab20"]
    return {s.name: cmap(i % cmap.N) for i, s in enumerate(run.stages)}


def _span(stage: StageReport) -> int:
    steps = [number(r.get("step")) for r in stage.steps]
    steps = [s for s in steps if s is not None]
    return int(max(steps, default=0))


def step_offsets(run: RunReport) -> dict[str, int]:
    """Where each stage's step 0 lies on the shared x axis (topological order, back to back)."""
    out, total = {}, 0
    for s in run.stages:
        out[s.name] = total
        total += _span(s)
    return out


def _points(stage: StageReport, key: str, offset: int) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, record in enumerate(stage.steps):
        y = number(record.get(key))
        if y is None:
            continue
        step = number(record.get("step"))
        xs.append(offset + (step if step is not None else i + 1))
        ys.append(y)
    return xs, ys


def _use_log(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(values) and max(positive) / min(positive) > 20


def curves_png(run: RunReport, series: list[Series], log_keys: tuple[str, ...] = ()) -> bytes | None:
    """One axes per series, a line per stage; None when no stage logged any of the keys."""
    offsets = step_offsets(run)
    colors = stage_colors(run)
    plotted = [(ser, [(s, *_points(s, ser.key, offsets[s.name])) for s in run.stages]) for ser in series]
    plotted = [(ser, [(s, xs, ys) for s, xs, ys in lines if xs]) for ser, lines in plotted]
    plotted = [(ser, lines) for ser, lines in plotted if lines]
    if not plotted:
        return None
    fig, axes = _figure(1.0 + 2.6 * len(plotted), rows=len(plotted))
    spans = [(offsets[s.name], offsets[s.name] + _span(s)) for s in run.stages if _span(s)]
    for ax, (ser, lines) in zip(axes, plotted):
        values = []
        for stage, xs, ys in lines:
            label = stage.name + (" (interrupted)" if stage.interrupted else "")
            ax.plot(xs, ys, color=colors[stage.name], linewidth=1.3, label=label)
            if stage.interrupted:
                ax.plot(xs[-1:], ys[-1:], marker="x", markersize=9, markeredgewidth=2, color="#c62828",
                        linestyle="none", clip_on=False, zorder=5)
            values.extend(ys)
        xs_all = [x for _, xs, _ in lines for x in xs]
        for start, _ in spans[1:]:  # only where this plot has data: a GRPO-only plot keeps its own x range
            if min(xs_all) - 1 <= start <= max(xs_all):
                ax.axvline(start, color="#999999", linewidth=0.7, linestyle=":")
        if ser.key in log_keys and _use_log(values):
            ax.set_yscale("log")
        ax.set_ylabel(ser.label)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.015)
    axes[-1].set_xlabel("step (stages back to back in graph order; dotted lines mark where each starts)")
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=9, title="stage",
               title_fontsize=9, frameon=False)
    return _png(fig)


def eval_bars_png(run: RunReport) -> bytes | None:
    """Final exact match (plain `a+b=` and chat) per stage in graph order; None when no stage has any."""
    if not any(s.has_eval for s in run.stages):
        return None
    from matplotlib.ticker import PercentFormatter

    names = [s.name for s in run.stages]
    fig, (ax,) = _figure(3.8)
    width = 0.38
    for j, (key, label, color) in enumerate((("exact_match/plain", "a+b= (plain)", "#1565c0"),
                                             ("exact_match/chat", "chat", "#ef6c00"))):
        for i, stage in enumerate(run.stages):
            value = stage.final(key)
            if value is None:
                continue
            x = i + (j - 0.5) * width
            ax.bar(x, value, width, color=color, label=label if not ax.get_legend_handles_labels()[1].count(label)
                   else None)
            ax.text(x, value + 0.015, f"{100 * value:.0f}%", ha="center", va="bottom", fontsize=8)
    for i, stage in enumerate(run.stages):
        if not stage.has_eval:
            why = "no eval" if stage.status == "done" else stage.state
            ax.text(i, 0.04, why, ha="center", va="bottom", fontsize=9, color="#777777", style="italic")
    crowded = len(names) * max(len(n) for n in names) > 90
    ax.set_xticks(range(len(names)), names, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("exact match")
    ax.set_title("final greedy exact match on held-out problems, per stage in graph order", fontsize=11,
                 loc="left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, title="format", title_fontsize=9, frameon=False)
    return _png(fig)
