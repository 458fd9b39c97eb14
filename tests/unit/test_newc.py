"""testbed.build.newc: initramfs archives written by hand, read back by cpio."""

import subprocess
from pathlib import Path

import pytest

from testbed.build.newc import CpioEntry, encode_newc, write_newc


@pytest.mark.process
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
