"""PNG figures from the tidy table (matplotlib figures without pyplot: no display and
no global backend switch, so importing analysis leaves matplotlib's state alone).

Each function draws from medians over repetitions with IQR whiskers (the same
numbers the tables show), writes one PNG and returns its path, or None when the
run has nothing to draw (e.g. no reader samples): a missing figure is better
than an empty one that looks like a measurement of zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.collate import cell_label
from testbed.vocabulary import TABLE_AXES as AXES

DPI = 100
MAX_PANELS = 12


def _ok(tidy: pd.DataFrame) -> pd.DataFrame:
    return tidy[(tidy["status"] == "ok") & tidy["value"].notna()]


def _varying(df: pd.DataFrame, exclude: tuple[str, ...]) -> list[str]:
    """Axes (other than `exclude`) that take more than one value: they label panels."""
    return [a for a in AXES if a not in exclude and df[a].astype(str).nunique() > 1]


def _stats(values: pd.Series) -> tuple[float, float, float]:
    q1, med, q3 = np.quantile(values.to_numpy(dtype=float), [0.25, 0.5, 0.75])
    return float(med), float(med - q1), float(q3 - med)


THROUGHPUT_METRICS = (("window.throughput", "window.transaction_rate"),
                      ("netperf.throughput", "netperf.transaction_rate"))


def plot_throughput(tidy: pd.DataFrame, out_dir: Path) -> Path | None:
    """Throughput per policy (x) and NIC (bars), one panel per other varying axes.

    The window's own rate where the run has it (payload 10^6bits/s; transactions/s
    for TCP_RR); netperf's (a longer run) only for runs made before window units.
    """
    df = pd.DataFrame()
    label = ""
    for stream_metric, rr_metric in THROUGHPUT_METRICS:
        rows = tidy[(tidy["cpu"] == "all") & (
            ((tidy["metric"] == stream_metric) & (tidy["workload"] != "TCP_RR")) |
            ((tidy["metric"] == rr_metric) & (tidy["workload"] == "TCP_RR")))]
        df = _ok(rows)
        label = stream_metric.split(".")[0]
        if not df.empty:
            break
    if df.empty:
        return None
    panel_axes = _varying(df, ("policy", "nic"))
    panels = list(df.groupby(panel_axes, dropna=False)) if panel_axes else [((), df)]
    panels = panels[:MAX_PANELS]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.5 * cols, 3.8 * rows))
    axs = fig.subplots(rows, cols, squeeze=False)
    for ax, (key, g) in zip(axs.flat, panels, strict=False):
        policies = list(dict.fromkeys(g["policy"].astype(str)))
        nics = list(dict.fromkeys(g["nic"].astype(str)))
        width = 0.8 / max(1, len(nics))
        for i, nic in enumerate(nics):
            meds, lo, hi, xs = [], [], [], []
            for j, pol in enumerate(policies):
                v = g[(g["nic"].astype(str) == nic) & (g["policy"].astype(str) == pol)]["value"]
                if v.empty:
                    continue
                m, dl, dh = _stats(v)
                meds.append(m)
                lo.append(dl)
                hi.append(dh)
                xs.append(j + (i - (len(nics) - 1) / 2) * width)
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=nic)
        ax.set_xticks(range(len(policies)), policies, rotation=20)
        ax.set_ylabel(f"{g['metric'].iloc[0]} ({g['unit'].iloc[0]})", fontsize=8)
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(" ".join(f"{a}={k}" for a, k in zip(panel_axes, key, strict=False)) or
                     "throughput", fontsize=9)
        ax.legend(title="nic", fontsize=8)
    for ax in list(axs.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Throughput ({label}): median over repetitions, whiskers = IQR")
    fig.tight_layout()
    return _save(fig, out_dir / "throughput.png")


LOCALITY_METRICS = (("share.netrx", "NET_RX softirqs"), ("share.nic_irq", "NIC interrupts"),
                    ("share.reader", "reader samples"))


def plot_locality(tidy: pd.DataFrame, out_dir: Path) -> Path | None:
    """Heatmaps of the per-CPU share of NET_RX, NIC IRQs and reader time, per cell."""
    df = _ok(tidy[tidy["metric"].isin([m for m, _ in LOCALITY_METRICS]) &
                  (tidy["cpu"] != "all")])
    if df.empty:
        return None
    label_axes = _varying(df, ()) or ["policy"]
    df = df.assign(cell=df.apply(lambda r: cell_label(r, label_axes), axis=1))
    cells = sorted(df["cell"].unique())
    cpus = sorted(df["cpu"].unique(), key=int)
    present = [(m, t) for m, t in LOCALITY_METRICS if (df["metric"] == m).any()]
    fig = Figure(figsize=(2.5 + 1.1 * len(cpus) * len(present) + 1, 1.6 + 0.45 * len(cells)),
                 layout="constrained")
    axs = fig.subplots(1, len(present), squeeze=False)
    for ax, (metric, title) in zip(axs.flat, present, strict=True):
        grid = (df[df["metric"] == metric].groupby(["cell", "cpu"])["value"].median()
                .unstack("cpu").reindex(index=cells, columns=cpus))
        im = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis",
                       aspect="auto")
        ax.set_xticks(range(len(cpus)), [f"CPU{c}" for c in cpus])
        ax.set_yticks(range(len(cells)), cells if ax is axs.flat[0] else [""] * len(cells),
                      fontsize=8)
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=list(axs.flat), shrink=0.8, label="share of the window (median)")
    fig.suptitle("Where the receive path ran", fontsize=10)
    return _save(fig, out_dir / "locality.png")


JOINT_METRICS = (("locality.processing_on_reader_cpu", "processing on reader's CPU"),
                 ("locality.irq_on_reader_cpu", "NIC poll on reader's CPU"),
                 ("wakeups.on_waker_cpu", "wake-ups placed on waker's CPU"),
                 ("wakeups.from_softirq", "wake-ups from softirq"))


def plot_joint_locality(tidy: pd.DataFrame, out_dir: Path) -> Path | None:
    """Co-location and wake-up placement measured from the trace, per cell (0..1)."""
    names = [m for m, _ in JOINT_METRICS]
    df = _ok(tidy[tidy["metric"].isin(names) & (tidy["cpu"] == "all")])
    if df.empty:
        return None
    label_axes = _varying(df, ()) or ["policy"]
    df = df.assign(cell=df.apply(lambda r: cell_label(r, label_axes), axis=1))
    cells = sorted(df["cell"].unique())
    present = [(m, t) for m, t in JOINT_METRICS if (df["metric"] == m).any()]
    fig = Figure(figsize=(2.5 + 2.6 * len(present), 1.4 + 0.35 * len(cells)),
                 layout="constrained")
    axs = fig.subplots(1, len(present), squeeze=False)
    for i, (ax, (metric, title)) in enumerate(zip(axs.flat, present, strict=True)):
        g = df[df["metric"] == metric]
        meds, lo, hi = _per_cell(g, cells)
        ax.barh(range(len(cells)), meds, xerr=[lo, hi], capsize=3, color="tab:green")
        ax.set_yticks(range(len(cells)), cells if i == 0 else [""] * len(cells), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Measured from kernel tracepoints (median, whiskers = IQR)", fontsize=10)
    return _save(fig, out_dir / "joint-locality.png")


def _per_cell(g: pd.DataFrame, cells: list[str]) -> tuple[list[float], list[float],
                                                          list[float]]:
    """Median and whisker lengths of each cell's values, in `cells` order (NaN, no whisker,
    for a cell without values)."""
    meds, lo, hi = [], [], []
    for c in cells:
        v = g[g["cell"] == c]["value"]
        m, dl, dh = _stats(v) if not v.empty else (math.nan, 0.0, 0.0)
        meds.append(m)
        lo.append(dl)
        hi.append(dh)
    return meds, lo, hi


COUNTER_METRICS = ("perf.context-switches", "perf.cpu-migrations", "perf.cache-misses",
                   "perf.LLC-load-misses", "cache.l1d_misses", "cache.llc_misses",
                   "cache.c2c_transfers", "softirq.NET_RX")


def plot_counters(tidy: pd.DataFrame, out_dir: Path) -> Path | None:
    """Counters per KB (STREAM/MAERTS) or per transaction (RR), with IQR whiskers."""
    wanted = [f"{m}{s}" for m in COUNTER_METRICS for s in (".per_kb", ".per_trans")]
    df = _ok(tidy[tidy["metric"].isin(wanted) & (tidy["cpu"] == "all")])
    if df.empty:
        return None
    label_axes = _varying(df, ()) or ["policy"]
    df = df.assign(cell=df.apply(lambda r: cell_label(r, label_axes), axis=1))
    metrics = [m for m in wanted if (df["metric"] == m).any()][:MAX_PANELS]
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    cells = sorted(df["cell"].unique())
    fig = Figure(figsize=(6 * cols, 0.9 + 0.35 * len(cells) * rows + rows))
    axs = fig.subplots(rows, cols, squeeze=False)
    for ax, metric in zip(axs.flat, metrics, strict=False):
        g = df[df["metric"] == metric]
        meds, lo, hi = _per_cell(g, cells)
        ax.barh(range(len(cells)), meds, xerr=[lo, hi], capsize=3, color="tab:orange")
        ax.set_yticks(range(len(cells)), cells, fontsize=8)
        ax.set_title(f"{metric} ({g['unit'].iloc[0]})", fontsize=9)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    for ax in list(axs.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Counters normalised by work done (median, whiskers = IQR)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir / "counters.png")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI)
    tmp.replace(path)
    return path


def plot_all(tidy: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every figure that has data, in report order."""
    made = [plot_throughput(tidy, out_dir), plot_joint_locality(tidy, out_dir),
            plot_locality(tidy, out_dir), plot_counters(tidy, out_dir)]
    return [p for p in made if p is not None]
