"""testbed.formats.trace: parsing tracefs text and reducing it to co-location and wake-ups.

The scenario tests build short traces line by line (the exact format Linux 6.1 prints,
as in the captured fixture), so each expected share can be worked out by hand.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from analysis import window_metrics as wm
from testbed.errors import NetbedError
from testbed.formats import trace

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-window"
PID = 321


def line(ts: float, cpu: int, flags: str, event: str, body: str, comm: str = "netserver",
         pid: int = PID) -> str:
    return f"{comm:>16}-{pid:<7} [{cpu:03d}] {flags} {ts:12.6f}: {event}: {body}"


def switch_in(ts: float, cpu: int) -> str:
    return line(ts, cpu, "d..2.", "sched_switch",
                f"prev_comm=swapper/{cpu} prev_pid=0 prev_prio=120 prev_state=R ==> "
                f"next_comm=netserver next_pid={PID} next_prio=120", "<idle>", 0)


def switch_out(ts: float, cpu: int, state: str = "S") -> str:
    return line(ts, cpu, "d..2.", "sched_switch",
                f"prev_comm=netserver prev_pid={PID} prev_prio=120 prev_state={state} ==> "
                f"next_comm=swapper/{cpu} next_pid=0 next_prio=120")


def skb(ts: float, cpu: int, size: int, dev: str = "eth1") -> str:
    return line(ts, cpu, "..s1.", "netif_receive_skb",
                f"dev={dev} skbaddr=00000000a1b2c3d4 len={size}", "<idle>", 0)


def poll(ts: float, cpu: int, work: int, dev: str = "eth1") -> str:
    return line(ts, cpu, "..s1.", "napi_poll",
                f"napi poll on napi struct 00000000deadbeef for device {dev} work {work} "
                "budget 64", "<idle>", 0)


def waking(ts: float, cpu: int, ctx: str = "s", target: int = 1) -> str:
    flags = f"d.{ctx}3."
    return line(ts, cpu, flags, "sched_waking",
                f"comm=netserver pid={PID} prio=120 target_cpu={target:03d}", "<idle>", 0)


def wakeup(ts: float, cpu: int, target: int) -> str:
    return line(ts, cpu, "d.s4.", "sched_wakeup",
                f"comm=netserver pid={PID} prio=120 target_cpu={target:03d}", "<idle>", 0)


def reduce(lines: list[str], iface: str | None = "eth1") -> trace.Locality:
    return trace.reduce_trace(trace.parse_trace(["# tracer: nop", "#", *lines]), iface, PID)


def test_processing_share_is_weighted_by_len_at_the_readers_cpu_of_that_moment():
    loc = reduce([
        skb(0.5, 0, 9999),  # before the reader's first switch: left out, counted
        switch_in(1.0, 1),
        skb(1.1, 1, 3000),  # on the reader's CPU
        skb(1.2, 0, 1000),  # elsewhere
        switch_out(1.3, 1),  # sleeping: it last ran on CPU 1
        skb(1.4, 1, 4000),
        switch_in(2.0, 0),
        skb(2.1, 0, 2000),
        skb(2.2, 0, 500, dev="lo"),  # another device: not the data NIC
    ])
    assert loc.processed_bytes == 10000 and loc.processed_unattributed == 9999
    assert loc.processing_on_reader_cpu == pytest.approx(9000 / 10000)
    assert loc.skbs == 5


def test_irq_share_is_weighted_by_work_and_ignores_backlog_polls():
    loc = reduce([switch_in(1.0, 1), poll(1.1, 0, 30), poll(1.2, 1, 10), poll(1.3, 1, 0),
                  poll(1.4, 1, 50, dev="(no_device)")])
    assert loc.napi_work == 40
    assert loc.irq_on_reader_cpu == pytest.approx(10 / 40)


def test_wakeups_count_only_a_sleeping_reader_and_use_sched_wakeup_placement():
    loc = reduce([
        switch_in(1.0, 1), switch_out(1.1, 1),
        waking(1.2, 0, "s", target=1), wakeup(1.2001, 0, target=0),  # placed on waker CPU 0
        switch_in(1.3, 0), switch_out(1.4, 0),
        waking(1.5, 1, ".", target=0), wakeup(1.5001, 1, target=0),  # process ctx, not waker's
        switch_in(1.6, 0),
        waking(1.65, 1, "s", target=0), wakeup(1.6501, 1, target=0),  # still awake: not counted
        switch_out(1.7, 0, state="R+"),  # preempted: runnable, not asleep
        waking(1.75, 1, "s", target=0),
    ])
    assert loc.wakings == 4 and loc.wakings_while_awake == 2
    assert loc.wakeups == 2
    assert loc.on_waker_cpu == pytest.approx(0.5)
    assert loc.from_softirq == pytest.approx(0.5)


def test_shares_without_events_are_none_not_zero():
    loc = reduce([switch_in(1.0, 1)])
    assert loc.processing_on_reader_cpu is None and loc.irq_on_reader_cpu is None
    assert loc.on_waker_cpu is None and loc.wakeups == 0


def test_reader_pid_found_from_the_sched_events_when_not_given():
    recs = list(trace.parse_trace([waking(1.0, 0), wakeup(1.0, 0, 1)]))
    assert trace.reader_pid(recs) == PID
    assert trace.reader_pid(recs, 7) == 7


def test_lost_events_from_markers_and_stats():
    stats = "# cpu0\nentries: 10\noverrun: 3\ncommit overrun: 0\ndropped events: 2\n"
    assert trace.lost_events(["CPU:1 [LOST 5 EVENTS]", "x"], stats) == 10


def test_truncated_gzip_is_a_clear_error():
    data = gzip.compress(b"# tracer: nop\n" * 100)
    with pytest.raises(NetbedError, match="not a complete gzip"):
        trace.read_trace_gz(data[: len(data) // 2])


def test_filters_refuse_an_interface_name_that_would_break_the_shell():
    with pytest.raises(NetbedError, match="interface name"):
        trace.setup_command("eth1'; reboot #", "/tmp/w")


def test_captured_guest_trace_parses_and_reduces():
    """A real 6.1 guest trace (e1000, pin-cross: IRQ on CPU 0, reader pinned to CPU 1)."""
    lines = trace.read_trace_gz((FIX / trace.RAW_TRACE).read_bytes())
    recs = list(trace.parse_trace(lines))
    events = {r.event for r in recs}
    assert {"netif_receive_skb", "napi_poll", "sched_switch", "sched_waking",
            "sched_wakeup"} <= events
    skipped = [ln for ln in lines if ln and not ln.startswith("#")
               and not trace._LINE_RE.match(ln)]
    assert skipped == []  # every record line of the real trace parses
    iface = (FIX / "iface.txt").read_text().strip()
    loc = trace.reduce_trace(recs, iface, None)
    assert loc.reader_pids == [int((FIX / "reader-pid.txt").read_text())]
    assert loc.skbs > 100 and loc.reader_switches > 10
    assert loc.processing_on_reader_cpu == 0.0  # all protocol processing on CPU 0
    assert loc.irq_on_reader_cpu == 0.0
    assert loc.wakeups > 10 and loc.on_waker_cpu == 0.0 and loc.from_softirq == 1.0
    stats = (FIX / trace.RAW_STATS).read_text()
    assert trace.lost_events(lines, stats) == 0


def migrate(ts: float, cpu: int, orig: int, dest: int, pid: int = PID) -> str:
    return line(ts, cpu, "d..2.", "sched_migrate_task",
                f"comm=netserver pid={pid} prio=120 orig_cpu={orig} dest_cpu={dest}",
                "migration/1", 17)


def test_migrations_count_the_readers_moves_only():
    loc = reduce([
        switch_in(1.0, 1),
        migrate(1.1, 1, 1, 0),  # the reader moved by the stopper
        switch_in(1.2, 0),
        migrate(1.3, 0, 0, 1, pid=999),  # netserver's parent: another pid
        migrate(1.4, 1, 0, 1),  # and pulled back
    ])
    assert loc.migrations == 2


def test_setup_arms_the_migration_event_and_lists_what_it_armed():
    script = trace.setup_command("eth1", "/tmp/w")
    assert "events/sched/sched_migrate_task/filter" in script
    assert f"echo sched/sched_migrate_task >> /tmp/w/{trace.RAW_EVENTS}" in script


def test_migration_rows_per_second_of_the_window_and_not_zero_when_untraced():
    loc = trace.Locality(migrations=6, reader_pids=[PID])
    armed = "\n".join(trace.EVENTS) + "\n"
    rows = {r.metric: r for r in wm.migration_rows(loc, armed, 3.0, "")}
    assert rows["sched.reader_migrations"].value == 6
    assert rows["sched.reader_migrations.per_s"].value == pytest.approx(2.0)
    old = {r.metric: r for r in wm.migration_rows(loc, None, 3.0, "")}
    assert all(r.status == "not-supported" and r.value != r.value for r in old.values())
    assert "sched_migrate_task" in old["sched.reader_migrations"].note
    no_window = {r.metric: r for r in wm.migration_rows(loc, armed, None, "")}
    assert no_window["sched.reader_migrations"].value == 6
    assert no_window["sched.reader_migrations.per_s"].status == "not-supported"
