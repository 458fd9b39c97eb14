"""What SIGINT and SIGTERM do while guests run: the program ends within TEARDOWN_BOUND_S.

A KeyboardInterrupt alone does not guarantee that. The main thread may sit where
the exception never surfaces: invoke's runner catches it while a remote command
runs (Fabric re-raises it, but then joins its reader threads, which wait for the
guest), a teardown step may wait on a stuck guest (QMP, SSH), and a program
started in the background by a shell inherits SIGINT *ignored*, so Python never
installs a handler at all. Hence:

- Handlers are installed explicitly, by the code that boots guests
  (`install_signal_handlers`, called by `testbed.vm.topology.boot`), never at
  import: importing analysis/ must not change what Ctrl-C does. They are
  installed whatever the inherited disposition was, because `kill -INT` is how
  netbed stops a run (the remote-hosts interrupt does exactly that).
- A watcher thread reads `signal.set_wakeup_fd`, which the C-level handler
  writes whatever the main thread is doing, so the reaction never depends on
  the main thread reaching Python code.
- First signal: every registered QEMU is killed at once (that also ends each SSH
  session to it, which is what unblocks a waiting Fabric read), the main thread
  unwinds (KeyboardInterrupt, or SystemExit(143) for SIGTERM) so context
  managers remove taps and bridges as usual, and a deadline is armed.
- Second signal, or the deadline passing first: the emergency teardown kills the
  QEMU processes, then removes taps and bridges, in that order, each step with a
  budget, and exits with 128 + the first signal's number.
- Once an interrupted program reaches its exit functions, the teardown is done and
  further signals are ignored: CPython's finalization puts SIG_DFL back for every
  signal with a Python handler, so a second Ctrl-C landing there would kill the
  process by the signal (status -2, not 130) after a complete cleanup.

Whoever creates something an emergency must undo registers it in `TEARDOWN`
(QEMU processes at stage PROCESSES, data planes at stage DEVICES) and removes it
when it has undone it itself.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

# The promise: from the first SIGINT/SIGTERM to the process's exit, at most this.
TEARDOWN_BOUND_S = 10.0
# The orderly unwinding gets this long before the emergency teardown takes over ...
DEADLINE_S = 5.0
# ... which has these budgets (kill, then devices), well inside the bound.
EMERGENCY_KILL_S = 1.5
EMERGENCY_DEVICES_S = 2.5
HANDLED = (signal.SIGINT, signal.SIGTERM)


class Stage(enum.IntEnum):
    """Teardown order: QEMU processes hold the taps, so they go first."""

    PROCESSES = 0
    DEVICES = 1


Action = Callable[[float], None]  # called with its time budget in seconds


@dataclass(frozen=True)
class Entry:
    stage: Stage
    name: str
    action: Action


class Teardown:
    """What an emergency must undo, in stage order, then registration order.

    Reentrant lock: the Python-level signal handler may run in the main thread while
    that thread is inside `register` or `unregister`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[int, Entry] = {}
        self._tokens = itertools.count()

    def register(self, stage: Stage, name: str, action: Action) -> int:
        with self._lock:
            token = next(self._tokens)
            self._entries[token] = Entry(stage, name, action)
            return token

    def unregister(self, token: int | None) -> None:
        if token is not None:
            with self._lock:
                self._entries.pop(token, None)

    def pending(self, stage: Stage | None = None) -> list[Entry]:
        with self._lock:
            items = sorted(self._entries.items(), key=lambda kv: (kv[1].stage, kv[0]))
        return [e for _, e in items if stage is None or e.stage == stage]

    def run(self, stage: Stage, budget: float, clock: Callable[[], float] = time.monotonic
            ) -> list[str]:
        """Run every action of `stage` within `budget` seconds in all; returns the problems.

        Each action gets what is left of the budget; one that fails or overruns does
        not stop the others (an action that ignores its budget is a bug we report).
        """
        problems = []
        end = clock() + budget
        for entry in self.pending(stage):
            left = max(0.05, end - clock())
            try:
                entry.action(left)
            except Exception as exc:  # one failure must not keep the rest in place
                problems.append(f"{entry.name}: {type(exc).__name__}: {exc}")
        return problems


TEARDOWN = Teardown()


def _write_stderr(message: str) -> None:
    """Say something without waiting on stderr: a full pipe must not block an exit.

    (os.write to fd 2 from a helper thread; the caller gives it a moment, no more.)
    """
    def write() -> None:
        with contextlib.suppress(OSError):
            os.write(2, message.encode(errors="replace"))

    t = threading.Thread(target=write, name="netbed-say", daemon=True)
    t.start()
    t.join(0.2)


class InterruptController:
    """The state of interrupts in this process; effects injectable for tests."""

    def __init__(self, teardown: Teardown = TEARDOWN, *, deadline_s: float | None = None,
                 exit_: Callable[[int], None] = os._exit,
                 say: Callable[[str], None] = _write_stderr) -> None:
        self.teardown = teardown
        self.deadline_s = DEADLINE_S if deadline_s is None else deadline_s
        self.exit = exit_
        self.say = say
        self.signals: list[int] = []  # every delivery seen, in order
        self.raised = False  # the main thread has been told to unwind
        self.emergency_reason: str | None = None
        self._lock = threading.RLock()
        self._deadline: threading.Timer | None = None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signals[0] if self.signals else signal.SIGINT)

    def observe(self, signum: int) -> None:
        """One delivered SIGINT/SIGTERM (from the watcher thread, or the handler)."""
        with self._lock:
            self.signals.append(signum)
            first = len(self.signals) == 1
        if first:
            self.teardown.run(Stage.PROCESSES, EMERGENCY_KILL_S)
            timer = threading.Timer(self.deadline_s, self.emergency,
                                    args=(f"teardown still running {self.deadline_s:.0f} s "
                                          "after the interrupt",))
            timer.daemon = True
            timer.name = "netbed-teardown-deadline"
            self._deadline = timer
            timer.start()
        else:
            self.emergency("interrupted again")

    def emergency(self, reason: str) -> None:
        """Kill QEMU, then remove taps and bridges, each within its budget; then exit."""
        with self._lock:
            if self.emergency_reason is not None:
                return
            self.emergency_reason = reason
        problems = self.teardown.run(Stage.PROCESSES, EMERGENCY_KILL_S)
        problems += self.teardown.run(Stage.DEVICES, EMERGENCY_DEVICES_S)
        detail = "".join(f"\nnetbed:   {p}" for p in problems)
        self.say(f"netbed: {reason}: killed the guests and removed their devices{detail}\n")
        self.exit(self.exit_code)

    def unwind_exception(self, signum: int) -> BaseException | None:
        """What the main thread raises: only for the first signal (later ones must not
        break the teardown that the first one started)."""
        with self._lock:
            if self.raised:
                return None
            self.raised = True
        if signum == signal.SIGINT:
            return KeyboardInterrupt()
        return SystemExit(128 + signum)

    def cancel_deadline(self) -> None:
        """For tests: stop a pending deadline timer."""
        if self._deadline is not None:
            self._deadline.cancel()


class _Installation:
    """The process-wide handlers: one controller, one wakeup pipe, one watcher thread."""

    def __init__(self) -> None:
        self.controller: InterruptController | None = None
        self.wakeup_w: int | None = None
        self.watcher: threading.Thread | None = None
        self.lock = threading.Lock()


_INSTALLED = _Installation()


def _watch(fd: int, controller: InterruptController) -> None:
    """Each byte the C-level handler writes is one delivered signal."""
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in HANDLED:
                controller.observe(signum)


def _watching() -> bool:
    w = _INSTALLED.watcher
    return w is not None and w.is_alive()


def _handler(signum: int, _frame: FrameType | None) -> None:
    """Runs in the main thread whenever it next executes Python code."""
    controller = _INSTALLED.controller
    assert controller is not None  # installed together
    if not _watching():  # (no watcher: count here, which needs the main thread to run)
        controller.observe(signum)
    exc = controller.unwind_exception(signum)
    if exc is not None:
        raise exc


def _ignore_signals_once_interrupted() -> None:
    """Exit function: after an interrupt nothing is left to do but exit (see above)."""
    if interrupted():
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_IGN)


def install_signal_handlers() -> bool:
    """Install the SIGINT/SIGTERM handling described above; idempotent.

    Returns False where Python does not allow it (not the main thread); QEMU still
    dies with this process (PDEATHSIG) and atexit kills what is registered.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    with _INSTALLED.lock:
        if _INSTALLED.controller is None:  # the first installation, once per process
            _INSTALLED.controller = InterruptController()
            atexit.register(_ignore_signals_once_interrupted)
        if _INSTALLED.wakeup_w is None:
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(w, False)  # the C handler must never block on it
            _INSTALLED.wakeup_w = w
            _INSTALLED.watcher = threading.Thread(
                target=_watch, args=(r, _INSTALLED.controller), daemon=True,
                name="netbed-signal-watcher")
            _INSTALLED.watcher.start()
        # (Re)claim the wakeup fd: asyncio's add_signal_handler, for one, replaces it.
        signal.set_wakeup_fd(_INSTALLED.wakeup_w, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, _handler)
    return True


def current_controller() -> InterruptController | None:
    return _INSTALLED.controller


def interrupted() -> bool:
    """Whether SIGINT/SIGTERM has been seen: nothing new should boot after that."""
    ctl = _INSTALLED.controller  # (raised: the handler ran before the watcher counted it)
    return bool(ctl and (ctl.signals or ctl.raised))
