"""The matrix loop with fake guests: retries, boot reuse and its invalidation, resume,
policy mismatch. No QEMU: the collaborators are fakes that fail the way real guests do."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.errors import CommandError, GuestError
from testbed.experiment.config import Cell
from testbed.experiment.load import experiment_from_dict
from testbed.experiment.matrix import expand, schedule
from testbed.experiment.policies import load_policies
from testbed.run.folder import RepDir, RunDir
from testbed.run.loop import (
    AdaptivePlan,
    Collaborators,
    MatrixRunner,
    PolicyMismatch,
    RunSummary,
    summary_text,
)
from testbed.shell import Result


def experiment(nics: list[str], repetitions: object = 2, retries: int = 1,
               policies: tuple[str, ...] = ("default",), order: str = "sequential",
               plain: int = 1):
    return experiment_from_dict({
        "name": "t", "axes": {"kernel": ["distro"], "nic": nics, "cpus": [2],
                              "policy": list(policies), "workload": ["TCP_STREAM"],
                              "gro": ["on"]},
        "repetitions": repetitions, "retries": retries, "duration": 3, "warmup": 0,
        "order": order, "plain_repetitions": plain}, load_policies())


@dataclass
class FakeGuest:
    """A booted receiver: a Shell whose commands fail the way a real guest's do."""

    number: int
    failures: list[Exception]  # raised by the next run() calls, in order
    closed: bool = False
    plain: bool = False  # booted without the cache-model plugin

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        assert not self.closed, "a command ran on guests that were shut down"
        if self.failures:
            raise self.failures.pop(0)
        return Result(command, 0, "throughput 940.5\n", "")


@dataclass
class World:
    """Fake collaborators that record what the loop asked of them."""

    boot_failures: list[Exception] = field(default_factory=list)
    guest_failures: list[Exception] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    guests: list[FakeGuest] = field(default_factory=list)
    measured: list[tuple[str, int, int]] = field(default_factory=list)  # cell, rep, guest
    plain_from: int | None = None  # repetition numbers from here on are plain

    @contextlib.contextmanager
    def boot(self, cell: Cell, plain: bool = False) -> Iterator[FakeGuest]:
        self.events.append(f"boot {cell.nic}" + (" plain" if plain else ""))
        if self.boot_failures:
            raise self.boot_failures.pop(0)
        guest = FakeGuest(len(self.guests) + 1, self.guest_failures, plain=plain)
        self.guests.append(guest)
        try:
            yield guest
        finally:
            guest.closed = True
            self.events.append(f"shutdown {guest.number}")

    def measure(self, guest: FakeGuest, cell: Cell, rep: RepDir) -> dict[str, object]:
        out = guest.run("netperf -H 198.18.0.1").stdout
        (rep.path / "netperf.txt").write_text(out)
        self.measured.append((cell.nic, rep.repetition, guest.number))
        return {"throughput": float(out.split()[1]), "units": "10^6bits/s",
                "plugin": not guest.plain}

    def keep_logs(self, rep: RepDir) -> None:
        (rep.path / "console-receiver.log").write_text("console\n")
        self.events.append(f"logs {rep.cell_id} {rep.repetition}")

    def collaborators(self) -> Collaborators[FakeGuest]:
        plain_from = self.plain_from
        return Collaborators(boot=self.boot, measure=self.measure,
                             start=lambda: self.events.append("start"),
                             keep_logs=self.keep_logs,
                             plain=lambda r: plain_from is not None and r >= plain_from)


def run_loop(tmp_path: Path, world: World, exp, log: list[str] | None = None,
             plain: int = 0, adaptive: AdaptivePlan | None = None) -> RunSummary:
    """The loop over `exp`'s schedule; `plain` > 0: a cache-model run with that many plain
    repetitions per cell (numbered from max_repetitions, as the session numbers them)."""
    run = RunDir(tmp_path / "run")
    lines = log if log is not None else []
    if plain:
        world.plain_from = exp.max_repetitions
    runner = MatrixRunner(run, schedule(exp, expand(exp), plain=plain), exp.retries,
                          world.collaborators(), log=lines.append, adaptive=adaptive)
    return runner.execute()


def status(tmp_path: Path, cell: str, rep: int) -> dict[str, object]:
    d = tmp_path / "run" / "cells" / cell / f"rep-{rep}"
    name = "done" if (d / "done").exists() else "failed"
    return {"state": name, **json.loads((d / name).read_text())}


def cell_id(exp, nic: str) -> str:
    return next(c.cell_id for c in expand(exp) if c.nic == nic)


def test_repetitions_of_one_guest_set_share_a_boot_and_another_set_reboots(tmp_path):
    world = World()
    exp = experiment(["e1000", "virtio"], repetitions=3)
    summary = run_loop(tmp_path, world, exp)
    assert summary.ok and summary.done == 6
    assert world.events == ["start", "boot e1000", "shutdown 1", "boot virtio", "shutdown 2"]
    assert [g for _, _, g in world.measured] == [1, 1, 1, 2, 2, 2]


def test_a_boot_failure_is_retried_on_a_fresh_boot(tmp_path):
    world = World(boot_failures=[GuestError("guest receiver: no NETBED-READY line within 180 s")])
    exp = experiment(["e1000"], repetitions=1)
    lines: list[str] = []
    summary = run_loop(tmp_path, world, exp, lines)
    assert summary.ok and summary.done == 1
    assert world.events == ["start", "boot e1000", "logs " + cell_id(exp, "e1000") + " 0",
                            "boot e1000", "shutdown 1"]
    assert status(tmp_path, cell_id(exp, "e1000"), 0)["attempts"] == 2
    assert any("no NETBED-READY line" in line and "rebooting and retrying (1/1)" in line
               for line in lines)


def test_a_hang_shuts_the_guests_down_and_the_retry_boots_new_ones(tmp_path):
    hang = GuestError("guest receiver: command timed out after 60 s (guest unresponsive)")
    world = World(guest_failures=[hang])
    exp = experiment(["e1000"], repetitions=2)
    summary = run_loop(tmp_path, world, exp)
    cid = cell_id(exp, "e1000")
    assert summary.ok and summary.done == 2
    # the hung guests are gone before new ones boot, and the next repetition reuses the new ones
    assert world.events == ["start", "boot e1000", f"logs {cid} 0", "shutdown 1",
                            "boot e1000", "shutdown 2"]
    assert world.measured == [("e1000", 0, 2), ("e1000", 1, 2)]
    assert status(tmp_path, cid, 0)["attempts"] == 2
    assert status(tmp_path, cid, 1)["attempts"] == 1
    # the failed attempt's partial files are gone: the folder holds the good attempt only
    assert sorted(p.name for p in (tmp_path / "run/cells" / cid / "rep-0").iterdir()) == [
        "done", "netperf.txt"]


def test_a_lost_ssh_session_fails_the_repetition_after_its_retries_and_the_matrix_goes_on(
        tmp_path):
    dropped = [GuestError(f"guest receiver: SSH dropped while running 'netperf': {n}")
               for n in range(3)]
    world = World(guest_failures=dropped)
    exp = experiment(["e1000", "virtio"], repetitions=1, retries=2)
    summary = run_loop(tmp_path, world, exp)
    cid = cell_id(exp, "e1000")
    assert summary.failed == [
        (cid, 0, "GuestError: guest receiver: SSH dropped while running 'netperf': 2")]
    assert summary.done == 1 and not summary.ok
    failed = status(tmp_path, cid, 0)
    assert failed["state"] == "failed" and failed["attempts"] == 3
    assert failed["reason"].startswith("GuestError: guest receiver: SSH dropped")
    assert (tmp_path / "run/cells" / cid / "rep-0" / "console-receiver.log").exists()
    assert world.events.count("boot e1000") == 3 and world.measured == [("virtio", 0, 4)]
    assert "failures:\n  " + cid in summary_text(summary, 1.0)


def test_a_failing_command_counts_as_a_guest_failure(tmp_path):
    world = World(guest_failures=[CommandError("[receiver] ethtool -K eth1 gro on", 1, "")])
    summary = run_loop(tmp_path, world, experiment(["e1000"], repetitions=1))
    assert summary.ok and world.events.count("boot e1000") == 2


def test_a_policy_mismatch_fails_at_once_without_a_reboot(tmp_path):
    world = World(guest_failures=[PolicyMismatch("receiver state differs from policy")])
    exp = experiment(["e1000"], repetitions=2, retries=3)
    summary = run_loop(tmp_path, world, exp)
    cid = cell_id(exp, "e1000")
    failed = status(tmp_path, cid, 0)
    assert failed["state"] == "failed" and failed["attempts"] == 1
    assert "differs from policy" in failed["reason"]
    # no retry and no reboot: the next repetition runs on the same guests
    assert world.events == ["start", "boot e1000", f"logs {cid} 0", "shutdown 1"]
    assert world.measured == [("e1000", 1, 1)] and summary.failed[0][:2] == (cid, 0)


def test_resume_runs_only_repetitions_without_a_done_marker(tmp_path):
    exp = experiment(["e1000", "virtio"], repetitions=2)
    run = RunDir(tmp_path / "run")
    virtio = cell_id(exp, "virtio")
    e1000 = cell_id(exp, "e1000")
    for cid, rep in ((e1000, 0), (e1000, 1), (virtio, 0)):
        run.mark_done(run.start_rep(cid, rep), {"attempts": 1})
    run.mark_failed(run.start_rep(virtio, 1), "boom", {"attempts": 2})  # failed: redone
    world = World()
    lines: list[str] = []
    summary = run_loop(tmp_path, world, exp, lines)
    assert (summary.skipped, summary.done, summary.total) == (3, 1, 4)
    assert world.measured == [("virtio", 1, 1)]
    assert world.events == ["start", "boot virtio", "shutdown 1"]  # e1000 never booted
    assert status(tmp_path, virtio, 1)["state"] == "done"
    assert lines[0] == "resuming: 3 of 4 repetitions already done"


def test_a_finished_run_boots_nothing_but_still_records_provenance(tmp_path):
    exp = experiment(["e1000"], repetitions=1)
    run = RunDir(tmp_path / "run")
    run.mark_done(run.start_rep(cell_id(exp, "e1000"), 0), {})
    world = World()
    summary = run_loop(tmp_path, world, exp)
    assert summary.skipped == 1 and summary.done == 0 and world.events == ["start"]


def test_an_interrupt_still_shuts_the_guests_down(tmp_path):
    world = World(guest_failures=[KeyboardInterrupt()])
    with pytest.raises(KeyboardInterrupt):
        run_loop(tmp_path, world, experiment(["e1000"], repetitions=1))
    assert world.events[-1] == "shutdown 1"


def test_summary_lists_failures():
    s = RunSummary(Path("/r"), total=4, done=2, skipped=1, failed=[("c1", 0, "boom")])
    text = summary_text(s, 12.3)
    assert "4 total, 2 run now, 1 already done, 1 failed" in text
    assert "c1 rep 0: boom" in text and not s.ok


# ------------------------------------------------------------- plain (plugin-less) repetitions


def test_plain_repetitions_boot_without_the_plugin_after_every_instrumented_one(tmp_path):
    world = World()
    exp = experiment(["e1000", "virtio"], repetitions=2, policies=("default", "rfs"))
    summary = run_loop(tmp_path, world, exp, plain=1)
    assert summary.ok and summary.done == 4 * 3 and summary.total == 12
    # one plugin boot and one plain boot per NIC: the cells of a NIC share each
    assert world.events == ["start", "boot e1000", "shutdown 1", "boot virtio", "shutdown 2",
                            "boot e1000 plain", "shutdown 3", "boot virtio plain",
                            "shutdown 4"]
    assert [(nic, r) for nic, r, g in world.measured if g in (3, 4)] == [
        ("e1000", 2), ("e1000", 2), ("virtio", 2), ("virtio", 2)]
    for cell in expand(exp):
        assert [status(tmp_path, cell.cell_id, r)["plugin"] for r in range(3)] == \
            [True, True, False]


def test_interleaved_plain_rounds_share_their_boots_too(tmp_path):
    world = World()
    exp = experiment(["e1000", "virtio"], repetitions=2, policies=("default", "rfs"),
                     order="interleaved", plain=2)
    run_loop(tmp_path, world, exp, plain=2)
    boots = [e for e in world.events if e.startswith("boot")]
    assert boots == ["boot e1000", "boot virtio"] * 2 + ["boot e1000 plain",
                                                          "boot virtio plain"] * 2


def test_resume_runs_only_the_missing_plain_repetitions(tmp_path):
    exp = experiment(["e1000", "virtio"], repetitions=1)
    run = RunDir(tmp_path / "run")
    e1000, virtio = cell_id(exp, "e1000"), cell_id(exp, "virtio")
    for cid, rep in ((e1000, 0), (virtio, 0), (e1000, 1)):
        run.mark_done(run.start_rep(cid, rep), {"attempts": 1, "plugin": rep == 0})
    world = World()
    lines: list[str] = []
    summary = run_loop(tmp_path, world, exp, lines, plain=1)
    assert (summary.skipped, summary.done, summary.total) == (3, 1, 4)
    assert world.events == ["start", "boot virtio plain", "shutdown 1"]
    assert status(tmp_path, virtio, 1)["plugin"] is False


def test_a_failed_plain_repetition_is_retried_on_a_fresh_plain_boot(tmp_path):
    exp = experiment(["e1000"], repetitions=1)
    run_loop(tmp_path, World(), exp, plain=1)  # both kinds, cleanly
    hang = GuestError("guest receiver: command timed out")
    world2 = World(guest_failures=[hang])
    run = RunDir(tmp_path / "run")
    cid = cell_id(exp, "e1000")
    (run.rep(cid, 1).path / "done").unlink()  # the plain one again, now hanging once
    summary = run_loop(tmp_path, world2, exp, plain=1)
    assert summary.ok and world2.events == ["start", "boot e1000 plain", f"logs {cid} 1",
                                            "shutdown 1", "boot e1000 plain", "shutdown 2"]
    assert status(tmp_path, cid, 1)["attempts"] == 2


def test_adaptive_rounds_run_before_the_plain_repetitions(tmp_path):
    from testbed.run.local import adaptive_plan

    class Noisy(World):
        def measure(self, guest: FakeGuest, cell: Cell, rep: RepDir) -> dict[str, object]:
            info = super().measure(guest, cell, rep)
            return {**info, "throughput": 900.0 + 50 * (rep.repetition % 2)}

    exp = experiment(["e1000"], repetitions={"min": 5, "max": 6, "target_cv": 0.01})
    world = Noisy()
    run_loop(tmp_path, world, exp, plain=1, adaptive=adaptive_plan(exp, expand(exp)))
    # CV above target after 5: the adaptive round (rep 5) runs, then the plain one (rep 6)
    assert [r for _, r, _ in world.measured] == [0, 1, 2, 3, 4, 5, 6]
    assert world.events == ["start", "boot e1000", "shutdown 1", "boot e1000 plain",
                            "shutdown 2"]


# ------------------------------------------------------------------ faults (docs/reliability.md)


def test_retried_errors_are_listed_in_done_and_in_failed(tmp_path):
    dropped = [GuestError(f"guest receiver: SSH dropped: {n}") for n in range(3)]
    world = World(guest_failures=dropped)
    exp = experiment(["e1000", "virtio"], repetitions=1, retries=1)
    run_loop(tmp_path, world, exp)
    failed = status(tmp_path, cell_id(exp, "e1000"), 0)
    assert failed["errors"] == ["GuestError: guest receiver: SSH dropped: 0",
                                "GuestError: guest receiver: SSH dropped: 1"]
    done = status(tmp_path, cell_id(exp, "virtio"), 0)  # the third error hit virtio once
    assert done["state"] == "done" and done["attempts"] == 2
    assert done["retried"] == ["GuestError: guest receiver: SSH dropped: 2"]


class DiskFullWorld(World):
    """Measuring fails with ENOSPC on repetition `full_at` (a results disk that filled)."""

    full_at: int = 1

    def measure(self, guest: FakeGuest, cell: Cell, rep: RepDir) -> dict[str, object]:
        if rep.repetition == self.full_at:
            (rep.path / "netperf.txt").write_text("half")
            raise OSError(28, "No space left on device", str(rep.path / ".perf-stat.csv.x"))
        return super().measure(guest, cell, rep)


def test_a_full_disk_stops_the_run_naming_the_file_and_resume_finishes_it(tmp_path):
    from testbed.run.folder import DiskFull

    exp = experiment(["e1000"], repetitions=3)
    cid = cell_id(exp, "e1000")
    with pytest.raises(DiskFull) as err:
        run_loop(tmp_path, DiskFullWorld(), exp)
    text = str(err.value)
    assert str(tmp_path / "run/cells" / cid / "rep-1" / ".perf-stat.csv.x") in text
    assert "MiB free of" in text and "invoke run-matrix --resume" in text
    run = RunDir(tmp_path / "run")
    first = run.rep(cid, 0).file("done").read_bytes()
    assert run.rep(cid, 0).is_complete
    assert not run.rep(cid, 1).path.exists()  # no marker, no half files: redone on resume
    assert not run.rep(cid, 2).path.exists()  # the run stopped: no retry, no next one
    world = World()
    summary = run_loop(tmp_path, world, exp)
    assert (summary.skipped, summary.done) == (1, 2) and summary.ok
    assert run.rep(cid, 0).file("done").read_bytes() == first


def test_a_full_disk_while_keeping_logs_of_a_failure_still_stops_cleanly(tmp_path):
    from testbed.run.folder import DiskFull

    class Full(World):
        def keep_logs(self, rep: RepDir) -> None:
            raise OSError(28, "No space left on device")

    world = Full(guest_failures=[GuestError("guest receiver: SSH dropped")])
    with pytest.raises(DiskFull, match="no space left on the device"):
        run_loop(tmp_path, world, experiment(["e1000"], repetitions=1))


def damage_run(run: RunDir, exp) -> dict[str, RepDir]:
    """Four repetitions of one cell, damaged four ways (and one extra file)."""
    cid = cell_id(exp, "e1000")
    reps = {name: run.rep(cid, n) for n, name in enumerate(
        ("truncated", "partial", "cut", "intact"))}
    done = reps["truncated"].file("done")
    done.write_bytes(done.read_bytes()[:25])
    reps["partial"].file("done").unlink()
    raw = reps["cut"].file("netperf.txt")
    raw.write_bytes(raw.read_bytes()[:4])
    (reps["intact"].path / "someones-notes.txt").write_text("hello\n")
    return reps


def test_resume_redoes_exactly_the_damaged_repetitions(tmp_path):
    exp = experiment(["e1000"], repetitions=4)
    run_loop(tmp_path, World(), exp)
    run = RunDir(tmp_path / "run")
    reps = damage_run(run, exp)
    kept = reps["intact"].file("done").read_bytes()
    world = World()
    lines: list[str] = []
    summary = run_loop(tmp_path, world, exp, lines)
    assert [r for _, r, _ in world.measured] == [0, 1, 2]
    assert (summary.skipped, summary.done) == (1, 3)
    assert any("rep 0: done but damaged, redoing it" in x and "unreadable" in x for x in lines)
    assert any("rep 2: done but damaged" in x and "netperf.txt has 4 bytes" in x for x in lines)
    assert reps["intact"].file("done").read_bytes() == kept
    assert all(r.is_complete for r in reps.values())
