"""testbed.run.repetition: the window's way back (one tar stream). The window script
itself is tested in test_window.py."""

from __future__ import annotations

import base64
import io
import tarfile
from typing import ClassVar

import pytest

from testbed.errors import GuestError
from testbed.experiment.config import Cell
from testbed.files import read_json
from testbed.formats import netperf, sockqueue
from testbed.run import repetition, traffic
from testbed.run.folder import RunDir
from testbed.run.loop import PolicyMismatch
from testbed.run.phases import Phases
from testbed.run.repetition import (
    NOT_FINISHED,
    fetch_window_command,
    prepare_command,
    split_sections,
    start_window_command,
    unpack_window,
)
from testbed.shell import HostShell, Result
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


class _Guest:
    """A guest that answers the repetition's commands by their content; records them."""

    SHA: ClassVar[dict[str, str]] = {"sender": "5" * 64, "receiver": "7" * 64}

    timeouts: ClassVar[list[float | None]] = []  # the receiver's combined command's

    def __init__(self, side: str, log: list[tuple[str, str]]) -> None:
        self.side, self.log = side, log

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        def kind() -> str:
            if f"echo '{repetition.SECTION}'" in command:
                return "prepare"
            if "/tmp/nbfill.sha256" in command:
                return "fill"
            if "nohup sh -c" in command:
                return "start"
            if "kill -INT" in command:
                return "stop"
            if "netperf.rc ]; then cat" in command:
                return "status"
            if "base64 -w 0" in command:
                return "fetch"
            if "/win/closed ]" in command:
                return "closed"
            raise AssertionError(f"unexpected command {command!r}")

        what = kind()
        self.log.append((self.side, what))
        if what == "prepare":
            self.timeouts.append(timeout)
        out, code = "", 0
        if what == "prepare":
            assert self.side == "receiver" and "nohup sh /tmp/netbed/window.sh" in command
            parts = command.split(f"echo '{repetition.SECTION}'")
            out = "applied\n" + "".join(
                f"{repetition.SECTION}\n"
                + (f'{{"sha256": "{self.SHA["receiver"]}"}}\n' if "nbfill" in part else
                   "" if "window.sh" in part else "iface=eth1\n")
                for part in parts[1:])
        elif what == "fill":
            out = f'{{"sha256": "{self.SHA[self.side]}"}}\n'
        elif ((what == "stop" and self.side == "sender")
              or (what == "status" and any(w == "stop" for _, w in self.log))):
            out = f"0\n{traffic.OUTPUT_MARK}\nTHROUGHPUT=1\n"
        elif what == "fetch":
            code = NOT_FINISHED  # the test ends here: its folder holds what came before
        return Result(command, code, out, "")


def _measure(tmp_path, workload: str) -> tuple[list[tuple[str, str]], Phases, RunDir]:
    from testbed.experiment.load import loads_experiment
    from testbed.experiment.matrix import expand
    from testbed.formats.readback import NicInfo

    exp = loads_experiment(f"name: t\naxes: {{workload: [{workload}], nic: [e1000]}}\n"
                           "duration: 1\n", tmp_path / "t.yaml")
    cell = expand(exp)[0]
    log: list[tuple[str, str]] = []
    run = RunDir(tmp_path / "run")
    phases = Phases()
    boot = repetition.BootState(NicInfo("eth1", "0000:00:04.0", "e1000"), (11,), ("rx-0",))
    with pytest.raises(GuestError, match="did not finish"):
        repetition.run_repetition(_Guest("receiver", log), _Guest("sender", log), boot, exp,
                                  cell, exp.policies.resolve(cell.policy, cell.cpus),
                                  run.start_rep(cell.cell_id, 0), pmu=False,
                                  cachemodel=True, phases=phases)
    return log, phases, run


def test_a_stream_repetition_takes_three_round_trips_into_each_guest(tmp_path):
    log, phases, _ = _measure(tmp_path, "TCP_STREAM")
    rx = [w for side, w in log if side == "receiver"]
    tx = [w for side, w in log if side == "sender"]
    # policy + read-back + window armed in one; the fetch overlaps the sender's stop
    assert rx == ["prepare", "closed", "fetch"]
    assert tx == ["fill", "start", "stop"]
    assert phases.trips == {"rx": 3, "tx": 3}
    assert _Guest.timeouts[-1] is None  # the guest's own: a hung receiver fails as fast
    assert log.index(("receiver", "closed")) < log.index(("sender", "stop"))
    assert log.index(("receiver", "closed")) < log.index(("receiver", "fetch"))
    kept = read_json(next((tmp_path / "run").rglob("payload.json")))
    assert kept["sha256"] == _Guest.SHA["sender"] and kept["kind"] == "random-fill"


def test_a_maerts_fill_rides_with_the_policy_and_its_fetch_waits_for_the_stop(tmp_path):
    log, _, _ = _measure(tmp_path, "TCP_MAERTS")
    assert [w for side, w in log if side == "receiver"] == ["prepare", "closed", "stop",
                                                             "fetch"]
    assert [w for side, w in log if side == "sender"] == ["start", "status"]
    kept = read_json(next((tmp_path / "run").rglob("payload.json")))
    assert kept["sha256"] == _Guest.SHA["receiver"]


def test_a_request_response_fill_is_made_on_both_guests_and_read_in_order(tmp_path):
    log, _, _ = _measure(tmp_path, "TCP_RR")
    assert ("sender", "fill") in log and ("receiver", "prepare") in log
    kept = read_json(next((tmp_path / "run").rglob("payload.json")))
    assert kept["sha256"] == _Guest.SHA["receiver"]  # sender first, then receiver, as before
    assert _Guest.timeouts[-1] == repetition.PREPARE_TIMEOUT_S  # room for a first fill file


def test_an_interfaces_queues_are_kept_from_every_interfaces_listing():
    listing = ("/sys/class/net/eth0/queues/rx-0\n/sys/class/net/eth1/queues/rx-0\n"
               "/sys/class/net/eth1/queues/rx-1\n/sys/class/net/eth10/queues/rx-0\n")
    assert repetition.rx_queues(listing, "eth1") == ("rx-0", "rx-1")
    assert repetition.rx_queues("", "eth1") == ()


@pytest.mark.process
def test_the_boots_facts_come_back_in_one_round_trip(tmp_path, monkeypatch):
    """discover on a made-up /sys/class/net (two NICs) in a real shell, netserver left out."""
    net = tmp_path / "net"
    for name, mac, queues in (("eth0", "52:54:00:00:00:01", 1), ("eth1", "52:54:00:12:34:56", 2)):
        dev = tmp_path / "devices" / name
        (dev / "driver").mkdir(parents=True)
        (net / name / "queues").mkdir(parents=True)
        (net / name / "address").write_text(mac + "\n")
        (net / name / "device").symlink_to(dev)
        for q in range(queues):
            (net / name / "queues" / f"rx-{q}").mkdir()
            (net / name / "queues" / f"tx-{q}").mkdir()
    calls: list[str] = []

    class Receiver:
        def run(self, command: str, timeout: float | None = None,
                check: bool = True) -> Result:
            calls.append(command)
            res = HostShell().run(["sh", "-c", command.replace("/sys/class/net", str(net))],
                                  check=check)
            return Result(command, res.exit_code, res.stdout.replace(str(net), "/sys/class/net"),
                          res.stderr)

    monkeypatch.setattr(repetition, "NETSERVER_START", "true")
    state = repetition.discover(Receiver(), "52:54:00:12:34:56")
    assert len(calls) == 1
    assert state.nic.iface == "eth1" and state.nic.device == "eth1"
    assert state.rx_queues == ("rx-0", "rx-1")
