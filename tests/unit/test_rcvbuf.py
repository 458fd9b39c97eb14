"""The copy-lag axis: level parsing, the mechanism's arguments, cell ids old runs keep."""

from __future__ import annotations

import pytest

from testbed.experiment.config import Cell, Workload, rcvbuf_bytes, rcvbuf_level
from testbed.formats import sockqueue
from testbed.formats.netperf import netperf_command, receive_buffer_args


@pytest.mark.parametrize(("written", "canonical"), [
    ("auto", "auto"), (" AUTO ", "auto"), ("64K", "64K"), ("64k", "64K"), ("64KiB", "64K"),
    ("1M", "1M"), ("1024K", "1M"), ("1MiB", "1M"), (65536, "64K"), ("5000", "5000"),
    ("4K", "4K"), ("4M", "4M"), ("1536K", "1536K")])
def test_levels_are_canonical(written: object, canonical: str) -> None:
    assert rcvbuf_level(written) == canonical


@pytest.mark.parametrize("junk", ["64KB", "1 G", "-64K", "64.5K", "", "lots", "0", "3K",
                                  "5M", 4095, True, None, 1.5, [64]])
def test_junk_is_refused_with_the_fix(junk: object) -> None:
    with pytest.raises(ValueError, match="rcvbuf"):
        rcvbuf_level(junk)


def test_level_bytes() -> None:
    assert rcvbuf_bytes("auto") is None
    assert rcvbuf_bytes("64K") == 65536 and rcvbuf_bytes("1M") == 1048576
    assert rcvbuf_bytes("5000") == 5000


def test_kernel_doubles_and_caps_the_buffer() -> None:
    assert sockqueue.kernel_rcvbuf(65536, 212992) == 131072
    assert sockqueue.kernel_rcvbuf(1048576, 212992) == 425984  # an un-raised rmem_max
    assert sockqueue.kernel_rcvbuf(1048576, 1048576) == 2097152


def test_netperf_args_set_only_netservers_receive_buffer_and_pin_the_recv_size() -> None:
    assert receive_buffer_args(None) == []
    assert receive_buffer_args(262144) == ["-S", ",262144", "-M", "131072"]
    cmd = netperf_command("198.18.0.1", Workload(name="TCP_STREAM", message_size=16384), 10,
                          1, test_args=receive_buffer_args(65536))
    test = cmd.split(" -- ", 1)[1]
    assert "-S ,65536 -M 131072" in test
    assert "RSR_SIZE_REQ" in test and "RSR_SIZE_END" in test


def test_rmem_max_is_set_to_the_level_or_linuxs_default() -> None:
    assert "echo 212992 >" in sockqueue.rmem_max_command(65536)
    assert "echo 1048576 >" in sockqueue.rmem_max_command(1048576)
    assert sockqueue.parse_rmem_max("rmem_max=1048576\n") == 1048576
    assert sockqueue.parse_rmem_max("") is None


def test_auto_cells_keep_the_ids_runs_had_before_the_axis() -> None:
    base = {"kernel": "patched", "nic": "e1000", "cpus": 2, "policy": "pin-same",
            "workload": {"name": "TCP_STREAM", "message_size": 16384}, "gro": True}
    old = Cell(**base)  # a cell.json written before the axis: no rcvbuf key
    assert old.rcvbuf == "auto"
    assert old.cell_id == "patched-e1000-c2-pin-same-TCP_STREAM-16384-gro_on"
    assert Cell(**base, rcvbuf="auto").cell_id == old.cell_id
    shallow = Cell(**base, rcvbuf="65536")
    assert shallow.cell_id == old.cell_id + "-rcvbuf_64K"
    assert shallow.flat()["rcvbuf"] == "64K" and old.flat()["rcvbuf"] == "auto"
