"""Atomic file writes: readers (analysis, a resumed run) never see half a file; and
built folders published the same way, so no run ever loses an asset it is using.

Every asset (guest image, distro kernel, plugin header, QEMU backport, kernel build)
lives in a folder named by its content key, and is built in a work folder beside it
that is renamed into place when complete. The builders use:

- `building(dest)`: one build of one asset at a time on the host (flock on a file
  beside it, released by the kernel if the builder dies). Whoever gets the lock second
  finds the asset built and builds nothing.
- Work folders are named `.<asset>.build-*`, so under the lock every one that exists
  was left by a build that died (a kill, a full disk, a reboot): `sweep_leftovers`
  removes them and says that the earlier build was interrupted, before building again.
- `publish_dir` renames the finished work folder into place and never removes a
  published folder: if a complete one is there already (a builder without the lock,
  an older netbed), it is kept and the new work is dropped; an incomplete one is moved
  aside (`.stale-*`, swept with the leftovers), never deleted under a reader. A new
  recipe gets a new key, so its folder is published beside the old one, which stays
  for the runs that booted from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Log = Callable[[str], None]  # (testbed.progress.Log; a sibling in the base layer)


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- published folders

BUILD_MARK = ".build-"
STALE_PREFIX = ".stale-"


def lock_file(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


@contextlib.contextmanager
def building(dest: Path) -> Iterator[None]:
    """Hold the build lock of the asset published at `dest` (waits for another builder)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with lock_file(dest).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def work_prefix(dest: Path) -> str:
    return f".{dest.name}{BUILD_MARK}"


@contextlib.contextmanager
def work_dir(dest: Path) -> Iterator[Path]:
    """A fresh work folder beside `dest`, removed on the way out (whatever happened)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=work_prefix(dest)) as tmp:
        yield Path(tmp)


def leftovers(dest: Path) -> list[Path]:
    """Work folders of earlier builds of this asset, and folders moved aside (pure-ish:
    only lists)."""
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir()
                  if p.name.startswith(work_prefix(dest))
                  or p.name.startswith(f"{STALE_PREFIX}{dest.name}."))


def sweep_leftovers(dest: Path, what: str, log: Log) -> list[Path]:
    """Under `building(dest)`: remove what interrupted builds of `what` left, saying so."""
    found = leftovers(dest)
    if found:
        log(f"an earlier build of {what} was interrupted (left {', '.join(p.name for p in found)}"
            f" in {dest.parent}): removing that and building {what} again")
        for path in found:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return found


def publish_dir(work: Path, dest: Path, complete: Callable[[Path], bool]) -> bool:
    """Rename the finished `work` folder to `dest`; True if it was published.

    rename(2) onto an existing non-empty folder fails, so a published folder is never
    replaced. A complete `dest` wins (False: `work` is left for its caller to drop); an
    incomplete one is moved aside first."""
    for _ in range(3):
        try:
            os.rename(work, dest)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if complete(dest):
            return False
        aside = dest.parent / f"{STALE_PREFIX}{dest.name}.{os.getpid()}-{secrets.token_hex(3)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(dest, aside)
    raise OSError(errno.EEXIST, f"cannot publish {work.name}: {dest} keeps reappearing "
                                "incomplete", str(dest))
