"""The receiver's measured window: one guest shell script, built here (pure).

Every number of a repetition must describe the same seconds, so everything the
receiver counts is read by this one script, at the window's two edges.
"""

from __future__ import annotations

from testbed.experiment.config import Experiment
from testbed.experiment.nicstate import reader_affinity_command
from testbed.formats import perfstat, procfs, reader

GUEST_DIR = "/tmp/netbed"
PERF_FILE = "perf-stat.csv"
SAMPLER_INTERVAL_S = 0.05  # 20 Hz: nbsample keeps it even when both vCPUs are busy
WINDOW_LEAD_S = 0.5  # connection ramp before the window opens
NETPERF_TAIL_S = 2  # netperf keeps sending this long after the window should close
READER_WAIT_S = 60


def window_script(exp: Experiment, pmu: bool, cachemodel: bool) -> str:
    """The receiver's measured-window script (pure).

    It waits until netserver's data process (the reader) exists, that is until
    netperf's test is running, lets the connection ramp for a moment, then takes
    /proc snapshots around `perf stat` and the reader sampler for exactly the
    window. netperf runs WINDOW_LEAD_S + duration + NETPERF_TAIL_S seconds, so the
    window lies inside the transfer whatever the SSH latency to the sender.
    `nbmark` brackets the window when the cache model runs.
    """
    d = GUEST_DIR
    events = perfstat.perf_events(pmu)
    perf = perfstat.perf_stat_command(exp.duration, events, output=f"{d}/{PERF_FILE}")
    sampler = reader.reader_sampler_command(exp.duration, SAMPLER_INTERVAL_S)
    polls = int(READER_WAIT_S / 0.1)
    lines = [
        f"rm -rf {d}/win && mkdir -p {d}/win",
        f"i=0; until {_reader_exists()}; do i=$((i + 1)); "
        f"if [ $i -gt {polls} ]; then echo 'no reader within {READER_WAIT_S} s' "
        f"> {d}/win/error; break; fi; sleep 0.1; done",
        f"sleep {WINDOW_LEAD_S:g}",
        f"{reader_affinity_command().strip()} > {d}/win/reader-affinity.txt 2>&1",
        procfs.proc_snapshot_command(f"{d}/win/proc-before"),
    ]
    if cachemodel:
        lines.append("nbmark begin 1")
    lines += [
        f"( {perf} ) 2> {d}/win/perf.err &",
        f"( {sampler} ) > {d}/win/reader-cpus.txt 2> {d}/win/sampler.err &",
        "wait",
    ]
    if cachemodel:
        lines.append("nbmark end 1")
    lines += [procfs.proc_snapshot_command(f"{d}/win/proc-after"),
              f"mv {d}/{PERF_FILE} {d}/win/{PERF_FILE} 2>/dev/null; touch {d}/win/finished"]
    return "\n".join(lines) + "\n"


def _reader_exists() -> str:
    return 'd=$(pgrep -o -x netserver) && pgrep -n -x -P "$d" netserver >/dev/null'
