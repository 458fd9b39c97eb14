"""netperf: the command the sender runs (omni selectors), its raw file, its parser.

Raw file: `netperf.txt`, netperf's omni keyval output (KEY=VALUE lines) as printed.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from testbed.errors import NetbedError
from testbed.vocabulary import WORKLOAD_NAMES

# --------------------------------------------------------------------------- netperf

WORKLOADS = WORKLOAD_NAMES  # what netperf_command accepts
RAW = "netperf.txt"  # netperf omni keyval output (KEY=VALUE lines)
FILES = (RAW,)

# Omni output selectors asked of every test. Unknown selectors would make netperf
# fail, so this list only names selectors netperf 2.7 documents.
NETPERF_SELECTORS: tuple[str, ...] = (
    "THROUGHPUT",
    "THROUGHPUT_UNITS",
    "ELAPSED_TIME",
    "PROTOCOL",
    "DIRECTION",
    "LOCAL_CPU_UTIL",
    "REMOTE_CPU_UTIL",
    "LOCAL_CPU_BIND",
    "REMOTE_CPU_BIND",
    "LOCAL_TRANSPORT_RETRANS",
    "REMOTE_TRANSPORT_RETRANS",
    "TRANSPORT_MSS",
    "LOCAL_SEND_SIZE",
    "LOCAL_RECV_SIZE",
    "REMOTE_SEND_SIZE",
    "REMOTE_RECV_SIZE",
    # netserver's receive buffer (SO_RCVBUF as getsockopt returns it): asked (-1: not
    # asked, autotuned), on its listening socket before the test, and at the test's end
    # (the copy-lag axis, docs/copy-lag.md)
    "RSR_SIZE_REQ",
    "RSR_SIZE",
    "RSR_SIZE_END",
)
# Request/response adds the transaction rate and the latency distribution; the
# percentiles need the global `-j` flag (netperf keeps a histogram only then).
NETPERF_RR_SELECTORS: tuple[str, ...] = (
    "TRANSACTION_RATE",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "RT_LATENCY",
    "MEAN_LATENCY",
    "MIN_LATENCY",
    "P50_LATENCY",
    "P90_LATENCY",
    "P99_LATENCY",
    "MAX_LATENCY",
    "STDDEV_LATENCY",
)


# netserver's recv size under autotuning (its initial SO_RCVBUF, tcp_rmem[1] = 128 KiB:
# REMOTE_RECV_SIZE=131072 in every STREAM run before the copy-lag axis), pinned for every
# set receive buffer so the levels change how much may queue, not how much a recv copies.
RECV_SIZE = 131072


def receive_buffer_args(size: int | None) -> list[str]:
    """Test-specific options that give netserver's socket a receive buffer of `size` bytes
    (the copy-lag axis; none for None, autotuning). `-S ,N` sets only netserver's SO_RCVBUF
    (its send buffer keeps the default; netperf's break_args), on its listening socket
    before the test's connection is accepted, so only the measured connection gets it;
    netserver's recv size would follow the buffer, so `-M` pins it to RECV_SIZE."""
    if size is None:
        return []
    return ["-S", f",{int(size)}", "-M", str(RECV_SIZE)]


class WorkloadLike(Protocol):
    """What the command builder needs of a workload (testbed.experiment.config's model has it)."""

    @property
    def name(self) -> str: ...
    @property
    def message_size(self) -> int: ...


def netperf_command(
    host: str,
    workload: WorkloadLike,
    duration: float,
    remote_cpu: int | None,
    local_cpu: int | None = None,
    timeout_margin: float = 30,
    global_args: Sequence[str] = (),
    test_args: Sequence[str] = (),
) -> str:
    """The netperf client command run on the SENDER VM against netserver on the receiver.

    `-T local,remote` binds netserver's data process on the receiver (the reader
    whose location the policies control); `-c -C` asks both sides for CPU
    utilisation; `global_args`/`test_args` go before/after `--` (the payload's
    `-F` fill file and `-W` send width, testbed.formats.payload); the classic
    test names run as omni "migrated" tests, which accept `-k` output selectors
    and print KEY=VALUE lines. The whole command is wrapped in `timeout` because
    Fabric's timeout closes the channel but leaves the remote process running.
    """
    name = workload.name.upper()
    if name not in WORKLOADS:
        raise NetbedError(
            f"unknown netperf workload {workload.name!r}",
            hint=f"use one of: {', '.join(WORKLOADS)}",
        )
    size = int(workload.message_size)
    if size <= 0:
        raise NetbedError(
            f"workload {name}: message_size must be a positive byte count, got {size}",
            hint="set message_size to e.g. 16384 (STREAM/MAERTS) or 1 (RR)",
        )
    seconds = _whole_seconds(duration)
    selectors = list(NETPERF_SELECTORS)
    glob = ["netperf", "-P", "0", "-H", host, "-t", name, "-l", str(seconds), "-c", "-C"]
    if name == "TCP_RR":
        glob.append("-j")
        selectors += NETPERF_RR_SELECTORS
    if remote_cpu is not None or local_cpu is not None:
        local = "" if local_cpu is None else str(int(local_cpu))
        remote = "" if remote_cpu is None else str(int(remote_cpu))
        glob += ["-T", f"{local},{remote}"]
    glob += list(global_args)
    if name == "TCP_STREAM":
        test = ["-m", str(size)]
    elif name == "TCP_MAERTS":
        # In MAERTS the remote (netserver) sends; "local,remote" sets both sizes so
        # the receiver's send size is the one asked for whichever side netperf uses.
        test = ["-m", f"{size},{size}"]
    else:
        test = ["-r", f"{size},{size}"]
    test += [*test_args, "-k", ",".join(selectors)]
    limit = seconds + max(1, math.ceil(timeout_margin))
    argv = ["timeout", "-k", "5", str(limit), *glob, "--", *test]
    return shlex.join(argv)


def _whole_seconds(duration: float) -> int:
    """netperf's `-l` takes whole seconds; reject what it would silently truncate."""
    if duration <= 0 or not math.isfinite(duration):
        raise NetbedError(
            f"netperf duration must be a positive number of seconds, got {duration}",
            hint="set duration to e.g. 5",
        )
    seconds = round(duration)
    if abs(seconds - duration) > 1e-9:
        raise NetbedError(
            f"netperf duration {duration} is not a whole number of seconds",
            hint=f"netperf -l takes integers: use {max(1, seconds)}",
        )
    return int(seconds)


@dataclass(frozen=True)
class NetperfResult:
    """netperf's KEY=VALUE output: the raw strings plus the numeric ones as floats."""

    raw: dict[str, str]
    values: dict[str, float]

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    @property
    def throughput_units(self) -> str:
        return self.raw.get("THROUGHPUT_UNITS", "")


_UNIT_RE = re.compile(r"^10\^(\d+)(bits|bytes)/s$")


def parse_netperf(text: str) -> NetperfResult:
    """Parse keyval output; banner and warning lines (no '=') are ignored.

    netperf prints -1 or 0 for things it could not measure (e.g. CPU utilisation
    without a method): those are kept as printed, the reader decides.
    """
    raw: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raw[key] = value.strip()
    if "THROUGHPUT" not in raw:
        raise NetbedError(
            "netperf output has no THROUGHPUT=... line",
            hint="the test probably failed; look at netperf.txt and the guest's console log",
        )
    values: dict[str, float] = {}
    for key, value in raw.items():
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return NetperfResult(raw, values)


def netperf_units_factor(units: str) -> tuple[str, float]:
    """Map THROUGHPUT_UNITS to ("bytes", bytes per unit-second) or ("trans", 1.0).

    Used to turn THROUGHPUT x ELAPSED_TIME into bytes moved or transactions done.
    """
    u = units.strip()
    if u.lower().startswith("trans"):
        return "trans", 1.0
    m = _UNIT_RE.match(u)
    if not m:
        raise NetbedError(
            f"unknown netperf THROUGHPUT_UNITS {units!r}",
            hint="expected 10^N bits/s, 10^N bytes/s or Trans/s",
        )
    scale = 10.0 ** int(m.group(1))
    return "bytes", scale / 8 if m.group(2) == "bits" else scale


