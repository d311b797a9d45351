"""The stage graph as inline SVG: a layered layout (one column per depth, left to right), a box
per stage coloured by its state with its kind and fingerprint, and an arrow from each parent."""

from __future__ import annotations

from html import escape

from instar.report.collect import RunReport, StageReport

# fill, stroke per state
STATE_COLORS = {
    "done": ("#e8f5e9", "#2e7d32"),
    "running": ("#e3f2fd", "#1565c0"),
    "failed": ("#ffebee", "#c62828"),
    "interrupted": ("#fff3e0", "#ef6c00"),
    "stopped": ("#fff3e0", "#ef6c00"),
    "pending": ("#f5f5f5", "#9e9e9e"),
}

BOX_H = 66
COL_GAP = 72
ROW_GAP = 22
PAD = 16
CHAR_W = 7.6  # approximate width of a 13px sans-serif character


def _columns(run: RunReport) -> list[list[StageReport]]:
    """Stages grouped by depth; each column ordered by the mean row of its parents (fewer crossings)."""
    ncols = 1 + max((s.depth for s in run.stages), default=0)
    cols: list[list[StageReport]] = [[] for _ in range(ncols)]
    for s in run.stages:
        cols[s.depth].append(s)
    row: dict[str, float] = {}
    topo = {s.name: i for i, s in enumerate(run.stages)}
    for col in cols:
        def key(s: StageReport) -> tuple[float, int]:
            rows = [row[p] for p in s.parents if p in row]
            return (sum(rows) / len(rows) if rows else 0.0, topo[s.name])
        col.sort(key=key)
        for i, s in enumerate(col):
            row[s.name] = i - (len(col) - 1) / 2
    return cols


def _fit(text: str, width: float, char_w: float) -> str:
    room = max(4, int((width - 20) / char_w))
    return text if len(text) <= room else text[: room - 1] + "\u2026"


def graph_svg(run: RunReport, swatches: dict[str, str] | None = None) -> str:
    """An <svg> element (as text) with one `<g class="stage-node">` per stage."""
    if not run.stages:
        return ""
    swatches = swatches or {}
    cols = _columns(run)
    longest = max(len(s.name) for s in run.stages)
    box_w = int(min(260, max(160, CHAR_W * longest + 40)))
    tallest = max(len(c) for c in cols)
    height = PAD * 2 + tallest * BOX_H + (tallest - 1) * ROW_GAP
    width = PAD * 2 + len(cols) * box_w + (len(cols) - 1) * COL_GAP
    pos: dict[str, tuple[float, float]] = {}
    for c, col in enumerate(cols):
        col_h = len(col) * BOX_H + (len(col) - 1) * ROW_GAP
        top = (height - col_h) / 2
        for r, s in enumerate(col):
            pos[s.name] = (PAD + c * (box_w + COL_GAP), top + r * (BOX_H + ROW_GAP))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="stage-graph" role="img" '
             f'aria-label="stage graph of {escape(run.name)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" font-family="system-ui, -apple-system, sans-serif">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    for s in run.stages:
        for p in s.parents:
            if p not in pos:
                continue
            (px, py), (cx, cy) = pos[p], pos[s.name]
            x1, y1, x2, y2 = px + box_w, py + BOX_H / 2, cx - 2, cy + BOX_H / 2
            mid = (x1 + x2) / 2
            parts.append(f'<path class="stage-edge" data-from="{escape(p)}" data-to="{escape(s.name)}" '
                         f'd="M {x1:.1f} {y1:.1f} C {mid:.1f} {y1:.1f}, {mid:.1f} {y2:.1f}, {x2:.1f} {y2:.1f}" '
                         f'fill="none" stroke="#555" stroke-width="1.4" marker-end="url(#arrow)"/>')
    for s in run.stages:
        x, y = pos[s.name]
        state = s.state
        fill, stroke = STATE_COLORS.get(state, STATE_COLORS["pending"])
        dash = ' stroke-dasharray="5 3"' if state == "pending" else ""
        tip = [f"{s.name} ({s.kind}): {state}", f"fingerprint {s.fingerprint}",
               "parents: " + (", ".join(s.parents) or "-"), *s.notes()]
        parts.append(f'<g class="stage-node" data-stage="{escape(s.name)}" data-state="{escape(state)}">'
                     f'<title>{escape(chr(10).join(tip))}</title>'
                     f'<rect x="{x}" y="{y:.1f}" width="{box_w}" height="{BOX_H}" rx="8" fill="{fill}" '
                     f'stroke="{stroke}" stroke-width="2"{dash}/>')
        tx = x + 12
        if s.name in swatches:
            parts.append(f'<circle cx="{x + 14}" cy="{y + 19:.1f}" r="5" fill="{escape(swatches[s.name])}"/>')
            tx = x + 25
        parts.append(f'<text x="{tx}" y="{y + 24:.1f}" font-size="14" font-weight="600" fill="#222">'
                     f'{escape(_fit(s.name, box_w - (tx - x) + 12, CHAR_W + 0.6))}</text>')
        parts.append(f'<text x="{x + 12}" y="{y + 42:.1f}" font-size="12" fill="#444">{escape(s.kind)} \u00b7 '
                     f'<tspan fill="{stroke}" font-weight="600">{escape(state)}</tspan></text>')
        parts.append(f'<text x="{x + 12}" y="{y + 58:.1f}" font-size="11" fill="#666" '
                     f'font-family="ui-monospace, monospace">{escape(_fit(s.fingerprint, box_w, 6.7))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
