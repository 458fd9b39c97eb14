"""How repeatable a run's numbers are: CV per cell and metric, drift, why cells stopped.

A comparison is only as good as the spread of its repetitions (#11). This module
computes, from the tidy table and the run folder only:

- the coefficient of variation (sample sd / |mean|) per cell and metric, over the
  repetitions that finished with a value, marked where it is above the goal
  (5% for rates and throughput; 2% for cache-model counts);
- drift: the first vs the last repetition of each cell, and a run-wide trend of
  values (each divided by its cell's mean) against the order repetitions finished
  in (Spearman's rho with its p-value), so a host that slowed down over the run
  shows up instead of being read as a policy effect;
- the adaptive stopping record (`stopping.json`), if the run had one, with the
  note on optional stopping.

The metric is a parameter; the default is `window.throughput` where the run has
it and netperf's `throughput` otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.collate import cell_label
from testbed.files import read_json
from testbed.formats import record
from testbed.run.folder import RunDir

DEFAULT_METRICS = ("window.throughput", "netperf.throughput", "throughput")
GOAL_CV = 0.05
GOAL_CV_MODEL = 0.02  # cache-model counts per window KB (deterministic model, #11)
STOPPING_FILE = record.STOPPING  # written by the run's adaptive loop


def default_metric(tidy: pd.DataFrame) -> str:
    """window.throughput where the run recorded it, else netperf's throughput."""
    have = set(tidy.loc[tidy["value"].notna(), "metric"].astype(str))
    for m in DEFAULT_METRICS:
        if m in have:
            return m
    return DEFAULT_METRICS[-1]


def goal_for(metric: str) -> float:
    """2% for the cache model's counts per unit of window work (`cache.*.per_kb`, ...;
    `cache.*` rows always come from the model), 5% for everything else."""
    return GOAL_CV_MODEL if metric.startswith("cache.") and ".per_" in metric else GOAL_CV


def _ok(tidy: pd.DataFrame, metrics: list[str] | None) -> pd.DataFrame:
    df = tidy[(tidy["cpu"].astype(str) == "all") & tidy["value"].notna()]
    if "status" in df.columns:
        df = df[df["status"] == "ok"]
    if metrics is not None:
        df = df[df["metric"].isin(metrics)]
    return df[np.isfinite(df["value"].astype(float))]


def cv_table(tidy: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per cell and metric: n, mean, sd, cv, goal, above_goal (cv is NaN below n=2)."""
    df = _ok(tidy, metrics)
    rows = []
    for (cell_id, metric), g in df.groupby(["cell_id", "metric"], sort=True, observed=True):
        v = g["value"].astype(float).to_numpy()
        mean = float(v.mean()) if len(v) else math.nan
        sd = float(v.std(ddof=1)) if len(v) >= 2 else math.nan
        cv = sd / abs(mean) if len(v) >= 2 and mean != 0 else math.nan
        goal = goal_for(str(metric))
        rows.append({"cell_id": cell_id, "cell": cell_label(g.iloc[0]), "metric": metric,
                     "n": len(v), "mean": mean, "sd": sd, "cv": cv, "goal": goal,
                     "above_goal": bool(cv > goal) if not math.isnan(cv) else False})
    return pd.DataFrame(rows, columns=["cell_id", "cell", "metric", "n", "mean", "sd", "cv",
                                       "goal", "above_goal"])


# the reader sleeping and woken: batch size. From /proc (nbsnap reads it in the units'
# line), so it exists in cache-model windows too, which perf is kept out of; it
# counts what perf's context-switches do (0-5% fewer: perf's window was wider).
BATCHING = "stat.ctxt.per_kb"


def explained_spread(tidy: pd.DataFrame, metrics: list[str], by: str = BATCHING
                     ) -> pd.DataFrame:
    """How much of each cell's spread in `metrics` goes with `by`, a measure of the same
    windows: a least-squares line per cell, its R^2 and the CV of what is left.

    A diagnostic of what limits repeatability, never a correction (no value is
    adjusted). Measured under TCG: the model's instructions per KB rise and fall with
    context switches per KB, i.e. with how much data each wake-up of the reader finds,
    which the pace of sender and receiver sets and the host does not hold steady. The
    line's two parameters need n >= 4 for a residual with any meaning."""
    df = _ok(tidy, [*metrics, by])
    cols = ["cell_id", "metric", "by", "n", "cv", "r2", "residual_cv"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    wide = df.pivot_table(index=["cell_id", "repetition"], columns="metric", values="value",
                          observed=True)
    rows = []
    for cell_id, w in wide.groupby(level=0, sort=True):
        for metric in metrics:
            if metric not in w.columns or by not in w.columns or not w[by].notna().any():
                continue
            v = w[[by, metric]].dropna().astype(float)
            n, mean = len(v), float(v[metric].mean()) if len(v) else math.nan
            cv = float(v[metric].std(ddof=1)) / abs(mean) if n >= 2 and mean else math.nan
            r2 = residual = math.nan
            if n >= 4 and v[by].nunique() >= 2 and v[metric].nunique() >= 2 and mean:
                slope, intercept = np.polyfit(v[by], v[metric], 1)
                res = v[metric] - (intercept + slope * v[by])
                ss = float(((v[metric] - mean) ** 2).sum())
                r2 = 1 - float((res ** 2).sum()) / ss
                residual = math.sqrt(float((res ** 2).sum()) / (n - 2)) / abs(mean)
            rows.append({"cell_id": cell_id, "metric": metric, "by": by, "n": n, "cv": cv,
                         "r2": r2, "residual_cv": residual})
    return pd.DataFrame(rows, columns=cols)


def finish_order(run_dir: Path) -> pd.DataFrame:
    """When each finished repetition finished (its `done` record), and its rank in the run."""
    rows = []
    for rep in RunDir(run_dir).reps():
        if not rep.is_complete:
            continue
        try:
            finished = read_json(rep.file(record.DONE)).get("finished")
        except (OSError, ValueError):
            finished = None
        when = pd.to_datetime(finished, utc=True, errors="coerce") if finished else pd.NaT
        if pd.isna(when):
            when = pd.to_datetime(rep.file(record.DONE).stat().st_mtime, unit="s", utc=True)
        rows.append({"cell_id": rep.cell_id, "repetition": rep.repetition, "finished": when})
    df = pd.DataFrame(rows, columns=["cell_id", "repetition", "finished"])
    df = df.sort_values(["finished", "cell_id", "repetition"]).reset_index(drop=True)
    df["order"] = range(len(df))
    return df


def drift_table(tidy: pd.DataFrame, metric: str) -> pd.DataFrame:
    """First vs last repetition of each cell: values and (last - first) / cell mean."""
    df = _ok(tidy, [metric])
    rows = []
    for cell_id, g in df.groupby("cell_id", sort=True, observed=True):
        g = g.sort_values("repetition")
        mean = float(g["value"].mean())
        first, last = g.iloc[0], g.iloc[-1]
        change = (float(last["value"]) - float(first["value"])) / mean \
            if len(g) >= 2 and mean else math.nan
        rows.append({"cell_id": cell_id, "cell": cell_label(first), "metric": metric,
                     "n": len(g), "first_rep": int(first["repetition"]),
                     "first": float(first["value"]), "last_rep": int(last["repetition"]),
                     "last": float(last["value"]), "last_vs_first": change})
    return pd.DataFrame(rows, columns=["cell_id", "cell", "metric", "n", "first_rep", "first",
                                       "last_rep", "last", "last_vs_first"])


def normalised_series(tidy: pd.DataFrame, metric: str, order: pd.DataFrame) -> pd.DataFrame:
    """Each finished repetition's value / its cell's mean, with its place in run order."""
    df = _ok(tidy, [metric])[["cell_id", "repetition", "value", *_label_cols(tidy)]].copy()
    if df.empty or order.empty:
        return pd.DataFrame(columns=["cell_id", "repetition", "value", "relative", "order"])
    df["repetition"] = df["repetition"].astype(int)
    df["relative"] = df["value"] / df.groupby("cell_id", observed=True)["value"].transform("mean")
    merged = df.merge(order, on=["cell_id", "repetition"], how="inner")
    return merged.sort_values("order").reset_index(drop=True)


def _label_cols(tidy: pd.DataFrame) -> list[str]:
    from testbed.vocabulary import TABLE_AXES

    return [a for a in TABLE_AXES if a in tidy.columns]


def drift_trend(series: pd.DataFrame) -> dict[str, Any]:
    """Run-wide drift: Spearman rho (and p) of relative value vs run order, and the
    least-squares change of the relative value from the first to the last repetition."""
    from scipy import stats

    n = len(series)
    if n < 3 or series["relative"].nunique() < 2:
        return {"n": n, "rho": math.nan, "p": math.nan, "change_over_run": math.nan}
    rho, p = stats.spearmanr(series["order"], series["relative"])
    slope = float(np.polyfit(series["order"].astype(float), series["relative"], 1)[0])
    return {"n": n, "rho": float(rho), "p": float(p), "change_over_run": slope * (n - 1)}


def stopping_record(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STOPPING_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    return data if isinstance(data, dict) else None


def stopping_text(record: dict[str, Any] | None) -> str:
    """Says whether stopping was adaptive, why each cell stopped, and what that means."""
    if not record:
        return "Repetitions were fixed in number (no adaptive stopping)."
    cells = record.get("cells") or {}
    reached = sorted(c for c, v in cells.items() if v.get("reason") == "max-reached")
    within = sorted(c for c, v in cells.items() if v.get("reason") == "within-target")
    lines = [f"Adaptive repetitions: min {record.get('min')}, max {record.get('max')}, target CV "
             f"{100 * float(record.get('target_cv') or 0):.1f}% of "
             f"{record.get('metric') or 'window.throughput/throughput'}.",
             f"{len(within)} cell(s) stopped within target, {len(reached)} reached max above "
             "target" + (": " + ", ".join(reached) if reached else "") + ".",
             str(record.get("note", ""))]
    return " ".join(x for x in lines if x)


def stopping_table(record: dict[str, Any] | None) -> pd.DataFrame:
    if not record:
        return pd.DataFrame()
    rows = [{"cell_id": c, "repetitions": v.get("repetitions"), "with value": v.get("values"),
             "cv": percent(v.get("cv")), "stopped": v.get("reason") or "(not stopped)",
             "metric": v.get("metric")} for c, v in sorted((record.get("cells") or {}).items())]
    return pd.DataFrame(rows)


def percent(v: object) -> str:
    """A share as '12.3%', or 'n/a' where there is no finite value (never 0)."""
    return f"{100 * float(v):.1f}%" if isinstance(v, int | float) and math.isfinite(v) else "n/a"


def with_cv(keys: pd.DataFrame, tidy: pd.DataFrame) -> pd.DataFrame:
    """The report's key table with each cell's CV appended, marked where above goal."""
    if keys.empty:
        return keys
    cvs = cv_table(tidy, [str(m) for m in keys.columns])
    lookup = {(r.cell, r.metric): r for r in cvs.itertuples()}
    out = keys.copy()
    for metric in out.columns:
        for cell in out.index:
            r = lookup.get((cell, metric))
            text = out.at[cell, metric]
            if r is None or not isinstance(text, str):
                continue
            mark = f" CV {percent(r.cv)}" + (f" > {100 * r.goal:.0f}% !" if r.above_goal else "")
            out.at[cell, metric] = text + mark
    return out


def plot_drift(series: pd.DataFrame, metric: str, out_dir: Path) -> Path | None:
    """Each repetition's value / its cell's mean against run order, one line per cell."""
    if series.empty:
        return None
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    for _, g in series.groupby("cell_id", sort=True, observed=True):
        ax.plot(g["order"], g["relative"], marker="o", ms=3, lw=0.8,
                label=cell_label(g.iloc[0]) if len(series["cell_id"].unique()) <= 12
                else None)
    ax.axhline(1.0, color="#888", lw=0.8)
    for band in (1 - GOAL_CV, 1 + GOAL_CV):
        ax.axhline(band, color="#bbb", lw=0.6, ls="--")
    ax.set_xlabel("repetition, in the order the run finished them")
    ax.set_ylabel(f"{metric} / cell mean")
    ax.set_title(f"Drift: {metric} over the run (dashed: +-{100 * GOAL_CV:.0f}%)")
    if len(series["cell_id"].unique()) <= 12:
        ax.legend(fontsize=7, loc="best")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "drift.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def report_parts(run_dir: Path, tidy: pd.DataFrame, out_dir: Path, metric: str | None = None
                 ) -> tuple[list[tuple[str, str, Any]], list[Path]]:
    """Report sections (title, kind, payload) and figures for repeatability."""
    m = metric or default_metric(tidy)
    series = normalised_series(tidy, m, finish_order(run_dir))
    trend = drift_trend(series)
    cvs = cv_table(tidy, [m])
    text = (f"CV of {m} per cell ({len(cvs)} cells; goal {100 * goal_for(m):.0f}%; "
            f"{int(cvs['above_goal'].sum())} above goal). Run-wide drift over {trend['n']} "
            f"repetitions: Spearman rho {trend['rho']:.2f} (p {trend['p']:.2g}), fitted change "
            f"first->last {percent(trend['change_over_run'])} of the cell mean.")
    drift = drift_table(tidy, m)
    drift["last_vs_first"] = drift["last_vs_first"].map(percent)
    record = stopping_record(run_dir)
    sections: list[tuple[str, str, Any]] = [
        ("Repeatability", "text", text),
        ("Repeatability: CV per cell", "table", _shown_cv(cvs)),
        ("Repeatability: drift (first vs last repetition)", "table",
         drift.drop(columns=["cell_id"])),
        ("Repeatability: stopping", "text", stopping_text(record))]
    if record:
        sections.append(("Repeatability: why each cell stopped", "table", stopping_table(record)))
    plot = plot_drift(series, m, out_dir)
    return sections, [plot] if plot else []


def _shown_cv(cvs: pd.DataFrame) -> pd.DataFrame:
    out = cvs.drop(columns=["cell_id"]).copy()
    out["mean"] = out["mean"].map(lambda v: f"{v:.4g}")
    out["sd"] = out["sd"].map(lambda v: f"{v:.3g}")
    out["cv"] = out["cv"].map(percent)
    out["goal"] = out["goal"].map(percent)
    out["above_goal"] = out["above_goal"].map(lambda b: "ABOVE GOAL" if b else "")
    return out


def insert_after_key_table(sections: list[tuple[str, str, Any]],
                           extra: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """`extra` right after the key table (or at the end if there is none)."""
    for i, (_, kind, _) in enumerate(sections):
        if kind == "table-index":
            return [*sections[:i + 1], *extra, *sections[i + 1:]]
    return [*sections, *extra]
