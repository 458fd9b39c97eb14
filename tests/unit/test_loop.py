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
    Collaborators,
    MatrixRunner,
    PolicyMismatch,
    RunSummary,
    summary_text,
)
from testbed.shell import Result


def experiment(nics: list[str], repetitions: int = 2, retries: int = 1):
    return experiment_from_dict({
        "name": "t", "axes": {"kernel": ["distro"], "nic": nics, "cpus": [2],
                              "policy": ["default"], "workload": ["TCP_STREAM"],
                              "gro": ["on"]},
        "repetitions": repetitions, "retries": retries, "duration": 3, "warmup": 0,
        "order": "sequential"}, load_policies())


@dataclass
class FakeGuest:
    """A booted receiver: a Shell whose commands fail the way a real guest's do."""

    number: int
    failures: list[Exception]  # raised by the next run() calls, in order
    closed: bool = False

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

    @contextlib.contextmanager
    def boot(self, cell: Cell) -> Iterator[FakeGuest]:
        self.events.append(f"boot {cell.nic}")
        if self.boot_failures:
            raise self.boot_failures.pop(0)
        guest = FakeGuest(len(self.guests) + 1, self.guest_failures)
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
        return {"throughput": float(out.split()[1]), "units": "10^6bits/s"}

    def keep_logs(self, rep: RepDir) -> None:
        (rep.path / "console-receiver.log").write_text("console\n")
        self.events.append(f"logs {rep.cell_id} {rep.repetition}")

    def collaborators(self) -> Collaborators[FakeGuest]:
        return Collaborators(boot=self.boot, measure=self.measure,
                             start=lambda: self.events.append("start"),
                             keep_logs=self.keep_logs)


def run_loop(tmp_path: Path, world: World, exp, log: list[str] | None = None) -> RunSummary:
    run = RunDir(tmp_path / "run")
    lines = log if log is not None else []
    runner = MatrixRunner(run, schedule(exp, expand(exp)), exp.retries, world.collaborators(),
                          log=lines.append)
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
