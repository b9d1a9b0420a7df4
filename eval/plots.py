"""PNG plots of evaluation results (matplotlib, an optional dependency: ``pip install 'longctx[plot]'``).

- :func:`heatmap`: accuracy per (length, depth), red → green, a line at the trained length;
- :func:`curves`: a metric versus length, one line per method (perplexity, retrieval accuracy), a line at the
  trained length.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = ["heatmap", "curves"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'longctx[plot]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^v<>pPX*h"
STYLES = ("-", "--", "-.", ":")


def heatmap(records: Sequence[dict], path: str | Path, *, title: str, trained_length: int | None = None,
            value: str = "correct", row: str = "depth", scale: float = 100.0, label: str = "accuracy (%)") -> Path:
    """Mean of ``value`` per (length, ``row``) over ``records`` (dicts with ``length``, ``row``, ``value``), times
    ``scale`` (cells and colour bar on the same 0-100 scale): by depth (passkey, needle) or by task (RULER, whose
    scores are already 0-100: ``scale=1``)."""
    plt = _pyplot()
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        key = round(float(r[row]), 3) if row == "depth" else r[row]
        cells[(r["length"], key)].append(float(r[value]))
    lengths = sorted({k[0] for k in cells})
    depths = list(dict.fromkeys(k[1] for k in cells)) if row != "depth" else sorted({k[1] for k in cells})
    grid = [[scale * sum(cells[(n, d)]) / len(cells[(n, d)]) if cells.get((n, d)) else float("nan") for n in lengths]
            for d in depths]
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{d:g}" if row == "depth" else str(d) for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel(row)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    if trained_length is not None:
        beyond = [j for j, n in enumerate(lengths) if n > trained_length]
        if beyond and beyond[0] > 0:
            ax.axvline(beyond[0] - 0.5, color="black", linewidth=2, linestyle="--", label=f"trained {trained_length}")
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.35), fontsize=7, frameon=False)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def curves(rows: Sequence[dict], path: str | Path, *, metric: str, title: str, trained_length: int | None = None,
           log_y: bool = False, percent: bool = False, ylabel: str | None = None) -> Path:
    """``metric`` versus ``length``, one line per ``method`` (rows: dicts with method, length, metric).

    Lengths on a log axis labelled with the lengths themselves; each method its own marker and line style, nudged
    sideways a little so equal values do not hide each other; the legend outside the data; ``percent``: values
    × 100 (the unit of the tables) on an axis spanning the data within 0-100."""
    plt = _pyplot()
    by_method: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None and r.get("length") is not None:
            by_method[r["method"]].append((r["length"], float(r[metric]) * (100 if percent else 1)))
    lengths = sorted({n for points in by_method.values() for n, _ in points})
    fig, ax = plt.subplots(figsize=(7.5, 4))
    k = len(by_method)
    for i, (method, points) in enumerate(by_method.items()):
        points.sort()
        nudge = 2 ** (0.025 * (i - (k - 1) / 2))  # a few % of an octave apart
        ax.plot([p[0] * nudge for p in points], [p[1] for p in points], marker=MARKERS[i % len(MARKERS)],
                linestyle=STYLES[i % len(STYLES)], markersize=5, linewidth=1.4, label=method, alpha=0.9)
    ax.set_xscale("log", base=2)
    if lengths:
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
    if log_y:
        ax.set_yscale("log")
    values = [v for points in by_method.values() for _, v in points]
    if percent and values:  # the data's range, padded, never below 0 % nor above 100 %
        lo, hi = min(values), max(values)
        pad = max(2.0, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(102.0, hi + pad))
    if trained_length is not None:
        ax.axvline(trained_length, color="black", linestyle="--", linewidth=1, label=f"trained {trained_length}")
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel(ylabel or (f"{metric} (%)" if percent else metric))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
