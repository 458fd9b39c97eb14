"""Experiment -> cells -> run order; sharding, time estimate and the dry-run table (pure).

See testbed.experiment.config for the include/exclude semantics. Cell order is stable:
the axes' product in the order kernel, nic, cpus, policy, workload, gro (the
last varying fastest, so neighbouring cells usually share a boot key), then
cells added by `include`, in file order.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Literal

from testbed.errors import NetbedError
from testbed.experiment.config import Cell, Combination, Experiment
from testbed.experiment.runname import MAX_SHARDS
from testbed.vocabulary import AXES

Schedule = list[tuple[Cell, int]]


def _cell_from_include(exp: Experiment, inc: Combination) -> Cell:
    values = {axis: getattr(exp.axes, axis)[0] for axis in AXES}
    for axis in inc.given_axes():
        value = getattr(inc, axis)
        values[axis] = value.to_workload() if axis == "workload" else value
    return Cell(**values)


def expand_with_origin(exp: Experiment) -> list[tuple[Cell, int | None]]:
    """`expand`, with where each cell came from: None (the axes) or its include index."""
    ax = exp.axes
    out: list[tuple[Cell, int | None]] = []
    seen: set[Cell] = set()
    for kernel, nic, cpus, policy, workload, gro in itertools.product(
            ax.kernel, ax.nic, ax.cpus, ax.policy, ax.workload, ax.gro):
        cell = Cell(kernel=kernel, nic=nic, cpus=cpus, policy=policy, workload=workload, gro=gro)
        if cell in seen or any(ex.matches(cell) for ex in exp.exclude):
            continue
        seen.add(cell)
        out.append((cell, None))
    for j, inc in enumerate(exp.include):
        if any(inc.matches(cell) for cell, _ in out):
            continue  # "extends" existing cells: every key is an axis, so nothing to add
        cell = _cell_from_include(exp, inc)
        if cell not in seen:
            seen.add(cell)
            out.append((cell, j))
    return out


def unmatched_excludes(exp: Experiment) -> list[int]:
    """Indexes of exclude entries that match no combination of the axes (usually typos)."""
    ax = exp.axes
    unused = set(range(len(exp.exclude)))
    for kernel, nic, cpus, policy, workload, gro in itertools.product(
            ax.kernel, ax.nic, ax.cpus, ax.policy, ax.workload, ax.gro):
        if not unused:
            break
        cell = Cell(kernel=kernel, nic=nic, cpus=cpus, policy=policy, workload=workload, gro=gro)
        unused -= {j for j in unused if exp.exclude[j].matches(cell)}
    return sorted(unused)


def expand(exp: Experiment) -> list[Cell]:
    """The experiment's cells: product of the axes, minus exclude, plus include; no duplicates."""
    return [cell for cell, _ in expand_with_origin(exp)]


def _shuffled(items: list[Cell], rng: random.Random) -> list[Cell]:
    """Fisher-Yates on `rng.random()` only: the one stream Python promises not to change."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def schedule(exp: Experiment, cells: Sequence[Cell]) -> Schedule:
    """(cell, repetition) pairs in run order; repetitions count from 0.

    sequential: every repetition of a cell, then the next cell (fewest boots).
    interleaved: repetition 0 of every cell, then repetition 1, ... so slow drift
    of a shared host spreads over all cells instead of biasing the last ones.
    random: interleaved rounds, each round in a seeded random order
    (deterministic for a seed; a different permutation per round).
    """
    cells = list(cells)
    reps = range(exp.repetitions)
    if exp.order == "sequential":
        return [(c, r) for c in cells for r in reps]
    if exp.order == "interleaved":
        return [(c, r) for r in reps for c in cells]
    rng = random.Random(exp.seed)
    return [(c, r) for r in reps for c in _shuffled(cells, rng)]


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def shard(cells: Sequence[Cell], k: int, n: int) -> list[Cell]:
    """Shard K of N (1-based): a deterministic, balanced share of the cells.

    Cells are ranked by a stable hash of their id (the same on every machine and
    Python) and dealt round-robin, so the N shards partition the cells and differ
    in size by at most one. All repetitions of a cell stay in its shard. The
    result keeps the input order.
    """
    if not (n >= 1 and 1 <= k <= n):
        raise NetbedError(f"bad shard {k}/{n}: K must be between 1 and N",
                          hint="write K/N with 1 <= K <= N, e.g. --shard 2/4")
    ranked = sorted(cells, key=lambda c: (_stable_hash(c.cell_id), c.cell_id))
    mine = {c.cell_id for i, c in enumerate(ranked) if i % n == k - 1}
    return [c for c in cells if c.cell_id in mine]


_SHARD_RE = re.compile(r"^\s*([0-9]{1,9})\s*/\s*([0-9]{1,9})\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4); anything else is a NetbedError saying how to write it."""
    m = _SHARD_RE.match(text or "")
    if not m:
        raise NetbedError(f"bad --shard {text!r}: expected K/N",
                          hint="e.g. --shard 2/4 runs the second of four shards")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise NetbedError(f"bad --shard {text!r}: K must be between 1 and N (K counts from 1)",
                          hint=f"use 1/{max(n, 1)} .. {max(n, 1)}/{max(n, 1)}")
    if n > MAX_SHARDS:
        raise NetbedError(f"bad --shard {text!r}: at most {MAX_SHARDS} shards")
    return k, n


Reuse = Literal["none", "cell", "guest"]


def count_boots(sched: Schedule, reuse: Reuse = "cell") -> int:
    """Guest-pair boots the schedule needs.

    none: every repetition boots; cell: consecutive repetitions of one cell share a
    boot; guest: consecutive cells with the same kernel/nic/cpus share a boot.
    """
    if reuse == "none":
        return len(sched)
    key: Callable[[Cell], Hashable] = (
        (lambda c: c.cell_id) if reuse == "cell" else (lambda c: c.boot_key))
    boots = 0
    previous: Hashable = object()
    for cell, _ in sched:
        k = key(cell)
        if k != previous:
            boots += 1
            previous = k
    return boots


def estimate_seconds(exp: Experiment, cells: Sequence[Cell], boot_seconds: float = 25.0, *,
                     rep_overhead_seconds: float = 8.0, reuse: Reuse = "cell") -> float:
    """Rough wall time: boots (as the order allows reuse) + (warmup + duration + overhead) per rep.

    `rep_overhead_seconds` covers policy apply/read-back, /proc snapshots and
    copying results; retries are not counted (an estimate, not a promise).
    """
    sched = schedule(exp, cells)
    per_rep = exp.warmup + exp.duration + rep_overhead_seconds
    return count_boots(sched, reuse) * boot_seconds + len(sched) * per_rep


def format_duration(seconds: float) -> str:
    """3725 -> '1 h 2 min'; 75 -> '1 min 15 s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


def cells_table(exp: Experiment, cells: Sequence[Cell]) -> str:
    """Plain-text table of the cells for `--dry-run` (no terminal needed, no colour)."""
    header = ("#", "kernel", "nic", "cpus", "policy", "workload", "gro", "cell id")
    rows = [(str(i + 1), c.kernel, c.nic, str(c.cpus), c.policy, c.workload.id,
             "on" if c.gro else "off", c.cell_id) for i, c in enumerate(cells)]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    runs = len(cells) * exp.repetitions
    lines.append("")
    lines.append(f"{exp.name}: {len(cells)} cells x {exp.repetitions} repetitions = {runs} runs, "
                 f"order {exp.order}" + (f" (seed {exp.seed})" if exp.order == "random" else "")
                 + f", {exp.warmup} s warmup + {exp.duration} s measured each")
    return "\n".join(lines)
