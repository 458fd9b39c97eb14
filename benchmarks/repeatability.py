"""Repeatability under TCG (#11): CV per cell and metric, per host placement, with the load.

    python -m benchmarks.repeatability --placement shared
    python -m benchmarks.repeatability --placement disjoint

Each matrix runs through the runner, which holds netbed's host lock
(testbed.run.hostlock): it waits for another measuring run on this host, and no
other run starts while it measures.

For each placement it runs a small matrix (e1000 and virtio, default policy or
those given, TCP_STREAM, N repetitions of each cell, back to back) through the real runner
into a run folder, then prints each cell's CV of the metrics its repetitions
recorded (netperf's throughput; window.throughput where the run records it),
with the host's load average and host CPU busy share over the run: the machine
is shared, so every figure comes with the load it was measured under. With the
counters on `auto` under TCG the run has instrumented repetitions (cache model)
and `--plain` plugin-less ones; the run is then collated and the CVs are printed
per kind: window throughput of each kind, and the cache model's counts per window
KB of the instrumented ones. `--icount shift=auto` runs the guests under QEMU's
-icount (the `tcg_icount` setting) to measure that lever.

Goal (printed, never asserted): CV <= 5% for window throughput, <= 2% for the
cache model's counts per window KB, on a 2-core host.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from analysis.collate import collate_run
from analysis.repeatability import BATCHING, cv_table, explained_spread, percent
from testbed.files import read_json
from testbed.run.adaptive import cv
from testbed.run.folder import RunDir
from testbed.run.local import run_matrix
from testbed.settings import Settings

GOAL_CV = 0.05
METRICS = ("window.throughput", "netperf.throughput", "throughput")

EXPERIMENT = """\
name: repeatability-{placement}
axes:
  kernel: [{kernel}]
  nic: [{nics}]
  cpus: [2]
  policy: [{policies}]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: {repetitions}
plain_repetitions: {plain}
duration: {duration}
warmup: {warmup}
order: sequential
retries: 1
"""


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the host from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def values_of(run_dir: Path) -> dict[tuple[str, str], list[float]]:
    """(cell, metric) -> the values its finished repetitions recorded, in repetition order."""
    out: dict[tuple[str, str], list[float]] = {}
    reps = sorted(RunDir(run_dir).reps(), key=lambda r: (r.cell_id, r.repetition))
    for rep in reps:
        if not rep.is_done:
            continue
        info = read_json(rep.file("done"))
        # a run under the cache model has two kinds of repetition: keep them apart
        plugin = info.get("plugin")
        kind = "" if not isinstance(plugin, bool) else (" (model)" if plugin else " (plain)")
        for metric in METRICS:
            v = info.get(metric)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.setdefault((rep.cell_id, metric + kind), []).append(float(v))
    return out


@dataclass
class Result:
    placement: str
    run: str
    seconds: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    host_busy: float
    placement_record: object
    values: dict[tuple[str, str], list[float]]
    by_kind: list[dict[str, object]]  # (cell, kind, metric, n, mean, cv) from the tidy table
    limits: list[dict[str, object]]  # (cell, kind, metric, by, n, cv, r2, residual_cv)


KIND_METRICS = {
    "plain": ("window.throughput", "netperf.throughput"),
    "instrumented": ("window.throughput", "cache.instructions.per_kb", "cache.loads.per_kb",
                     "cache.l1d_misses.per_kb", "cache.l2_misses.per_kb",
                     "cache.llc_misses.per_kb", "cache.c2c_transfers.per_kb",
                     "cache.device_writes.per_kb"),
}


# what a spread may go with: (kind, metrics, measure of the same windows)
LIMIT_CHECKS = (
    ("instrumented", ("cache.instructions.per_kb", "cache.loads.per_kb",
                      "cache.l1d_misses.per_kb", "cache.l2_misses.per_kb"), BATCHING),
    ("plain", ("window.throughput",), BATCHING),
    ("plain", ("window.throughput",), "locality.processing_on_reader_cpu"),
)


def _with_kind(tidy: pd.DataFrame) -> pd.DataFrame:
    kinds = tidy[tidy["metric"] == "rep.instrumented"][["cell_id", "repetition", "value"]]
    kinds = kinds.assign(kind=kinds["value"].map(lambda v: "instrumented" if v else "plain"))
    return tidy.merge(kinds[["cell_id", "repetition", "kind"]], on=["cell_id", "repetition"])


def limits_by_kind(tidy: pd.DataFrame) -> list[dict[str, object]]:
    """What each cell's spread goes with, per kind of repetition (pure): the share of
    the variance a line on batching (context switches per KB) or on co-location
    explains, and the CV left (analysis.repeatability.explained_spread)."""
    df = _with_kind(tidy)
    rows: list[dict[str, object]] = []
    for kind, metrics, by in LIMIT_CHECKS:
        for _, row in explained_spread(df[df["kind"] == kind], list(metrics), by).iterrows():
            rows.append({"cell": row["cell_id"], "kind": kind, **{
                k: row[k] for k in ("metric", "by", "n", "cv", "r2", "residual_cv")}})
    return rows


def cv_by_kind(tidy: pd.DataFrame) -> list[dict[str, object]]:
    """CV per cell, kind of repetition (instrumented or plain) and metric (pure)."""
    df = _with_kind(tidy)
    rows: list[dict[str, object]] = []
    for kind, metrics in KIND_METRICS.items():
        sub = df[df["kind"] == kind]
        for _, row in cv_table(sub, list(metrics)).iterrows():
            rows.append({"cell": row["cell_id"], "kind": kind, "metric": row["metric"],
                         "n": int(row["n"]), "mean": float(row["mean"]),
                         "cv": float(row["cv"]), "goal": float(row["goal"])})
    return rows


def run(settings: Settings, placement: str, nics: list[str], repetitions: int,
        duration: int, warmup: int, *, kernel: str = "distro", plain: int = 0,
        icount: str = "", sender: str = "netns", policies: tuple[str, ...] = ("default",)
        ) -> Result:
    s = replace(settings, host_placement=placement, tcg_icount=icount, sender=sender)
    with tempfile.TemporaryDirectory(prefix="netbed-repeat-") as tmp:
        config = Path(tmp) / "experiment.yaml"
        config.write_text(EXPERIMENT.format(placement=placement, nics=", ".join(nics),
                                            repetitions=repetitions, duration=duration,
                                            warmup=warmup, kernel=kernel, plain=plain,
                                            policies=", ".join(policies)))
        load_before = os.getloadavg()
        busy0, total0 = cpu_busy()
        started = time.monotonic()
        summary = run_matrix(s, config, log=lambda m: print(f"  {m}", flush=True))
        busy1, total1 = cpu_busy()
    versions = read_json(RunDir(summary.run_dir).versions_file)
    return Result(placement + f", sender {sender}" + (f", icount {icount}" if icount else ""),
                  str(summary.run_dir),
                  time.monotonic() - started, load_before,
                  os.getloadavg(), (busy1 - busy0) / max(1, total1 - total0),
                  versions.get("placement"), values_of(summary.run_dir),
                  cv_by_kind(tidy := collate_run(summary.run_dir)), limits_by_kind(tidy))


def report(result: Result) -> str:
    lb, la, values = result.load_before, result.load_after, result.values
    lines = [f"placement {result.placement}: run {result.run} ({result.seconds:.0f} s); "
             f"host load avg 1 min {lb[0]:.2f} -> {la[0]:.2f}, "
             f"host CPU busy over the run {100 * result.host_busy:.0f}%"]
    rec = result.placement_record
    if isinstance(rec, dict):
        lines.append(f"  as read back: {rec.get('note')}")
    lines.append(f"  {'cell':<52} {'metric':<26} {'n':>2} {'mean':>9} {'CV':>7}  goal <= 5%")
    for (cell, metric), vs in sorted(values.items()):
        c = cv(vs)
        mark = "" if c is None else ("met" if c <= GOAL_CV else "NOT met")
        lines.append(f"  {cell:<52} {metric:<26} {len(vs):>2} {statistics.fmean(vs):>9.1f} "
                     f"{'n/a' if c is None else f'{100 * c:.1f}%':>7}  {mark}   "
                     f"values: {', '.join(f'{v:.0f}' for v in vs)}")
    if result.by_kind:
        lines.append("  by kind of repetition (tidy table; goal 5%, cache.*.per_kb 2%):")
        lines.append(f"  {'cell':<52} {'kind':<12} {'metric':<28} {'n':>2} {'mean':>11} "
                     f"{'CV':>7}")
        for r in result.by_kind:
            c = float(str(r["cv"]))
            verdict = "" if math.isnan(c) else ("met" if c <= float(str(r["goal"]))
                                                else "NOT met")
            lines.append(f"  {r['cell']!s:<52} {r['kind']!s:<12} {r['metric']!s:<28} "
                         f"{r['n']!s:>2} {float(str(r['mean'])):>11.4g} "
                         f"{percent(c):>7}  {verdict}")
    if result.limits:
        lines.append("  what the spread goes with (a line per cell on a measure of the same "
                     "windows; R^2, and the CV left: a diagnostic, nothing is adjusted):")
        for r in result.limits:
            c, r2, left = (float(str(r[k])) for k in ("cv", "r2", "residual_cv"))
            lines.append(f"  {r['cell']!s:<52} {r['kind']!s:<12} {r['metric']!s:<26} "
                         f"on {r['by']!s:<34} n {r['n']!s:>2}  CV {percent(c)} -> {percent(left)} "
                         f"(R^2 {'n/a' if math.isnan(r2) else f'{r2:.2f}'})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--placement", action="append", choices=("shared", "disjoint"),
                   help="host placement(s) to measure (default: both)")
    p.add_argument("--nics", default="e1000,virtio", help="comma-separated NIC models")
    p.add_argument("--repetitions", type=int, default=5, help="repetitions per cell")
    p.add_argument("--duration", type=int, default=10, help="measured seconds per repetition")
    p.add_argument("--warmup", type=int, default=2, help="seconds before measuring")
    p.add_argument("--kernel", default="distro", help="guest kernel (distro, stock, patched)")
    p.add_argument("--plain", type=int, default=0,
                   help="plain (plugin-less) repetitions per cell when the cache model counts")
    p.add_argument("--icount", default="", help="QEMU -icount for the guests, e.g. shift=auto")
    p.add_argument("--sender", action="append", choices=("guest", "netns"),
                   help="what sends the traffic (default: the `sender` setting; give both "
                        "to compare)")
    p.add_argument("--policy", action="append",
                   help="policies of configs/policies.yaml, one cell each (default: "
                        "default, where the guest's scheduler places the reader, so the "
                        "cell's own outcome varies; pin-cross fixes where it runs)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    results = []
    for placement in a.placement or ["shared", "disjoint"]:
        for sender in a.sender or [Settings().sender]:
            print(f"== placement {placement}, sender {sender}", flush=True)
            res = run(Settings(), placement, a.nics.split(","), a.repetitions, a.duration,
                      a.warmup, kernel=a.kernel, plain=a.plain, icount=a.icount, sender=sender,
                      policies=tuple(a.policy or ["default"]))
            results.append(res)
            print(report(res), flush=True)
    if a.json:
        a.json.write_text(json.dumps([{**asdict(r), "values": {
            f"{c}|{m}": v for (c, m), v in r.values.items()}} for r in results],
            indent=1, default=str))


if __name__ == "__main__":
    main()
