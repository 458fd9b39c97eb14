"""Pure pieces of host probing, archives, offload parsing and settings."""

import os
import subprocess
from pathlib import Path

import pytest

from testbed.build.newc import CpioEntry, encode_newc, write_newc
from testbed.errors import NetbedError
from testbed.formats.offloads import parse_offloads
from testbed.settings import REPO_ROOT, Settings
from testbed.vm.hostfacts import KvmVerdict, choose_accel


def test_auto_falls_back_to_tcg_and_says_why():
    accel, why = choose_accel("auto", KvmVerdict(False, "a stock kernel did not boot"))
    assert accel == "tcg" and why == "TCG, because a stock kernel did not boot"


def test_auto_takes_kvm_when_probe_booted():
    assert choose_accel("auto", KvmVerdict(True, "booted in 1.0 s", 1.0))[0] == "kvm"


def test_kvm_requested_but_unusable_is_an_error_with_a_fix():
    with pytest.raises(NetbedError, match="use --accel tcg"):
        choose_accel("kvm", KvmVerdict(False, "hangs"))


def test_newc_archive_round_trips_through_cpio(tmp_path: Path):
    archive = tmp_path / "a.cpio"
    write_newc(archive, [CpioEntry.directory("dev"), CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
                         CpioEntry.file("odd", b"12345")])
    listing = subprocess.run(["cpio", "-itv"], input=archive.read_bytes(), capture_output=True,
                             check=True).stdout.decode()
    assert "init" in listing and "dev" in listing and "odd" in listing
    assert " 10 " in listing.splitlines()[1]  # init's size
    assert encode_newc([]).startswith(b"070701") and b"TRAILER!!!" in encode_newc([])
    assert len(archive.read_bytes()) % 4 == 0


def test_char_device_entry_header():
    data = encode_newc([CpioEntry.char_device("dev/console", 5, 1)])
    header = data[:110]
    assert header[14:22] == b"00002180"  # S_IFCHR | 0600
    assert header[78:86] == b"00000005" and header[86:94] == b"00000001"


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


def test_settings_from_invoke_mapping_resolves_relative_dirs():
    s = Settings.from_mapping({"cache_dir": "somewhere", "guest_memory_mb": "2048",
                               "unknown": 1})
    assert s.cache_dir == REPO_ROOT / "somewhere"
    assert s.guest_memory_mb == 2048
    assert Settings.from_mapping({"cache_dir": "/abs"}).cache_dir == Path("/abs")


def test_missing_packages_without_root_names_the_apt_line(monkeypatch):
    from testbed.build import sysdeps

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetbedError, match="apt-get install -y -q --no-install-recommends "
                                          "netbed-no-such-pkg"):
        sysdeps.ensure_packages({"netbed-no-such-pkg": "netbed-no-such-command"})
