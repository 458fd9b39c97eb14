"""testbed.formats.offloads: `ethtool -k` features and the offload state of the data NIC."""

from __future__ import annotations

from pathlib import Path

from testbed.formats import offloads
from testbed.formats.offloads import parse_offloads

GUEST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-distro-e1000"


def test_ethtool_features() -> None:
    text = ("Features for eth1:\nrx-checksumming: off [fixed]\ntx-checksumming: on\n"
            "\ttx-checksum-ipv4: off [fixed]\ngeneric-receive-offload: on\n")
    f = offloads.parse_ethtool_features(text)
    assert f["rx-checksumming"] == "off [fixed]"
    assert f["tx-checksum-ipv4"] == "off [fixed]"
    assert f["generic-receive-offload"] == "on"


def test_guest_e1000_verifies_checksums_in_software() -> None:
    feats = offloads.parse_ethtool_features((GUEST / "offloads.txt").read_text())
    assert feats["rx-checksumming"].startswith("off")  # QEMU's e1000: software checksums


VIRTIO_NOCSUM = """iface=eth1
driver=virtio_net
virtio_features=0010010000000001111101010000110010000000100000000000000000000000
--- ethtool -k
Features for eth1:
rx-checksumming: on [fixed]
tx-checksumming: off
generic-receive-offload: on
"""


def test_virtio_without_guest_csum_is_software_checksumming_despite_ethtool():
    state = parse_offloads(VIRTIO_NOCSUM)
    assert state.ethtool["rx-checksumming"] == "on"
    assert state.rx_checksum_offload is False
    assert state.gro is True


def test_virtio_with_guest_csum_and_e1000_without():
    assert parse_offloads(VIRTIO_NOCSUM.replace("=00100", "=01100")).rx_checksum_offload
    e1000 = "iface=eth1\ndriver=e1000\n--- ethtool -k\nrx-checksumming: off\n"
    state = parse_offloads(e1000)
    assert state.driver == "e1000" and state.rx_checksum_offload is False
