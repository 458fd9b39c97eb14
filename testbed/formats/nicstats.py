"""The data NIC's own statistics (sysfs), read at the window's edges: command, raw files, parser.

Raw files: `nicstats-before.txt` and `nicstats-after.txt`, "<name> <value>" lines
of /sys/class/net/<iface>/statistics/<name>, written by the guest tool `nbsnap`.
The driver counts frames as they come off the wire, before GRO merges them, so
`rx_packets` is frames (not skbs) and `rx_bytes` includes the Ethernet header
(driver-dependent: e1000 and virtio_net count the frame without FCS).
"""

from __future__ import annotations

from testbed.errors import NetbedError

RAW_BEFORE = "nicstats-before.txt"
RAW_AFTER = "nicstats-after.txt"
FILES = (RAW_BEFORE, RAW_AFTER)
STATS = ("rx_bytes", "rx_packets", "rx_dropped", "rx_errors", "tx_bytes", "tx_packets")


def parse_nicstats(text: str) -> dict[str, int]:
    """"<name> <value>" lines -> {name: value}; a malformed line is an error."""
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise NetbedError(f"NIC statistics line {number}: expected '<name> <count>', "
                              f"got {line!r}")
        out[parts[0]] = int(parts[1])
    return out


def nicstats_delta(before_text: str, after_text: str) -> dict[str, int]:
    """after - before for the statistics present in both snapshots."""
    before, after = parse_nicstats(before_text), parse_nicstats(after_text)
    if "rx_packets" not in before or "rx_packets" not in after:
        raise NetbedError("NIC statistics have no rx_packets",
                          hint="the window read /sys/class/net/<iface>/statistics; "
                               "was the interface name right?")
    return {k: after[k] - before[k] for k in after if k in before}
