"""Experiment -> cells -> run order; sharding, time estimate and the dry-run table (pure).

See testbed.experiment.config for the include/exclude semantics. Cell order is stable:
the axes' product in the order kernel, nic, cpus, policy, workload, gro, rcvbuf (the
last varying fastest, so neighbouring cells usually share a boot key), then
cells added by `include`, in file order.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, Literal

from testbed.errors import NetbedError
from testbed.experiment.config import Cell, Combination, Experiment
from testbed.runname import MAX_SHARDS
from testbed.vocabulary import AXES

Schedule = list[tuple[Cell, int]]


def _cell_from_include(exp: Experiment, inc: Combination) -> Cell:
    values = {axis: getattr(exp.axes, axis)[0] for axis in AXES}
    for axis in inc.given_axes():
        value = getattr(inc, axis)
        values[axis] = value.to_workload() if axis == "workload" else value
    return Cell(**values)


# A combination as a flat tuple; an include/exclude entry as the positions it names and
# the values it wants there. Entries naming the same positions share one set, so matching
# thousands of cells against hundreds of entries is a few set lookups per cell.
Key = tuple[str, str, int, str, str, int, bool, str]
Positions = tuple[int, ...]
_INDEX = {"kernel": 0, "nic": 1, "cpus": 2, "policy": 3, "gro": 6, "rcvbuf": 7}


def _entry(comb: Combination) -> tuple[Positions, tuple[object, ...]]:
    checks: list[tuple[int, object]] = []
    for axis in comb.given_axes():
        value = getattr(comb, axis)
        if axis == "workload":
            checks.append((4, value.name))
            if value.message_size is not None:  # no size: every size of that workload
                checks.append((5, value.message_size))
        else:
            checks.append((_INDEX[axis], value))
    checks.sort(key=lambda c: c[0])
    return tuple(i for i, _ in checks), tuple(v for _, v in checks)


def _project(key: Key, positions: Positions) -> tuple[object, ...]:
    return tuple(key[i] for i in positions)


def _product(exp: Experiment) -> Iterator[tuple[Key, tuple[Any, ...]]]:
    ax = exp.axes
    for combo in itertools.product(ax.kernel, ax.nic, ax.cpus, ax.policy, ax.workload, ax.gro,
                                   ax.rcvbuf):
        kernel, nic, cpus, policy, workload, gro, rcvbuf = combo
        yield (kernel, nic, cpus, policy, workload.name, workload.message_size, gro,
               rcvbuf), combo


def _key(cell: Cell) -> Key:
    return (cell.kernel, cell.nic, cell.cpus, cell.policy, cell.workload.name,
            cell.workload.message_size, cell.gro, cell.rcvbuf)


def expand_with_origin(exp: Experiment) -> list[tuple[Cell, int | None]]:
    """`expand`, with where each cell came from: None (the axes) or its include index."""
    excluded: dict[Positions, set[tuple[object, ...]]] = {}
    for ex in exp.exclude:
        positions, values = _entry(ex)
        excluded.setdefault(positions, set()).add(values)
    includes = [_entry(inc) for inc in exp.include]
    # projections of the cells so far onto the positions includes name
    present: dict[Positions, set[tuple[object, ...]]] = {pos: set() for pos, _ in includes}
    out: list[tuple[Cell, int | None]] = []
    seen: set[Key] = set()

    def add(key: Key, cell: Cell, origin: int | None) -> None:
        seen.add(key)
        for pos, projections in present.items():
            projections.add(_project(key, pos))
        out.append((cell, origin))

    for key, (kernel, nic, cpus, policy, workload, gro, rcvbuf) in _product(exp):
        if key in seen or any(_project(key, pos) in values
                              for pos, values in excluded.items()):
            continue
        add(key, Cell(kernel=kernel, nic=nic, cpus=cpus, policy=policy, workload=workload,
                      gro=gro, rcvbuf=rcvbuf), None)
    for j, (inc, (positions, values)) in enumerate(zip(exp.include, includes, strict=True)):
        if values in present[positions]:
            continue  # "extends" existing cells: every key is an axis, so nothing to add
        cell = _cell_from_include(exp, inc)
        key = _key(cell)
        if key not in seen:
            add(key, cell, j)
    return out


def unmatched_excludes(exp: Experiment) -> list[int]:
    """Indexes of exclude entries that match no combination of the axes (usually typos)."""
    entries = [_entry(ex) for ex in exp.exclude]
    found: dict[Positions, set[tuple[object, ...]]] = {pos: set() for pos, _ in entries}
    for key, _ in _product(exp):
        for pos, projections in found.items():
            projections.add(_project(key, pos))
    return [j for j, (pos, values) in enumerate(entries) if values not in found[pos]]


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


def round_order(exp: Experiment, cells: Sequence[Cell], round_no: int) -> list[Cell]:
    """The cells in the order round `round_no` runs them (interleaved or random order).

    random: the permutation of round r is the r-th drawn from the seed's stream, so
    the rounds an adaptive run adds after its first ones are as reproducible (and
    resume alike) as the first ones.
    """
    cells = list(cells)
    if exp.order != "random":
        return cells
    rng = random.Random(exp.seed)
    order = cells
    for _ in range(round_no + 1):
        order = _shuffled(cells, rng)
    return order


def schedule(exp: Experiment, cells: Sequence[Cell], repetitions: int | None = None,
             plain: int = 0) -> Schedule:
    """(cell, repetition) pairs in run order; repetitions count from 0.

    sequential: every repetition of a cell, then the next cell (fewest boots).
    interleaved: repetition 0 of every cell, then repetition 1, ... so slow drift
    of a shared host spreads over all cells instead of biasing the last ones.
    random: interleaved rounds, each round in a seeded random order
    (deterministic for a seed; a different permutation per round).

    With adaptive repetitions this is the first `min` rounds every cell gets; the
    loop adds rounds (`round_order`) for the cells still above target. Pass
    `repetitions` (e.g. `exp.max_repetitions`) for the longest possible schedule.

    `plain` > 0 (the run counts with the cache model): that many plugin-less
    repetitions per cell follow, numbered from `exp.max_repetitions` on
    (`plain_numbers`), in the same order rule (sequential: cell by cell;
    otherwise rounds, each in `round_order`). They come last, so the plugin's boots
    and the plain boots each serve a whole run of cells.
    """
    cells = list(cells)
    reps = range(exp.min_repetitions if repetitions is None else repetitions)
    if exp.order == "sequential":
        main = [(c, r) for c in cells for r in reps]
    elif exp.order == "interleaved":
        main = [(c, r) for r in reps for c in cells]
    else:
        rng = random.Random(exp.seed)
        main = [(c, r) for r in reps for c in _shuffled(cells, rng)]
    extra = plain_numbers(exp, plain)
    if exp.order == "sequential":
        return main + [(c, r) for c in cells for r in extra]
    return main + [(c, r) for r in extra for c in round_order(exp, cells, r)]


def plain_numbers(exp: Experiment, plain: int) -> range:
    """Repetition numbers of the plugin-less repetitions: after every number the
    instrumented ones may take (adaptive: after `max`), so the two never collide and a
    resumed run finds each where it was."""
    return range(exp.max_repetitions, exp.max_repetitions + plain)


def planned_plain(exp: Experiment) -> int:
    """Plain repetitions per cell a plan or estimate should count: the experiment's
    `plain_repetitions` when its counters may resolve to the cache model (auto on a TCG
    host, or cachemodel), else none. The run itself decides from the host."""
    return exp.plain_repetitions if exp.may_use_cachemodel else 0


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


def count_boots(sched: Schedule, reuse: Reuse = "cell", plain_from: int | None = None) -> int:
    """Guest-pair boots the schedule needs.

    none: every repetition boots; cell: consecutive repetitions of one cell share a
    boot; guest: consecutive cells with the same kernel/nic/cpus share a boot.
    Repetitions numbered from `plain_from` on run without the plugin: another boot.
    """
    if reuse == "none":
        return len(sched)
    key: Callable[[Cell], Hashable] = (
        (lambda c: c.cell_id) if reuse == "cell" else (lambda c: c.boot_key))
    boots = 0
    previous: Hashable = object()
    for cell, rep in sched:
        k = (key(cell), plain_from is not None and rep >= plain_from)
        if k != previous:
            boots += 1
            previous = k
    return boots


def estimate_seconds(exp: Experiment, cells: Sequence[Cell], boot_seconds: float = 25.0, *,
                     rep_overhead_seconds: float = 6.0, model_extra_seconds: float = 5.5,
                     reuse: Reuse = "guest", plain: int | None = None) -> float:
    """Rough wall time: boots (as the order allows reuse) + (warmup + duration + overhead) per rep.

    `rep_overhead_seconds` covers policy apply/read-back, the window's edges and
    copying results (measured ~6 s under TCG, 2026-11-29); a repetition under the
    cache model takes `model_extra_seconds` more (its slower guest and the plugin's
    stalls at the marks: ~15.5 s against ~10 s for quick.yaml's 1 s warm-up and 3 s
    window). Retries are not counted (an estimate, not a promise). `plain` (default:
    `planned_plain`) adds the plugin-less repetitions and their boots; when there
    are any, the others are counted as instrumented.
    `reuse` defaults to "guest": the loop keeps a booted pair across the cells of one
    kernel/NIC/vCPUs (testbed.run.bootcache).
    """
    plain = planned_plain(exp) if plain is None else plain
    # adaptive: the most it may take
    sched = schedule(exp, cells, exp.max_repetitions, plain=plain)
    per_rep = exp.warmup + exp.duration + rep_overhead_seconds
    instrumented = len(cells) * exp.max_repetitions if plain else 0
    return (count_boots(sched, reuse, exp.max_repetitions) * boot_seconds
            + len(sched) * per_rep + instrumented * model_extra_seconds)


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
    header = ("#", "kernel", "nic", "cpus", "policy", "workload", "gro", "rcvbuf", "cell id")
    rows = [(str(i + 1), c.kernel, c.nic, str(c.cpus), c.policy, c.workload.id,
             "on" if c.gro else "off", c.rcvbuf, c.cell_id) for i, c in enumerate(cells)]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    plain = planned_plain(exp)
    runs = len(cells) * (exp.max_repetitions + plain)
    lines.append("")
    if plain:
        lines.append(f"plain: {plain} repetition(s) per cell booted without the cache-model "
                     f"plugin (traced; numbered from rep-{exp.max_repetitions}), run only "
                     "when the counters resolve to the cache model (auto on a TCG host, or "
                     "cachemodel)")
    lines.append(f"{exp.name}: {len(cells)} cells x {exp.repetitions_text(plain)} = "
                 f"{'at most ' if exp.adaptive else ''}{runs} runs, "
                 f"order {exp.order}" + (f" (seed {exp.seed})" if exp.order == "random" else "")
                 + f", {exp.warmup} s warmup + {exp.duration} s measured each")
    return "\n".join(lines)
