"""The cache-model plugin's raw output and its guest markers (pure).

Raw file: `cachemodel.csv` (RAW; columns vcpu, mode, event, value, marker), one
block of rows per `nbmark` marker hit. The marker encoding mirrors images/tools/nbmark.c
and cachemodel/plugin/plugin.c.
"""

from __future__ import annotations

import gzip
from io import StringIO
from itertools import repeat
from pathlib import Path

import numpy as np
import pandas as pd

from testbed.errors import NetbedError

EVENTS = (
    "loads", "stores", "l1d_misses", "l2_misses", "llc_misses", "c2c_transfers",
    "invalidations_sent", "invalidations_received", "instructions", "device_writes",
)
MODES = ("kernel", "user")
RAW = "cachemodel.csv"  # a repetition's measured window (two blocks: begin, end)
CSV_COLUMNS = ("vcpu", "mode", "event", "value", "marker")

# Marker instruction: nopl disp32(%rax) = 0f 1f 80 <disp32 little endian>, with
# disp32 = MAGIC << 24 | kind << 20 | id. Mirrors nbmark.c and plugin.c. `arm` makes
# the plugin retranslate with its callbacks without counting, so a later `begin` only
# starts counting; its block in the CSV is "arm:<id>" (no reader here treats it as an
# edge: windows run from "begin:" to "end:" blocks).
MARKER_MAGIC = 0x4E
MARKER_KINDS = {"begin": 1, "end": 2, "snapshot": 3, "arm": 4}
MAX_MARKER_ID = (1 << 20) - 1


# ---------------------------------------------------------------- markers (pure)
def marker_displacement(kind: str, marker_id: int) -> int:
    """The disp32 of the marker NOP for `kind` and `marker_id`."""
    if kind not in MARKER_KINDS:
        raise NetbedError(f"unknown marker kind {kind!r}", hint=f"use one of {list(MARKER_KINDS)}")
    if not 0 <= marker_id <= MAX_MARKER_ID:
        raise NetbedError(f"marker id {marker_id} out of range",
                          hint=f"use 0..{MAX_MARKER_ID}")
    return MARKER_MAGIC << 24 | MARKER_KINDS[kind] << 20 | marker_id


def marker_bytes(kind: str, marker_id: int) -> bytes:
    """The 7 instruction bytes nbmark executes."""
    return b"\x0f\x1f\x80" + marker_displacement(kind, marker_id).to_bytes(4, "little")


def nbmark_command(kind: str, marker_id: int) -> str:
    """Guest shell command for a marker (validated here so a bad id fails on the host)."""
    marker_displacement(kind, marker_id)
    return f"nbmark {kind} {marker_id}"



# ---------------------------------------------------------------- CSV
def read_snapshots(text: str) -> pd.DataFrame:
    """The plugin's CSV with a `snapshot` column numbering the marker hits in order.

    A snapshot is one block of rows written at one marker hit; the same marker
    may be hit more than once, so blocks are told apart by position, not name.
    """
    df = pd.read_csv(StringIO(text), dtype={"vcpu": int, "mode": str, "event": str,
                                            "value": "int64", "marker": str})
    if tuple(df.columns) != CSV_COLUMNS:
        raise NetbedError(f"cache-model CSV has columns {list(df.columns)}",
                          hint=f"expected {','.join(CSV_COLUMNS)} (plugin/CSV mismatch?)")
    starts = (df["vcpu"] == df["vcpu"].iloc[0]) & (df["mode"] == df["mode"].iloc[0]) & (
        df["event"] == df["event"].iloc[0]) if len(df) else df["vcpu"] == 0
    df["snapshot"] = starts.cumsum() - 1
    return df


def window_edges(df: pd.DataFrame) -> tuple[int, int] | None:
    """The measured window's two blocks (snapshot numbers): the last `begin:<id>` block
    and the first `end:<id>` block after it; None when the CSV has no such pair.

    This is the one definition of a cache-model window: the runner cuts a
    repetition's file out of the receiver's CSV with it (testbed.run.cachemodel_window)
    and analysis counts the repetition with it (`measured_window`), so a file holds
    one window and both read the same one.
    """
    firsts = df.groupby("snapshot")["marker"].first()
    begins = [(int(s), str(m)) for s, m in firsts.items() if str(m).startswith("begin:")]
    if not begins:
        return None
    start, name = begins[-1]
    end = "end:" + name.split(":", 1)[1]
    ends = [int(s) for s, m in firsts.items() if int(s) > start and str(m) == end]
    return (start, ends[0]) if ends else None


def _delta(df: pd.DataFrame, first: int, last: int) -> pd.DataFrame:
    """Counters of block `last` minus block `first` (block `last` alone if equal):
    columns vcpu (str), mode, event, value."""
    key = ["vcpu", "mode", "event"]
    a = df[df["snapshot"] == last].set_index(key)["value"]
    if first != last:
        a = a - df[df["snapshot"] == first].set_index(key)["value"]
    out = a.rename("value").reset_index()
    out["vcpu"] = out["vcpu"].astype(str)
    return out


def measured_window(text: str, source: str = RAW) -> pd.DataFrame:
    """A repetition's cache-model counts in its measured window (`window_edges`):
    columns vcpu (str), mode, event, value.

    A file from before begin/end markers is read from its first block to its last
    (a single block: its values, counted from the plugin's start).
    """
    try:
        df = read_snapshots(text)
    except (ValueError, KeyError) as exc:
        raise NetbedError(f"{source} does not parse: {exc}",
                          hint="expected the header vcpu,mode,event,value,marker") from exc
    if df.empty:
        raise NetbedError(f"{source} has no counter rows",
                          hint="did the measured window's markers run in the guest?")
    edges = window_edges(df)
    if edges is None:
        blocks = df["snapshot"]
        edges = (int(blocks.min()), int(blocks.max()))
    return _delta(df, *edges)


def window(df: pd.DataFrame, first: str, last: str, mode: str | None = None,
           vcpu: int | None = None) -> dict[str, int]:
    """Event totals between the first hit of marker `first` and the last hit of `last`
    (for tests and benchmarks that place their own markers)."""
    snaps = df.groupby("snapshot")["marker"].first()
    a, b = snaps[snaps == first], snaps[snaps == last]
    if a.empty or b.empty:
        raise NetbedError(f"cache-model CSV lacks marker {first if a.empty else last!r}",
                          hint=f"markers present: {sorted(set(snaps))}")
    sel = _delta(df, int(a.index[0]), int(b.index[-1]))
    if mode is not None:
        sel = sel[sel["mode"] == mode]
    if vcpu is not None:
        sel = sel[sel["vcpu"] == str(vcpu)]
    tot = sel.groupby("event")["value"].sum()
    return {ev: int(tot[ev]) for ev in EVENTS if ev in tot.index}




# ---------------------------------------------------------------- attribution tables
# Written by the plugin (sites=, c2c=) when the last region of a window closes, and
# copied into the repetition folder under these names. See model.h.
SITES_FILE = "cachemodel-sites.csv"
C2C_FILE = "cachemodel-c2c.csv"
# The plugin's writer thread formats the tables after the window (the guest runs on)
# and last replaces this file with the window's number: "0" from the plugin's start,
# "<n>" once both tables of window n are in place.
TABLES_WINDOW_FILE = SITES_FILE + ".window"
# In a repetition folder they are kept gzip-compressed (a window's sites table of a
# receiver is ~10 MB of CSV, ~1.5 MB compressed); readers accept either form.
STORED_SUFFIX = ".gz"
FILES = (RAW, SITES_FILE + STORED_SUFFIX, C2C_FILE + STORED_SUFFIX, SITES_FILE, C2C_FILE)
SITE_EVENTS = tuple(e for e in EVENTS if e not in ("instructions", "invalidations_received"))
SITES_COLUMNS = ("window", "pc", "vcpu", "mode", "data", *SITE_EVENTS)
C2C_COLUMNS = ("window", "line", "vcpu", "pc", "owner_vcpu", "owner_pc", "count")
DATA_KINDS = ("cpu", "device")


def _read_table(text: str, columns: tuple[str, ...], hex_cols: tuple[str, ...],
                source: str) -> pd.DataFrame:
    text_cols: dict[str, type] = {c: str for c in ("mode", "data") if c in columns}
    # Hex columns as Python strings (object): they are converted below, and a list of
    # Python strings is what int() reads fastest.
    text_cols.update({c: object for c in hex_cols})
    ints = {c: "int64" for c in columns if c not in text_cols}
    try:
        head = pd.read_csv(StringIO(text), nrows=0)
        if tuple(head.columns) != columns:
            raise NetbedError(f"{source}: columns {list(head.columns)}",
                              hint=f"expected {','.join(columns)} (plugin/reader mismatch?)")
        df = pd.read_csv(StringIO(text), dtype={**text_cols, **ints}, keep_default_na=False)
        for col in hex_cols:  # int(v, 16) by map: element-wise .map was 7 s per run
            df[col] = np.fromiter(map(int, df[col].tolist(), repeat(16)), dtype=np.uint64,
                                  count=len(df))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError,
            OverflowError) as exc:
        raise NetbedError(f"{source}: does not parse: {exc}",
                          hint="the cache-model plugin writes it; was it cut short? "
                               "rerun the cell") from exc
    return df


def read_sites(text: str, source: str = SITES_FILE) -> pd.DataFrame:
    """Per-instruction counters of one window (columns SITES_COLUMNS, pc as uint64)."""
    df = _read_table(text, SITES_COLUMNS, ("pc",), source)
    bad = (sorted(set(df["data"].unique()) - set(DATA_KINDS))
           + sorted(set(df["mode"].unique()) - set(MODES)))
    if bad:
        raise NetbedError(f"{source}: unknown mode/data value(s) {bad}",
                          hint=f"modes {MODES}, data {DATA_KINDS}")
    return df


def stored_text(folder: Path, name: str) -> str | None:
    """A table kept in a repetition folder as `name.gz` (or plain `name`); None if absent."""
    gz = folder / (name + STORED_SUFFIX)
    if gz.is_file():
        try:
            return gzip.decompress(gz.read_bytes()).decode()
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise NetbedError(f"{gz}: not a readable gzip file: {exc}",
                              hint="rerun the cell to recreate it") from exc
    plain = folder / name
    return plain.read_text() if plain.is_file() else None


def read_c2c(text: str, source: str = C2C_FILE) -> pd.DataFrame:
    """c2c records of one window: (line, requesting vcpu/pc, owner vcpu/pc) -> count."""
    return _read_table(text, C2C_COLUMNS, ("line", "pc", "owner_pc"), source)


def parse_tables_window(text: str, source: str = TABLES_WINDOW_FILE) -> int:
    """The number of the window whose attribution tables are complete (pure)."""
    value = text.strip()
    if not value.isdigit():
        raise NetbedError(f"{source}: expected a window number, got {value[:40]!r}",
                          hint="the cache-model plugin writes it (tmp + rename)")
    return int(value)
