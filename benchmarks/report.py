"""The report step's time: `write_report` (what `invoke run-matrix` ends with) on a run.

    python -m benchmarks.report RUN_DIR [--repeat 3]

Copies the run folder (without its analysis/) into a temporary directory under the
same name, and writes the report there `--repeat` times, each on a fresh copy. Prints
each run's wall seconds and CPU seconds (this process and the process beside it,
analysis/beside.py), their medians and the host's load average: the machine is
shared, so the figures come with the load they were measured under. It asserts
nothing about time. The import of the analysis package is timed once, apart
(run-matrix imports it when it starts, not at the report).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float  # user + system, this process and its finished children


def _cpu() -> float:
    own, kids = (resource.getrusage(resource.RUSAGE_SELF),
                 resource.getrusage(resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_report(run_dir: Path) -> Timing:
    """One report written on a fresh copy of `run_dir`."""
    from analysis import pipeline

    with tempfile.TemporaryDirectory(prefix="netbed-report-") as tmp:
        copy = Path(tmp) / run_dir.name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("analysis"))
        wall, cpu = time.perf_counter(), _cpu()
        pipeline.write_report(copy)
        return Timing(time.perf_counter() - wall, _cpu() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    start = time.perf_counter()
    import analysis.pipeline  # noqa: F401  (timed apart: run-matrix imports it first)

    print(f"import analysis.pipeline: {time.perf_counter() - start:.2f} s")
    runs = []
    for i in range(args.repeat):
        t = time_report(args.run_dir)
        runs.append(t)
        print(f"report {i + 1}: {t.wall:.2f} s wall, {t.cpu:.2f} CPU-s, "
              f"load {os.getloadavg()[0]:.2f}")
    print(f"median of {len(runs)}: {statistics.median(t.wall for t in runs):.2f} s wall, "
          f"{statistics.median(t.cpu for t in runs):.2f} CPU-s "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
