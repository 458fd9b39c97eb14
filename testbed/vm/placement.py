"""Host placement of the guests: which host CPUs each QEMU process may run on.

Under TCG the host scheduler decides much of what a guest policy seems to do:
two guests' vCPU threads and their main-loop threads (tap I/O and device
emulation run there, and QMP's vCPU list does not show it) migrate over the same
host cores. A placement gives each guest's *whole* QEMU process a set of host
CPUs, so the receiver and the sender do not steal each other's cores; what
happens inside a guest (its IRQ affinity, RPS/RFS, the reader's pinning) is left
alone, so the placement does not erase what it measures.

`plan` is pure (host CPUs x guests -> affinity) and unit-tested; `apply` sets the
affinity of every thread of a running process (threads QEMU starts later inherit
it from the thread that creates them); `read_back` reads what the kernel holds
from /proc, which is what gets recorded.

Modes:
  shared    no pinning: every guest may use every host CPU (the host scheduler decides)
  disjoint  the host CPUs are split into disjoint, contiguous blocks, one per guest,
            in proportion to the guests' weights (vCPUs + 1 for the main loop);
            with fewer host CPUs than guests the guests share them (and the plan
            says so)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from testbed.errors import GuestError
from testbed.formats.readback import fmt_cpulist

PlacementMode = Literal["shared", "disjoint"]
PLACEMENT_MODES: tuple[PlacementMode, ...] = get_args(PlacementMode)


@dataclass(frozen=True)
class Placement:
    """The host CPUs each guest's QEMU process may use, and why."""

    mode: PlacementMode
    host_cpus: tuple[int, ...]
    cpus: tuple[tuple[str, tuple[int, ...]], ...]  # (guest name, its host CPUs), in order
    note: str

    def of(self, guest: str) -> tuple[int, ...]:
        for name, cpus in self.cpus:
            if name == guest:
                return cpus
        raise KeyError(guest)

    @property
    def pins(self) -> bool:
        """Whether applying the plan changes anything (shared leaves affinity alone)."""
        return any(set(c) != set(self.host_cpus) for _, c in self.cpus)

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "host_cpus": list(self.host_cpus),
                "guests": {name: fmt_cpulist(c) for name, c in self.cpus},
                "note": self.note}


def _shares(n: int, weights: Sequence[int]) -> list[int]:
    """n CPUs split in proportion to weights, each at least 1 (largest remainder)."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    shares = [max(1, int(r)) for r in raw]
    while sum(shares) > n:  # the minimum of 1 each took too many: take from the largest
        shares[shares.index(max(shares))] -= 1
    order = sorted(range(len(weights)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    k = 0
    while sum(shares) < n:
        shares[order[k % len(order)]] += 1
        k += 1
    return shares


def plan(host_cpus: Sequence[int], guests: Sequence[str], mode: PlacementMode,
         weights: Mapping[str, int] | None = None) -> Placement:
    """The placement of `guests` (first one first, e.g. receiver then sender) on `host_cpus`.

    `weights` (default 1 each) sizes the blocks in disjoint mode: with the vCPU count
    + 1 a 4-vCPU receiver and a 2-vCPU sender on 8 host CPUs get 5 and 3.
    """
    cpus = tuple(sorted(set(host_cpus)))
    if not cpus:
        raise ValueError("no host CPUs to place guests on")
    if len(set(guests)) != len(guests) or not guests:
        raise ValueError(f"guest names must be distinct and at least one: {list(guests)}")
    if mode not in PLACEMENT_MODES:
        raise ValueError(f"unknown placement {mode!r}; use one of {', '.join(PLACEMENT_MODES)}")
    if mode == "shared" or len(guests) == 1:
        why = ("no pinning: the host scheduler places every QEMU thread" if mode == "shared"
               else "one guest: it may use every host CPU")
        return Placement(mode, cpus, tuple((g, cpus) for g in guests), why)
    if len(cpus) < len(guests):
        return Placement(mode, cpus, tuple((g, cpus) for g in guests),
                         f"disjoint asked, but {len(cpus)} host CPU(s) for {len(guests)} "
                         "guests: they share them")
    w = [max(1, (weights or {}).get(g, 1)) for g in guests]
    out: list[tuple[str, tuple[int, ...]]] = []
    start = 0
    for g, share in zip(guests, _shares(len(cpus), w), strict=True):
        out.append((g, cpus[start:start + share]))
        start += share
    text = "; ".join(f"{g} on host CPUs {fmt_cpulist(c)}" for g, c in out)
    return Placement(mode, cpus, tuple(out), f"whole QEMU processes on disjoint CPUs: {text}")


def parse_cpu_list(text: str) -> frozenset[int]:
    """'0-2,5' -> {0, 1, 2, 5} (the kernel's list format, as in Cpus_allowed_list)."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep:
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"bad CPU range {part!r}")
            out.update(range(a, b + 1))
        else:
            out.add(int(lo))
    return frozenset(out)


def allowed_cpus(status_text: str) -> frozenset[int]:
    """The Cpus_allowed_list of a /proc/<pid>/task/<tid>/status text (pure)."""
    for line in status_text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpu_list(line.split(":", 1)[1])
    raise ValueError("no Cpus_allowed_list line in the status text")


def placement_mode(text: str) -> PlacementMode:
    """A placement name from a setting or the command line, checked."""
    for mode in PLACEMENT_MODES:
        if mode == text:
            return mode
    raise ValueError(f"unknown host placement {text!r}; use one of {', '.join(PLACEMENT_MODES)} "
                     "(netbed setting host_placement)")


def host_cpus() -> tuple[int, ...]:
    """The host CPUs this process may use (its own affinity, not just the CPU count)."""
    return tuple(sorted(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class ThreadAffinity:
    tid: int
    name: str
    cpus: frozenset[int]


def read_back(pid: int, proc: Path = Path("/proc")) -> list[ThreadAffinity]:
    """Every thread of `pid` with its name and the host CPUs it may run on, from /proc."""
    out = []
    task = proc / str(pid) / "task"
    for tdir in sorted(task.iterdir(), key=lambda p: int(p.name)):
        try:
            name = (tdir / "comm").read_text().strip()
            cpus = allowed_cpus((tdir / "status").read_text())
        except FileNotFoundError:  # the thread ended while we looked
            continue
        out.append(ThreadAffinity(int(tdir.name), name, cpus))
    return out


def apply(pid: int, cpus: Sequence[int], proc: Path = Path("/proc")) -> list[ThreadAffinity]:
    """Pin every thread of `pid` to `cpus`; returns what /proc then says.

    Threads may start while we work, so the thread list is walked until a pass
    finds none left to set; a thread that does not hold the set afterwards is an
    error naming it (a placement that silently failed would be recorded wrong).
    """
    want = frozenset(cpus)
    for _ in range(20):
        changed = False
        for t in read_back(pid, proc):
            if t.cpus != want:
                try:
                    os.sched_setaffinity(t.tid, want)
                except ProcessLookupError:
                    continue
                changed = True
        if not changed:
            break
    seen = read_back(pid, proc)
    wrong = [t for t in seen if t.cpus != want]
    if wrong:
        raise GuestError(f"could not pin QEMU pid {pid} to host CPUs {fmt_cpulist(want)}: "
                         + ", ".join(f"{t.name}/{t.tid} on {fmt_cpulist(t.cpus)}"
                                     for t in wrong))
    return seen


def summary(threads: Sequence[ThreadAffinity]) -> dict[str, str]:
    """'name (N threads)' -> the CPUs they may use, as read back (distinct lists joined)."""
    cpus: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for t in threads:
        cpus.setdefault(t.name, set()).add(fmt_cpulist(t.cpus))
        count[t.name] = count.get(t.name, 0) + 1
    return {(name if count[name] == 1 else f"{name} ({count[name]} threads)"):
            " | ".join(sorted(v)) for name, v in sorted(cpus.items())}


@dataclass(frozen=True)
class PlacedProcess:
    """A started QEMU process to place: its guest name, pid and weight (vCPUs + 1)."""

    name: str
    pid: int
    weight: int = 1


def place_guests(mode: PlacementMode, processes: Sequence[PlacedProcess],
                 cpus: Sequence[int] | None = None,
                 others: Mapping[str, int] | None = None) -> dict[str, object]:
    """Plan, apply and read back a placement; returns the record for versions.json.

    The record holds the plan and, per guest, each QEMU thread name with the host
    CPUs /proc says it may use (read back, not assumed). `others` (name -> weight)
    get a block of the plan too but are not applied here: a native sender has no
    process yet, and pins each of its commands itself (testbed.vm.netns).
    """
    weights = {x.name: x.weight for x in processes} | dict(others or {})
    p = plan(cpus if cpus is not None else host_cpus(),
             [x.name for x in processes] + list(others or {}), mode, weights)
    threads: dict[str, dict[str, str]] = {}
    for proc in processes:
        seen = apply(proc.pid, p.of(proc.name)) if p.pins else read_back(proc.pid)
        threads[proc.name] = summary(seen)
    return {**p.to_dict(), "threads": threads}


def confirm(record: dict[str, object], processes: Sequence[PlacedProcess]) -> dict[str, object]:
    """Read the placement back again once the guests are up (QEMU starts threads while
    booting; they inherit the affinity) and fail if any thread is off its host CPUs."""
    guests = record.get("guests")
    if not isinstance(guests, dict):
        return record
    before = record.get("threads")
    names = {proc.name for proc in processes}
    # entries placed another way (a native sender's taskset) are kept as they are
    threads: dict[str, dict[str, str]] = {k: v for k, v in before.items() if k not in names} \
        if isinstance(before, dict) else {}
    for proc in processes:
        seen = read_back(proc.pid)
        want = parse_cpu_list(str(guests.get(proc.name, "")))
        wrong = [t for t in seen if t.cpus != want]
        if record.get("mode") != "shared" and wrong:
            raise GuestError(f"QEMU {proc.name} (pid {proc.pid}): threads off host CPUs "
                             f"{fmt_cpulist(want)} after boot: "
                             + ", ".join(f"{t.name}/{t.tid} on {fmt_cpulist(t.cpus)}"
                                         for t in wrong))
        threads[proc.name] = summary(seen)
    return {**record, "threads": threads, "read_back": "after boot"}
