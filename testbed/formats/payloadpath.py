"""Each payload line's path through the caches, from the cache model (pure, but `read_rows`).

The plugin keeps a record per device-written line that survives the line's eviction
(cachemodel/plugin/payload.c): its first CPU read after the device write, its checksum
read (`csum_partial`: in GRO on the NAPI CPU for e1000) and its copy to user space
(`copy_user_*`, `_copy_to_iter`, ...), where the copy's read was served and how many
KB of device writes the model noticed between the checksum read and the copy (the
lag). Passes are told apart by the instruction's address, from ranges the host writes
(PASSES_FILE) out of the receiver's /proc/kallsyms.

Raw file: `cachemodel-payload.csv` in a repetition (the measured window's statistics,
as the plugin wrote them at the window's end): `window,kind,name,detail,count` with
kinds `first_read`, `copy_from` (name: where served, detail: the copying CPU against the
checksum's), `lag_kb` (name: lag start, detail: whole KB) and `records`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import pandas as pd

from testbed.errors import NetbedError
from testbed.formats.symbols import SymbolTable

RAW = "cachemodel-payload.csv"
PASSES_FILE = "cachemodel-passes.txt"  # beside the plugin's files (host -> plugin), not a raw file
FILES = (RAW,)
COLUMNS = ("window", "kind", "name", "detail", "count")
SERVED = ("own", "peer_clean", "peer_modified", "llc", "memory")
RELATIONS = ("same_cpu", "other_cpu", "no_checksum")
LAG_FROM = ("checksum", "first_read")
PASSES = ("other", "checksum", "copy")
COUNTERS = ("noticed", "unfinished", "closed_by_store", "untracked", "lag_unknown",
            "pass_ranges")
KINDS = ("first_read", "copy_from", "lag_kb", "records")
LAG_CAP_KB = (1 << 16) - 1  # the plugin's last bucket: this many KB or more

# Guest kernel functions of each pass (names as /proc/kallsyms gives them, module
# functions without their "[module]"). The checksum: csum_partial (GRO's and
# tcp_checksum_complete's pass over the payload). The copy to user space: the copy
# routines under _copy_to_iter / copy_to_user, and the combined copy-and-checksum.
PASS_PATTERNS: dict[str, tuple[str, ...]] = {
    "checksum": (r"csum_partial", r"do_csum", r"csum_partial_ext"),
    "copy": (r"copy_user_\w+", r"rep_movs_alternative", r"_copy_to_iter", r"_copy_to_user",
             r"__copy_user_\w+", r"copyout", r"csum_and_copy_to_\w+",
             r"csum_partial_copy_\w+", r"raw_copy_to_user"),
}
PASSES_HEADER = "# netbed payload passes: start end pass (hex, end exclusive)"


# ---------------------------------------------------------------- passes (host -> plugin)
def pass_of(name: str) -> str | None:
    """The pass a kernel function belongs to, or None (pure)."""
    bare = name.split(" [", 1)[0]
    for pass_, patterns in PASS_PATTERNS.items():
        if any(re.fullmatch(p, bare) for p in patterns):
            return pass_
    return None


def pass_ranges(table: SymbolTable) -> list[tuple[int, int, str]]:
    """(start, end, pass) of every function of `table` that belongs to a pass (pure)."""
    out = []
    for start, end, name in zip(table.starts, table.ends, table.names, strict=True):
        got = pass_of(str(name))
        if got is not None:
            out.append((int(start), int(end), got))
    return out


def format_passes(ranges: Iterable[tuple[int, int, str]]) -> str:
    """The plugin's `passes=` file (payload_read_passes in cachemodel/plugin/payload.c)."""
    return PASSES_HEADER + "\n" + "".join(f"{s:x} {e:x} {p}\n" for s, e, p in ranges)


# ---------------------------------------------------------------- the raw file
@dataclass
class PayloadPath:
    """One window's statistics as the plugin counted them."""

    window: int
    first_read: dict[str, int] = field(default_factory=dict)
    copy_from: dict[tuple[str, str], int] = field(default_factory=dict)  # (served, relation)
    lag_kb: dict[str, dict[int, int]] = field(default_factory=dict)  # from -> KB -> lines
    records: dict[str, int] = field(default_factory=dict)


def parse(text: str, source: str = RAW) -> PayloadPath:
    """The plugin's CSV -> PayloadPath; a clear error naming the file and line otherwise."""
    try:
        df = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise NetbedError(f"{source}: does not parse: {exc}",
                          hint="the cache-model plugin writes it at the window's end; "
                               "rerun the cell") from exc
    if tuple(df.columns) != COLUMNS:
        raise NetbedError(f"{source}: columns {list(df.columns)}",
                          hint=f"expected {','.join(COLUMNS)} (plugin/reader mismatch?)")
    windows = set(df["window"])
    if len(windows) != 1:
        raise NetbedError(f"{source}: holds windows {sorted(windows)}",
                          hint="one file per window: the plugin replaces it at each end")
    out = PayloadPath(int(windows.pop()))
    for n, (kind, name, detail, count) in enumerate(
            zip(df["kind"], df["name"], df["detail"], df["count"], strict=True), 2):
        known = {"first_read": PASSES, "copy_from": SERVED, "lag_kb": LAG_FROM,
                 "records": COUNTERS}.get(kind)
        if known is None or name not in known or not count.isdigit():
            raise NetbedError(f"{source}:{n}: unknown row {kind},{name},{detail},{count}",
                              hint=f"kinds {KINDS}; is the plugin newer than this reader?")
        c = int(count)
        if kind == "first_read":
            out.first_read[name] = c
        elif kind == "records":
            out.records[name] = c
        elif kind == "copy_from":
            if detail not in RELATIONS:
                raise NetbedError(f"{source}:{n}: unknown relation {detail!r}",
                                  hint=f"one of {RELATIONS}")
            out.copy_from[(name, detail)] = c
        else:
            if not detail.isdigit():
                raise NetbedError(f"{source}:{n}: lag bucket {detail!r} is not whole KB")
            out.lag_kb.setdefault(name, {})[int(detail)] = c
    return out


# ---------------------------------------------------------------- tidy rows (pure)
@dataclass(frozen=True)
class Row:
    metric: str
    value: float
    unit: str
    status: str = "ok"
    note: str = ""


def quantile(hist: dict[int, int], q: float) -> float:
    """The q-quantile of a histogram {value: count} (the smallest value whose cumulative
    count reaches q of the total)."""
    total = sum(hist.values())
    need, seen = q * total, 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= need:
            return float(value)
    return math.nan


def tidy_rows(pp: PayloadPath) -> list[Row]:
    """The repetition's tidy metrics (names the analysis uses):
    cache.payload_copy_from.{own,peer,llc,memory} (shares of copy reads of device-written
    lines, summing to 1), cache.payload_lag_kb.{p50,p95}, cache.payload_checksum_cpu_is_copy_cpu
    (share of copied lines with a checksum read whose checksum ran on the copying CPU),
    and the counts they rest on."""
    rows: list[Row] = []
    if not pp.records.get("pass_ranges"):
        why = ("the plugin knew no checksum/copy functions (no passes file: "
               f"{PASSES_FILE} from the receiver's kallsyms)")
        return [Row(f"cache.payload_copy_from.{k}", math.nan, "fraction", "not-supported", why)
                for k in ("own", "peer", "llc", "memory")] + [
            Row(m, math.nan, u, "not-supported", why) for m, u in (
                ("cache.payload_lag_kb.p50", "KB"), ("cache.payload_lag_kb.p95", "KB"),
                ("cache.payload_checksum_cpu_is_copy_cpu", "fraction"))]
    served: dict[str, int] = {}
    for (where, _), n in pp.copy_from.items():
        key = "peer" if where.startswith("peer") else where
        served[key] = served.get(key, 0) + n
    copies = sum(served.values())
    rows.append(Row("cache.payload_copy_reads", float(copies), "count", note=(
        "copy reads of device-written lines (first copy read per line and write)")))
    rows.append(Row("cache.payload_lines_noticed", float(pp.records.get("noticed", 0)),
                    "count", note="device-written lines with a record"))
    for key in ("own", "peer", "llc", "memory"):
        if copies:
            note = (f"of {copies} copy reads" + (
                f"; {served_detail(pp)}" if key == "peer" else ""))
            rows.append(Row(f"cache.payload_copy_from.{key}", served.get(key, 0) / copies,
                            "fraction", note=note))
        else:
            rows.append(Row(f"cache.payload_copy_from.{key}", math.nan, "fraction",
                            "not-supported", "no copy read of a device-written line"))
    rows += lag_rows(pp)
    by_rel = {rel: sum(n for (_, r), n in pp.copy_from.items() if r == rel) for rel in RELATIONS}
    checked = by_rel["same_cpu"] + by_rel["other_cpu"]
    if checked:
        rows.append(Row("cache.payload_checksum_cpu_is_copy_cpu", by_rel["same_cpu"] / checked,
                        "fraction", note=f"of {checked} copied lines with a checksum read"))
    else:
        rows.append(Row("cache.payload_checksum_cpu_is_copy_cpu", math.nan, "fraction",
                        "not-supported", "no copied line had a checksum read (offloading "
                        f"NIC?); {by_rel['no_checksum']} without one"))
    return rows


def served_detail(pp: PayloadPath) -> str:
    clean = sum(n for (w, _), n in pp.copy_from.items() if w == "peer_clean")
    mod = sum(n for (w, _), n in pp.copy_from.items() if w == "peer_modified")
    return f"peer clean {clean}, modified {mod}"


def lag_rows(pp: PayloadPath) -> list[Row]:
    """p50/p95 of the lag from the checksum read; where no copied line had one (an
    offloading NIC), from the line's first read by another pass (its device write's
    nearest observed point: the model notices device writes at the first read)."""
    unknown = pp.records.get("lag_unknown", 0)
    for start in LAG_FROM:
        hist = pp.lag_kb.get(start, {})
        n = sum(hist.values())
        if start == "first_read" and n < unknown:
            # e.g. virtio: a few header lines against the payload, whose first read is
            # the copy itself; their lag would stand for lines it does not describe
            why = (f"only {n} copied lines had an earlier read after their device write, "
                   f"{unknown} had none (the model notices a device write at the first CPU "
                   "read, here the copy)")
            return [Row(f"cache.payload_lag_kb.p{q}", math.nan, "KB", "not-supported", why)
                    for q in (50, 95)]
        if n:
            capped = hist.get(LAG_CAP_KB, 0)
            note = (f"from the {'checksum read' if start == 'checksum' else 'first read'}, "
                    f"n={n} lines; {unknown} copied lines had no earlier read"
                    + (f"; {capped} at the {LAG_CAP_KB} KB cap" if capped else ""))
            return [Row(f"cache.payload_lag_kb.p{q}", quantile(hist, q / 100), "KB", note=note)
                    for q in (50, 95)]
    why = (f"no copied line had an earlier read after its device write ({unknown} copied "
           "lines: the model notices a device write at the first CPU read, here the copy)")
    return [Row(f"cache.payload_lag_kb.p{q}", math.nan, "KB", "not-supported", why)
            for q in (50, 95)]


def read_rows(folder: Path) -> list[Row]:
    """Tidy rows of the repetition in `folder` ([] without the raw file; an `error` row
    when it does not parse)."""
    path = folder / RAW
    if not path.is_file():
        return []
    try:
        return tidy_rows(parse(path.read_text(), str(path)))
    except NetbedError as exc:
        return [Row("cache.payload_copy_from", math.nan, "", "error",
                    str(exc).splitlines()[0][:300])]
