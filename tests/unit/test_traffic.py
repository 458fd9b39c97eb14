"""netperf runs until the receiver's window closes, then the sending side is stopped.

A simulated pair of guests on a fake clock: the receiver's window closes at a set
time; netperf ends on its own cap, or some time after the side that sends got SIGINT.
"""

from __future__ import annotations

import pytest

from testbed.errors import GuestError
from testbed.run import traffic
from testbed.shell import Result

CLOSED = "/tmp/netbed/win/closed"
PID = "/tmp/netbed/win/reader-pid.txt"


class World:
    def __init__(self, window_closes_at: float, netperf_cap: float,
                 stops_after_signal: float | None = 1.0, exit_code: int = 0) -> None:
        self.now = 0.0
        self.window_closes_at = window_closes_at
        self.netperf_cap = netperf_cap
        self.stops_after_signal = stops_after_signal
        self.exit_code = exit_code
        self.started_at: float | None = None
        self.signalled_at: float | None = None
        self.signals: list[tuple[str, str]] = []

    def netperf_ended(self) -> bool:
        if self.started_at is None:
            return False
        if self.now >= self.started_at + self.netperf_cap:
            return True
        return (self.signalled_at is not None and self.stops_after_signal is not None
                and self.now >= self.signalled_at + self.stops_after_signal)

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Guest:
    def __init__(self, world: World, side: str) -> None:
        self.world, self.side = world, side
        self.commands: list[str] = []

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        w = self.world
        self.commands.append(command)
        w.now += 0.05  # an SSH round trip
        out, code = "", 0
        if command.startswith("mkdir -p /tmp/netbed && rm -f"):
            assert self.side == "sender" and "nohup sh -c" in command
            w.started_at = w.now
        elif command == traffic.status_command():
            out = f"{w.exit_code}\n" if w.netperf_ended() else ""
        elif command.startswith("test -e"):
            code = 0 if w.now >= w.window_closes_at else 1
        elif "kill -INT" in command:
            w.signals.append((self.side, command))
            if w.signalled_at is None:
                w.signalled_at = w.now
        elif command.startswith("cat /tmp/netbed/netperf.out"):
            out = "THROUGHPUT=300.5\n"
        else:
            raise AssertionError(f"unexpected command {command!r}")
        return Result(command, code, out, "")


def run(world: World, workload: str = "TCP_STREAM") -> tuple[traffic.TrafficOutcome, Guest, Guest]:
    rx, tx = Guest(world, "receiver"), Guest(world, "sender")
    outcome = traffic.run_until_window_closes(
        rx, tx, "timeout 216 netperf -l 186", workload, closed_file=CLOSED,
        reader_pid_file=PID, cap_s=186, clock=lambda: world.now, sleep=world.sleep)
    return outcome, rx, tx


def test_netperf_is_stopped_once_the_window_has_closed_however_slow_the_window():
    # the old fixed tail ended netperf at 11 s; a slow (cache-model) window closes at 40 s
    world = World(window_closes_at=40.0, netperf_cap=186.0)
    outcome, _, _ = run(world)
    assert outcome == traffic.TrafficOutcome(0, "THROUGHPUT=300.5\n", "window-closed")
    assert world.signalled_at is not None and world.signalled_at >= 40.0
    assert world.signals == [("sender", "pkill -INT -x netperf || true")]
    assert world.now < 40.0 + 3  # polled, not slept through


def test_maerts_stops_the_reader_on_the_receiver_not_netperf():
    world = World(window_closes_at=12.0, netperf_cap=186.0)
    outcome, _, _ = run(world, "tcp_maerts")
    assert outcome.stopped_by == "window-closed"
    assert [side for side, _ in world.signals] == ["receiver"]
    assert PID in world.signals[0][1]


def test_netperf_ending_first_is_returned_as_it_is():
    world = World(window_closes_at=500.0, netperf_cap=30.0, exit_code=1)
    outcome, _, _ = run(world)
    assert outcome.stopped_by == "own-clock" and outcome.exit_code == 1
    assert world.signals == []


def test_a_lost_signal_is_sent_again():
    world = World(window_closes_at=5.0, netperf_cap=186.0, stops_after_signal=None)
    original = world.netperf_ended

    def ends_after_second_signal() -> bool:
        return len(world.signals) >= 2 or original()

    world.netperf_ended = ends_after_second_signal  # type: ignore[method-assign]
    outcome, _, _ = run(world)
    assert outcome.stopped_by == "window-closed" and len(world.signals) == 2


def test_netperf_that_ignores_the_signal_fails_the_repetition_within_the_grace():
    world = World(window_closes_at=5.0, netperf_cap=186.0, stops_after_signal=None)
    with pytest.raises(GuestError, match="did not end within 60 s of SIGINT to the sender"):
        run(world)
    assert world.now < 5.0 + traffic.STOP_GRACE_S + 2


def test_neither_ending_is_a_guest_error_not_a_hang():
    world = World(window_closes_at=1e9, netperf_cap=1e9)
    with pytest.raises(GuestError, match="both still running"):
        run(world)


def test_the_start_command_detaches_netperf_and_records_its_status():
    cmd = traffic.start_command("timeout 40 netperf -H 198.18.0.1 -- -k 'A,B'")
    assert cmd.endswith("&") and "nohup sh -c" in cmd
    assert "echo $? > /tmp/netbed/netperf.rc" in cmd and "'\"'\"'A,B'\"'\"'" in cmd
