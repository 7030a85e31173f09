"""Dependency-free SVG charts for the HTML report: latency distributions (box + every run) and
scatter plots (quality against latency or size). Plain SVG strings, embedded inline."""
from __future__ import annotations

import math
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_W, _ROW, _LEFT, _RIGHT, _TOP, _BOTTOM = 720, 34, 230, 30, 30, 44


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"


def latency_svg(series: dict[str, list[float]], *, title: str = "latency per run (ms)") -> str:
    """One row per artifact: a box (p25-p75, p50 line, whiskers at p5/p95) over every timed run."""
    if not series:
        return ""
    labels = list(series)
    values = np.concatenate([np.asarray(series[k], float) for k in labels])
    ticks = _ticks(0.0, float(values.max()) * 1.05)
    lo, hi = ticks[0], ticks[-1]
    height = _TOP + _ROW * len(labels) + _BOTTOM
    plot_w = _W - _LEFT - _RIGHT

    def x(v: float) -> float:
        return _LEFT + (v - lo) / (hi - lo) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" '
             f'font-family="sans-serif" font-size="11"><title>{escape(title)}</title>',
             f'<text x="{_LEFT}" y="16" font-size="13">{escape(title)}</text>']
    axis_y = _TOP + _ROW * len(labels)
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{_TOP}" x2="{x(t):.1f}" y2="{axis_y}" stroke="#ddd"/>'
                     f'<text x="{x(t):.1f}" y="{axis_y + 14}" text-anchor="middle">{_fmt(t)}</text>')
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        v = np.asarray(series[label], float)
        cy = _TOP + _ROW * i + _ROW / 2
        color = PALETTE[i % len(PALETTE)]
        p5, p25, p50, p75, p95 = np.percentile(v, [5, 25, 50, 75, 95])
        parts.append(f'<text x="{_LEFT - 8}" y="{cy + 4:.1f}" text-anchor="end">{escape(label)}</text>')
        parts.append(f'<line x1="{x(p5):.1f}" y1="{cy:.1f}" x2="{x(p95):.1f}" y2="{cy:.1f}" stroke="{color}"/>')
        parts.append(f'<rect x="{x(p25):.1f}" y="{cy - 9:.1f}" width="{max(x(p75) - x(p25), 1):.1f}" '
                     f'height="18" fill="{color}" fill-opacity="0.25" stroke="{color}"/>')
        parts.append(f'<line x1="{x(p50):.1f}" y1="{cy - 9:.1f}" x2="{x(p50):.1f}" y2="{cy + 9:.1f}" '
                     f'stroke="{color}" stroke-width="2"/>')
        for val, jitter in zip(v, rng.uniform(-6, 6, v.size)):
            parts.append(f'<circle cx="{x(val):.1f}" cy="{cy + jitter:.1f}" r="1.6" fill="{color}" '
                         f'fill-opacity="0.6"/>')
    parts.append(f'<text x="{_LEFT + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">ms '
                 f'(box p25-p75, line p50, whiskers p5-p95, dots every run)</text></svg>')
    return "".join(parts)


def scatter_svg(points: list[tuple[str, float, float]], *, xlabel: str, ylabel: str,
                title: str) -> str:
    """Labelled points (label, x, y); one colour per label prefix before ' / '."""
    pts = [(lab, float(px), float(py)) for lab, px, py in points
           if px is not None and py is not None and math.isfinite(px) and math.isfinite(py)]
    if not pts:
        return ""
    w, h, left, bottom, top, right = _W, 380, 70, 46, 30, 190
    xs = [p[1] for p in pts]
    ys = [p[2] for p in pts]
    xt = _ticks(min(0.0, min(xs)), max(xs) * 1.08)
    pad = (max(ys) - min(ys)) * 0.15 or abs(max(ys)) * 0.05 or 1.0
    yt = _ticks(min(ys) - pad, max(ys) + pad)

    def x(v: float) -> float:
        return left + (v - xt[0]) / (xt[-1] - xt[0]) * (w - left - right)

    def y(v: float) -> float:
        return h - bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (h - top - bottom)

    groups = list(dict.fromkeys(lab.split(" / ")[0] for lab, _, _ in pts))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="11"><title>{escape(title)}</title>',
             f'<text x="{left}" y="16" font-size="13">{escape(title)}</text>']
    for t in xt:
        parts.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{h - bottom}" stroke="#ddd"/>'
                     f'<text x="{x(t):.1f}" y="{h - bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yt:
        parts.append(f'<line x1="{left}" y1="{y(t):.1f}" x2="{w - right}" y2="{y(t):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for lab, px, py in pts:
        color = PALETTE[groups.index(lab.split(" / ")[0]) % len(PALETTE)]
        parts.append(f'<circle cx="{x(px):.1f}" cy="{y(py):.1f}" r="4" fill="{color}">'
                     f'<title>{escape(lab)}: {_fmt(px)}, {_fmt(py)}</title></circle>'
                     f'<text x="{x(px) + 6:.1f}" y="{y(py) - 5:.1f}" font-size="10">'
                     f'{escape(lab.split(" / ")[-1])}</text>')
    for i, g in enumerate(groups):
        parts.append(f'<rect x="{w - right + 12}" y="{top + 16 * i}" width="10" height="10" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{w - right + 26}" '
                     f'y="{top + 16 * i + 9}">{escape(g)}</text>')
    parts.append(f'<text x="{left + (w - left - right) / 2:.0f}" y="{h - 8}" text-anchor="middle">'
                 f'{escape(xlabel)}</text><text x="14" y="{top + (h - top - bottom) / 2:.0f}" '
                 f'transform="rotate(-90 14 {top + (h - top - bottom) / 2:.0f})" text-anchor="middle">'
                 f'{escape(ylabel)}</text></svg>')
    return "".join(parts)
