"""The answer's one figure: the locality effect per NIC against the queue depth.

y: pin-cross / pin-same private (L2) misses per KB with its 95% CI (analysis.stats),
on a log scale with a line at 1 (no effect); x: the socket queue while the reader
copies (socket.queue_kb.p50) or, where the run did not measure it, the rcvbuf level.
Each NIC's series is labelled at its last point, not by a legend over the data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analysis.claims import LocalityPoint, level_order

COLOURS = {"e1000": "#b2182b", "virtio": "#2166ac", "virtio-notso": "#4d9221"}
MARKERS = {"e1000": "o", "virtio": "s", "virtio-notso": "^"}
Y_TICKS = (0.25, 0.33, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
LABEL_GAP_PX = 14


def _label_ends(fig: Any, ax: Any, ends: list[tuple[str, float, float, str]]) -> None:
    """Each series' name right of its last point, pushed apart vertically so that no
    two overlap (a legend would sit over the data)."""
    fig.canvas.draw()
    spots = sorted((ax.transData.transform((x, y))[1], name, x, y, colour)
                   for name, x, y, colour in ends)
    placed: list[float] = []
    for py, name, x, y, colour in spots:
        want = max(py, placed[-1] + LABEL_GAP_PX) if placed else py
        placed.append(want)
        ax.annotate(name, (x, y), xytext=(8, (want - py) * 72 / fig.dpi),
                    textcoords="offset points", va="center", fontsize=9, color=colour)


def plot_locality(points: list[LocalityPoint], out_dir: Path) -> Path | None:
    """answer-locality.png in `out_dir`, or None without a point that has a ratio."""
    points = [p for p in points if not math.isnan(p.effect.ratio)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    measured = all(not math.isnan(p.queue_kb) and p.queue_kb > 0 for p in points)
    levels = sorted({p.level for p in points}, key=level_order)
    names = sorted({p.series or p.nic for p in points})
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ends: list[tuple[str, float, float, str]] = []
    for k, name in enumerate(names):
        mine = sorted((p for p in points if (p.series or p.nic) == name),
                      key=lambda p: p.queue_kb if measured else level_order(p.level))
        if measured:
            xs = [p.queue_kb for p in mine]
        else:  # categorical: NICs side by side within a level
            xs = [levels.index(p.level) + (k - (len(names) - 1) / 2) * 0.12 for p in mine]
        ys = [p.effect.ratio for p in mine]
        lo = [p.effect.ratio - (p.effect.lo if not math.isnan(p.effect.lo) else p.effect.ratio)
              for p in mine]
        hi = [(p.effect.hi if not math.isnan(p.effect.hi) else p.effect.ratio) - p.effect.ratio
              for p in mine]
        nic = mine[0].nic
        colour = COLOURS.get(nic, f"C{k}") if len(names) == len({p.nic for p in points}) \
            else f"C{k}"
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=MARKERS.get(nic, "D") + "-", color=colour,
                    capsize=3, linewidth=1.2, markersize=5)
        ends.append((name, xs[-1], ys[-1], colour))
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ymin = min(min(p.effect.lo if not math.isnan(p.effect.lo) else p.effect.ratio
                   for p in points), 1.0)
    ymax = max(max(p.effect.hi if not math.isnan(p.effect.hi) else p.effect.ratio
                   for p in points), 1.0)
    ax.set_ylim(ymin / 1.15, ymax * 1.15)
    ticks = [t for t in Y_TICKS if ymin / 1.15 <= t <= ymax * 1.15]
    ax.set_yticks(ticks)
    if measured:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(NullFormatter())
        xs_all = [p.queue_kb for p in points]
        ax.set_xlim(min(xs_all) / 1.6, max(xs_all) * 2.2)  # room for the labels
        ax.set_xlabel("socket queue while the reader copies, p50 (KB)")
    else:
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlim(-0.5, len(levels) - 0.5 + 0.45)
        ax.set_xlabel("receive buffer (rcvbuf level)")
    _label_ends(fig, ax, ends)
    ax.set_ylabel("pin-cross / pin-same\nprivate misses per KB")
    ax.set_title("Locality effect (95% CI) against queue depth", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "answer-locality.png"
    tmp = path.with_name(".answer-locality.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
