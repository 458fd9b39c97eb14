"""The data connection's own counters: `ss -tin` (its `tcp_info`), raw files and parser.

Raw files: `tcpinfo-before.txt` and `tcpinfo-after.txt`, `ss -tin` output for the
established TCP connections on the receiver's data-plane address, as ss printed
it. The payload of the test connection is its `bytes_received` (what the reader's
socket took in; STREAM and RR requests) or `bytes_acked` (what it sent and the
peer acknowledged; MAERTS), counted by the kernel per connection, so unlike
IpExt InOctets it carries no headers and no other interface's traffic.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from testbed.errors import NetbedError

RAW_BEFORE = "tcpinfo-before.txt"
RAW_AFTER = "tcpinfo-after.txt"
NETSERVER_CONTROL_PORT = 12865

# tcp_info fields kept (as `ss -i` names them); all are cumulative counters.
COUNTERS = ("bytes_sent", "bytes_acked", "bytes_received", "segs_out", "segs_in",
            "data_segs_out", "data_segs_in")


def ss_command(local_ip: str) -> str:
    """`ss -tin` for established connections on `local_ip` (one fork: ss itself)."""
    return f"ss -tin state established src {shlex.quote(local_ip)}"


@dataclass(frozen=True)
class Connection:
    """One TCP connection as `ss -tin` showed it: its addresses and counters."""

    local: str
    peer: str
    counters: dict[str, int]

    @property
    def local_port(self) -> int:
        return int(self.local.rpartition(":")[2])


_ADDR_RE = re.compile(r"^\S+:\d+$")
_COUNTER_RE = re.compile(r"\b(" + "|".join(COUNTERS) + r"):(\d+)\b")


def parse_ss(text: str) -> list[Connection]:
    """`ss -tin [state established]` output -> connections.

    ss prints a header, then per connection one line with the queues and the two
    addresses (the state column is absent when a state filter is given) and an
    indented line of `key:value` details. Lines that fit neither are skipped, so a
    warning from ss does not hide the connections.
    """
    conns: list[Connection] = []
    pending: tuple[str, str] | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("Recv-Q", "State", "Netid")):
            continue
        if not line[0].isspace():
            addrs = [t for t in line.split() if _ADDR_RE.match(t)]
            pending = (addrs[-2], addrs[-1]) if len(addrs) >= 2 else None
            continue
        if pending is None:
            continue
        counters = {k: int(v) for k, v in _COUNTER_RE.findall(line)}
        conns.append(Connection(pending[0], pending[1], counters))
        pending = None
    return conns


def data_connection(conns: list[Connection]) -> Connection | None:
    """The test's data connection: not netserver's control connection (port 12865)
    and, of the rest, the one that moved the most payload."""
    data = [c for c in conns if c.local_port != NETSERVER_CONTROL_PORT
            and not c.peer.endswith(f":{NETSERVER_CONTROL_PORT}")]
    if not data:
        return None
    return max(data, key=lambda c: c.counters.get("bytes_received", 0)
               + c.counters.get("bytes_acked", 0))


@dataclass(frozen=True)
class ConnectionDelta:
    """What the data connection did between two `ss -tin` snapshots."""

    local: str
    peer: str
    delta: dict[str, int]

    def payload_bytes(self, direction: str) -> int:
        """Payload moved towards the reader ("in": bytes_received) or out of the
        receiver ("out": bytes_acked, MAERTS)."""
        key = "bytes_acked" if direction == "out" else "bytes_received"
        if key not in self.delta:
            raise NetbedError(f"ss -tin showed no {key} for {self.local} -> {self.peer}",
                              hint="iproute2's ss prints it since 4.x; is ss too old?")
        return self.delta[key]


def connection_delta(before_text: str, after_text: str) -> ConnectionDelta:
    """The data connection's counters after minus before (the same connection in both)."""
    after = data_connection(parse_ss(after_text))
    if after is None:
        raise NetbedError("the window's closing ss -tin shows no data connection",
                          hint="did netperf's test end before the window closed?")
    match = [c for c in parse_ss(before_text) if (c.local, c.peer) == (after.local, after.peer)]
    if not match:
        raise NetbedError(f"data connection {after.local} -> {after.peer} is missing from "
                          "the window's opening ss -tin",
                          hint="the window opened before netperf's data connection existed")
    before = match[0]
    delta = {k: after.counters[k] - before.counters[k] for k in after.counters
             if k in before.counters}
    back = [k for k, v in delta.items() if v < 0]
    if back:
        raise NetbedError(f"tcp_info counters went backwards: {', '.join(back)}",
                          hint="two different connections with the same addresses?")
    return ConnectionDelta(after.local, after.peer, delta)
