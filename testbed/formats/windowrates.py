"""The window's work and rates: the one definition the stopping rule and analysis share.

Work comes from the receiver's data connection (tcp_info at the window's edges:
payload bytes received, or acked for MAERTS, whose measured guest sends; for TCP_RR
the transactions are bytes received over the request size) and time from the
window's stamps. The adaptive rule (testbed.run.adaptive) reads these rates from the
`done` record while the run goes on, analysis.window_metrics writes them into the
tidy table, and analysis.collate divides counters by the same work: all through the
functions here, so the stopping rule and the report cannot disagree about a
repetition.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import NetbedError
from testbed.formats import stamps, tcpinfo

THROUGHPUT = "window.throughput"
TRANSACTION_RATE = "window.transaction_rate"
THROUGHPUT_UNIT = "10^6bits/s"
TRANSACTION_RATE_UNIT = "trans/s"


def direction(workload: str) -> str:
    """"out" when the measured guest sends (TCP_MAERTS), else "in"."""
    return "out" if workload.upper() == "TCP_MAERTS" else "in"


def is_rr(workload: str) -> bool:
    return workload.upper() == "TCP_RR"


@dataclass(frozen=True)
class Payload:
    """Payload the data connection moved in the window (None: transactions not defined)."""

    kbytes: float
    transactions: float | None
    note: str              # which tcp_info counter of which connection
    transactions_note: str


def payload(tcpinfo_before: str, tcpinfo_after: str, workload: str,
            request_size: int | None) -> Payload:
    """The window's payload from the two tcp_info snapshots (NetbedError if they cannot
    say). Transactions only for TCP_RR with a known request size."""
    delta = tcpinfo.connection_delta(tcpinfo_before, tcpinfo_after)
    way = direction(workload)
    moved = delta.payload_bytes(way)
    what = "bytes_acked (sent)" if way == "out" else "bytes_received"
    transactions = None
    if is_rr(workload) and request_size and request_size > 0:
        transactions = delta.payload_bytes("in") / request_size
    return Payload(moved / 1024, transactions,
                   f"tcp_info {what} of {delta.local} <-> {delta.peer}",
                   f"bytes_received / request size {request_size}")


def throughput(kbytes: float, seconds: float) -> float:
    """10^6 bits/s (netperf's unit) of `kbytes` moved in `seconds`."""
    return kbytes * 1024 * 8 / seconds / 1e6


def transaction_rate(transactions: float, seconds: float) -> float:
    return transactions / seconds


def window_seconds(stamps_text: str) -> float:
    """The window's length from its stamps (NetbedError if they cannot say)."""
    return stamps.alignment(stamps.parse_stamps(stamps_text)).seconds


def rates(work: Payload, seconds: float, workload: str) -> dict[str, float]:
    """{THROUGHPUT: ..., and for TCP_RR with a request size TRANSACTION_RATE: ...}."""
    out = {THROUGHPUT: throughput(work.kbytes, seconds)}
    if is_rr(workload) and work.transactions is not None:
        out[TRANSACTION_RATE] = transaction_rate(work.transactions, seconds)
    return out


def window_rates(stamps_text: str, tcpinfo_before: str, tcpinfo_after: str, workload: str,
                 request_size: int | None) -> dict[str, float]:
    """The rates `done` records, from the window's raw texts.

    Raises NetbedError when the files cannot say (analysis then reports why)."""
    seconds = window_seconds(stamps_text)
    if not seconds > 0:
        raise NetbedError(f"{stamps.RAW}: the window lasted {seconds} s")
    return rates(payload(tcpinfo_before, tcpinfo_after, workload, request_size), seconds,
                 workload)
