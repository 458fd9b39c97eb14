"""The copy-lag axis `rcvbuf`: how much the receiver's socket may queue (pure).

Levels are `auto` (the kernel's autotuning, tcp_rmem up to 6 MiB: netbed's behaviour
before the axis existed, and the default) or a size, written in bytes or with a K or
M suffix (KiB, MiB): `64K`, `256K`, `1M`, `65536`.

How a level is set (docs/copy-lag.md): netperf's test-specific `-S ,N` makes
netserver call setsockopt(SO_RCVBUF, N) on its listening socket before the test's
connection is accepted, so only the measured connection gets it (the control
connection and everything else keep their defaults). Linux caps N at
`net.core.rmem_max`, doubles it (room for the skbs' overhead) and turns autotuning
off for that socket (SOCK_RCVBUF_LOCK); the advertised window is then about N of
payload (tcp_adv_win_scale 1: half the doubled buffer). The receiver's rmem_max is
raised to the level first (`rmem_max_command`), so `1M` is not silently capped at
208 KiB. Levels are bounded by MAX_BYTES, below tcp_rmem's 6 MiB maximum, so the
raised rmem_max cannot change the window scale later autotuned connections choose
(tcp_select_initial_window takes the larger of the two). netserver's recv size
follows its buffer unless asked, so every non-auto level also pins it (`-M`) to
RECV_SIZE, the size netserver chose under autotuning: the levels change how much
may queue, not how much each recv copies.

TCP_MAERTS is refused with a level (testbed.experiment.load): there the receiver
guest's netserver sends, and the queue the level would bound is on the other guest.
TCP_RR takes levels (netperf sets netserver's buffer alike), but a request queues at
most its own size, so a level binds only when it is below the request size.
"""

from __future__ import annotations

import re
from typing import Any

AUTO = "auto"
KIB = 1024
MIB = 1024 * 1024
MIN_BYTES = 4 * KIB
MAX_BYTES = 4 * MIB
# netserver's recv size under autotuning (its initial SO_RCVBUF, tcp_rmem[1] = 128 KiB;
# REMOTE_RECV_SIZE=131072 in every STREAM run before the axis): pinned for every level.
RECV_SIZE = 131072
# Linux's default net.core.rmem_max (SK_RMEM_MAX on x86-64): a level below it needs no raise.
DEFAULT_RMEM_MAX = 212992
RMEM_MAX_PATH = "/proc/sys/net/core/rmem_max"
MAERTS_REASON = ("TCP_MAERTS sends from the receiver guest; the queue a level would bound "
                 "is on the sender guest")

_LEVEL_RE = re.compile(r"^([0-9]{1,9})\s*([KkMm](?:iB)?)?$")


def parse_level(value: Any) -> str:
    """A level as written in YAML -> its canonical text (`auto`, `64K`, `1M`, `1536`).

    Canonical: the largest unit that divides it, so `1024K` and `1M` are one level
    (one cell id). Raises ValueError with the fix for anything else.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(_bad(value))
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip()
        if text.lower() == AUTO:
            return AUTO
        m = _LEVEL_RE.match(text)
        if not m:
            hint = (" (KB is ambiguous: write K for KiB)"
                    if re.match(r"^[0-9]+\s*[KkMm][Bb]$", text) else "")
            raise ValueError(_bad(value) + hint)
        unit = (m.group(2) or "")[:1].upper()
        size = int(m.group(1)) * {"": 1, "K": KIB, "M": MIB}[unit]
    else:
        raise ValueError(_bad(value))
    if not MIN_BYTES <= size <= MAX_BYTES:
        raise ValueError(f"rcvbuf {_shown(value)} is {size} bytes; levels lie between 4K and "
                         f"4M (above 4M the raised net.core.rmem_max would pass tcp_rmem's "
                         f"6 MiB and change other connections' window scale)")
    return label(size)


def label(size: int) -> str:
    """65536 -> '64K', 1048576 -> '1M', 5000 -> '5000'."""
    if size % MIB == 0:
        return f"{size // MIB}M"
    if size % KIB == 0:
        return f"{size // KIB}K"
    return str(size)


def level_bytes(level: str) -> int | None:
    """The level's size in bytes; None for `auto`."""
    return None if level == AUTO else parse_level_size(level)


def parse_level_size(level: str) -> int:
    """Bytes of a canonical, non-auto level (`64K` -> 65536)."""
    m = _LEVEL_RE.match(level)
    if not m:
        raise ValueError(_bad(level))
    unit = (m.group(2) or "")[:1].upper()
    return int(m.group(1)) * {"": 1, "K": KIB, "M": MIB}[unit]


def kernel_rcvbuf(level: str, rmem_max: int) -> int | None:
    """The SO_RCVBUF the kernel gives a socket asked for `level` (doubled, capped at
    rmem_max first; sock_setsockopt in Linux 6.1); None for `auto` (autotuned)."""
    size = level_bytes(level)
    return None if size is None else 2 * min(size, rmem_max)


def netperf_test_args(level: str) -> list[str]:
    """netperf test-specific options for a level: none for `auto`; else `-S ,N` (netserver's
    SO_RCVBUF only; its send buffer keeps the default) and `-M RECV_SIZE` (its recv size)."""
    size = level_bytes(level)
    if size is None:
        return []
    return ["-S", f",{size}", "-M", str(RECV_SIZE)]


def rmem_max_command(level: str) -> str | None:
    """Receiver command that lets SO_RCVBUF reach the level (net.core.rmem_max raised to
    max(level, Linux's default)) and prints the value in force; None for `auto`, which
    touches nothing (a value raised by an earlier cell of the same boot is inert for
    autotuned sockets: see the module docstring)."""
    size = level_bytes(level)
    if size is None:
        return None
    want = max(size, DEFAULT_RMEM_MAX)
    return f"echo {want} > {RMEM_MAX_PATH} && echo rmem_max=$(cat {RMEM_MAX_PATH})"


def parse_rmem_max(text: str) -> int | None:
    """`rmem_max=N` from rmem_max_command's output; None when absent."""
    m = re.search(r"rmem_max=([0-9]+)", text)
    return int(m.group(1)) if m else None


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f"'{value[:40]}'"
    return text[:60]


def _bad(value: Any) -> str:
    return (f"rcvbuf {_shown(value)} is not a level; write auto, a size with K or M "
            "(KiB, MiB: 64K, 256K, 1M) or a whole number of bytes")
