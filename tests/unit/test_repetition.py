"""testbed.run.repetition: the window's way back (one tar stream). The window script
itself is tested in test_window.py."""

from __future__ import annotations

import base64
import io
import tarfile

import pytest

from testbed.errors import GuestError
from testbed.experiment.config import Cell
from testbed.files import read_json
from testbed.formats import netperf, sockqueue
from testbed.run import repetition
from testbed.run.folder import RunDir
from testbed.run.loop import PolicyMismatch
from testbed.run.repetition import (
    NOT_FINISHED,
    fetch_window_command,
    prepare_command,
    split_sections,
    start_window_command,
    unpack_window,
)
from testbed.shell import HostShell
from testbed.vocabulary import GUEST_DIR


@pytest.mark.process
def test_the_window_comes_back_as_one_tar_stream_byte_for_byte(tmp_path):
    win = tmp_path / "win"
    (win / "proc-before").mkdir(parents=True)
    (win / "proc-before" / "softirqs").write_bytes(b"                    CPU0\n NET_RX: 7\n")
    (win / "perf-stat.csv").write_text("1.0;;task-clock;0\n")
    (win / "odd \xe9 name.txt").write_bytes(bytes(range(256)))
    (win / "finished").touch()
    cmd = fetch_window_command().replace(f"{GUEST_DIR}/win", str(win))
    armoured = HostShell().run(["sh", "-c", cmd]).stdout
    assert "\n" not in armoured.strip()  # one line of base64: safe through any text channel
    rep = RunDir(tmp_path / "run").start_rep("c", 0)
    written = unpack_window(armoured, rep)
    assert sorted(written) == ["odd \xe9 name.txt", "perf-stat.csv", "proc-before/softirqs"]
    for rel in written:
        assert (rep.path / rel).read_bytes() == (win / rel).read_bytes()
    assert not (rep.path / "finished").exists()


def test_a_tar_stream_that_leaves_the_folder_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    rep = RunDir(tmp_path / "run").start_rep("c", 0)
    with pytest.raises(GuestError, match="escape"):
        unpack_window(base64.b64encode(buf.getvalue()).decode(), rep)
    assert not (tmp_path / "run" / "cells" / "c" / "escape").exists()


def sh(command: str) -> tuple[int, str]:
    res = HostShell().run(["sh", "-c", command], check=False)
    return res.exit_code, res.stdout


@pytest.mark.process
def test_one_round_trip_runs_the_parts_in_order_and_splits_their_outputs():
    code, out = sh(prepare_command("set -eu\necho applied", "echo a=1\necho b=2",
                                   "echo offloads"))
    assert code == 0
    assert split_sections(out, 2) == ["a=1\nb=2\n", "offloads\n"]


@pytest.mark.process
def test_a_failing_part_stops_the_round_trip_with_its_status_and_set_e_stays_inside():
    # a policy write that fails must not be followed by reading back a half-applied state
    code, out = sh(prepare_command("set -eu\nfalse\necho not reached", "echo readback"))
    assert code == 1 and "readback" not in out and "not reached" not in out
    # a part without set -e runs on past its own failing command, as it did alone
    code, out = sh(prepare_command("false\necho went on", "echo second"))
    assert code == 0 and split_sections(out, 1) == ["second\n"]


def test_missing_sections_are_a_guest_error_not_a_silent_misparse():
    with pytest.raises(GuestError, match="expected 3 parts"):
        split_sections("a=1\n", 2)


@pytest.mark.process
def test_a_window_that_never_finishes_gives_its_own_status(tmp_path, monkeypatch):
    monkeypatch.setattr(repetition, "FINISH_WAIT_S", 0.2)
    (tmp_path / "win").mkdir()
    cmd = repetition.fetch_window_command().replace(f"{GUEST_DIR}/win", str(tmp_path / "win"))
    code, out = sh(cmd)
    assert code == NOT_FINISHED and out == ""


@pytest.mark.process
def test_the_window_starts_detached_and_the_command_returns_once_it_is_armed(tmp_path):
    script = "touch /tmp/netbed/win/armed\nsleep 30\n"
    cmd = start_window_command(script).replace(GUEST_DIR, str(tmp_path))
    (tmp_path / "win").mkdir()
    res = HostShell().run(["timeout", "10", "sh", "-c", cmd], check=False)
    assert res.exit_code == 0
    assert (tmp_path / "window.sh").read_text() == script.replace(GUEST_DIR, str(tmp_path))


def _cell(level: str) -> Cell:
    return Cell(kernel="patched", nic="e1000", cpus=2, policy="pin-same",
                workload={"name": "TCP_STREAM", "message_size": 16384}, gro=True, rcvbuf=level)


def test_a_levels_buffer_is_read_back_into_the_repetitions_provenance(tmp_path):
    rep = RunDir(tmp_path / "run").start_rep("c", 0)
    result = netperf.parse_netperf("THROUGHPUT=1\nRSR_SIZE_REQ=65536\nRSR_SIZE=131072\n"
                                   "RSR_SIZE_END=131072\n")
    repetition._check_rcvbuf(rep, _cell("64K"), result, 212992)
    kept = read_json(rep.file(sockqueue.RAW_RCVBUF))
    assert kept["level"] == "64K" and kept["asked_bytes"] == 65536
    assert kept["expected_rcvbuf_bytes"] == 131072 and kept["rmem_max"] == 212992
    assert kept["netperf"] == {"RSR_SIZE_REQ": 65536, "RSR_SIZE": 131072,
                               "RSR_SIZE_END": 131072}


def test_a_level_the_socket_did_not_get_fails_the_repetition(tmp_path):
    rep = RunDir(tmp_path / "run").start_rep("c", 0)
    capped = netperf.parse_netperf("THROUGHPUT=1\nRSR_SIZE_REQ=1048576\nRSR_SIZE=425984\n")
    with pytest.raises(PolicyMismatch, match="should give SO_RCVBUF 2097152"):
        repetition._check_rcvbuf(rep, _cell("1M"), capped, 1048576)
    auto = netperf.parse_netperf("THROUGHPUT=1\nRSR_SIZE_REQ=-1\nRSR_SIZE=131072\n")
    repetition._check_rcvbuf(rep, _cell("auto"), auto, None)  # nothing asked: nothing to match
