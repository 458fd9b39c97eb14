"""One measuring run per host at a time: a lock the kernel releases when its holder dies.

Two matrix runs on one host share its CPUs, and under TCG every figure (throughput,
window rates, the cache model's timing) depends on the CPU a guest gets, so both
runs' numbers would be silently wrong. The lock is a file under /run/lock/netbed/
(host-wide, outside every cache dir, so runs with different cache dirs see each
other), held with flock(2) on an open file descriptor: when the holder exits or is
killed (even by SIGKILL or the OOM killer) the kernel drops the lock, so a dead run
never blocks the next one. The holder writes who it is (run id, pid, start time,
command) into the file, so a second run can say whom it waits for.

Where /run/lock is not writable (an unusual container), the lock falls back to the
system temp folder and says so; `NETBED_HOST_LOCK` names another file (tests, or a
host whose runs should share a lock on a common file system).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import NetbedError
from testbed.files import now_iso
from testbed.progress import Log

ENV_VAR = "NETBED_HOST_LOCK"
LOCK_NAME = "measure.lock"
PRIMARY_DIR = Path("/run/lock/netbed")
BUSY_EXIT = 2  # --no-wait with the lock held elsewhere (tasks' user errors exit 2 too)


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) the lock, as its file says."""

    run: str
    pid: int | None
    since: str
    command: str

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid is not None else "pid unknown"
        since = f", since {self.since}" if self.since else ""
        return f"run {self.run} ({pid}{since})"


class HostBusy(NetbedError):
    """Another measuring run holds the host lock and the caller would not wait."""


def parse_holder(text: str) -> Holder:
    """The lock file's content (pure); an empty or foreign one names nobody."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Holder("(not recorded yet)", None, "", "")
    pid = data.get("pid")
    return Holder(str(data.get("run") or "(not recorded)"),
                  pid if isinstance(pid, int) else None,
                  str(data.get("since") or ""), str(data.get("command") or ""))


def lock_path(log: Log | None = None) -> Path:
    """The host-wide lock file: $NETBED_HOST_LOCK, else /run/lock/netbed/measure.lock,
    else (where /run/lock cannot be written) one in the system temp folder, said aloud."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    try:
        _shared_dir(PRIMARY_DIR)
        return PRIMARY_DIR / LOCK_NAME
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / "netbed-host-lock"
        if log is not None:
            log(f"note: cannot use {PRIMARY_DIR} for the host lock ({exc.strerror}); using "
                f"{fallback}/{LOCK_NAME}: runs that cannot see that folder will not see "
                f"this one (set {ENV_VAR} to choose the file)")
        _shared_dir(fallback)
        return fallback / LOCK_NAME


def _shared_dir(path: Path) -> None:
    """A folder every user can make lock files in (sticky, like /tmp)."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):
            path.chmod(0o1777)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(path))


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o666)  # any user's run may take it next (umask would narrow it)
    return fd


def read_holder(fd: int) -> Holder:
    return parse_holder(os.pread(fd, 4096, 0).decode(errors="replace"))


def _record(fd: int, run: str) -> None:
    data = {"run": run, "pid": os.getpid(), "since": now_iso(),
            "command": " ".join(sys.argv)[:300]}
    body = (json.dumps(data, sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)


class HostLock:
    """The lock, held by this process from `acquire` until `release` or its death."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def rename(self, run: str) -> None:
        """Record the run's id once it is known (a new run's folder is made under the lock)."""
        if self._fd is not None:
            _record(self._fd, run)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # a stale name must not be read as a holder
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def busy_message(path: Path, holder: Holder) -> str:
    return (f"another measuring run holds the host lock {path}: {holder.describe()}; "
            "two runs on one host share its CPUs and spoil each other's figures")


def acquire(run: str, *, wait: bool = True, log: Log = print,
            path: Path | None = None) -> HostLock:
    """Take the host lock for `run` (its id, or a description until the id exists).

    Held elsewhere: with `wait`, say whom we wait for and block until the kernel hands
    the lock over; without, raise HostBusy with the same words.
    """
    path = path or lock_path(log)
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = busy_message(path, read_holder(fd))
            if not wait:
                raise HostBusy(message, hint="wait for it to finish, or run without "
                                             "--no-wait to wait for it") from None
            log(message + "; waiting for it to finish (--no-wait exits instead)")
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"host lock {path} taken; starting")
        _record(fd, run)
    except BaseException:
        os.close(fd)
        raise
    return HostLock(path, fd)


@contextlib.contextmanager
def held(run: str, *, wait: bool = True, log: Log = print,
         path: Path | None = None) -> Iterator[HostLock]:
    """`acquire` as a context manager."""
    lock = acquire(run, wait=wait, log=log, path=path)
    try:
        yield lock
    finally:
        lock.release()


def current_holder(path: Path | None = None) -> Holder | None:
    """Who holds the lock now, without taking it; None when nobody does."""
    path = path or lock_path()
    try:
        fd = _open(path)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
