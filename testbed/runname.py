"""Names that become paths: the run folder `<time>-<name>[-shardKofN]`, in one place.

Validation (is an experiment's name short and plain enough?) and the runner
(what folder to create) both use these functions, so a name that passes a dry
run cannot fail at `mkdir`. Every component must fit NAME_MAX bytes, the file
name limit of Linux file systems.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from testbed.errors import NetbedError

NAME_MAX = 255                    # bytes in one path component (ext4, xfs, btrfs, tmpfs)
TIME_FORMAT = "%Y%m%dT%H%M%SZ"    # UTC, sortable
MAX_SHARDS = 9999
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit"
_TIME_WIDTH = len(datetime(2000, 1, 1).strftime(TIME_FORMAT))


def shard_suffix(shard: tuple[int, int] | None) -> str:
    return f"-shard{shard[0]}of{shard[1]}" if shard else ""


# The longest name that still fits with the time and the longest shard suffix.
MAX_NAME_BYTES = NAME_MAX - _TIME_WIDTH - 1 - len(shard_suffix((MAX_SHARDS, MAX_SHARDS)))


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a run, or None."""
    if not NAME_RE.match(name):
        return f"must be {NAME_RULE} (it becomes part of the run folder's name)"
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        return (f"is {size} characters long; at most {MAX_NAME_BYTES} fit in the run folder's "
                f"name <time>-<name>[-shardKofN] ({NAME_MAX} bytes)")
    return None


def name_from_file(path: Path) -> str:
    """A valid experiment name from a file name: 'f17 my exp.yaml' -> 'f17-my-exp'."""
    stem = "stdin" if str(path) == "-" else path.stem
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip("-_.")
    return name[:MAX_NAME_BYTES].rstrip("-_.") or "experiment"


def run_folder_name(name: str, when: datetime, shard: tuple[int, int] | None = None) -> str:
    """`<time>-<name>[-shardKofN]`; a NetbedError when it could not be a file name."""
    problem = name_problem(name)
    if problem:
        raise NetbedError(f"experiment name {name[:60]!r} {problem}")
    if shard and not (1 <= shard[0] <= shard[1] <= MAX_SHARDS):
        raise NetbedError(f"bad shard {shard[0]}/{shard[1]} (at most {MAX_SHARDS} shards)")
    return f"{when.strftime(TIME_FORMAT)}-{name}{shard_suffix(shard)}"
