"""Host placement applied to real QEMU processes and read back from /proc (#11).

Two paused QEMUs (TCG, 2 vCPUs each, `-S`: the vCPU threads exist but run no
guest) are placed as a receiver/sender pair; every thread of each, the vCPU
threads ("CPU n/TCG") and the main loop included, must then hold its guest's
host CPUs in /proc. A thread QEMU starts after placement inherits the set: the
`cont` below starts the guest and QEMU its worker threads.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.vm import placement as pl

pytestmark = pytest.mark.integration


@pytest.fixture
def two_qemus(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    try:
        for name in ("receiver", "sender"):
            procs.append(subprocess.Popen(
                ["qemu-system-x86_64", "-name", f"{name},debug-threads=on", "-machine", "q35",
                 "-accel", "tcg,thread=multi", "-smp", "2", "-m", "128", "-S", "-nodefaults",
                 "-display", "none", "-monitor", f"unix:{tmp_path}/{name}.mon,server,nowait"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(
                sum(t.name.startswith("CPU ") for t in pl.read_back(p.pid)) == 2 for p in procs):
            time.sleep(0.1)
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def _monitor(path: Path, command: str) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        time.sleep(0.5)


def test_disjoint_placement_is_applied_to_every_qemu_thread(
        two_qemus: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    host = sorted(os.sched_getaffinity(0))
    if len(host) < 2:
        pytest.skip("disjoint placement needs two host CPUs")
    receiver, sender = two_qemus
    record = pl.place_guests("disjoint", [pl.PlacedProcess("receiver", receiver.pid, 3),
                                          pl.PlacedProcess("sender", sender.pid, 3)])
    want = {"receiver": set(pl.parse_cpu_list(str(record["guests"]["receiver"]))),  # type: ignore[index]
            "sender": set(pl.parse_cpu_list(str(record["guests"]["sender"])))}  # type: ignore[index]
    assert want["receiver"] and want["sender"] and not want["receiver"] & want["sender"]
    for name in ("receiver", "sender"):
        _monitor(tmp_path / f"{name}.mon", "cont")  # the guest runs: QEMU may start threads
    for name, proc in (("receiver", receiver), ("sender", sender)):
        threads = pl.read_back(proc.pid)
        names = [t.name for t in threads]
        assert sum(n.startswith("CPU ") for n in names) == 2, names
        assert {t.tid for t in threads} >= {proc.pid}  # the main loop is among them
        wrong = [(t.name, sorted(t.cpus)) for t in threads if set(t.cpus) != want[name]]
        assert not wrong, f"{name}: threads off their host CPUs: {wrong}"
    recorded = record["threads"]
    assert isinstance(recorded, dict) and set(recorded) == {"receiver", "sender"}


def test_shared_placement_leaves_affinity_alone(
        two_qemus: list[subprocess.Popen[bytes]]) -> None:
    receiver, sender = two_qemus
    before = {t.tid: t.cpus for t in pl.read_back(receiver.pid)}
    record = pl.place_guests("shared", [pl.PlacedProcess("receiver", receiver.pid),
                                        pl.PlacedProcess("sender", sender.pid)])
    assert record["mode"] == "shared"
    assert {t.tid: t.cpus for t in pl.read_back(receiver.pid)} == before
