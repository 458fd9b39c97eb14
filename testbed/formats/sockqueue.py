"""How much payload waits in the reader's socket while it copies: raw file, parser, reduction.

Raw file: `sockqueue.txt`, written by the guest's reader sampler `nbsample` (its third
argument; images/tools/nbsample.c), which runs inside the measured window next to the
CPU samples, one round every 50 ms (testbed.run.window.SAMPLER_INTERVAL_S; ~40 samples
in a 2 s window):

    # sockqueue source=sock_diag|proc [why]
    # socket <i> local=<addr>:<port> peer=<addr>:<port>
    <ns> <i> <rqueue> <rmem_alloc> <rcvbuf>

`<ns>` is the guest's CLOCK_MONOTONIC, the clock of stamps.txt, so only samples
between the window's two units reads count. `rqueue` is the payload the socket has
received in order and the reader has not yet copied (tcp rcv_nxt - copied_seq, what
`ss` shows as Recv-Q), `rmem_alloc` the memory its queued skbs hold, `rcvbuf` the
socket's buffer limit (sk_rcvbuf) at that moment; `-` where the source lacks a field.
The reads never take the socket lock (sock_diag's exact lookup without INET_DIAG_INFO;
/proc/net/tcp's rx_queue where the kernel has no sock_diag TCP handler).

Tidy metrics (`queue_rows`): `socket.queue_kb.p50` / `.p95` (KiB of payload waiting,
over the window's samples), `socket.queue_samples`, and `socket.rcvbuf_kb` (the
largest sk_rcvbuf seen in the window: constant for a set level, the autotuned peak
otherwise; from netperf's RSR_SIZE_END when the samples carry no buffer field).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.errors import NetbedError
from testbed.formats import stamps, tcpinfo

RAW = "sockqueue.txt"
# The copy-lag level's provenance, written by the runner (testbed.run.repetition): the
# level asked, net.core.rmem_max, netserver's SO_RCVBUF as netperf read it back.
RAW_RCVBUF = "rcvbuf.json"
FILES = (RAW, RAW_RCVBUF)
# Linux's default net.core.rmem_max (SK_RMEM_MAX on x86-64): a buffer below it needs no raise.
DEFAULT_RMEM_MAX = 212992
RMEM_MAX_PATH = "/proc/sys/net/core/rmem_max"


def kernel_rcvbuf(size: int, rmem_max: int) -> int:
    """The sk_rcvbuf Linux gives a socket asked for SO_RCVBUF `size`: capped at rmem_max,
    then doubled (room for the skbs' overhead; sk_setsockopt in Linux 6.1)."""
    return 2 * min(size, rmem_max)


def rmem_max_command(size: int) -> str:
    """Receiver command that lets SO_RCVBUF reach `size` (net.core.rmem_max set to
    max(size, Linux's default): the same value for a level whatever ran before it in the
    boot) and prints the value in force. Autotuned cells run nothing: a value an earlier
    cell raised is inert for them (autotuning does not read it, and below tcp_rmem's
    maximum it does not change the window scale)."""
    want = max(int(size), DEFAULT_RMEM_MAX)
    return f"echo {want} > {RMEM_MAX_PATH} && echo rmem_max=$(cat {RMEM_MAX_PATH})"


def parse_rmem_max(text: str) -> int | None:
    """`rmem_max=N` from rmem_max_command's output; None when absent."""
    m = re.search(r"rmem_max=([0-9]+)", text)
    return int(m.group(1)) if m else None


def sampler_args(folder: str) -> str:
    """nbsample's third argument: where the queue samples go (pure)."""
    return f"{folder}/{RAW}"


@dataclass(frozen=True)
class Sample:
    ns: int
    socket: int
    rqueue: int
    rmem: int | None
    rcvbuf: int | None


@dataclass(frozen=True)
class SocketQueue:
    """A parsed sockqueue.txt."""

    source: str  # "sock_diag" or "proc"
    note: str  # why the fallback source was used, if it was
    sockets: dict[int, tuple[str, str]] = field(default_factory=dict)  # i -> (local, peer)
    samples: tuple[Sample, ...] = ()


_HEADER_RE = re.compile(r"^#\s*sockqueue\s+source=(\S+)\s*(.*)$")
_SOCKET_RE = re.compile(r"^#\s*socket\s+(\d+)\s+local=(\S+)\s+peer=(\S+)\s*$")
_SAMPLE_RE = re.compile(r"^(\d+) (\d+) (\d+) (\d+|-) (\d+|-)$")


def parse_sockqueue(text: str) -> SocketQueue:
    """nbsample's queue lines -> SocketQueue; anything else is an error naming the line."""
    source, note = "", ""
    sockets: dict[int, tuple[str, str]] = {}
    samples: list[Sample] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if m := _HEADER_RE.match(line):
            source, note = m.group(1), m.group(2).strip().strip("()")
        elif m := _SOCKET_RE.match(line):
            sockets[int(m.group(1))] = (m.group(2), m.group(3))
        elif m := _SAMPLE_RE.match(line):
            i = int(m.group(2))
            if i not in sockets:
                raise NetbedError(f"{RAW} line {number}: sample of socket {i}, which no "
                                  "'# socket' line names")
            samples.append(Sample(int(m.group(1)), i, int(m.group(3)), _opt(m.group(4)),
                                  _opt(m.group(5))))
        else:
            raise NetbedError(f"{RAW} line {number}: unexpected {line[:120]!r}",
                              hint="the file should come from nbsample (images/tools)")
    if samples and not source:
        raise NetbedError(f"{RAW}: samples without a '# sockqueue source=' line")
    return SocketQueue(source, note, sockets, tuple(samples))


def _opt(text: str) -> int | None:
    return None if text == "-" else int(text)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), so p50 of an even
    count is the mean of the middle two."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class QueueStats:
    """The data connection's queue over the window."""

    local: str
    peer: str
    samples: int
    p50_kb: float
    p95_kb: float
    rcvbuf_kb: float | None  # largest sk_rcvbuf in the window; None when not sampled
    rcvbuf_bytes: tuple[int, ...]  # the distinct sk_rcvbuf values seen, in order


def reduce_window(queue: SocketQueue, window: tuple[float, float],
                  connection: tuple[str, str]) -> QueueStats:
    """The connection's samples with begin <= ns <= end (guest monotonic ns), reduced."""
    ids = [i for i, lp in queue.sockets.items() if lp == connection]
    if not ids:
        raise NetbedError(f"{RAW} has no samples of the data connection "
                          f"{connection[0]} -> {connection[1]}",
                          hint="the sampler found other sockets of the reader only")
    begin, end = window
    inside = [s for s in queue.samples if s.socket in ids and begin <= s.ns <= end]
    if not inside:
        raise NetbedError(f"{RAW}: no sample of {connection[0]} -> {connection[1]} lies "
                          "inside the window", hint="did the sampler start late?")
    kb = [s.rqueue / 1024 for s in inside]
    bufs = [s.rcvbuf for s in inside if s.rcvbuf is not None]
    distinct = tuple(dict.fromkeys(bufs))
    return QueueStats(connection[0], connection[1], len(inside), quantile(kb, 0.5),
                      quantile(kb, 0.95), max(bufs) / 1024 if bufs else None, distinct)


@dataclass(frozen=True)
class Row:
    """One tidy row for analysis (metric, value, unit, source, status, note)."""

    metric: str
    value: float
    unit: str
    source: str
    status: str = "ok"
    note: str = ""


METRICS = ("socket.queue_kb.p50", "socket.queue_kb.p95", "socket.queue_samples",
           "socket.rcvbuf_kb")


def queue_rows(queue_text: str | None, stamps_text: str | None, tcpinfo_after: str | None,
               netperf_rsr_end: float | None = None) -> list[Row]:
    """The window's queue metrics; `not-supported` / `error` rows (NaN) with the reason
    when they cannot be had, never zeros. `netperf_rsr_end` (netperf's RSR_SIZE_END,
    bytes) stands in for the buffer when the samples have no rcvbuf field."""
    def missing(status: str, why: str) -> list[Row]:
        rows = [Row(m, math.nan, u, "sock_diag", status, why) for m, u in
                zip(METRICS[:3], ("KB", "KB", "samples"), strict=True)]
        return [*rows, _rcvbuf_from_netperf(netperf_rsr_end, why)]

    if queue_text is None:
        return missing("not-supported", f"no {RAW} (a guest image whose nbsample predates "
                                        "the queue samples, or the bash fallback sampler)")
    try:
        queue = parse_sockqueue(queue_text)
        window = _window_ns(stamps_text)
        conn = tcpinfo.data_connection(tcpinfo.parse_tcpinfo(tcpinfo_after or ""))
        if conn is None:
            raise NetbedError("no data connection in the window's closing tcp_info")
        stats = reduce_window(queue, window, (conn.local, conn.peer))
    except NetbedError as exc:
        return missing("error", exc.message)
    source = queue.source or "sock_diag"
    note = f"{stats.samples} samples in the window; {stats.local} -> {stats.peer}"
    if queue.note:
        note += f"; {queue.note}"
    rows = [Row("socket.queue_kb.p50", stats.p50_kb, "KB", source, note=note),
            Row("socket.queue_kb.p95", stats.p95_kb, "KB", source, note=note),
            Row("socket.queue_samples", float(stats.samples), "samples", source)]
    if stats.rcvbuf_kb is None:
        rows.append(_rcvbuf_from_netperf(netperf_rsr_end, f"{source} samples carry no buffer"))
    else:
        seen = ", ".join(str(b) for b in stats.rcvbuf_bytes[:6])
        rows.append(Row("socket.rcvbuf_kb", stats.rcvbuf_kb, "KB", source,
                        note=f"largest sk_rcvbuf in the window (bytes seen: {seen})"))
    return rows


def _rcvbuf_from_netperf(rsr_end: float | None, why: str) -> Row:
    if rsr_end is None or rsr_end <= 0:
        return Row("socket.rcvbuf_kb", math.nan, "KB", "netperf", "not-supported",
                   f"{why}; netperf printed no RSR_SIZE_END")
    return Row("socket.rcvbuf_kb", rsr_end / 1024, "KB", "netperf",
               note=f"netperf RSR_SIZE_END (netserver's SO_RCVBUF at the test's end): {why}")


def _window_ns(stamps_text: str | None) -> tuple[float, float]:
    """The window's edges: the middles of the two units reads (testbed.formats.stamps)."""
    if stamps_text is None:
        raise NetbedError(f"no {stamps.RAW}: the window's edges are unknown")
    marks = stamps.parse_stamps(stamps_text)
    begin_label, end_label = stamps.UNITS
    if begin_label not in marks or end_label not in marks:
        raise NetbedError(f"{stamps.RAW} lacks the units reads")

    def middle(label: str) -> float:
        return (marks.get(f"{label}-start", marks[label]) + marks[label]) / 2

    return middle(begin_label), middle(end_label)
