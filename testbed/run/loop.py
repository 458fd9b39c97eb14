"""The matrix loop: scheduled repetitions -> booted guests -> measured repetitions, resumable.

The loop knows nothing of QEMU or SSH: it is handed its collaborators (how to boot
guests for a cell, how to measure one repetition on them, how to record
provenance, how to keep logs of a failure), so resume, retries and boot reuse
are unit-tested with fakes (tests/unit/test_loop.py); `testbed.run.session`
supplies the real ones.

A repetition counts only when its `done` marker exists and is intact
(RepDir.is_complete), so a run killed at any moment resumes exactly the missing
work, and one whose folder was damaged since redoes exactly the damaged
repetitions. A guest that fails to boot, hangs, drops SSH or dies (its QEMU
killed, netserver gone: GuestError, CommandError, OSError) is rebooted and
retried `retries` times, each error logged and listed in `done` ("retried") or
`failed` ("errors"); then the repetition is marked failed and the matrix goes on.
A policy that reads back wrong (PolicyMismatch) fails at once: a reboot would not
fix it. A full results disk (ENOSPC) stops the run at once with DiskFull naming
the file and the free space: the unfinished attempt's files are removed (they
would only hold space), no marker is written, and `--resume` redoes it.

Plain repetitions (`Collaborators.plain` says which numbers) are the plugin-less
companions of a cache-model run: booted without the plugin, so they get their own
boots (the boot cache keys on the kind too) and run after every instrumented
repetition, adaptive rounds included, so each kind of boot serves a whole stretch.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from testbed.errors import CommandError, GuestError, NetbedError
from testbed.experiment.config import Cell
from testbed.files import atomic_write_json
from testbed.progress import Log, Progress
from testbed.run.adaptive import (
    OPTIONAL_STOPPING_NOTE,
    STOPPING_FILE,
    Rule,
    Stop,
    decide,
    done_value,
)
from testbed.run.bootcache import BootCache
from testbed.run.folder import RepDir, RunDir, disk_full

Booted = TypeVar("Booted")
Slot = tuple[Cell, bool]  # a cell and whether its guests boot plain (without the plugin)
# Failures a reboot may cure: the guest did not boot, hung, or dropped SSH.
RETRIED = (GuestError, CommandError, OSError)


class PolicyMismatch(NetbedError):
    """The receiver's state read back differs from what the policy asked: not retried."""


@dataclass
class RunSummary:
    run_dir: Path
    total: int
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def boot_key(cell: Cell) -> Hashable:
    """Repetitions with equal keys can share booted guests."""
    return (cell.kernel, cell.nic, cell.cpus)


@dataclass(frozen=True)
class Collaborators(Generic[Booted]):
    """What the loop needs from the world.

    boot: a context manager that boots the guests for a cell and stops them on exit;
      its second argument says "plain": boot without the cache-model plugin.
    measure: one repetition on booted guests into its folder; returns `done`'s info
      (the guests know how they were booted).
    start: called once before the first repetition (provenance).
    keep_logs: copy the guests' logs into a repetition that went wrong.
    plain: whether repetition number r is a plain (plugin-less) one.
    """

    boot: Callable[[Cell, bool], AbstractContextManager[Booted]]
    measure: Callable[[Booted, Cell, RepDir], dict[str, object]]
    start: Callable[[], None] = lambda: None
    keep_logs: Callable[[RepDir], None] = lambda rep: None
    key: Callable[[Cell], Hashable] = boot_key
    plain: Callable[[int], bool] = lambda rep_no: False


@dataclass(frozen=True)
class AdaptivePlan:
    """Adaptive repetitions: the rule, its metric, and each round's cells in run order.

    `order(r)` gives all cells in the order round r runs them; the loop keeps those
    still above target. `metric` None: window.throughput where recorded, else throughput.
    """

    rule: Rule
    metric: str | None
    order: Callable[[int], Sequence[Cell]]


class MatrixRunner(Generic[Booted]):
    """Runs the scheduled repetitions of one run folder that are not done yet."""

    def __init__(self, run: RunDir, items: Sequence[tuple[Cell, int]], retries: int,
                 collaborators: Collaborators[Booted], log: Log = print,
                 adaptive: AdaptivePlan | None = None) -> None:
        self.run = run
        self.items = list(items)
        self.retries = retries
        self.c = collaborators
        self.log = log
        self.adaptive = adaptive

    def execute(self) -> RunSummary:
        summary = RunSummary(self.run.path, total=len(self.items))
        todo = [(c, r) for c, r in self.items if not self._complete(c.cell_id, r)]
        summary.skipped = len(self.items) - len(todo)
        if summary.skipped:
            self.log(f"resuming: {summary.skipped} of {len(self.items)} repetitions already "
                     "done")
        self.c.start()
        if not todo and self.adaptive is None:
            return summary
        progress = Progress(len(self.items), summary.skipped, self.log)
        plain = [(c, r) for c, r in todo if self.c.plain(r)]
        main = [(c, r) for c, r in todo if not self.c.plain(r)]
        with BootCache(self._boot, self._key) as guests:
            for cell, rep_no in main:
                self._repetition(guests, cell, rep_no, summary, progress)
            if self.adaptive is not None:
                self._adaptive_rounds(self.adaptive, guests, summary, progress)
            for cell, rep_no in plain:
                self._repetition(guests, cell, rep_no, summary, progress)
        return summary

    def _complete(self, cell_id: str, rep_no: int) -> bool:
        """Done and intact; a damaged one is said aloud (it is redone)."""
        rep = self.run.rep(cell_id, rep_no)
        if not rep.is_done:
            return False
        damage = rep.damage()
        if damage is not None:
            self.log(f"{cell_id} rep {rep_no}: done but damaged, redoing it: {damage}")
        return damage is None

    def _boot(self, slot: Slot) -> AbstractContextManager[Booted]:
        return self.c.boot(*slot)

    def _key(self, slot: Slot) -> Hashable:
        return (self.c.key(slot[0]), slot[1])

    def decisions(self, plan: AdaptivePlan, before: int) -> dict[str, Stop]:
        """Each cell's stopping decision from its repetitions 0..before-1 (done or failed)."""
        out = {}
        for cell in plan.order(0):
            attempted, values, used = 0, [], plan.metric or "throughput"
            for r in range(before):
                rep = self.run.rep(cell.cell_id, r)
                if rep.is_done or rep.is_failed:
                    attempted += 1
                used, value = done_value(rep, plan.metric)
                if value is not None:
                    values.append(value)
            out[cell.cell_id] = decide(plan.rule, cell.cell_id, attempted, values, used)
        return out

    def _adaptive_rounds(self, plan: AdaptivePlan, guests: BootCache[Slot, Booted],
                         summary: RunSummary, progress: Progress) -> None:
        """Rounds min..max-1 over the cells still above target; then why each stopped."""
        rule = plan.rule
        for round_no in range(rule.min, rule.max):
            stops = self.decisions(plan, round_no)
            if round_no == rule.min and not any(x.values for x in stops.values()):
                self.log(f"note: no repetition recorded the metric "
                         f"{plan.metric or 'throughput'}; adaptive rounds run every cell "
                         "to max")
            open_cells = [c for c in plan.order(round_no) if stops[c.cell_id].reason is None]
            if not open_cells:
                break
            self.log(f"adaptive round {round_no + 1}/{rule.max}: {len(open_cells)} cell(s) "
                     f"above CV {rule.target_cv:g}: "
                     + ", ".join(f"{c.cell_id} ({_pct(stops[c.cell_id].cv)})"
                                 for c in open_cells))
            summary.total += len(open_cells)
            progress.total += len(open_cells)
            for cell in open_cells:
                if self._complete(cell.cell_id, round_no):
                    summary.skipped += 1
                    continue
                self._repetition(guests, cell, round_no, summary, progress)
        final = self.decisions(plan, rule.max)
        atomic_write_json(self.run.path / STOPPING_FILE, {
            "adaptive": True, "min": rule.min, "max": rule.max,
            "target_cv": rule.target_cv, "metric": plan.metric, "note": OPTIONAL_STOPPING_NOTE,
            "cells": {k: v.to_dict() for k, v in final.items()}})

    def _repetition(self, guests: BootCache[Slot, Booted], cell: Cell, rep_no: int,
                    summary: RunSummary, progress: Progress) -> None:
        """One repetition, with its retries; records done or failed."""
        errors: list[str] = []  # each failed attempt's error, in order
        while True:
            progress.start(f"{cell.cell_id} rep {rep_no}"
                           + (" (plain)" if self.c.plain(rep_no) else ""))
            rep = self.run.rep(cell.cell_id, rep_no)
            try:
                rep = self.run.start_rep(cell.cell_id, rep_no)
                try:
                    info = self.c.measure(guests.get((cell, self.c.plain(rep_no))), cell, rep)
                    retried = {"retried": list(errors)} if errors else {}
                    self.run.mark_done(rep, {"attempts": len(errors) + 1, **retried, **info})
                    summary.done += 1
                    progress.finish(_describe(info))
                    return
                except PolicyMismatch as exc:
                    self._fail(rep, str(exc), len(errors) + 1, summary, errors)
                    progress.finish("FAILED (policy read-back)")
                    return
                except RETRIED as exc:
                    if disk_full(exc, self.run.path) is not None:
                        raise
                    errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
                    self.c.keep_logs(rep)
                    guests.invalidate()
                    if len(errors) > self.retries:
                        self._fail(rep, f"{type(exc).__name__}: {exc}", len(errors), summary,
                                   errors)
                        progress.finish(f"FAILED after {len(errors)} attempts")
                        return
                    self.log(f"{cell.cell_id} rep {rep_no}: {_first_line(exc)}; "
                             f"rebooting and retrying ({len(errors)}/{self.retries})")
            except OSError as exc:
                full = disk_full(exc, rep.path,
                                 f"resume the run: invoke run-matrix --resume {self.run.path}")
                if full is None:
                    raise
                shutil.rmtree(rep.path, ignore_errors=True)  # no marker: resume redoes it
                progress.finish("STOPPED: results disk full")
                raise full from exc

    def _fail(self, rep: RepDir, reason: str, attempts: int, summary: RunSummary,
              errors: Sequence[str] = ()) -> None:
        self.c.keep_logs(rep)
        self.run.mark_failed(rep, reason, {"attempts": attempts, "errors": list(errors)})
        summary.failed.append((rep.cell_id, rep.repetition, _first_line(reason)))
        self.log(f"{rep.cell_id} rep {rep.repetition} FAILED: {_first_line(reason)}")


def _pct(value: float | None) -> str:
    return "CV n/a" if value is None else f"CV {100 * value:.1f}%"


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(info: dict[str, object]) -> str:
    tp = info.get("throughput")
    return f"{tp:.1f} {info.get('units', '')}" if isinstance(tp, float) else "done"


def summary_text(summary: RunSummary, seconds: float) -> str:
    lines = [f"run: {summary.run_dir}",
             f"repetitions: {summary.total} total, {summary.done} run now, "
             f"{summary.skipped} already done, {len(summary.failed)} failed",
             f"time: {seconds:.0f} s"]
    if summary.failed:
        lines.append("failures:")
        lines += [f"  {cell} rep {rep}: {why}" for cell, rep, why in summary.failed]
    return "\n".join(lines) + "\n"
