"""Kernel tracepoints of the receive path: guest commands (tracefs), raw files, reduction.

Raw files:
- `trace.txt.gz`: tracefs's `trace` file as the kernel printed it, gzip-compressed
  (clock `mono`, so its timestamps compare with the window's stamps);
- `trace-stats.txt`: `per_cpu/cpuN/stats` after the window (events lost to a full
  buffer show up there as `overrun`);
- `trace-unsupported`: present instead when the kernel cannot trace; its text is
  the reason;
- `trace-events.txt`: the events armed, one a line (runs made before it existed
  did not trace migrations: their migration counts are not-supported, not zero).

Events and why each (Linux 6.1 semantics):
- `net:netif_receive_skb` fires in `__netif_receive_skb_core`, after RPS/RFS
  steering, on the CPU that does the protocol processing, once per (GRO-merged)
  skb: weight it by `len`.
- `napi:napi_poll` fires per NAPI poll, on the CPU that took the interrupt; it
  also fires for RPS backlog polls (device "(no_device)"), so it is filtered on the
  data NIC and weighted by `work` (packets taken from the ring).
- `sched:sched_waking` is recorded on the waking CPU, in the waker's context (the
  irq-context flag says softirq or not); its `target_cpu` is the task's previous
  CPU. The placement is `sched:sched_wakeup`'s `target_cpu`.
- `sched:sched_switch` says where the reader runs and when it sleeps.
- `sched:sched_migrate_task` fires in `set_task_cpu()` whenever the reader is moved
  to another CPU: by a wake-up's placement, the load balancer, or a stopper-driven
  move (the affine-copy kernel's `net.core.rx_affine_copy`); `orig_cpu`, `dest_cpu`.
All are filtered in the kernel (data NIC; netserver's processes), so the buffer
holds little more than the reduction needs; the reduction picks the reader by pid.
"""

from __future__ import annotations

import bisect
import gzip
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from testbed.errors import NetbedError

TRACEFS = "/sys/kernel/tracing"
RAW_TRACE = "trace.txt.gz"
RAW_STATS = "trace-stats.txt"
RAW_UNSUPPORTED = "trace-unsupported"
RAW_EVENTS = "trace-events.txt"
FILES = (RAW_TRACE, RAW_STATS, RAW_UNSUPPORTED, RAW_EVENTS)
BUFFER_KB_PER_CPU = 8192
EVENTS = ("net/netif_receive_skb", "napi/napi_poll", "sched/sched_waking",
          "sched/sched_wakeup", "sched/sched_switch", "sched/sched_migrate_task")
MIGRATE_EVENT = "sched/sched_migrate_task"


READER_COMM = "netserver"  # the reader is netserver's data process; its pid picks it out


def _filters(iface: str) -> dict[str, str]:
    """Each event's filter as one shell word. The sched events are filtered on the
    reader's command name, so the trace can be armed before the reader exists."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", iface):
        raise NetbedError(f"interface name {iface!r} cannot go into a trace filter")
    c = READER_COMM
    return {
        "net/netif_receive_skb": f"'name == \"{iface}\"'",
        "napi/napi_poll": f"'dev_name == \"{iface}\"'",
        "sched/sched_waking": f"'comm == \"{c}\"'",
        "sched/sched_wakeup": f"'comm == \"{c}\"'",
        "sched/sched_switch": f"'prev_comm == \"{c}\" || next_comm == \"{c}\"'",
        "sched/sched_migrate_task": f"'comm == \"{c}\"'",
    }


def setup_command(iface: str, out_dir: str) -> str:
    """Shell lines that arm (not start) the trace; on any failure they write the reason
    to `<out_dir>/trace-unsupported` and leave tracing off."""
    t = TRACEFS
    unsup = f"{out_dir}/{RAW_UNSUPPORTED}"
    armed = f"{out_dir}/{RAW_EVENTS}"
    lines = [
        f"nbtrace_fail() {{ echo \"$1\" > {unsup}; echo 0 > {t}/tracing_on 2>/dev/null; }}",
        f"[ -d {t}/events ] || mount -t tracefs nodev {t} 2>/dev/null",
        f"if [ ! -d {t}/events ]; then nbtrace_fail 'no tracefs at {t} "
        f"(kernel without CONFIG_FTRACE/EVENT_TRACING?)'; else",
        f"  echo 0 > {t}/tracing_on; echo 0 > {t}/events/enable; echo > {t}/trace",
        f"  echo mono > {t}/trace_clock || nbtrace_fail 'trace_clock mono not available'",
        f"  echo {BUFFER_KB_PER_CPU} > {t}/buffer_size_kb "
        f"|| nbtrace_fail 'cannot size the trace buffer'",
    ]
    for event, flt in _filters(iface).items():
        d = f"{t}/events/{event}"
        lines += [
            f"  if [ ! -d {d} ]; then nbtrace_fail 'kernel has no tracepoint {event}';",
            f"  else echo {flt} > {d}/filter && echo 1 > {d}/enable && echo {event} >> {armed} "
            f"|| nbtrace_fail 'cannot filter or enable {event}'; fi",
        ]
    lines += ["fi", f"if [ -e {unsup} ]; then echo 0 > {t}/events/enable 2>/dev/null; fi"]
    return "\n".join(lines)


def on_command(out_dir: str) -> str:
    return f"[ -e {out_dir}/{RAW_UNSUPPORTED} ] || echo 1 > {TRACEFS}/tracing_on"


def off_command() -> str:
    return f"echo 0 > {TRACEFS}/tracing_on 2>/dev/null"


def collect_command(out_dir: str) -> str:
    """After the window: keep the buffer's loss counters and the compressed trace."""
    t = TRACEFS
    return (f"if [ ! -e {out_dir}/{RAW_UNSUPPORTED} ]; then "
            f"echo 0 > {t}/events/enable; "
            f"for c in {t}/per_cpu/cpu*; do echo \"# ${{c##*/}}\"; cat $c/stats; done "
            f"> {out_dir}/{RAW_STATS}; "
            f"gzip -1 -c {t}/trace > {out_dir}/{RAW_TRACE}; echo > {t}/trace; fi")


# --------------------------------------------------------------------------- parsing

_LINE_RE = re.compile(r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]"
                      r"\s+(?P<flags>\S+)\s+(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<body>.*)$")


@dataclass(frozen=True)
class Record:
    """One trace line: time (s, trace clock), CPU, irq-context flag, event, its text."""

    ts: float
    cpu: int
    context: str  # the hardirq/softirq flag: 's' softirq, 'h' hardirq, 'H' both, '.' none
    event: str
    body: str

    @property
    def in_softirq(self) -> bool:
        return self.context == "s"


def parse_trace(lines: Iterable[str]) -> Iterator[Record]:
    """Records of tracefs's text output; comment lines and others (e.g. "CPU:1
    [LOST 12 EVENTS]") are skipped here and counted by `lost_events`."""
    for line in lines:
        if not line or line.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            continue
        flags = m.group("flags")
        # 6.1 prints irqs-off, need-resched, hardirq/softirq, preempt depth, migrate-disable.
        context = flags[2] if len(flags) >= 3 else "."
        yield Record(float(m.group("ts")), int(m.group("cpu")), context, m.group("event"),
                     m.group("body"))


def read_trace_gz(data: bytes) -> list[str]:
    try:
        return gzip.decompress(data).decode("utf-8", "replace").splitlines()
    except (OSError, EOFError) as exc:
        raise NetbedError(f"{RAW_TRACE} is not a complete gzip file: {exc}",
                          hint="the guest may have run out of space or time while "
                               "compressing; rerun the repetition") from exc


_LOST_RE = re.compile(r"\[LOST (\d+) EVENTS\]")
_STATS_RE = re.compile(r"^(overrun|dropped events):\s*(\d+)", re.M)


def lost_events(lines: Iterable[str], stats_text: str = "") -> int:
    """Events the buffer lost: "[LOST n EVENTS]" lines plus overrun/dropped in the stats."""
    lost = sum(int(m.group(1)) for ln in lines if (m := _LOST_RE.search(ln)))
    return lost + sum(int(v) for _, v in _STATS_RE.findall(stats_text))


# --------------------------------------------------------------------------- reduction

_INT = {name: re.compile(rf"\b{name}=(\d+)") for name in
        ("pid", "prev_pid", "next_pid", "target_cpu", "len")}
_STATE_RE = re.compile(r"\bprev_state=(\S+)")
_DEV_RE = re.compile(r"\bdev=(\S+)")
_NAPI_RE = re.compile(r"for device (\S+) work (\d+) budget (\d+)")


def _int(name: str, body: str) -> int | None:
    m = _INT[name].search(body)
    return int(m.group(1)) if m else None


@dataclass
class Locality:
    """What the trace says about one window, with the counts each share rests on."""

    processed_bytes: int = 0
    processed_on_reader: int = 0
    processed_unattributed: int = 0  # before the reader's first switch in the trace
    skbs: int = 0
    napi_work: int = 0
    napi_on_reader: int = 0
    napi_unattributed: int = 0
    wakings: int = 0  # every sched_waking of the reader
    wakeups: int = 0  # wakings that placed a sleeping reader (followed by sched_wakeup)
    wakeups_on_waker: int = 0
    wakeups_from_softirq: int = 0
    wakings_while_awake: int = 0
    migrations: int = 0  # sched_migrate_task of the reader: any move to another CPU
    reader_switches: int = 0
    reader_pids: list[int] = field(default_factory=list)

    def share(self, part: int, whole: int) -> float | None:
        return part / whole if whole > 0 else None

    @property
    def processing_on_reader_cpu(self) -> float | None:
        return self.share(self.processed_on_reader, self.processed_bytes)

    @property
    def irq_on_reader_cpu(self) -> float | None:
        return self.share(self.napi_on_reader, self.napi_work)

    @property
    def on_waker_cpu(self) -> float | None:
        return self.share(self.wakeups_on_waker, self.wakeups)

    @property
    def from_softirq(self) -> float | None:
        return self.share(self.wakeups_from_softirq, self.wakeups)


def reader_pid(records: list[Record], hint: int | None = None) -> int | None:
    """The traced reader: `hint` (the pid the window traced) or the pid the sched
    events name most (the filters admit only the reader, so there is one)."""
    if hint is not None:
        return hint
    counts: dict[int, int] = {}
    for r in records:
        if r.event in ("sched_waking", "sched_wakeup"):
            p = _int("pid", r.body)
            if p is not None:
                counts[p] = counts.get(p, 0) + 1
    return max(counts, key=lambda p: counts[p]) if counts else None


def reduce_trace(records: Iterable[Record], iface: str | None, pid: int | None = None,
                 ) -> Locality:
    """Co-location and wake-up placement, measured event by event.

    The reader's CPU at time t is the CPU of its latest sched_switch (switched in:
    running there; switched out: last ran there) before t. Events before the
    reader's first switch are counted as unattributed, not guessed.
    """
    recs = list(records)
    pid = reader_pid(recs, pid)
    loc = Locality(reader_pids=[pid] if pid is not None else [])
    times: list[float] = []
    cpus: list[int] = []
    sleeping: list[bool] = []
    for r in recs:  # the reader's timeline from sched_switch
        if r.event != "sched_switch":
            continue
        prev, nxt = _int("prev_pid", r.body), _int("next_pid", r.body)
        if pid is not None and nxt == pid:
            times.append(r.ts)
            cpus.append(r.cpu)
            sleeping.append(False)
        elif pid is not None and prev == pid:
            state = _STATE_RE.search(r.body)
            times.append(r.ts)
            cpus.append(r.cpu)
            sleeping.append(not (state and state.group(1).startswith("R")))
    loc.reader_switches = len(times)

    def where(ts: float) -> tuple[int | None, bool | None]:
        i = bisect.bisect_right(times, ts) - 1
        return (cpus[i], sleeping[i]) if i >= 0 else (None, None)

    pending: tuple[int, bool] | None = None
    for r in recs:
        if r.event == "netif_receive_skb":
            dev = _DEV_RE.search(r.body)
            if iface and dev and dev.group(1) != iface:
                continue
            size = _int("len", r.body) or 0
            loc.skbs += 1
            cpu, _ = where(r.ts)
            if cpu is None:
                loc.processed_unattributed += size
                continue
            loc.processed_bytes += size
            loc.processed_on_reader += size if cpu == r.cpu else 0
        elif r.event == "napi_poll":
            m = _NAPI_RE.search(r.body)
            if not m or (iface and m.group(1) != iface):
                continue
            work = int(m.group(2))
            cpu, _ = where(r.ts)
            if cpu is None:
                loc.napi_unattributed += work
                continue
            loc.napi_work += work
            loc.napi_on_reader += work if cpu == r.cpu else 0
        elif r.event == "sched_waking" and _int("pid", r.body) == pid:
            loc.wakings += 1
            _, asleep = where(r.ts)
            if asleep:
                pending = (r.cpu, r.in_softirq)
            else:
                loc.wakings_while_awake += asleep is False
                pending = None
        elif r.event == "sched_migrate_task" and _int("pid", r.body) == pid:
            loc.migrations += 1
        elif r.event == "sched_wakeup" and _int("pid", r.body) == pid and pending:
            target = _int("target_cpu", r.body)
            loc.wakeups += 1
            loc.wakeups_on_waker += target == pending[0]
            loc.wakeups_from_softirq += pending[1]
            pending = None
    return loc
