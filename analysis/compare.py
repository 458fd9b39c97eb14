"""Statistics on the tidy table: per-cell summaries and comparisons with CIs.

A cell is described by its median and IQR, with a percentile-bootstrap interval of the
median (seeded, so a report is reproducible; descriptive only: at n = 3 it is narrow).
Two cells are compared with analysis.stats, the method the answer uses too: a ratio of
geometric means with a 95% Welch t interval on logs (a difference of means for shares
and for counts that can be zero). A change is flagged (`*`, `significant`, verdict
higher / lower) when that interval excludes no change; the table says n so a reader
sees why a row with one repetition on a side has no interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.collate import cell_label
from analysis.stats import ALPHA, compare_samples
from testbed.vocabulary import TABLE_AXES as AXES

# Each cell against the `default` policy of its own NIC, kernel and other axes: a global
# baseline (one NIC, one kernel) lets NIC differences drown policy effects. `--baseline
# policy=default,nic=e1000` (any axis=value pairs) compares across an axis instead.
DEFAULT_BASELINE: dict[str, str] = {"policy": "default"}

# What two runs compared with each other must share (versions.json keys), and why.
RUN_IDENTITY: tuple[tuple[str, str], ...] = (
    ("qemu_version", "QEMU"), ("cachemodel_plugin", "cache-model plugin"),
    ("kernels", "kernel build"), ("image", "guest image"))
BOOTSTRAP = 2000

# Metrics the text table and report lead with (when present in the run).
KEY_METRICS: tuple[str, ...] = (
    "window.throughput",
    "netperf.throughput",
    "window.transaction_rate",
    "netperf.transaction_rate",
    "netperf.latency_p50",
    "netperf.latency_p99",
    "netperf.cpu_util_receiver",
    "locality.processing_on_reader_cpu",
    "locality.irq_on_reader_cpu",
    "wakeups.on_waker_cpu",
    "wakeups.from_softirq",
    "reader.samples",
    "perf.context-switches.per_kb",
    "perf.cpu-migrations.per_kb",
    "perf.context-switches.per_trans",
    "perf.cpu-migrations.per_trans",
    "perf.cache-misses.per_kb",
    "perf.LLC-load-misses.per_kb",
    "cache.l1d_misses.per_kb",
    "cache.llc_misses.per_kb",
    "cache.c2c_transfers.per_kb",
    "cache.c2c_transfers.per_trans",
    "cache.device_write_coverage",
    "netperf.retrans_sender",
)


def is_headline(metric: str) -> bool:
    """Metrics compared by default: results, locality and normalised counters.

    Raw per-window counters (snmp.*, stat.*, softirq.* ...) stay in the tidy
    table and the summary; comparing them all would multiply the work by ~10
    for numbers nobody reads without normalisation.
    """
    return (metric in KEY_METRICS or metric.startswith(("locality.", "wakeups.", "window.",
                                                        "netperf.latency_", "netperf.cpu_util_",
                                                        "netperf.retrans_"))
            or metric.endswith((".per_kb", ".per_trans")))


def _ok(tidy: pd.DataFrame) -> pd.DataFrame:
    return tidy[(tidy["status"] == "ok") & tidy["value"].notna()]


def summarize(tidy: pd.DataFrame, seed: int = 0, n_boot: int = BOOTSTRAP) -> pd.DataFrame:
    """Per run, cell, metric and CPU: n, median, IQR and the median's bootstrap 95% CI.

    `n_failed` counts the cell's repetitions that failed or never finished, so a
    thin cell is visible next to its numbers. The bootstrap is vectorised over
    all groups with the same n (a full matrix has ~10^5 groups).
    """
    reps = tidy[tidy["metric"] == "rep.status"]
    bad = (reps[reps["status"] != "ok"].groupby(["run_id", "cell_id"]).size()
           .rename("n_failed"))
    keys = ["run_id", "cell_id", *AXES, "metric", "cpu"]
    data = _ok(tidy[tidy["metric"] != "rep.status"])
    if data.empty:
        return pd.DataFrame()
    grouped = data.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(unit=("unit", "first"), n=("value", "size"),
                      median=("value", "median")).reset_index()
    out["q1"] = grouped["value"].quantile(0.25).to_numpy()
    out["q3"] = grouped["value"].quantile(0.75).to_numpy()
    out["iqr"] = out["q3"] - out["q1"]
    gid = grouped.ngroup().to_numpy()
    order = np.argsort(gid, kind="stable")
    values = np.split(data["value"].to_numpy(dtype=float)[order],
                      np.cumsum(np.bincount(gid, minlength=len(out)))[:-1])
    lo = np.full(len(values), np.nan)
    hi = np.full(len(values), np.nan)
    rng = np.random.default_rng(seed)
    by_n: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        by_n.setdefault(len(v), []).append(i)
    for n, idxs in by_n.items():
        if n == 1:
            lo[idxs] = hi[idxs] = [values[i][0] for i in idxs]
            continue
        draw = rng.integers(0, n, size=(n_boot, n))
        for start in range(0, len(idxs), 256):
            chunk = idxs[start:start + 256]
            mat = np.stack([values[i] for i in chunk])  # (G, n)
            meds = np.median(mat[:, draw], axis=2)  # (G, n_boot)
            q = np.quantile(meds, [ALPHA / 2, 1 - ALPHA / 2], axis=1)
            lo[chunk], hi[chunk] = q[0], q[1]
    out["ci_lo"], out["ci_hi"] = lo, hi
    out = out.merge(bad, how="left", left_on=["run_id", "cell_id"], right_index=True)
    out["n_failed"] = out["n_failed"].fillna(0).astype(int)
    return out


@dataclass
class Comparison:
    """Rows of changes plus notes on how the baseline was chosen."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    alpha: float = ALPHA


def _values(tidy: pd.DataFrame) -> pd.DataFrame:
    return _ok(tidy[(tidy["cpu"] == "all") & (tidy["metric"] != "rep.status")])


def resolve_baseline(tidy: pd.DataFrame, baseline: Mapping[str, object] | None,
                     ) -> tuple[dict[str, object], list[str]]:
    """Drop baseline axes whose value is not in the run, and say so.

    Example: a run of the distro kernel only has no `stock` cells, so comparing
    "against kernel=stock" is impossible; instead each cell is compared within
    its own kernel and the report states it.
    """
    base = dict(DEFAULT_BASELINE if baseline is None else baseline)
    notes = []
    for axis, value in list(base.items()):
        if axis not in AXES:
            raise ValueError(f"baseline axis {axis!r} is not one of {', '.join(AXES)}")
        present = {str(v) for v in tidy[axis].dropna().unique()}
        if str(value) not in present:
            del base[axis]
            notes.append(f"baseline {axis}={value} is not in this run "
                         f"(it has {', '.join(sorted(present)) or 'none'}); "
                         f"cells are compared within the same {axis}")
    if not base:
        notes.append("no baseline axis is left: nothing to compare against")
    return base, notes


def compare_to_baseline(tidy: pd.DataFrame, baseline: Mapping[str, object] | None = None,
                        metrics: Iterable[str] | None = None, alpha: float = ALPHA,
                        ) -> Comparison:
    """Each cell against the cell that has the baseline's axis values and the same
    other axes (per run; use compare_runs for two runs)."""
    base, notes = resolve_baseline(tidy, baseline)
    if baseline is None:
        notes.insert(0, "baseline: each cell against policy=default with its own NIC, kernel "
                        "and other axes (choose another with --baseline axis=value,...)")
    vals = _values(tidy)
    if metrics is not None:
        vals = vals[vals["metric"].isin(list(metrics))]
    rows = []
    if base:
        cells = vals.drop_duplicates(["run_id", "cell_id"])
        by_axes = {tuple(str(r[a]) for a in AXES): r["cell_id"]
                   for _, r in cells.iterrows()}
        groups = {k: g for k, g in vals.groupby(["cell_id", "metric"])}
        metrics_of: dict[str, list[str]] = {}
        for cell_id, metric in groups:
            metrics_of.setdefault(cell_id, []).append(metric)
        for _, cell in cells.iterrows():
            if all(str(cell[a]) == str(v) for a, v in base.items()):
                continue
            want = tuple(str(base.get(a, cell[a])) for a in AXES)
            base_id = by_axes.get(want)
            if base_id is None:
                continue
            for metric in metrics_of.get(cell["cell_id"], []):
                gb = groups.get((base_id, metric))
                gn = groups.get((cell["cell_id"], metric))
                if gb is None or gn is None:
                    continue
                ch = compare_samples(gb["value"].tolist(), gn["value"].tolist(),
                                     str(gn["unit"].iloc[0]), 1 - alpha)
                rows.append({"cell_id": cell["cell_id"], "base_cell_id": base_id,
                             **{a: cell[a] for a in AXES}, "metric": metric,
                             "unit": gn["unit"].iloc[0], **ch.__dict__})
        if not rows:
            notes.append("no cell had a matching baseline cell")
    return Comparison(pd.DataFrame(rows), notes, alpha)


def run_differences(versions_a: Mapping[str, object], versions_b: Mapping[str, object],
                    ) -> list[str]:
    """What differs between two runs' versions.json in QEMU, plugin, kernel build or image
    (pure); a key only one run recorded is a difference too, a key neither has is not."""
    out = []
    for key, what in RUN_IDENTITY:
        a, b = versions_a.get(key), versions_b.get(key)
        if a is None and b is None:
            continue
        if key == "kernels" and isinstance(a, Mapping) and isinstance(b, Mapping):
            for name in sorted(set(a) & set(b)):
                if a[name] != b[name]:
                    out.append(f"{what} {name}: {_short(a[name])} vs {_short(b[name])}")
            continue
        if a != b:
            out.append(f"{what}: {_short(a)} vs {_short(b)}")
    return out


def _short(v: object, width: int = 80) -> str:
    text = "not recorded" if v is None else str(v)
    return text if len(text) <= width else text[:width - 3] + "..."


def compare_runs(tidy_a: pd.DataFrame, tidy_b: pd.DataFrame,
                 metrics: Iterable[str] | None = None, alpha: float = ALPHA) -> Comparison:
    """Run B against run A on cells with equal axis values (cell ids may differ)."""
    va, vb = _values(tidy_a), _values(tidy_b)
    if metrics is not None:
        keep = list(metrics)
        va, vb = va[va["metric"].isin(keep)], vb[vb["metric"].isin(keep)]
    ka = va.assign(_k=va[list(AXES)].astype(str).agg("|".join, axis=1))
    kb = vb.assign(_k=vb[list(AXES)].astype(str).agg("|".join, axis=1))
    ga = {k: g for k, g in ka.groupby(["_k", "metric"])}
    rows = []
    for (k, metric), gn in kb.groupby(["_k", "metric"]):
        gb = ga.get((k, metric))
        if gb is None:
            continue
        ch = compare_samples(gb["value"].tolist(), gn["value"].tolist(),
                             str(gn["unit"].iloc[0]), 1 - alpha)
        first = gn.iloc[0]
        rows.append({"cell_id": first["cell_id"], "base_cell_id": gb["cell_id"].iloc[0],
                     **{a: first[a] for a in AXES}, "metric": metric, "unit": first["unit"],
                     **ch.__dict__})
    notes = []
    run_a = ", ".join(sorted(tidy_a["run_id"].dropna().unique()))
    run_b = ", ".join(sorted(tidy_b["run_id"].dropna().unique()))
    notes.append(f"base = run {run_a}; new = run {run_b}; cells matched on their axes")
    unmatched = set(kb["_k"]) - set(ka["_k"])
    if unmatched:
        notes.append(f"{len(unmatched)} cell(s) of the new run have no match in the base run")
    if not rows:
        notes.append("no cells in common")
    return Comparison(pd.DataFrame(rows), notes, alpha)


def fmt_number(v: float) -> str:
    """Four significant digits, scientific for very large or small values; n/a for NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    if a != 0 and (a >= 1e6 or a < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}" if a < 1000 else f"{v:.0f}"


def format_table(comp: Comparison, metrics: Sequence[str] | None = KEY_METRICS) -> str:
    """The kernel-mailing-list table: base | %change ± | new | metric [cell].

    base and new are geometric means (means for shares and counts with zeros); ± is
    half the width of the % change's 95% CI (the CI itself may be asymmetric; the CSV
    has both ends); `*` marks a change whose interval excludes no change.
    """
    t = comp.table
    if t.empty:
        return "(no comparisons)\n" + "".join(f"note: {n}\n" for n in comp.notes)
    if metrics is not None:
        order = {m: i for i, m in enumerate(metrics)}
        t = t[t["metric"].isin(order)].copy()
        t["_o"] = t["metric"].map(order)
        t = t.sort_values(["_o", "cell_id"])
    lines = [f"{'base':>12} | {'%change ±':>18} | {'new':>12} | metric [cell, n base/new]"]
    lines.append("-" * len(lines[0]))
    for _, r in t.iterrows():
        if math.isnan(r["pct"]):
            change = "n/a" if not r["significant"] else f"{r['verdict']}*"
        elif math.isnan(r["pct_lo"]):
            change = f"{r['pct']:+.1f}% ± n/a "
        else:
            half = (r["pct_hi"] - r["pct_lo"]) / 2
            change = f"{r['pct']:+.1f}% ± {half:.1f}%" + ("*" if r["significant"] else " ")
        unit = f" ({r['unit']})" if r["unit"] and r["unit"] not in ("fraction",) else ""
        base, new = fmt_number(r["center_base"]), fmt_number(r["center_new"])
        lines.append(f"{base:>12} | {change:>18} | {new:>12}"
                     f" | {r['metric']}{unit} [{cell_label(r)}, n {r['n_base']}/{r['n_new']}]")
    lines.append(f"* {(1 - comp.alpha) * 100:g}% Welch t interval excludes no change: ratio of "
                 "geometric means on logs (difference of means for shares and counts with "
                 "zeros); analysis/stats.py")
    lines += [f"note: {n}" for n in comp.notes]
    return "\n".join(lines) + "\n"
