"""The window's rates as the run records them in `done`, from the window's raw files.

The adaptive rule (testbed.run.adaptive) decides from `done` records while the run
goes on, before any analysis: it needs the window's own rate, not netperf's (which
covers a longer run). These are the same figures analysis.window_metrics derives,
from the same files: payload bytes of the data connection (tcp_info) over the
window's length (stamps).
"""

from __future__ import annotations

from testbed.formats import stamps, tcpinfo


def window_rates(stamps_text: str, tcpinfo_before: str, tcpinfo_after: str, workload: str,
                 request_size: int | None) -> dict[str, float]:
    """{"window.throughput": 10^6bits/s, and for TCP_RR "window.transaction_rate": 1/s}.

    Raises NetbedError when the files cannot say (analysis then reports why)."""
    seconds = stamps.alignment(stamps.parse_stamps(stamps_text)).seconds
    delta = tcpinfo.connection_delta(tcpinfo_before, tcpinfo_after)
    direction = "out" if workload.upper() == "TCP_MAERTS" else "in"
    rates = {"window.throughput": delta.payload_bytes(direction) * 8 / seconds / 1e6}
    if workload.upper() == "TCP_RR" and request_size and request_size > 0:
        rates["window.transaction_rate"] = delta.payload_bytes("in") / request_size / seconds
    return rates
