"""The lifecycle of QEMU processes: start, staged readiness, QMP, shutdown, and
never leaving one behind.

Every process started is registered with `testbed.vm.interrupts.TEARDOWN`, so a
signal kills it at once and interpreter exit cannot leave it behind; QEMU also
dies with its parent (PDEATHSIG), which covers kill -9. Every step of stopping
one has a deadline: QMP, the wait for a clean exit, the wait after SIGKILL.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from testbed.errors import GuestError
from testbed.vm.interrupts import TEARDOWN, Stage, interrupted
from testbed.vm.qemu import READY_MARKER, GuestSpec, Qemu, qemu_argv


def short_socket_path(name: str) -> Path:
    """A fresh, short path for a UNIX socket (AF_UNIX paths are limited to 107 bytes).

    The file is removed when its QEMU stops; sockets of processes that died without
    cleaning up (kill -9) are swept here, the next time one is made.
    """
    import tempfile

    base = Path(tempfile.gettempdir()) / SOCKET_DIR
    base.mkdir(mode=0o700, exist_ok=True)
    sweep_stale_sockets(base)
    return base / f"{os.getpid()}-{secrets.token_hex(4)}-{name}.sock"


def socket_owner(path: Path) -> int | None:
    """The pid in a socket name made by short_socket_path (pure)."""
    m = re.fullmatch(r"(\d+)-[0-9a-f]+-.*\.sock", path.name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(owner: int | None) -> bool:
    """Whether a file named by its owner's pid was left by a process that is gone
    (never this one's; a name without a pid is nobody's to judge)."""
    return owner is not None and owner != os.getpid() and not pid_alive(owner)


def sweep_stale_sockets(base: Path) -> list[Path]:
    """Remove socket files whose owning process is gone; returns what was removed."""
    removed = []
    for path in base.glob("*.sock"):
        if owner_gone(socket_owner(path)):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


SHELL_DIR_PREFIX = "shell-"  # invoke shell's work folders in the cache: shell-<pid>-<random>


def shell_workdir_prefix() -> str:
    """mkdtemp prefix of this process's shell work folder: its pid, so a folder left by
    a shell that died (a second Ctrl-C ends it with os._exit, past its `finally`) can be
    told from one still in use."""
    return f"{SHELL_DIR_PREFIX}{os.getpid()}-"


def sweep_stale_workdirs(base: Path) -> list[Path]:
    """Remove shell work folders whose owning process is gone; returns what was removed.
    Folders without a pid in their name (made before the pid was put there) are left."""
    removed = []
    for path in sorted(base.glob(f"{SHELL_DIR_PREFIX}*")) if base.is_dir() else []:
        m = re.fullmatch(rf"{SHELL_DIR_PREFIX}(\d+)-.+", path.name)
        if path.is_dir() and owner_gone(int(m.group(1)) if m else None):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


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


PR_SET_PDEATHSIG = 1
# Teardown budgets: QMP answers in milliseconds; a QEMU that does not is stuck.
QMP_TIMEOUT_S = 2.0
SHUTDOWN_WAIT_S = 5.0
KILL_WAIT_S = 2.0
SOCKET_DIR = "netbed-sockets"


def _resolve_prctl() -> Callable[..., int] | None:
    """prctl from libc, looked up here in the parent: the child between fork and exec
    must not load libraries (another thread may hold the loader's lock)."""
    import ctypes

    try:
        fn: Callable[..., int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


_PRCTL = _resolve_prctl()


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills QEMU if we die, even by SIGKILL,
    which no atexit handler survives (a kill -9'd run must not leave guests behind)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_registered() -> None:
    TEARDOWN.run(Stage.PROCESSES, KILL_WAIT_S)


atexit.register(_kill_registered)  # an exception or sys.exit: no QEMU outlives us


async def _qmp_execute(path: str, command: str, timeout: float) -> object:
    from qemu.qmp import QMPClient

    client = QMPClient()
    try:
        async with asyncio.timeout(timeout):
            await client.connect(path)
            return await client.execute(command)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):
                await client.disconnect()


class QemuProcess:
    """One running QEMU; a context manager that always leaves nothing behind."""

    def __init__(self, spec: GuestSpec, qemu_binary: Qemu = "qemu-system-x86_64") -> None:
        self.spec = spec
        self.argv = qemu_argv(spec, qemu_binary)
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        self._token: int | None = None

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
        # Registered first: a signal right after the fork must find it (kill() does
        # nothing until popen is set; shutdown() then kills it without asking).
        self._token = TEARDOWN.register(Stage.PROCESSES, f"QEMU {self.spec.name}",
                                        self.kill)
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        except BaseException:
            TEARDOWN.unregister(self._token)
            raise
        finally:
            log.close()

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

    def qmp(self, command: str, timeout: float = QMP_TIMEOUT_S) -> object:
        """One QMP command, connection included, within `timeout` seconds."""
        return asyncio.run(_qmp_execute(str(self.spec.qmp_socket), command, timeout))

    def shutdown(self, timeout: float = SHUTDOWN_WAIT_S) -> None:
        """Ask QEMU to quit over QMP; kill it if it has not gone after `timeout`.

        Bounded in all: QMP_TIMEOUT_S + timeout + KILL_WAIT_S. After an interrupt
        there is nothing to ask: it is killed.
        """
        if self.popen is None:
            TEARDOWN.unregister(self._token)
            return
        if self.alive and not interrupted():
            with contextlib.suppress(Exception):
                self.qmp("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()

    def kill(self, wait: float = KILL_WAIT_S) -> None:
        """SIGKILL the process group, wait up to `wait` s for it, forget it, drop its socket."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=wait)
        TEARDOWN.unregister(self._token)
        self._token = None
        self.spec.qmp_socket.unlink(missing_ok=True)
