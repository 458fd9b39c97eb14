"""The test traffic of one repetition: netperf runs until the receiver's window has closed.

netperf used to run for a fixed time (lead + window + a tail) and the window had to
fit inside it. Under the cache model the receiver runs many times slower inside the
window, and its last edge read came after netperf had ended and the reader's socket
was gone (`nbsnap: units after: No such file or directory`). A longer tail only moves
the guess. So the sender's netperf now runs in the background with a long cap, the
host waits until the receiver's window says it has closed, and then the side that
sends is told to stop:

- netperf (and, in MAERTS, netserver's data process) installs a SIGINT handler for
  its timed test that only sets `times_up` (netperf 2.x `netlib.c` `catcher`), so a
  SIGINT ends the test as if its clock had run out: the final exchange happens and
  netperf prints its totals. netperf's totals then cover its start to the window's
  close; they are kept, and never divide window counts.
- TCP_STREAM and TCP_RR: the sender's netperf gets the signal.
- TCP_MAERTS: netserver's data process sends, on its own clock; stopping netperf
  would reset a sending connection (netserver exits on the send error), so the
  reader on the receiver gets the signal instead.

The loop polls through `Shell`s, so a fake stands in for both guests in tests.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from testbed.errors import GuestError
from testbed.shell import Shell

GUEST_DIR = "/tmp/netbed"
NETPERF_OUT = f"{GUEST_DIR}/netperf.out"
NETPERF_RC = f"{GUEST_DIR}/netperf.rc"
POLL_S = 0.5
STOP_GRACE_S = 60.0  # after the stop signal: netperf's final exchange under a slow receiver
RESIGNAL_S = 5.0  # a signal that landed between two syscalls is sent again


@dataclass(frozen=True)
class TrafficOutcome:
    """How netperf ended, and what it printed."""

    exit_code: int
    output: str
    stopped_by: str  # "window-closed" (netbed stopped it) or "own-clock" (its -l ran out)


def start_command(netperf_command: str) -> str:
    """Start netperf detached from the SSH session; its status lands in NETPERF_RC."""
    body = f"{netperf_command} > {NETPERF_OUT} 2>&1; echo $? > {NETPERF_RC}"
    return (f"mkdir -p {GUEST_DIR} && rm -f {NETPERF_OUT} {NETPERF_RC} && "
            f"nohup sh -c {shlex.quote(body)} < /dev/null > /dev/null 2>&1 &")


def status_command() -> str:
    """netperf's exit status once it has ended, nothing while it runs."""
    return f"cat {NETPERF_RC} 2>/dev/null || true"


def stop_command(workload: str, reader_pid_file: str) -> tuple[str, str]:
    """(which guest, command) that ends the test: SIGINT to the side that sends."""
    if workload.upper() == "TCP_MAERTS":
        return "receiver", f'p=$(cat {reader_pid_file} 2>/dev/null) && kill -INT "$p" || true'
    return "sender", "pkill -INT -x netperf || true"


def run_until_window_closes(rx: Shell, tx: Shell, netperf_command: str, workload: str, *,
                            closed_file: str, reader_pid_file: str, cap_s: float,
                            clock: Callable[[], float] = time.monotonic,
                            sleep: Callable[[float], None] = time.sleep) -> TrafficOutcome:
    """Run netperf on `tx` until the receiver's window has closed, then stop it.

    If netperf ends on its own clock first (its cap ran out, or it failed), that
    outcome is returned as it is: the window's own checks then say what is missing.
    Raises GuestError when neither happens within the cap, or netperf does not end
    within STOP_GRACE_S of being told to.
    """
    tx.run(start_command(netperf_command))
    deadline = clock() + cap_s + STOP_GRACE_S
    while True:
        status = tx.run(status_command()).stdout.strip()
        if status:
            return _outcome(tx, status, "own-clock")
        if rx.run(f"test -e {closed_file}", check=False).ok:
            break
        if clock() > deadline:
            raise GuestError(f"netperf and the receiver's window were both still running "
                             f"{cap_s + STOP_GRACE_S:.0f} s after netperf started")
        sleep(POLL_S)
    side, stop = stop_command(workload, reader_pid_file)
    stopper = rx if side == "receiver" else tx
    stop_deadline = clock() + STOP_GRACE_S
    next_signal = clock()
    while True:
        if clock() >= next_signal:
            stopper.run(stop, check=False)
            next_signal = clock() + RESIGNAL_S
        status = tx.run(status_command()).stdout.strip()
        if status:
            return _outcome(tx, status, "window-closed")
        if clock() > stop_deadline:
            raise GuestError(f"netperf did not end within {STOP_GRACE_S:.0f} s of SIGINT "
                             f"to the {side} once the window had closed")
        sleep(POLL_S)


def _outcome(tx: Shell, status: str, stopped_by: str) -> TrafficOutcome:
    try:
        code = int(status)
    except ValueError as exc:
        raise GuestError(f"netperf's status file holds {status!r}, not a number") from exc
    output = tx.run(f"cat {NETPERF_OUT} 2>/dev/null || true").stdout
    return TrafficOutcome(code, output, stopped_by)
