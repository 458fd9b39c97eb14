"""netperf runs until the receiver's window closes, then the sending side is stopped.

A simulated pair of guests on a fake clock: the receiver's window closes at a set
time; netperf ends on its own cap, or some time after the side that sends got SIGINT.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.errors import GuestError
from testbed.run import traffic
from testbed.shell import Result
from testbed.vocabulary import GUEST_DIR
from tests.waits import poll_until, wait_child

SH = shutil.which("dash") or "sh"  # the guest's /bin/sh is dash
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
        self.times: list[float] = []

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        w = self.world
        self.commands.append(command)
        self.times.append(w.now)
        w.now += 0.05  # an SSH round trip
        out, code = "", 0
        if command.startswith("mkdir -p /tmp/netbed && rm -f"):
            assert self.side == "sender" and "nohup sh -c" in command
            assert w.started_at is None  # netperf starts once
            w.started_at = w.now
            if "netperf.rc ]; then cat" not in command:
                return Result(command, 0, "", "")
        if "kill -INT" in command:
            w.signals.append((self.side, command))
            if w.signalled_at is None:
                w.signalled_at = w.now
            if self.side == "receiver":
                return Result(command, 0, "", "")
        if f"[ -e {CLOSED} ]" in command:
            assert self.side == "receiver"
            self.wait(command, lambda: w.now >= w.window_closes_at)
            code = 0 if w.now >= w.window_closes_at else 1
        elif "netperf.rc ]; then cat" in command:
            assert self.side == "sender"
            self.wait(command, w.netperf_ended)
            if w.netperf_ended():
                out = f"{w.exit_code}\n{traffic.OUTPUT_MARK}\nTHROUGHPUT=300.5\n"
        else:
            raise AssertionError(f"unexpected command {command!r}")
        return Result(command, code, out, "")

    def wait(self, command: str, done: Callable[[], bool]) -> None:
        """A bounded in-guest wait: polls every 0.1 s until `end` (centiseconds of uptime)."""
        m = re.search(r"end=\$\(\(u \+ (\d+)\)\)", command)  # centiseconds
        for _ in range(int(m.group(1)) // 10 if m else 0):
            if done():
                return
            self.world.sleep(0.1)


def run(world: World, workload: str = "TCP_STREAM", earliest_close_s: float = 0.0,
        closed: Callable[[float], bool] | None = None,
        ) -> tuple[traffic.TrafficOutcome, Guest, Guest]:
    rx, tx = Guest(world, "receiver"), Guest(world, "sender")
    outcome = traffic.run_until_window_closes(
        rx, tx, "timeout 216 netperf -l 186", workload, closed_file=CLOSED,
        reader_pid_file=PID, cap_s=186, earliest_close_s=earliest_close_s,
        clock=lambda: world.now, closed=closed)
    return outcome, rx, tx


def test_netperf_is_stopped_once_the_window_has_closed_however_slow_the_window():
    # the old fixed tail ended netperf at 11 s; a slow (cache-model) window closes at 40 s
    world = World(window_closes_at=40.0, netperf_cap=186.0)
    outcome, _, _ = run(world)
    assert outcome == traffic.TrafficOutcome(0, "THROUGHPUT=300.5\n", "window-closed")
    assert world.signalled_at is not None and world.signalled_at >= 40.0
    assert len(world.signals) == 1 and world.signals[0][0] == "sender"
    assert "pkill -INT -x -P" in world.signals[0][1]
    assert world.now < 40.0 + 1.5  # waited in the guest: noticed within a poll, not a period


def test_a_closed_window_and_netperfs_end_are_noticed_in_few_round_trips():
    world = World(window_closes_at=10.0, netperf_cap=186.0, stops_after_signal=0.3)
    _, rx, tx = run(world)
    # about one wait per WAIT_S, not one call per poll; then one stop-and-wait call
    assert len(rx.commands) <= 10 / traffic.WAIT_S + 2
    assert len(tx.commands) <= len(rx.commands) + 2


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


def test_the_receiver_runs_nothing_of_ours_before_the_window_can_close():
    world = World(window_closes_at=9.0, netperf_cap=186.0)
    outcome, rx, _ = run(world, earliest_close_s=8.0)
    assert outcome.stopped_by == "window-closed"
    assert rx.times and min(rx.times) >= 8.0  # the sender's wait covered warm-up + window
    assert world.now < 9.0 + 1.5


def test_netperf_failing_during_the_first_wait_is_seen_at_once():
    world = World(window_closes_at=30.0, netperf_cap=2.0, exit_code=2)
    outcome, rx, _ = run(world, earliest_close_s=20.0)
    assert outcome == traffic.TrafficOutcome(2, "THROUGHPUT=300.5\n", "own-clock")
    assert rx.commands == [] and world.now < 3.0


@pytest.mark.process
@pytest.mark.parametrize(("uptime", "centis"), [("1234.05", 123405), ("87.90", 8790),
                                              ("0.09", 9), ("5.00", 500)])
def test_the_guest_clock_is_read_in_centiseconds_without_octal_surprises(tmp_path, uptime,
                                                                         centis):
    fake = tmp_path / "uptime"
    fake.write_text(f"{uptime} 5.00\n")
    cmd = traffic.wait_closed_command("/nonexistent", 0.0).split("; end=")[0]
    res = subprocess.run([SH, "-c", cmd.replace("/proc/uptime", str(fake)) + '; echo "$u"'],
                         capture_output=True, text=True, timeout=10)
    assert res.stdout.strip() == str(centis), res.stderr


@pytest.mark.process
def test_a_guest_wait_ends_on_the_event_or_after_its_time(tmp_path):
    closed = tmp_path / "closed"
    start = time.monotonic()
    res = subprocess.run([SH, "-c", traffic.wait_closed_command(str(closed), 0.4)],
                         timeout=60)
    assert res.returncode == 1 and time.monotonic() - start >= 0.3  # it waited its time
    closed.touch()  # the event: with an hour to wait, only the event can end it in time
    res = subprocess.run([SH, "-c", traffic.wait_closed_command(str(closed), 3600.0)],
                         timeout=60)
    assert res.returncode == 0


@pytest.mark.process
def test_the_stop_reaches_this_netperf_and_no_other(tmp_path):
    """A native sender shares the host's process table: another run's netperf (or a
    user's) must not get our SIGINT. Real shell, a `sleep` named netperf."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "netperf").symlink_to(shutil.which("sleep"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    other = subprocess.Popen([str(bin_dir / "netperf"), "60"], env=env)
    try:
        def sh(command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["sh", "-c", command.replace(GUEST_DIR, str(tmp_path))],
                                  env=env, capture_output=True, text=True, timeout=30)

        sh(traffic.start_command("timeout -k 5 60 netperf 60"))
        pid_file = Path(traffic.NETPERF_PID.replace(GUEST_DIR, str(tmp_path)))
        poll_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "",
                   "the netperf pid file")
        wait_child(int(pid_file.read_text()), "netperf", "timeout to start its netperf")
        side, stop = traffic.stop_command("TCP_STREAM", "/nonexistent")
        assert side == "sender"
        out = sh(f"{stop}; {traffic.status_command(10)}").stdout
        status = traffic._parse_status(out)
        assert status is not None and status[0] == 130  # ours ended by SIGINT (sleep's way)
        assert other.poll() is None  # the other one runs on
    finally:
        other.kill()
        other.wait()


def test_netperf_starts_and_the_first_wait_runs_in_one_round_trip_then_the_fetch_may_start():
    world = World(window_closes_at=9.0, netperf_cap=186.0, stops_after_signal=0.3)
    rx, tx = Guest(world, "receiver"), Guest(world, "sender")
    closed_seen: list[tuple[float, int]] = []
    outcome = traffic.run_until_window_closes(
        rx, tx, "timeout 216 netperf -l 186", "TCP_STREAM", closed_file=CLOSED,
        reader_pid_file=PID, cap_s=186, earliest_close_s=8.0, clock=lambda: world.now,
        on_closed=lambda: closed_seen.append((world.now, len(world.signals))))
    assert outcome.stopped_by == "window-closed"
    # start + warm-up and window; then one stop-and-wait: two round trips into the sender
    assert len(tx.commands) == 2 and "nohup sh -c" in tx.commands[0]
    assert "end=$((u + 800))" in tx.commands[0]  # the first wait: warm-up plus window
    assert len(rx.commands) == 1
    # called once, after the window was seen closed and before the sender was signalled
    assert len(closed_seen) == 1 and closed_seen[0][0] >= 9.0 and closed_seen[0][1] == 0


@pytest.mark.process
def test_the_start_and_first_wait_command_returns_netperfs_end_in_a_real_shell(tmp_path):
    def sh(command: str) -> str:
        return subprocess.run([SH, "-c", command.replace(GUEST_DIR, str(tmp_path))],
                              capture_output=True, text=True, timeout=30).stdout

    out = sh(traffic.start_and_wait_command("sh -c 'echo THROUGHPUT=1; exit 3'", 20.0))
    assert traffic._parse_status(out) == (3, "THROUGHPUT=1\n")
    # a netperf still running when the wait ends: nothing yet, as status_command says
    assert sh(traffic.start_and_wait_command("sleep 5", 0.2)) == ""


def test_with_the_console_mark_the_receiver_runs_nothing_until_the_window_closes():
    # a window that opens late (the cache model) closes well after warm-up + window: the
    # SSH wait would have run inside it; the console wait never touches the receiver
    world = World(window_closes_at=4.0, netperf_cap=186.0)
    waits: list[float] = []

    def closed(seconds: float) -> bool:
        waits.append(world.now)
        if world.now + seconds >= world.window_closes_at:
            world.now = max(world.now, world.window_closes_at)
            return True
        world.now += seconds
        return False

    outcome, rx, _ = run(world, earliest_close_s=2.5, closed=closed)
    assert outcome.stopped_by == "window-closed" and rx.commands == []
    assert waits and world.signalled_at is not None and world.signalled_at >= 4.0


def test_the_console_wait_sees_only_a_mark_written_after_its_offset(tmp_path):
    console = tmp_path / "console.log"
    console.write_bytes(b"boot\nnetbed-window-closed\n")  # the previous window's mark
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    wait = traffic.console_closed(console, traffic.console_offset(console),
                                  "netbed-window-closed", clock=lambda: now[0], sleep=sleep)
    assert not wait(1.0) and now[0] >= 1.0  # waited its time, on the fake clock
    with console.open("ab") as f:
        f.write(b"[  12.3] eth0: link\nnetbed-window-closed\n")
    assert wait(1.0)
    assert not traffic.console_closed(tmp_path / "none.log", 0, "x", clock=lambda: now[0],
                                      sleep=sleep)(0.2)
    assert traffic.console_offset(tmp_path / "none.log") == 0


def test_the_window_script_writes_its_close_mark_to_the_console_after_closing():
    from testbed.run.window import CLOSED_MARK, WINDOW_CLOSED, window_script
    from tests.unit.test_window import experiment

    script = window_script(experiment(), pmu=False, cachemodel=True, iface="eth1")
    lines = script.splitlines()
    closed = next(i for i, ln in enumerate(lines) if ln.endswith(f"/{WINDOW_CLOSED}")
                  and ln.startswith("touch"))
    assert lines[closed + 1].startswith(f"echo {CLOSED_MARK} > /dev/console")


def test_a_close_mark_that_never_comes_is_not_waited_for_until_the_cap():
    # the window closed at 4 s but its console mark was lost: after CONSOLE_LATE_S the
    # receiver is asked as well (a hung one fails on its SSH timeout, not after the cap)
    world = World(window_closes_at=4.0, netperf_cap=186.0)

    def never(seconds: float) -> bool:
        world.now += seconds
        return False

    outcome, rx, _ = run(world, earliest_close_s=2.5, closed=never)
    assert outcome.stopped_by == "window-closed"
    assert rx.times and min(rx.times) >= 2.5 + traffic.CONSOLE_LATE_S
    assert world.now < 2.5 + traffic.CONSOLE_LATE_S + traffic.WAIT_S + 2
