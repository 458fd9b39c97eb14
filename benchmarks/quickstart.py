"""Benchmark: a fresh clone's README commands, timed, with the breakdown of where it went.

    python -m benchmarks.quickstart [--config FILE] [--keep] [--workdir DIR]
    python -m benchmarks.quickstart --parse DIR      # the breakdown of an earlier run

Clones this checkout's HEAD into a temporary directory and runs the README's commands
there, as a newcomer would: `pip install -e ".[dev]"` (into a venv that sees the
system's site-packages, so the shared environment keeps pointing at its own checkout)
and `invoke run-matrix` (configs/quick.yaml, or `--config`), with a cache directory of
its own (`INVOKE_NETBED_CACHE_DIR`): cold kernel builds with an empty ccache, the image,
the plugin, the KVM probe. Every output line is stamped with the seconds since the start
(`quickstart.log`); the run folder's `timings.json` (testbed.timings) says what each
build, the probe, each boot and each repetition took. The breakdown and the README's
timing line are printed from those two files, so they are regenerated, not retyped.

It needs the whole machine for as long as the run takes (quick.yaml: about 16 min on
2 cores): run it on a quiet host, under the host's lock if others share it. It prints
figures and asserts nothing about time; the 1-min load average is sampled throughout and
printed with them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from testbed.settings import REPO_ROOT
from testbed.timings import TIMINGS_FILE, Step, load_steps

LOG_NAME = "quickstart.log"
LOAD_EVERY_S = 10.0
# A stamped line: seconds since the start, the source (bench, pip, run, load), the text.
_LINE = re.compile(r"^\s*(\d+\.\d+) (\w+) ?(.*)$")


@dataclass(frozen=True)
class Line:
    t: float
    source: str
    text: str


def stamp(t: float, source: str, text: str) -> str:
    """One line of quickstart.log (pure)."""
    return f"{t:10.3f} {source} {text}"


def parse_log(text: str) -> list[Line]:
    """quickstart.log back into lines (pure); lines that are not stamped are skipped."""
    out = []
    for raw in text.splitlines():
        if m := _LINE.match(raw):
            out.append(Line(float(m.group(1)), m.group(2), m.group(3)))
    return out


@dataclass(frozen=True)
class Command:
    """One README command as it ran: its span on the benchmark's clock and exit status."""

    name: str
    start: float
    end: float
    status: int | None  # None: it never ended (the log stops inside it)

    @property
    def seconds(self) -> float:
        return self.end - self.start


def commands(lines: Sequence[Line]) -> list[Command]:
    """The commands of the log, from its `bench start NAME` / `bench end NAME rc=N` lines."""
    starts: dict[str, float] = {}
    out: list[Command] = []
    for line in lines:
        if line.source != "bench":
            continue
        if m := re.fullmatch(r"start (\S+)", line.text):
            starts[m.group(1)] = line.t
        elif (m := re.fullmatch(r"end (\S+) rc=(-?\d+)", line.text)) and m.group(1) in starts:
            out.append(Command(m.group(1), starts.pop(m.group(1)), line.t, int(m.group(2))))
    last = lines[-1].t if lines else 0.0
    out += [Command(name, t, last, None) for name, t in starts.items()]
    return sorted(out, key=lambda c: c.start)


@dataclass(frozen=True)
class Row:
    """One line of the breakdown: a step (or group of steps) and its wall time."""

    label: str
    seconds: float
    note: str = ""
    beside: str = ""  # ran beside this step (its time is inside that step's: not added)


@dataclass
class Breakdown:
    total: float
    rows: list[Row] = field(default_factory=list)
    load: tuple[float, float] | None = None  # min, max of the 1-min load average
    failed: list[str] = field(default_factory=list)  # commands that did not succeed
    readme: str = ""


def _spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    return (f"{min(values):.1f}-{max(values):.1f} s each, median "
            f"{statistics.median(values):.1f} s")


def _minutes(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def step_rows(steps: Sequence[Step]) -> list[Row]:
    """Rows from a run's timings.json (pure): each build on its own, the probe, then boots,
    instrumented and plain repetitions as groups. A build that took no time (cached) is
    left out: it did not cost the run anything. The probe is always shown, with its
    verdict's source."""
    rows: list[Row] = []
    for s in steps:
        if s.kind == "probe" or (s.kind in ("build", "packages") and s.seconds >= 0.5):
            label = {"probe": "KVM probe", "packages": "host packages"}.get(s.kind, s.name)
            note = s.detail if s.ok else f"{s.detail} FAILED".strip()
            if s.beside:
                note = f"beside the {s.beside}, not added; {note}".rstrip("; ")
            rows.append(Row(label, s.seconds, note, s.beside))
    for kind, label in (("boot", "boots"), ("repetition", "instrumented repetitions"),
                        ("plain", "plain repetitions")):
        spans = [s.seconds for s in steps if s.kind == kind]
        if spans:
            failed = sum(not s.ok for s in steps if s.kind == kind)
            note = _spread(spans) + (f"; {failed} failed attempts" if failed else "")
            rows.append(Row(f"{label} ({len(spans)})", sum(spans), note))
    return rows


def report_seconds(lines: Sequence[Line], run: Command) -> float | None:
    """The analysis and report at the end of `invoke run-matrix`: from the run's summary
    (its `run: <folder>` line, printed when the last repetition is done) to the end."""
    summary = next((ln.t for ln in lines if ln.source == "run" and ln.text.startswith("run: ")
                    and run.start <= ln.t <= run.end), None)
    return None if summary is None else run.end - summary


def load_range(lines: Sequence[Line]) -> tuple[float, float] | None:
    values = [float(ln.text) for ln in lines if ln.source == "load"]
    return (min(values), max(values)) if values else None


def breakdown(lines: Sequence[Line], steps: Sequence[Step]) -> Breakdown:
    """Where the time went, from the stamped log and the run's timings.json (pure)."""
    cmds = commands(lines)
    total = (max(c.end for c in cmds) - min(c.start for c in cmds)) if cmds else 0.0
    out = Breakdown(total, load=load_range(lines),
                    failed=[c.name for c in cmds if c.status != 0])
    run = next((c for c in cmds if c.name == "run-matrix"), None)
    for c in cmds:
        if c.name != "run-matrix":
            out.rows.append(Row(c.name, c.seconds))
    if run is not None:
        inner = step_rows(steps)
        report = report_seconds(lines, run)
        if report is not None:
            inner.append(Row("report", report))
        accounted = sum(r.seconds for r in inner if not r.beside)
        inner.append(Row("other", run.seconds - accounted,
                         "start-up, host facts, guest shutdowns: in no step"))
        out.rows.append(Row("run-matrix", run.seconds))
        out.rows += [Row(f"  {r.label}", r.seconds, r.note, r.beside) for r in inner]
    out.readme = readme_line(out)
    return out


def readme_line(b: Breakdown) -> str:
    """The README's one timing line (pure)."""
    parts = [f"{r.label.strip()} {_minutes(r.seconds)}"
             + (f" (beside the {r.beside})" if r.beside else "") for r in b.rows
             if r.label != "run-matrix" and r.label.strip() != "other"]
    load = f", load {b.load[0]:.1f}-{b.load[1]:.1f}" if b.load else ""
    return (f"Fresh clone to report: {b.total / 60:.1f} min ({b.total:.0f} s) on "
            f"{os.cpu_count()} cores{load}: " + ", ".join(parts) + ".")


def format_breakdown(b: Breakdown) -> str:
    width = max((len(r.label) for r in b.rows), default=10) + 2
    lines = [f"{'step':<{width}} {'seconds':>8}  note"]
    lines += [f"{r.label:<{width}} {r.seconds:8.1f}  {r.note}".rstrip() for r in b.rows]
    lines.append(f"{'total (clone to report)':<{width}} {b.total:8.1f}")
    if b.load:
        lines.append(f"1-min load average during the run: {b.load[0]:.1f}-{b.load[1]:.1f}")
    if b.failed:
        lines.append(f"NOT a clean run: {', '.join(b.failed)} did not succeed")
    lines.append(f"README: {b.readme}")
    return "\n".join(lines)


# ---------------------------------------------------------------- effects


class StampedLog:
    """quickstart.log: every line of every command, stamped on arrival (thread-safe)."""

    def __init__(self, path: Path, echo: IO[str] = sys.stdout) -> None:
        self.path, self.echo = path, echo
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.file = path.open("a")

    def write(self, source: str, text: str) -> None:
        line = stamp(time.monotonic() - self.t0, source, text)
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            print(line, file=self.echo, flush=True)

    def close(self) -> None:
        self.file.close()


def run_stamped(log: StampedLog, name: str, argv: Sequence[str], cwd: Path,
                env: dict[str, str], source: str) -> int:
    """Run `argv`, its output (stdout and stderr, merged) stamped line by line."""
    log.write("bench", f"start {name}")
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        log.write(source, raw.rstrip("\n"))
    rc = proc.wait()
    log.write("bench", f"end {name} rc={rc}")
    return rc


def sample_load(log: StampedLog, stop: threading.Event) -> None:
    while not stop.wait(LOAD_EVERY_S):
        log.write("load", f"{os.getloadavg()[0]:.2f}")


def newest_run(results: Path) -> Path | None:
    runs = sorted(p for p in results.glob("*") if (p / "cells.json").is_file())
    return runs[-1] if runs else None


def fresh_clone(work: Path, log: StampedLog) -> Path:
    clone = work / "netbed"
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout
    log.write("bench", f"clone {REPO_ROOT} at {head}"
                       + (" (uncommitted changes are not in the clone)" if dirty else ""))
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO_ROOT), str(clone)],
                   check=True)
    return clone


def run_benchmark(work: Path, config: Path | None) -> Path:
    """The README's commands in a fresh clone under `work`; returns the log's path."""
    log = StampedLog(work / LOG_NAME)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_load, args=(log, stop), daemon=True)
    sampler.start()
    try:
        clone = fresh_clone(work, log)
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "INVOKE_NETBED_CACHE_DIR": str(work / "cache"),
               "INVOKE_NETBED_RESULTS_DIR": str(clone / "results"),
               "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("PYTHONPATH", None)  # the clone's own code, as a newcomer would run it
        log.write("load", f"{os.getloadavg()[0]:.2f}")
        rc = run_stamped(log, "pip", [str(venv / "bin/pip"), "install", "-q", "-e",
                                      ".[dev]"], clone, env, "pip")
        if rc == 0:
            # the venv's python: invoke itself may come from the system's site-packages
            argv = [str(venv / "bin/python"), "-m", "invoke", "run-matrix"]
            if config is not None:
                argv += ["--config", str(config.resolve())]
            run_stamped(log, "run-matrix", argv, clone, env, "run")
        log.write("load", f"{os.getloadavg()[0]:.2f}")
    finally:
        stop.set()
        log.close()
    return work / LOG_NAME


def print_breakdown(work: Path) -> Breakdown:
    lines = parse_log((work / LOG_NAME).read_text())
    run = newest_run(work / "netbed" / "results")
    steps = load_steps(run / TIMINGS_FILE) if run else []
    if run is None:
        print(f"no run folder under {work / 'netbed' / 'results'}: only the commands' times")
    result = breakdown(lines, steps)
    print(format_breakdown(result))
    return result


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None,
                    help="experiment file for `invoke run-matrix --config` (default: the "
                         "README's command, configs/quick.yaml)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="empty directory for the clone, its cache and the log "
                         "(default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the clone, cache and log afterwards")
    ap.add_argument("--parse", type=Path, default=None, metavar="DIR",
                    help="print the breakdown of an earlier run kept in DIR; run nothing")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.parse:
        if not (args.parse / LOG_NAME).is_file():
            ap.error(f"{args.parse / LOG_NAME} does not exist: pass the --workdir of a "
                     "benchmark run kept with --keep")
        print_breakdown(args.parse)
        return 0
    work = args.workdir or Path(tempfile.mkdtemp(prefix="netbed-quickstart-"))
    if work.exists() and any(work.iterdir()):
        ap.error(f"{work} is not empty: a fresh clone needs an empty directory")
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_benchmark(work, args.config)
        result = print_breakdown(work)
    finally:
        if args.keep:
            print(f"kept: {work} (python -m benchmarks.quickstart --parse {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
