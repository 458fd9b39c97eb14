"""Who verifies RX checksums on the data NIC: the device, or the guest's CPU.

`ethtool -k` alone is not the truth for virtio-net on Linux 6.1: the driver shows
`rx-checksumming: on [fixed]` even when VIRTIO_NET_F_GUEST_CSUM was not
negotiated, and then it never marks a packet checksum-verified. So for virtio we
read the negotiated feature bits from sysfs as well.
"""

from __future__ import annotations

from dataclasses import dataclass

RAW = "offloads.txt"  # OFFLOAD_SCRIPT's output for the receiver's data NIC
FILES = (RAW,)
VIRTIO_NET_F_GUEST_CSUM = 1  # bit number in the virtio-net feature set

OFFLOAD_SCRIPT = r"""
d=$(cat /run/netbed-data-iface)
echo "iface=$d"
echo "driver=$(basename "$(readlink /sys/class/net/$d/device/driver)")"
v=$(basename "$(readlink -f /sys/class/net/$d/device)")
case "$v" in virtio*) echo "virtio_features=$(cat /sys/class/net/$d/device/features)";; esac
echo "--- ethtool -k"
ethtool -k "$d"
"""


@dataclass(frozen=True)
class OffloadState:
    iface: str
    driver: str
    ethtool: dict[str, str]  # feature -> "on"/"off" (with " [fixed]" dropped)
    virtio_features: str | None  # the sysfs bit string, bit 0 first

    @property
    def rx_checksum_offload(self) -> bool:
        """True when the device vouches for checksums, so the guest need not read payloads."""
        if self.virtio_features is not None:
            bits = self.virtio_features
            return len(bits) > VIRTIO_NET_F_GUEST_CSUM and bits[VIRTIO_NET_F_GUEST_CSUM] == "1"
        return self.ethtool.get("rx-checksumming") == "on"

    @property
    def gro(self) -> bool:
        return self.ethtool.get("generic-receive-offload") == "on"

    def summary(self) -> dict[str, object]:
        return {"iface": self.iface, "driver": self.driver,
                "rx_checksum_offload": self.rx_checksum_offload,
                "ethtool_rx_checksumming": self.ethtool.get("rx-checksumming"),
                "gro": self.gro, "virtio_features": self.virtio_features}


def parse_ethtool_features(text: str) -> dict[str, str]:
    """`ethtool -k` -> {"rx-checksumming": "on [fixed]", ...}: the one parser of that table."""
    feats: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line or line.strip().startswith("Features for"):
            continue
        key, _, value = line.partition(":")
        feats[key.strip()] = value.strip()
    return feats


def parse_offloads(text: str) -> OffloadState:
    """Parse OFFLOAD_SCRIPT's output (pure); features as "on"/"off", the table's first word."""
    head, _, table = text.partition("--- ethtool -k")
    kv = dict(line.split("=", 1) for line in head.strip().splitlines() if "=" in line)
    features = {name: value.split()[0]
                for name, value in parse_ethtool_features(table).items() if value}
    return OffloadState(kv.get("iface", "?"), kv.get("driver", "?"), features,
                        kv.get("virtio_features"))
