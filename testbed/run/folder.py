"""The run folder: its layout, finding one by name, and resume bookkeeping.

Layout of one run (the contract between the runner and `analysis/`):

    results/<run-id>/
      experiment.yaml          the experiment file exactly as run
      policies.yaml            the policies file the experiment used (a copy)
      run.json                 how the run was started: its shard (K/N) and config path
      cells.json               the expanded cells (list of Cell models as JSON)
      host.json                host facts (what `invoke doctor --json` prints)
      versions.json            netbed commit, QEMU version, accel, kernel metadata,
                               image packages, data plane, guest PMU
      summary.txt              counts and failures of the last session on this run
      cells/<cell-id>/rep-<n>/ one folder per cell and repetition:
          cell.json            the cell's axes plus repetition number
          policy.json          the resolved policy (what was applied)
          netperf.txt          netperf omni keyval output (KEY=VALUE lines)
          perf-stat.csv        `perf stat -a -A -x<SEP>` output of the receiver
          proc-before/<name>   /proc snapshots (softirqs, interrupts, softnet_stat, snmp,
          proc-after/<name>      stat) taken right before and after the measured window
          reader-cpus.txt      where the reader ran: "<seconds> <cpu>" samples
          readback.json        policy state read back from the receiver
          reader-affinity.txt  the reader's CPU affinity as read back
          offloads.txt         `ethtool -k` of the receiver's data NIC
          cachemodel.csv       cache-model counters (when counters include cachemodel)
          console-*.log        serial logs (kept for failures)
          done                 JSON, written last and atomically: the repetition is complete;
                               its "files" lists every file of the folder with its size,
                               "retried" the errors of attempts that were retried
          failed               JSON, written instead of `done` when retries ran out

Only a folder with an intact `done` counts as finished (`RepDir.is_complete`): a
`done` that does not parse, or whose listed files are missing or have another size
(`RepDir.damage` says which), makes the repetition damaged, and resume redoes it
like an unfinished one. So a kill -9 at any moment loses nothing finished and
duplicates nothing, and a folder damaged later is redone exactly where it is damaged.
Files nobody listed (a note someone left) are neither damage nor read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.errors import NetbedError
from testbed.files import atomic_write_json, now_iso
from testbed.formats import record
from testbed.runname import run_folder_name

DONE = record.DONE
FAILED = record.FAILED
CELLS_DIR = "cells"


def new_run_id(name: str, shard: tuple[int, int] | None = None) -> str:
    """A sortable, readable id: <UTC time>-<experiment name>[-shardKofN].

    The naming rules (and the NAME_MAX check validation shares) are in
    testbed.runname.
    """
    return run_folder_name(name, datetime.now(UTC), shard)


@dataclass(frozen=True)
class RepDir:
    """One cell repetition's folder."""

    path: Path
    cell_id: str
    repetition: int

    @property
    def is_done(self) -> bool:
        return (self.path / DONE).is_file()

    @property
    def is_failed(self) -> bool:
        return (self.path / FAILED).is_file()

    @property
    def is_complete(self) -> bool:
        """Finished and intact: `done` exists and `damage` finds nothing."""
        return self.is_done and self.damage() is None

    def damage(self) -> str | None:
        """Why this repetition's `done` cannot be trusted, or None (also when not done).

        `done` must be a JSON object; the files it lists (runs since the listing
        exists) must be there with their recorded sizes: a raw file cut short (a disk
        that filled, a copy that stopped) is caught here, not parsed into numbers."""
        path = self.path / DONE
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return f"{path}: unreadable ({type(exc).__name__}: {exc})"
        if not isinstance(info, dict):
            return f"{path}: not a JSON object"
        files = info.get("files")
        if not isinstance(files, dict):
            return None  # written before done listed its files: nothing to check against
        problems = []
        for name, size in sorted(files.items()):
            try:
                actual = (self.path / name).stat().st_size
            except OSError:
                problems.append(f"{name} missing")
                continue
            if actual != size:
                problems.append(f"{name} has {actual} bytes, done recorded {size}")
        if problems:
            return f"{self.path}: " + "; ".join(problems[:5]) + (
                f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        return None

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class RunDir:
    """A run's folder; knows the layout, nothing about what is measured."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def experiment_file(self) -> Path:
        return self.path / record.EXPERIMENT

    @property
    def cells_file(self) -> Path:
        return self.path / record.CELLS

    @property
    def host_file(self) -> Path:
        return self.path / record.HOST

    @property
    def versions_file(self) -> Path:
        return self.path / record.VERSIONS

    @property
    def policies_file(self) -> Path:
        return self.path / record.POLICIES

    @property
    def meta_file(self) -> Path:
        return self.path / record.RUN

    @property
    def summary_file(self) -> Path:
        return self.path / record.SUMMARY

    @property
    def work_dir(self) -> Path:
        """Scratch space of a session (guests' consoles, keys); never part of results."""
        return self.path / ".work"

    def rep(self, cell_id: str, repetition: int) -> RepDir:
        return RepDir(self.path / CELLS_DIR / cell_id / f"rep-{repetition}", cell_id, repetition)

    def reps(self) -> Iterator[RepDir]:
        """Every repetition folder present, in a stable order."""
        root = self.path / CELLS_DIR
        if not root.is_dir():
            return
        for cell in sorted(p for p in root.iterdir() if p.is_dir()):
            for rep in sorted(cell.glob("rep-*"), key=lambda p: int(p.name.split("-", 1)[1])):
                yield RepDir(rep, cell.name, int(rep.name.split("-", 1)[1]))

    def start_rep(self, cell_id: str, repetition: int) -> RepDir:
        """A clean folder for a (re)attempt: leftovers of an interrupted attempt are removed."""
        rep = self.rep(cell_id, repetition)
        if rep.path.exists():
            shutil.rmtree(rep.path)
        rep.path.mkdir(parents=True)
        return rep

    def mark_done(self, rep: RepDir, info: dict[str, Any]) -> None:
        (rep.path / FAILED).unlink(missing_ok=True)
        atomic_write_json(rep.path / DONE, {"finished": now_iso(), **info,
                                            "files": file_sizes(rep.path)})

    def mark_failed(self, rep: RepDir, reason: str, info: dict[str, Any]) -> None:
        atomic_write_json(rep.path / FAILED, {"finished": now_iso(), "reason": reason, **info})


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative POSIX path -> size), but `done` itself and
    the temporary files of atomic writes (dot-names)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != DONE and not any(
                part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = path.stat().st_size
    return out


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(NetbedError):
    """The results' file system is full: nothing more can be written, so the run stops."""


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also from libraries that keep the errno only in the text (pyarrow)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    return isinstance(exc, OSError) and (f"[Errno {errno.ENOSPC}]" in text
                                         or os.strerror(errno.ENOSPC) in text)


def disk_full(exc: BaseException, where: Path, then: str = "") -> DiskFull | None:
    """A DiskFull naming the file and the free space, if `exc` (or what caused it) is
    ENOSPC/EDQUOT; else None. `where` is a folder on the file system in question;
    `then` what to do once space is freed."""
    cause: BaseException | None = exc
    while cause is not None and not _is_disk_full(cause):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    filename = cause.filename if isinstance(cause, OSError) else None
    strerror = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                else os.strerror(errno.ENOSPC))
    target = filename or where
    probe = Path(target)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
        free = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"no space left on the device while writing {target} ({free}: "
                    f"{strerror})",
                    hint="free space on that file system" + (f", then {then}" if then else ""))


def resolve_run(arg: str, results_dir: Path) -> Path:
    """A run named on the command line: a folder, a run id under `results_dir`, or "latest"
    (the newest run there)."""
    p = Path(arg).expanduser()
    if p.is_dir():
        return p
    if arg == "latest":
        runs = sorted(d for d in results_dir.glob("*") if (d / record.CELLS).is_file()
                      or (d / CELLS_DIR).is_dir())
        if not runs:
            raise NetbedError(f"no runs in {results_dir}", hint="run `invoke run-matrix` first")
        return runs[-1]
    q = results_dir / arg
    if q.is_dir():
        return q
    known = sorted(d.name for d in results_dir.glob("*") if d.is_dir())[-5:]
    raise NetbedError(f"no run {arg!r} (neither a folder nor under {results_dir})",
                      hint="give a path or a run id; recent runs: " + (", ".join(known) or "none"))
