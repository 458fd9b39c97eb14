"""Repeatability under TCG (#11): CV per cell and metric, per host placement, with the load.

    flock /tmp/netbed-guests.lock python -m benchmarks.repeatability --placement shared
    flock /tmp/netbed-guests.lock python -m benchmarks.repeatability --placement disjoint

For each placement it runs a small matrix (e1000 and virtio, default policy,
TCP_STREAM, N repetitions of each cell, back to back) through the real runner
into a run folder, then prints each cell's CV of the metrics its repetitions
recorded (netperf's throughput; window.throughput where the run records it),
with the host's load average and host CPU busy share over the run: the machine
is shared, so every figure comes with the load it was measured under.

Goal (printed, never asserted): CV <= 5% for window throughput on a 2-core host.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
  kernel: [distro]
  nic: [{nics}]
  cpus: [2]
  policy: [default]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: {repetitions}
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
        for metric in METRICS:
            v = info.get(metric)
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.setdefault((rep.cell_id, metric), []).append(float(v))
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


def run(settings: Settings, placement: str, nics: list[str], repetitions: int,
        duration: int, warmup: int) -> Result:
    s = replace(settings, host_placement=placement)
    with tempfile.TemporaryDirectory(prefix="netbed-repeat-") as tmp:
        config = Path(tmp) / "experiment.yaml"
        config.write_text(EXPERIMENT.format(placement=placement, nics=", ".join(nics),
                                            repetitions=repetitions, duration=duration,
                                            warmup=warmup))
        load_before = os.getloadavg()
        busy0, total0 = cpu_busy()
        started = time.monotonic()
        summary = run_matrix(s, config, log=lambda m: print(f"  {m}", flush=True))
        busy1, total1 = cpu_busy()
    versions = read_json(RunDir(summary.run_dir).versions_file)
    return Result(placement, str(summary.run_dir), time.monotonic() - started, load_before,
                  os.getloadavg(), (busy1 - busy0) / max(1, total1 - total0),
                  versions.get("placement"), values_of(summary.run_dir))


def report(result: Result) -> str:
    lb, la, values = result.load_before, result.load_after, result.values
    lines = [f"placement {result.placement}: run {result.run} ({result.seconds:.0f} s); "
             f"host load avg 1 min {lb[0]:.2f} -> {la[0]:.2f}, "
             f"host CPU busy over the run {100 * result.host_busy:.0f}%"]
    rec = result.placement_record
    if isinstance(rec, dict):
        lines.append(f"  as read back: {rec.get('note')}")
    lines.append(f"  {'cell':<52} {'metric':<18} {'n':>2} {'mean':>9} {'CV':>7}  goal <= 5%")
    for (cell, metric), vs in sorted(values.items()):
        c = cv(vs)
        mark = "" if c is None else ("met" if c <= GOAL_CV else "NOT met")
        lines.append(f"  {cell:<52} {metric:<18} {len(vs):>2} {statistics.fmean(vs):>9.1f} "
                     f"{'n/a' if c is None else f'{100 * c:.1f}%':>7}  {mark}   "
                     f"values: {', '.join(f'{v:.0f}' for v in vs)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--placement", action="append", choices=("shared", "disjoint"),
                   help="host placement(s) to measure (default: both)")
    p.add_argument("--nics", default="e1000,virtio", help="comma-separated NIC models")
    p.add_argument("--repetitions", type=int, default=5, help="repetitions per cell")
    p.add_argument("--duration", type=int, default=10, help="measured seconds per repetition")
    p.add_argument("--warmup", type=int, default=2, help="seconds before measuring")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()
    results = []
    for placement in a.placement or ["shared", "disjoint"]:
        print(f"== placement {placement}", flush=True)
        res = run(Settings(), placement, a.nics.split(","), a.repetitions, a.duration, a.warmup)
        results.append(res)
        print(report(res), flush=True)
    if a.json:
        a.json.write_text(json.dumps([{**asdict(r), "values": {
            f"{c}|{m}": v for (c, m), v in r.values.items()}} for r in results],
            indent=1, default=str))


if __name__ == "__main__":
    main()
