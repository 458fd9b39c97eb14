"""The lifecycle of QEMU processes: start, staged readiness, QMP, shutdown, and
never leaving one behind.

Every process started is registered so an exception, a Ctrl-C or interpreter
exit cannot leave one behind; QEMU also dies with its parent (PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

from testbed.errors import GuestError
from testbed.vm.qemu import READY_MARKER, GuestSpec, qemu_argv


def short_socket_path(name: str) -> Path:
    """A fresh, short path for a UNIX socket (AF_UNIX paths are limited to 107 bytes)."""
    import tempfile

    base = Path(tempfile.gettempdir()) / "netbed-sockets"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{os.getpid()}-{secrets.token_hex(4)}-{name}.sock"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (QEMU's bind fails loudly if we lose a race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ready_line(console_text: str) -> str | None:
    """The init's readiness line, if the console has printed it (pure)."""
    m = re.search(rf"^{READY_MARKER}\b.*$", console_text, re.MULTILINE)
    return m.group(0) if m else None


def console_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_LIVE: dict[int, QemuProcess] = {}
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills QEMU if we die, even by SIGKILL,
    which no atexit handler survives (a kill -9'd run must not leave guests behind)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_all() -> None:
    for proc in list(_LIVE.values()):
        proc.kill()


atexit.register(_kill_all)


def _on_signal(signum: int, _frame: object) -> None:
    """SIGTERM: stop our guests, then unwind like an exit so context managers remove
    tap devices and bridges too (a later run would sweep them, but why wait)."""
    _kill_all()
    raise SystemExit(128 + signum)


def _on_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: stop our guests first. invoke's runner swallows KeyboardInterrupt while a
    remote command runs (it forwards it to the remote side, which a non-pty command
    ignores), so killing QEMU is what makes the SSH session, and then the task, end."""
    _kill_all()
    signal.default_int_handler(signum, frame)  # type: ignore[arg-type]


with contextlib.suppress(ValueError):  # not in the main thread: atexit still covers us
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)


class QemuProcess:
    """One running QEMU; a context manager that always leaves nothing behind."""

    def __init__(self, spec: GuestSpec, qemu_binary: str = "qemu-system-x86_64") -> None:
        self.spec = spec
        self.argv = qemu_argv(spec, qemu_binary)
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None

    def __enter__(self) -> QemuProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        self.spec.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.spec.console_log, self.spec.qmp_socket):
            stale.unlink(missing_ok=True)
        self.spec.console_log.touch()
        log = open(self.spec.qemu_log, "wb")  # noqa: SIM115 - handed to the child
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        log.close()
        _LIVE[self.popen.pid] = self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _fail(self, what: str) -> GuestError:
        qemu_out = console_tail(self.spec.qemu_log, 10)
        msg = f"guest {self.spec.name}: {what}"
        if qemu_out:
            msg += f"\n--- qemu output ---\n{qemu_out}"
        tail = console_tail(self.spec.console_log, 15)
        if tail:
            msg += f"\n--- console tail ---\n{tail}"
        return GuestError(msg, console_log=str(self.spec.console_log))

    def wait_ready(self, timeout: float) -> float:
        """Block until the console shows the readiness line; returns seconds since start."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise self._fail(f"QEMU exited with status {self.popen and self.popen.poll()}")
            text = self.spec.console_log.read_text(errors="replace")
            if ready_line(text):
                self.ready_at = time.monotonic()
                return self.ready_at - self.started_at
            time.sleep(0.1)
        raise self._fail(f"no {READY_MARKER} line within {timeout:.0f} s")

    def qmp(self, command: str, timeout: float = 5.0) -> object:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        mon = QEMUMonitorProtocol(str(self.spec.qmp_socket))
        try:
            mon.connect()
            return mon.cmd(command)
        finally:
            mon.close()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit over QMP; kill it if it has not gone after `timeout`."""
        if self.popen is None:
            return
        if self.alive:
            with contextlib.suppress(Exception):
                self.qmp("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
        _LIVE.pop(self.popen.pid, None)
        self.spec.qmp_socket.unlink(missing_ok=True)
