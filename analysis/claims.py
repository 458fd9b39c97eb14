"""The seed's claims, each judged from the tidy table (pure): the report's first section.

Each claim gets what was measured, the figure with its 95% CI and n (analysis.stats),
a verdict (supported / contradicted / not detectable, with the reason) and, where the
run has it, the mechanism: where the copy's reads of device-written payload lines were
served (`cache.payload_copy_from.*`, from the cache model's payload records).

The locality claims contrast pin-cross with pin-same: the reader is bound in both, so
the scheduler's wake-affine choices are out of the comparison (a policy's `default`
cell places processing differently per NIC). They are judged per NIC and per level of
the copy-lag axis `rcvbuf` (a run without the column is one level, `auto`), on bulk
receive (TCP_STREAM) cells: cache counters from the repetitions under the cache model,
rates and placement shares from the plain ones (analysis.collate.instrumented_reps).
A claim the run cannot judge says "not measured in this run" and why; no missing
figure is shown as a zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.collate import instrumented_reps
from analysis.stats import (
    CONTRADICTED,
    NOT_DETECTABLE,
    SUPPORTED,
    Difference,
    Ratio,
    diff_contrast,
    judge_diff,
    judge_null_diff,
    judge_ratio,
    log_contrast,
)
from testbed.vocabulary import TABLE_AXES

CLAIMS: dict[str, str] = {
    "dma": "DMA'd data is in no CPU's cache, so the CPU that checksums does not matter",
    "copy": "the copy should run on the CPU that runs the reader",
    "offload": "this matters more without checksum offload",
    "wake": "wake the reader on the CPU that did the work",
    "affine": "set the woken task's affinity to the CPU that processed its data",
}
SHORT: dict[str, str] = {
    "dma": "1 DMA'd data in no CPU cache",
    "copy": "2 copy on the reader's CPU",
    "offload": "3 more without csum offload",
    "wake": "4 wake where the work was",
    "affine": "5 affinity to processing CPU",
}
SAME, CROSS = "pin-same", "pin-cross"
CHECKSUM_NIC = "e1000"
OFFLOAD_NICS = ("virtio-notso", "virtio")  # the offloading NIC, most specific first
BULK = "TCP_STREAM"
RCVBUF = "rcvbuf"
AXES = (*TABLE_AXES, RCVBUF) if RCVBUF not in TABLE_AXES else TABLE_AXES
MISSES = "cache.l2_misses.per_kb"
MISSES_RR = "cache.l2_misses.per_trans"
COPY_FROM = tuple(f"cache.payload_copy_from.{k}" for k in ("own", "peer", "llc", "memory"))
QUEUE = "socket.queue_kb.p50"
LAG = "cache.payload_lag_kb.p50"  # payload KB written between a line's checksum and copy
WAKE_PLACED = "wakeups.on_waker_cpu"
PROCESSING = "locality.processing_on_reader_cpu"
MIGRATIONS = ("sched.reader_migrations.per_s", "perf.cpu-migrations.per_kb")
WAKE_POLICY, AFFINE_POLICY = "wake-local", "affine-copy"
AFFINE_CONTROLS = ("pin-irq", "default")


@dataclass(frozen=True)
class ClaimRow:
    """One judged contrast of one claim."""

    claim: str       # key of CLAIMS
    where: str       # "e1000, rcvbuf 64K"
    measured: str    # what was compared
    figure: str      # "1.93x [1.41, 2.64]" or "+54 pp [+40, +68]"
    n: str           # "3 vs 3"
    verdict: str     # supported / contradicted / not detectable
    why: str         # the verdict's reason (the interval against a meaningful effect)
    mechanism: str = ""  # e.g. where the copy's reads were served


@dataclass(frozen=True)
class LocalityPoint:
    """The figure's data: the locality effect of one NIC at one copy-lag level."""

    nic: str
    level: str
    queue_kb: float   # socket.queue_kb.p50 median over the pair's repetitions (NaN: none)
    effect: Ratio
    series: str = ""  # the line it belongs to: the NIC, plus any other axis that varies


@dataclass
class Claims:
    rows: list[ClaimRow] = field(default_factory=list)
    points: list[LocalityPoint] = field(default_factory=list)
    unmeasured: list[tuple[str, str]] = field(default_factory=list)  # (claim key, why)
    notes: list[str] = field(default_factory=list)


def level_order(level: str) -> tuple[int, float]:
    """Shallow to deep: sizes ascending (64K < 256K < 1M), then `auto` (autotuning lets
    the queue grow to tcp_rmem's maximum, MiBs), then anything else."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KkMmGg]?)", str(level))
    if not m:
        return (1 if level == "auto" else 2, 0.0)
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    return (0, float(m.group(1)) * scale)


@dataclass
class Values:
    """The run's ok, all-CPU values, indexed by (metric, axis values in AXES order): the
    cells are few and the lookups many (a pandas filter each took ~3 ms)."""

    cells: pd.DataFrame   # one row per cell: its axes as strings
    index: dict[tuple[str, tuple[str, ...]], list[tuple[float, bool]]]
    has_plugin: bool

    def get(self, metric: str, where: dict[str, str]) -> list[tuple[float, bool]]:
        return self.index.get((metric, tuple(where[a] for a in AXES)), [])


def values_table(tidy: pd.DataFrame) -> Values:
    """ok, all-CPU values with the axes as strings, an `rcvbuf` axis (auto when the run
    has none) and whether each repetition ran under the cache model."""
    ok = tidy[(tidy["status"] == "ok") & (tidy["cpu"] == "all") & tidy["value"].notna()]
    ok = ok.copy()
    if RCVBUF not in ok.columns:
        ok[RCVBUF] = "auto"
    ok[RCVBUF] = ok[RCVBUF].astype("string").fillna("auto")
    for a in AXES:
        ok[a] = ok[a].astype(str)
    inst = instrumented_reps(tidy)
    keys = zip(ok["run_id"].astype(str), ok["cell_id"].astype(str),
               ok["repetition"].astype("Int64").fillna(-1).astype(int), strict=True)
    under = [k in inst for k in keys]
    index: dict[tuple[str, tuple[str, ...]], list[tuple[float, bool]]] = {}
    axes = [ok[a].tolist() for a in AXES]
    for i, (metric, value) in enumerate(zip(ok["metric"].astype(str), ok["value"],
                                            strict=True)):
        key = (metric, tuple(col[i] for col in axes))
        index.setdefault(key, []).append((float(value), under[i]))
    cells = ok.drop_duplicates("cell_id")[["cell_id", *AXES]]
    return Values(cells, index, bool(inst))


def samples(vals: Values, metric: str, where: dict[str, str]) -> list[float]:
    """Per-repetition values of `metric` in the cell with the axes `where`: cache.* from
    the instrumented repetitions (every one in a run without the plugin), everything
    else from the plain ones."""
    found = vals.get(metric, where)
    if vals.has_plugin:
        cache = metric.startswith("cache.")
        return [v for v, under in found if under == cache]
    return [v for v, _ in found]


def _geo(values: Sequence[float]) -> float:
    a = np.asarray([v for v in values if v > 0], dtype=float)
    return float(np.exp(np.log(a).mean())) if len(a) else math.nan


def _n(r: Ratio | Difference) -> str:
    return " vs ".join(map(str, r.n)) if len(r.n) == 2 else "/".join(map(str, r.n))


def _pp(d: Difference) -> str:
    return d.pp()


def _where(group: dict[str, str], varying: set[str], level: bool = True) -> str:
    """"e1000, rcvbuf 64K": the NIC, the copy-lag level (always for the locality claims,
    else when it varies) and any other axis that varies between the claim's rows."""
    parts = [group["nic"]] if "nic" in group else []
    if level or RCVBUF in varying:
        parts.append(f"rcvbuf {group[RCVBUF]}")
    parts += [f"{a} {group[a]}" for a in ("kernel", "workload", "cpus", "message_size", "gro")
              if a in varying and a in group]
    return ", ".join(parts)


def _pairs(vals: Values, new: str, base: str,
           workloads: tuple[str, ...] | None = (BULK,)) -> list[dict[str, str]]:
    """The groups (every axis but the policy) that have both a `new` and a `base` cell."""
    cells = vals.cells
    if workloads is not None:
        cells = cells[cells["workload"].str.upper().isin(workloads)]
    rest = [a for a in AXES if a != "policy"]
    have: dict[tuple[str, ...], set[str]] = {}
    for row in cells.itertuples(index=False):
        rec = row._asdict()
        have.setdefault(tuple(str(rec[a]) for a in rest), set()).add(str(rec["policy"]))
    out = [dict(zip(rest, k, strict=True)) for k, pols in have.items() if {new, base} <= pols]
    return sorted(out, key=lambda g: (g["kernel"], g["workload"], g["nic"],
                                      level_order(g[RCVBUF])))


def _varying(groups: list[dict[str, str]]) -> set[str]:
    return {a for a in ("kernel", "workload", "cpus", "message_size", "gro", RCVBUF)
            if len({g.get(a) for g in groups}) > 1}


def _queue(vals: Values, group: dict[str, str]) -> float:
    """socket.queue_kb.p50 over the pair's repetitions: the instrumented ones (the same
    windows as the misses) when they have it, else the plain ones."""
    found = [*vals.get(QUEUE, {**group, "policy": SAME}),
             *vals.get(QUEUE, {**group, "policy": CROSS})]
    if not found:
        return math.nan
    inst = [v for v, under in found if under]
    return float(np.median(inst or [v for v, _ in found]))


def _locality(vals: Values, out: Claims) -> None:
    """Claims 1-3 on every pin-same / pin-cross pair of bulk cells."""
    groups = _pairs(vals, CROSS, SAME)
    if not groups:
        why = ("needs pin-same and pin-cross cells of TCP_STREAM with the same other axes")
        out.unmeasured += [(k, why) for k in ("dma", "copy", "offload")]
        return
    varying = _varying(groups)
    effects: dict[tuple[str, ...], tuple[Ratio, list[list[float]]]] = {}
    copy_rows: list[ClaimRow] = []
    dma_rows: list[ClaimRow] = []
    for g in groups:
        same = samples(vals, MISSES, {**g, "policy": SAME})
        cross = samples(vals, MISSES, {**g, "policy": CROSS})
        where = _where(g, varying)
        if same and cross:
            r = log_contrast([cross, same], [1, -1])
            verdict, why = judge_ratio(r, expected_up=True)
            copy_rows.append(ClaimRow(
                "copy", where, "private (L2) misses per KB, pin-cross / pin-same",
                r.times(), _n(r), verdict, why,
                f"same {_geo(same):.1f}, cross {_geo(cross):.1f} misses/KB"))
            series = _where(g, varying - {RCVBUF}, level=False)
            out.points.append(LocalityPoint(g["nic"], g[RCVBUF], _queue(vals, g), r, series))
            key = (*(g[a] for a in AXES if a not in ("policy", "nic")), g["nic"])
            effects[key] = (r, [cross, same])
        dma = _dma_row(vals, g, where)
        if dma is not None:
            dma_rows.append(dma)
    if not copy_rows:
        out.unmeasured.append(("copy", f"no {MISSES}: no cache model in this run"))
    if not dma_rows:
        out.unmeasured.append(("dma", "no cache.payload_copy_from.*, the model's payload "
                                          "records"))
    out.rows += dma_rows + copy_rows
    inter = _interactions(effects, groups, varying)
    if not inter:
        need = (f"needs the pair on {CHECKSUM_NIC} and on {' or '.join(OFFLOAD_NICS)}"
                if copy_rows else f"no {MISSES}: no cache model in this run")
        out.unmeasured.append(("offload", need))
    out.rows += inter


def _dma_row(vals: Values, g: dict[str, str], where: str) -> ClaimRow | None:
    same = {m: samples(vals, m, {**g, "policy": SAME}) for m in COPY_FROM}
    cross = {m: samples(vals, m, {**g, "policy": CROSS}) for m in COPY_FROM}
    own = COPY_FROM[0]
    if not same[own] or not cross[own]:
        return None
    d = diff_contrast(same[own], cross[own])
    verdict, why = judge_null_diff(d)

    def shares(s: dict[str, list[float]]) -> str:
        return "/".join(f"{np.mean(v) * 100:.0f}" if v else "?" for v in s.values())

    checksum = "checksum by the NIC" if g["nic"] != CHECKSUM_NIC else \
        "checksum on the softirq CPU"
    lag_same = samples(vals, LAG, {**g, "policy": SAME})
    lag_cross = samples(vals, LAG, {**g, "policy": CROSS})
    lag = (f"; lag p50 {np.median(lag_same):.0f} / {np.median(lag_cross):.0f} KB"
           if lag_same and lag_cross else "")
    return ClaimRow("dma", where, "copy reads served from the copying CPU's own cache, "
                    "pin-same - pin-cross", _pp(d), _n(d), verdict, why,
                    f"own/peer/LLC/mem %: same {shares(same)}, cross {shares(cross)} "
                    f"({checksum}){lag}")


def _interactions(effects: dict[tuple[str, ...], tuple[Ratio, list[list[float]]]],
                  groups: list[dict[str, str]], varying: set[str]) -> list[ClaimRow]:
    rows = []
    for key, (e_eff, e_vals) in effects.items():
        if key[-1] != CHECKSUM_NIC:
            continue
        for other in OFFLOAD_NICS:
            found = effects.get((*key[:-1], other))
            if found is None:
                continue
            o_eff, o_vals = found
            r = log_contrast([*e_vals, *o_vals], [1, -1, -1, 1])
            if math.isnan(e_eff.ratio) or e_eff.ratio == 1:
                verdict, why = NOT_DETECTABLE, "no e1000 effect to compare"
            else:
                verdict, why = judge_ratio(r, expected_up=e_eff.ratio > 1)
            g = dict(zip([a for a in AXES if a not in ("policy", "nic")], key[:-1],
                         strict=True))
            rows.append(ClaimRow(
                "offload", _where(g, varying),
                f"locality effect on misses/KB, e1000 / {other}", r.times(), _n(r), verdict,
                why, f"e1000 {e_eff.times()}, {other} {o_eff.times()}"))
            break
    return rows


def _combine(parts: list[tuple[str, str]]) -> tuple[str, str]:
    """One verdict from several outcome verdicts: agreement wins, disagreement or none
    is not detectable."""
    words = {v for v, _ in parts}
    why = "; ".join(w for _, w in parts)
    if SUPPORTED in words and CONTRADICTED not in words:
        return SUPPORTED, why
    if CONTRADICTED in words and SUPPORTED not in words and NOT_DETECTABLE not in words:
        return CONTRADICTED, why
    if SUPPORTED in words and CONTRADICTED in words:
        return NOT_DETECTABLE, "the outcomes disagree: " + why
    return NOT_DETECTABLE, why


def _wake(vals: Values, out: Claims) -> None:
    """Claim 4: wake-local against default (same kernel, NIC and other axes)."""
    groups = _pairs(vals, WAKE_POLICY, "default", workloads=None)
    if not groups:
        out.unmeasured.append(("wake", "needs wake-local and default cells"))
        return
    varying = _varying(groups)
    for g in groups:
        rr = g["workload"].upper().endswith("_RR")
        miss, rate = (MISSES_RR, "window.transaction_rate") if rr else \
            (MISSES, "window.throughput")
        figures: list[tuple[str, str]] = []
        parts: list[tuple[str, str]] = []
        for metric, label, up in ((miss, "misses/" + ("trans" if rr else "KB"), False),
                                  (rate, "trans/s" if rr else "throughput", True)):
            new = samples(vals, metric, {**g, "policy": WAKE_POLICY})
            base = samples(vals, metric, {**g, "policy": "default"})
            if new and base:
                r = log_contrast([new, base], [1, -1])
                figures.append((f"{label} {r.times()}", _n(r)))
                verdict, why = judge_ratio(r, expected_up=up)
                parts.append((verdict, f"{label}: {why}"))
        if not figures:
            continue
        placed_new = samples(vals, WAKE_PLACED, {**g, "policy": WAKE_POLICY})
        placed_base = samples(vals, WAKE_PLACED, {**g, "policy": "default"})
        mech = "wake-ups on the waking CPU: not measured in this run"
        if placed_new and placed_base:
            d = diff_contrast(placed_new, placed_base)
            mech = (f"wake-ups on the waking CPU {d.new_mean * 100:.0f}% vs "
                    f"{d.base_mean * 100:.0f}% (n = {_n(d)})")
        word, why = _combine(parts)
        out.rows.append(ClaimRow("wake", _where(g, varying, level=False),
                                 f"wake-local / default, {g['workload']}",
                                 "; ".join(f for f, _ in figures),
                                 "; ".join(n for _, n in figures), word, why, mech))


def _affine(vals: Values, out: Claims) -> None:
    """Claim 5 (only when the run has affine-copy cells): against its control."""
    for control in AFFINE_CONTROLS:
        groups = _pairs(vals, AFFINE_POLICY, control, workloads=None)
        if groups:
            break
    else:
        return
    varying = _varying(groups)
    for g in groups:
        new = samples(vals, MISSES, {**g, "policy": AFFINE_POLICY})
        base = samples(vals, MISSES, {**g, "policy": control})
        pn = samples(vals, PROCESSING, {**g, "policy": AFFINE_POLICY})
        pb = samples(vals, PROCESSING, {**g, "policy": control})
        mech = []
        if pn and pb:
            d = diff_contrast(pn, pb)
            mech.append(f"processing on the reader's CPU {d.new_mean * 100:.0f}% vs "
                        f"{d.base_mean * 100:.0f}% (n = {_n(d)})")
        for metric in MIGRATIONS:
            mn = samples(vals, metric, {**g, "policy": AFFINE_POLICY})
            mb = samples(vals, metric, {**g, "policy": control})
            if mn and mb:
                mech.append(f"{metric} {np.mean(mn):.3g} vs {np.mean(mb):.3g}")
                break
        if new and base:
            r = log_contrast([new, base], [1, -1])
            verdict, why = judge_ratio(r, expected_up=False)
            fig, n, measured = r.times(), _n(r), f"private misses/KB, {AFFINE_POLICY} / {control}"
        elif pn and pb:
            d = diff_contrast(pn, pb)
            verdict, why = judge_diff(d, expected_up=True)
            fig, n, measured = d.pp(), _n(d), f"processing on reader CPU, - {control}"
        else:
            continue
        out.rows.append(ClaimRow("affine", _where(g, varying, level=False), measured, fig, n,
                                 verdict,
                                 why, "; ".join(mech)))


STEERING = re.compile(r"rfs|rps", re.IGNORECASE)


def checksum_note(vals: Values) -> str:
    """Where the checksum ran, for the run's NICs and the policies that steer."""
    nics = set(vals.cells["nic"])
    steer = sorted(p for p in set(vals.cells["policy"]) if STEERING.search(p))
    parts = []
    if CHECKSUM_NIC in nics:
        parts.append(f"{CHECKSUM_NIC} has no receive checksum offload: the kernel "
                     "verifies each payload line in GRO, in the softirq on the CPU that "
                     "took the interrupt (NAPI)")
        if steer:
            parts.append(f"so in {', '.join(steer)} (RPS/RFS move protocol processing "
                         "toward the reader) the checksum had already run on the interrupt "
                         "CPU, before the steering")
    offl = sorted(n for n in nics if n.startswith("virtio"))
    if offl:
        parts.append(f"on {', '.join(offl)} the device verifies the checksum (offload): no "
                     "CPU reads the payload before the copy")
    return ("Checksum: " + "; ".join(parts) + ".") if parts else ""


def build_claims(tidy: pd.DataFrame) -> Claims:
    """Every claim the run can judge, and a "not measured" line for each it cannot."""
    out = Claims()
    if tidy.empty:
        out.unmeasured += [(k, "no finished repetitions") for k in CLAIMS if k != "affine"]
        return out
    vals = values_table(tidy)
    _locality(vals, out)
    _wake(vals, out)
    _affine(vals, out)
    order = list(CLAIMS)
    out.rows.sort(key=lambda r: order.index(r.claim))
    out.unmeasured.sort(key=lambda u: order.index(u[0]))
    note = checksum_note(vals)
    if note:
        out.notes.append(note)
    if out.points and all(math.isnan(p.queue_kb) for p in out.points):
        out.notes.append(f"Queue depth ({QUEUE}) not measured in this run: the figure's "
                         "x axis is the rcvbuf level.")
    return out


def unmeasured_text(claims: Claims) -> list[str]:
    """The claims this run could not judge, one sentence each (never a zero figure)."""
    return [f"\"{CLAIMS[k]}\": not measured in this run ({why})."
            for k, why in claims.unmeasured]


def claims_frame(claims: Claims) -> pd.DataFrame:
    """The claims table as the report shows it: the full claim once per group."""
    rows, seen, last_measured = [], set(), ""
    for r in claims.rows:
        rows.append({"claim": "" if r.claim in seen else CLAIMS[r.claim],
                     "where": r.where,
                     "measured": "" if r.measured == last_measured else r.measured,
                     "figure, 95% CI": r.figure, "n": r.n, "verdict": r.verdict,
                     "why": r.why, "mechanism": r.mechanism})
        seen.add(r.claim)
        last_measured = r.measured
    return pd.DataFrame(rows, columns=["claim", "where", "measured", "figure, 95% CI", "n",
                                       "verdict", "why", "mechanism"])


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_claims(claims: Claims, width: int = 118) -> str:
    """The claims as a terminal table (at most ~20 lines): one line per contrast, then
    what the run did not measure."""
    if not claims.rows:
        lines = ["Claims: none could be judged from this run."]
        lines += [_cut(f"{SHORT[k]:<29} not measured in this run: {why}", width)
                  for k, why in claims.unmeasured]
        return "\n".join(lines) + "\n"
    head = f"{'claim':<29} {'where':<22} {'figure [95% CI]':<34} {'n':<9} verdict"
    lines = [head, "-" * min(width, len(head) + 14)]
    seen: set[str] = set()
    for r in claims.rows:
        label = "" if r.claim in seen else SHORT[r.claim]
        seen.add(r.claim)
        figures, ns = r.figure.split("; "), r.n.split("; ")
        for i, fig in enumerate(figures):
            n = ns[i] if i < len(ns) else ""
            if i == 0:
                lines.append(f"{label:<29} {_cut(r.where, 22):<22} {_cut(fig, 34):<34} "
                             f"{_cut(n, 9):<9} {r.verdict}")
            else:
                lines.append(f"{'':<29} {'':<22} {_cut(fig, 34):<34} {_cut(n, 9)}")
    lines += [_cut(f"{SHORT[k]:<29} not measured in this run: {why}", width)
              for k, why in claims.unmeasured]
    return "\n".join(lines) + "\n"
