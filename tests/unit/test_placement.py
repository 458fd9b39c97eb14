"""The host placement plan (pure) and the /proc parsers it reads back with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed.formats.readback import fmt_cpulist
from testbed.vm import placement as pl


def test_disjoint_two_cpus_two_guests() -> None:
    p = pl.plan([0, 1], ["receiver", "sender"], "disjoint")
    assert p.of("receiver") == (0,) and p.of("sender") == (1,)
    assert p.pins and "disjoint" in p.note


def test_disjoint_blocks_follow_weights_and_cover_the_host() -> None:
    p = pl.plan(range(8), ["receiver", "sender"], "disjoint", {"receiver": 5, "sender": 3})
    assert p.of("receiver") == (0, 1, 2, 3, 4) and p.of("sender") == (5, 6, 7)


@pytest.mark.parametrize("n", [2, 3, 4, 7, 16, 64])
@pytest.mark.parametrize("weights", [(1, 1), (3, 2), (5, 3), (17, 2), (1, 9)])
def test_disjoint_is_a_partition_with_every_guest_on_a_cpu(
        n: int, weights: tuple[int, int]) -> None:
    cpus = [c * 2 for c in range(n)]  # not 0..n-1: the host's own affinity may have gaps
    p = pl.plan(cpus, ["r", "s"], "disjoint", {"r": weights[0], "s": weights[1]})
    got = [set(p.of("r")), set(p.of("s"))]
    assert got[0] and got[1] and not got[0] & got[1] and got[0] | got[1] == set(cpus)


def test_fewer_cpus_than_guests_shares_and_says_so() -> None:
    p = pl.plan([3], ["receiver", "sender"], "disjoint")
    assert p.of("receiver") == p.of("sender") == (3,)
    assert not p.pins and "share" in p.note


def test_shared_leaves_every_cpu_to_every_guest() -> None:
    p = pl.plan([0, 1, 2, 3], ["receiver", "sender"], "shared")
    assert p.of("sender") == (0, 1, 2, 3) and not p.pins
    assert p.to_dict()["guests"] == {"receiver": "0-3", "sender": "0-3"}


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError):
        pl.plan([], ["r"], "disjoint")
    with pytest.raises(ValueError):
        pl.plan([0, 1], ["r", "r"], "disjoint")
    with pytest.raises(ValueError):
        pl.placement_mode("pinned")
    assert pl.placement_mode("disjoint") == "disjoint"


@pytest.mark.parametrize(("text", "cpus"), [("0", {0}), ("0-2,5", {0, 1, 2, 5}),
                                            ("1,3-4\n", {1, 3, 4}), ("", set())])
def test_cpu_lists_round_trip(text: str, cpus: set[int]) -> None:
    assert pl.parse_cpu_list(text) == cpus
    assert pl.parse_cpu_list(fmt_cpulist(cpus)) == cpus


def test_bad_cpu_range() -> None:
    with pytest.raises(ValueError):
        pl.parse_cpu_list("3-1")


def test_status_parser() -> None:
    status = "Name:\tqemu\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\nMems_allowed:\t1\n"
    assert pl.allowed_cpus(status) == {0, 1}
    with pytest.raises(ValueError):
        pl.allowed_cpus("Name: x\n")


def test_read_back_from_a_proc_tree(tmp_path: Path) -> None:
    for tid, name, cpus in ((10, "qemu-system-x86", "0-1"), (12, "CPU 0/TCG", "1")):
        d = tmp_path / "10" / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "comm").write_text(name + "\n")
        (d / "status").write_text(f"Name:\t{name}\nCpus_allowed_list:\t{cpus}\n")
    got = pl.read_back(10, tmp_path)
    assert [(t.tid, t.name, set(t.cpus)) for t in got] == [
        (10, "qemu-system-x86", {0, 1}), (12, "CPU 0/TCG", {1})]
    assert pl.summary(got) == {"CPU 0/TCG": "1", "qemu-system-x86": "0-1"}


def test_read_back_of_this_process_matches_its_affinity() -> None:
    mine = pl.read_back(os.getpid())
    assert mine and mine[0].cpus == os.sched_getaffinity(0)


def test_confirm_rereads_and_refuses_threads_off_their_cpus() -> None:
    me = pl.PlacedProcess("receiver", os.getpid(), 3)
    mine = fmt_cpulist(os.sched_getaffinity(0))
    ok = pl.confirm({"mode": "disjoint", "guests": {"receiver": mine}, "note": ""}, [me])
    assert ok["read_back"] == "after boot" and "receiver" in ok["threads"]  # type: ignore[operator]
    other = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(pl.GuestError):
        pl.confirm({"mode": "disjoint", "guests": {"receiver": str(other)}, "note": ""}, [me])
    # shared: nothing was pinned, so nothing to refuse
    pl.confirm({"mode": "shared", "guests": {"receiver": str(other)}, "note": ""}, [me])


@pytest.mark.process
def test_a_native_sender_gets_a_block_of_its_own_planned_but_not_applied() -> None:
    """receiver (2 vCPUs: weight 3) + a native netperf (weight 1) on 4 host CPUs; the
    sender's block is recorded, and re-reading after boot keeps it."""
    mine = tuple(sorted(os.sched_getaffinity(0)))
    with subprocess.Popen(["sleep", "30"]) as stand_in:  # pinned in place of a QEMU
        try:
            rx_proc = pl.PlacedProcess("receiver", stand_in.pid, 3)
            record = pl.place_guests("disjoint", [rx_proc], cpus=mine, others={"sender": 1})
            guests = record["guests"]
            assert isinstance(guests, dict) and set(guests) == {"receiver", "sender"}
            if len(mine) >= 2:
                rx, tx = (pl.parse_cpu_list(guests[k]) for k in ("receiver", "sender"))
                assert rx and tx and not rx & tx and rx | tx == set(mine)
                assert os.sched_getaffinity(stand_in.pid) == rx
            threads = record["threads"]
            assert isinstance(threads, dict)
            threads["sender"] = {"netperf": guests["sender"]}
            again = pl.confirm(record, [rx_proc])
            assert again["threads"]["sender"] == {"netperf": guests["sender"]}  # type: ignore[index]
        finally:
            stand_in.kill()


def test_on_more_cores_the_native_sender_gets_one_and_the_receiver_the_rest() -> None:
    p = pl.plan(range(8), ["receiver", "sender"], "disjoint", {"receiver": 5, "sender": 1})
    assert p.of("receiver") == (0, 1, 2, 3, 4, 5, 6) and p.of("sender") == (7,)
