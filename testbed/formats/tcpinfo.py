"""The data connection's own counters (its `tcp_info`): raw files and parser.

Raw files: `tcpinfo-before.txt` and `tcpinfo-after.txt`, written by the guest tool
`nbsnap` (images/tools/nbsnap.c) from a netlink sock_diag dump, one line per
established TCP connection: "local=<addr>:<port> peer=<addr>:<port> key=value ..."
with tcp_info's bytes_acked, bytes_received, bytes_sent, segs_in, segs_out,
data_segs_in, data_segs_out (the numbers `ss -tin` prints under the same names).
The payload of the test connection is its `bytes_received` (what the reader's
socket took in; STREAM and RR requests) or `bytes_acked` (what it sent and the
peer acknowledged; MAERTS), counted by the kernel per connection, so unlike
IpExt InOctets it carries no headers and no other interface's traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from testbed.errors import NetbedError

RAW_BEFORE = "tcpinfo-before.txt"
RAW_AFTER = "tcpinfo-after.txt"
FILES = (RAW_BEFORE, RAW_AFTER)
NETSERVER_CONTROL_PORT = 12865

# tcp_info fields kept (as `ss -i` names them); all are cumulative counters.
COUNTERS = ("bytes_sent", "bytes_acked", "bytes_received", "segs_out", "segs_in",
            "data_segs_out", "data_segs_in")


@dataclass(frozen=True)
class Connection:
    """One TCP connection: its addresses and counters."""

    local: str
    peer: str
    counters: dict[str, int]

    @property
    def local_port(self) -> int:
        return int(self.local.rpartition(":")[2])


_FIELD_RE = re.compile(r"(\w+)=(\S+)")
_ADDR_RE = re.compile(r".+:\d{1,5}")


def parse_tcpinfo(text: str) -> list[Connection]:
    """nbsnap's lines -> connections; a line without local= and peer= is an error."""
    conns: list[Connection] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = dict(_FIELD_RE.findall(line))
        if not all(_ADDR_RE.fullmatch(fields.get(k, "")) for k in ("local", "peer")):
            raise NetbedError(f"tcp_info line {number}: no local=/peer= <address>:<port> in "
                              f"{line[:200]!r}",
                              hint="the file should come from nbsnap (images/tools/nbsnap.c)")
        try:
            counters = {k: int(fields[k]) for k in COUNTERS if k in fields}
        except ValueError as exc:
            raise NetbedError(f"tcp_info line {number}: {exc}") from exc
        conns.append(Connection(fields["local"], fields["peer"], counters))
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
    """What the data connection did between two tcp_info snapshots."""

    local: str
    peer: str
    delta: dict[str, int]

    def payload_bytes(self, direction: str) -> int:
        """Payload moved towards the reader ("in": bytes_received) or out of the
        receiver ("out": bytes_acked, MAERTS)."""
        key = "bytes_acked" if direction == "out" else "bytes_received"
        if key not in self.delta:
            raise NetbedError(f"tcp_info has no {key} for {self.local} -> {self.peer}",
                              hint="the kernel reports it since Linux 4.1/4.6")
        return self.delta[key]


def connection_delta(before_text: str, after_text: str) -> ConnectionDelta:
    """The data connection's counters after minus before (the same connection in both)."""
    after = data_connection(parse_tcpinfo(after_text))
    if after is None:
        raise NetbedError("the window's closing tcp_info snapshot shows no data connection",
                          hint="did netperf's test end before the window closed?")
    match = [c for c in parse_tcpinfo(before_text)
             if (c.local, c.peer) == (after.local, after.peer)]
    if not match:
        raise NetbedError(f"data connection {after.local} -> {after.peer} is missing from "
                          "the window's opening tcp_info snapshot",
                          hint="the window opened before netperf's data connection existed")
    before = match[0]
    delta = {k: after.counters[k] - before.counters[k] for k in after.counters
             if k in before.counters}
    back = [k for k, v in delta.items() if v < 0]
    if back:
        raise NetbedError(f"tcp_info counters went backwards: {', '.join(back)}",
                          hint="two different connections with the same addresses?")
    return ConnectionDelta(after.local, after.peer, delta)
