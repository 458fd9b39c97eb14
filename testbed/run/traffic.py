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

The host learns that the window has closed from the receiver's serial console, a file
on the host: the window script writes CLOSED_MARK there once every edge read is done
(testbed.run.window). Asking the receiver over SSH would put our own processes (sshd, a
shell, its polls) into the receiver while it is measured: a window opens late (the
reader's set-up; under the cache model about a second), so no fixed delay after
netperf's start keeps the poll out of it. The receiver is asked over SSH only where no
console log is given (tests that drive run_repetition with guests of their own) or no
mark has come CONSOLE_LATE_S after the window should have closed.

The loop works through `Shell`s, so a fake stands in for both guests in tests. Its
waits run inside the guests (or on the console file), bounded, so it notices a closed
window within 0.1 s instead of a host poll period plus two SSH round trips.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import GuestError
from testbed.shell import Shell
from testbed.vocabulary import GUEST_DIR

CONSOLE_POLL_S = 0.05  # the host's look at the receiver's console log

NETPERF_OUT = f"{GUEST_DIR}/netperf.out"
NETPERF_RC = f"{GUEST_DIR}/netperf.rc"
NETPERF_PID = f"{GUEST_DIR}/netperf.pid"  # the `timeout` wrapping netperf (its parent)
OUTPUT_MARK = "@@netbed-netperf-output@@"
WAIT_S = 2.0  # one bounded wait inside the guest: ends as soon as what it waits for happens
STOP_GRACE_S = 60.0  # after the stop signal: netperf's final exchange under a slow receiver
RESIGNAL_S = 5.0  # a signal that landed between two syscalls is sent again
# no close mark on the console this long after warm-up + window: ask the receiver over SSH
# too (a window long over whose mark was lost, or a hung receiver: its SSH times out)
CONSOLE_LATE_S = 30.0


@dataclass(frozen=True)
class TrafficOutcome:
    """How netperf ended, and what it printed."""

    exit_code: int
    output: str
    stopped_by: str  # "window-closed" (netbed stopped it) or "own-clock" (its -l ran out)


def start_command(netperf_command: str) -> str:
    """Start netperf detached from the SSH session; its status lands in NETPERF_RC and the
    pid of the `timeout` that wraps it in NETPERF_PID, so the stop reaches this netperf
    only (a native sender shares the host's process table with any other netperf)."""
    body = (f"{netperf_command} > {NETPERF_OUT} 2>&1 & echo $! > {NETPERF_PID}; "
            f"wait $!; echo $? > {NETPERF_RC}")
    # the old files go before the command returns (not in the background job): a wait
    # right after it must not read the previous repetition's status
    return (f"mkdir -p {GUEST_DIR} && rm -f {NETPERF_OUT} {NETPERF_RC} {NETPERF_PID} "
            f"|| exit 1; nohup sh -c {shlex.quote(body)} < /dev/null > /dev/null 2>&1 &")


def wait_until(test: str, seconds: float) -> str:
    """Poll `test` in the guest every 0.1 s for at most `seconds` of the guest's clock
    (pure): an SSH round trip costs 0.2-0.7 s under TCG, so the host waits inside the
    guest, not between calls. The bound reads /proc/uptime (centiseconds, builtins
    only) rather than counting polls: in a busy TCG guest each `sleep 0.1` took up
    to 0.18 s, so 40 polls lasted 7-8 s instead of 4."""
    cs = int(seconds * 100)
    # "1234.05" -> 123405; the 1 in front of the decimals keeps "05" from reading as octal
    now = 'read -r u _ < /proc/uptime; u=$((${u%.*} * 100 + 1${u#*.} - 100))'
    return (f"{now}; end=$((u + {cs})); until {test}; do {now}; "
            f"[ $u -ge $end ] && break; sleep 0.1; done")


def start_and_wait_command(netperf_command: str, wait_s: float) -> str:
    """Start netperf (start_command) and, in the same round trip, wait up to `wait_s`
    for it to end (status_command): the window cannot close sooner (pure)."""
    return f"{start_command(netperf_command)}\n{status_command(wait_s)}"


def status_command(wait_s: float = 0.0) -> str:
    """Once netperf has ended: its exit status, OUTPUT_MARK and its output; nothing while it
    runs (after waiting up to `wait_s` for it to end)."""
    wait = wait_until(f"[ -s {NETPERF_RC} ]", wait_s) + "; " if wait_s > 0 else ""
    return (f"{wait}if [ -s {NETPERF_RC} ]; then cat {NETPERF_RC}; echo {OUTPUT_MARK}; "
            f"cat {NETPERF_OUT} 2>/dev/null; fi; true")


def wait_closed_command(closed_file: str, wait_s: float = WAIT_S) -> str:
    """Status 0 as soon as the window has closed, 1 after `wait_s` if it has not."""
    return wait_until(f"[ -e {closed_file} ]", wait_s) + f"; [ -e {closed_file} ]"


def console_closed(console: Path, offset: int, mark: str,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> Callable[[float], bool]:
    """A wait of up to N seconds for a line holding `mark` in the console log `console`
    after byte `offset` (where the log ended before the window was armed): True as soon
    as it is there, False after the N seconds."""
    def wait(seconds: float) -> bool:
        end = clock() + seconds
        while mark not in console_text(console, offset):
            if clock() >= end:
                return False
            sleep(CONSOLE_POLL_S)
        return True

    return wait


def console_text(console: Path, offset: int) -> str:
    """What the guest wrote to its console log after byte `offset` ("" before QEMU has
    made the file)."""
    try:
        with console.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def console_offset(console: Path) -> int:
    """Where the console log ends now (0 before QEMU has written it)."""
    return console.stat().st_size if console.exists() else 0


def stop_command(workload: str, reader_pid_file: str) -> tuple[str, str]:
    """(which guest, command) that ends the test: SIGINT to the side that sends.

    The sender's signal goes to netperf itself, the child of its `timeout`: signalled,
    `timeout` would pass it on but also arm its 5 s kill, too short for the final
    exchange with a receiver slowed by the cache model."""
    if workload.upper() == "TCP_MAERTS":
        return "receiver", f'p=$(cat {reader_pid_file} 2>/dev/null) && kill -INT "$p" || true'
    return "sender", (f'p=$(cat {NETPERF_PID} 2>/dev/null) && '
                      f'pkill -INT -x -P "$p" netperf || true')


def run_until_window_closes(rx: Shell, tx: Shell, netperf_command: str, workload: str, *,
                            closed_file: str, reader_pid_file: str, cap_s: float,
                            earliest_close_s: float = 0.0,
                            clock: Callable[[], float] = time.monotonic,
                            on_closed: Callable[[], None] | None = None,
                            closed: Callable[[float], bool] | None = None) -> TrafficOutcome:
    """Run netperf on `tx` until the receiver's window has closed, then stop it.

    If netperf ends on its own clock first (its cap ran out, or it failed), that
    outcome is returned as it is: the window's own checks then say what is missing.
    Raises GuestError when neither happens within the cap, or netperf does not end
    within STOP_GRACE_S of being told to. Every wait is bounded and inside a guest.

    `closed(seconds)` waits for the window's close without touching the receiver (the
    console mark: console_closed; only CONSOLE_LATE_S after warm-up plus window without
    a mark is the receiver asked as well); without it the receiver is asked over SSH, but not
    before `earliest_close_s` after netperf starts (warm-up plus window; a window that
    opens late is still running then, and each poll is a process in it, counted by
    perf and by the cache model like the traffic's own work).

    `on_closed` is called once the window is seen closed, before the side that sends is
    stopped: the caller may start fetching the window's files then, alongside the stop.
    """
    # one round trip starts netperf and waits out the warm-up and the window
    out = tx.run(start_and_wait_command(netperf_command, earliest_close_s),
                 timeout=earliest_close_s + 60).stdout
    deadline = clock() + cap_s + STOP_GRACE_S
    late = clock() + CONSOLE_LATE_S
    while True:
        ended = _parse_status(out)
        if ended is not None:
            return TrafficOutcome(*ended, "own-clock")
        if closed is not None:
            if closed(WAIT_S):
                break
            if clock() > late and rx.run(wait_closed_command(closed_file), check=False).ok:
                break
        elif rx.run(wait_closed_command(closed_file), check=False).ok:
            break
        if clock() > deadline:
            raise GuestError(f"netperf and the receiver's window were both still running "
                             f"{cap_s + STOP_GRACE_S:.0f} s after netperf started")
        out = tx.run(status_command()).stdout
    if on_closed is not None:
        on_closed()
    side, stop = stop_command(workload, reader_pid_file)
    stop_deadline = clock() + STOP_GRACE_S
    while True:  # signal, wait up to RESIGNAL_S for netperf to end, signal again
        if side == "sender":
            out = tx.run(f"{stop}; {status_command(RESIGNAL_S)}", check=False).stdout
        else:
            rx.run(stop, check=False)
            out = tx.run(status_command(RESIGNAL_S)).stdout
        ended = _parse_status(out)
        if ended is not None:
            return TrafficOutcome(*ended, "window-closed")
        if clock() > stop_deadline:
            raise GuestError(f"netperf did not end within {STOP_GRACE_S:.0f} s of SIGINT "
                             f"to the {side} once the window had closed")


def _parse_status(text: str) -> tuple[int, str] | None:
    """status_command's output -> (exit status, netperf's output), None while it runs."""
    if not text.strip():
        return None
    status, sep, output = text.partition(OUTPUT_MARK + "\n")
    if not sep:
        status, _, output = text.partition(OUTPUT_MARK)
    try:
        return int(status.strip()), output
    except ValueError as exc:
        raise GuestError(f"netperf's status file holds {status.strip()!r}, "
                         "not a number") from exc
