"""Where the cache model's misses are: per guest symbol, device vs CPU data, c2c lines.

Inputs per repetition (written by the runner when the cache model counts, see
testbed/run/cachemodel_window.py): `cachemodel-sites.csv.gz` (counters per guest
instruction address, vCPU, mode and data kind), `cachemodel-c2c.csv` (cache-to-cache
transfers per line, requesting and owning instruction and vCPU; .gz too) and
`cachemodel-symbols.json` naming the symbol tables in `<run>/symbols/`.

Outputs in `<run>/analysis/`: `symbols.parquet` + `symbols.csv` (tidy: run, cell and
axis columns, repetition, vcpu, mode, symbol, data, event, value) and
`c2c_lines.csv` (the top C2C_TOP lines by c2c transfers per repetition, one row per
line, side, symbol and vCPU, like perf c2c's Shared Data Cache Line Table).
User addresses resolve only for our static guest tools; other user code is
labelled by address range (testbed.formats.symbols), because the plugin cannot
tell which process ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from analysis.collate import analysis_dir, cell_axes, cell_label
from analysis.csvtext import csv_text
from testbed.errors import NetbedError
from testbed.files import atomic_write_text
from testbed.formats import cachemodel as cmfmt
from testbed.formats import record
from testbed.formats import symbols as symfmt
from testbed.run.folder import RepDir, RunDir
from testbed.vocabulary import TABLE_AXES as AXES

C2C_TOP = 20
REPORT_TOP = 10
ID_COLUMNS = ("run_id", "cell_id", *AXES, "repetition")
SYMBOL_COLUMNS = (*ID_COLUMNS, "vcpu", "mode", "symbol", "data", "event", "value")
C2C_COLUMNS = (*ID_COLUMNS, "rank", "line", "line_c2c", "side", "symbol", "vcpu", "count")
# What the report ranks by: accesses, misses of the private hierarchy (L2, or L1D
# when the model has no L2) and cache-to-cache transfers.
REPORT_EVENTS = (("loads", "loads"), ("l2_misses", "private misses"),
                 ("c2c_transfers", "c2c"))
REPORT_POLICIES = ("pin-same", "pin-cross")
USER_NOTE = ("User addresses: QEMU's plugin API does not say which process ran, so "
             "only our static guest tools resolve to functions; other user code is "
             "labelled by address range ([user:...]).")


# ---------------------------------------------------------------- pure
def symbol_rows(sites: pd.DataFrame, kernel: symfmt.SymbolTable | None,
                user: symfmt.SymbolTable | None) -> pd.DataFrame:
    """Per-instruction counters -> (vcpu, mode, symbol, data, event, value), summed."""
    if sites.empty:
        return pd.DataFrame(columns=["vcpu", "mode", "symbol", "data", "event", "value"])
    names, codes = _symbol_codes(sites["pc"].to_numpy(), kernel, user)
    # Sum the instructions of each symbol (by its code) before going long: the long
    # table then has a row per symbol rather than per instruction; the sums are the same.
    events = list(cmfmt.SITE_EVENTS)
    wide = sites.assign(code=codes).groupby(["vcpu", "mode", "code", "data"], as_index=False,
                                             sort=False)[events].sum()
    wide["symbol"] = names[wide["code"].to_numpy()].tolist()
    keys = ["vcpu", "mode", "symbol", "data"]
    long = wide.melt(id_vars=keys, value_vars=events, var_name="event", value_name="value")
    out = long.groupby([*keys, "event"], as_index=False)["value"].sum()
    out = out[out["value"] != 0]
    return out.sort_values(["event", "value"], ascending=[True, False]).reset_index(drop=True)


def c2c_line_rows(c2c: pd.DataFrame, kernel: symfmt.SymbolTable | None,
                  user: symfmt.SymbolTable | None, top: int = C2C_TOP) -> pd.DataFrame:
    """The `top` lines by c2c transfers, one row per (line, side, symbol, vcpu).

    side=requester: the instruction whose private miss found the line Modified in
    another cache (perf c2c's HITM load/store); side=owner: the store that had made
    the owner's copy dirty ("[unknown]" when the model did not see it)."""
    cols = ["rank", "line", "line_c2c", "side", "symbol", "vcpu", "count"]
    if c2c.empty:
        return pd.DataFrame(columns=cols)
    totals = c2c.groupby("line")["count"].sum().sort_values(ascending=False, kind="stable")
    chosen = totals.head(top)
    sel = c2c[c2c["line"].isin(chosen.index)]
    req = sel.assign(side="requester", symbol=_attribute(sel["pc"].to_numpy(), kernel, user))
    own = sel.assign(side="owner", vcpu=sel["owner_vcpu"],
                     symbol=[s if pc else "[unknown]" for s, pc in zip(
                         _attribute(sel["owner_pc"].to_numpy(), kernel, user),
                         sel["owner_pc"].tolist(), strict=True)])
    both = pd.concat([req, own])
    rows = both.groupby(["line", "side", "symbol", "vcpu"], as_index=False)["count"].sum()
    rank = {line: i + 1 for i, line in enumerate(chosen.index)}
    rows["rank"] = rows["line"].map(rank)
    rows["line_c2c"] = rows["line"].map(chosen)
    rows["line"] = rows["line"].map(lambda a: f"{int(a):#x}")
    rows = rows.sort_values(["rank", "side", "count"], ascending=[True, False, False])
    return rows[cols].reset_index(drop=True)


def _attribute(pcs: npt.NDArray[np.uint64], kernel: symfmt.SymbolTable | None,
               user: symfmt.SymbolTable | None) -> list[str]:
    """symfmt.attribute of each pc."""
    names, codes = _symbol_codes(pcs, kernel, user)
    return names[codes].tolist()  # type: ignore[no-any-return]


def _symbol_codes(pcs: npt.NDArray[np.uint64], kernel: symfmt.SymbolTable | None,
                  user: symfmt.SymbolTable | None,
                  ) -> tuple[npt.NDArray[np.object_], npt.NDArray[np.intp]]:
    """(names, codes): pc i's symbol is names[codes[i]]. Each distinct pc is looked up
    once (a sites table lists a pc per vCPU, mode and data kind)."""
    where, distinct = pd.factorize(pcs)
    codes, names = pd.factorize(np.array(symfmt.attribute(distinct, kernel, user),
                                         dtype=object))
    return names, codes[where]


# ---------------------------------------------------------------- effects: reading a run
@dataclass
class _Tables:
    """Symbol tables read so far, by file (a run shares one per kernel boot)."""

    run: Path
    cache: dict[str, symfmt.SymbolTable]

    def get(self, rel: str | None, source: str) -> symfmt.SymbolTable | None:
        if not rel:
            return None
        if rel not in self.cache:
            path = self.run / rel
            if not path.is_file():
                raise NetbedError(f"{source}: names {rel}, which is missing",
                                  hint=f"the runner writes it into {self.run}/"
                                       f"{symfmt.SYMBOLS_DIR}/")
            text = symfmt.decompress_table(path.read_bytes(), str(path))
            self.cache[rel] = symfmt.parse_table(text, str(path))
        return self.cache[rel]


def _rep_attribution(rep: RepDir, tables: _Tables
                     ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    if not rep.is_complete:
        return None
    sites_text = cmfmt.stored_text(rep.path, cmfmt.SITES_FILE)
    if sites_text is None:
        return None
    ref_path = rep.file(symfmt.SYMBOLS_REF)
    ref: dict[str, Any] = json.loads(ref_path.read_text()) if ref_path.is_file() else {}
    kernel = tables.get(ref.get("kernel"), str(ref_path))
    user = tables.get(ref.get("user"), str(ref_path))
    sites = cmfmt.read_sites(sites_text, str(rep.file(cmfmt.SITES_FILE)))
    c2c_text = cmfmt.stored_text(rep.path, cmfmt.C2C_FILE)
    c2c = (cmfmt.read_c2c(c2c_text, str(rep.file(cmfmt.C2C_FILE))) if c2c_text is not None
           else pd.DataFrame(columns=list(cmfmt.C2C_COLUMNS)))
    return symbol_rows(sites, kernel, user), c2c_line_rows(c2c, kernel, user)


def attribution_reps(run_dir: Path) -> int:
    """Repetitions of the run that have a sites table (finished or not)."""
    names = (cmfmt.SITES_FILE, cmfmt.SITES_FILE + cmfmt.STORED_SUFFIX)
    return sum(any(rep.file(n).is_file() for n in names) for rep in RunDir(run_dir).reps())


def _with_ids(df: pd.DataFrame, ids: dict[str, Any]) -> pd.DataFrame:
    return df.assign(**ids)


def collate_attribution(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(symbols, c2c_lines) of every finished repetition that has attribution."""
    run = RunDir(Path(run_dir))
    tables = _Tables(run.path, {})
    sym_parts: list[pd.DataFrame] = []
    c2c_parts: list[pd.DataFrame] = []
    for rep in run.reps():
        got = _rep_attribution(rep, tables)
        if got is None:
            continue
        cell = json.loads(rep.file(record.CELL).read_text()) if rep.file(
            record.CELL).is_file() else {}
        ids = {"run_id": run.run_id, "cell_id": rep.cell_id, **cell_axes(cell),
               "repetition": rep.repetition}
        sym_parts.append(_with_ids(got[0], ids))
        c2c_parts.append(_with_ids(got[1], ids))
    symbols = (pd.concat(sym_parts, ignore_index=True) if sym_parts
               else pd.DataFrame(columns=list(SYMBOL_COLUMNS)))
    c2c = (pd.concat(c2c_parts, ignore_index=True) if c2c_parts
           else pd.DataFrame(columns=list(C2C_COLUMNS)))
    return _typed(symbols[list(SYMBOL_COLUMNS)]), c2c[list(C2C_COLUMNS)]


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for col in ("run_id", "cell_id", "kernel", "nic", "policy", "workload", "gro", "mode",
                "symbol", "data", "event"):
        df[col] = df[col].astype("string")
    for col in ("repetition", "cpus", "message_size", "vcpu"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("int64")
    return df


@dataclass(frozen=True)
class AttributionPaths:
    parquet: Path
    csv: Path
    c2c_csv: Path


def write_attribution_tables(run_dir: Path) -> AttributionPaths | None:
    """Write symbols.parquet, symbols.csv and c2c_lines.csv; None if the run has no
    attribution (nothing is written then)."""
    symbols, c2c = collate_attribution(run_dir)
    if symbols.empty and c2c.empty:
        return None
    out = analysis_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq = out / "symbols.parquet"
    tmp = out / ".symbols.parquet.tmp"
    symbols.to_parquet(tmp, index=False)
    tmp.replace(pq)
    csv, c2c_csv = out / "symbols.csv", out / "c2c_lines.csv"
    atomic_write_text(csv, csv_text(symbols))
    atomic_write_text(c2c_csv, csv_text(c2c))
    return AttributionPaths(pq, csv, c2c_csv)


def write_attribution(run_dir: Path) -> list[tuple[str, str, Any]]:
    """write_attribution_tables, then the report's sections read back from them (what
    write_report asks of the process beside it: analysis/beside.py)."""
    write_attribution_tables(run_dir)
    return report_sections(run_dir)


# ---------------------------------------------------------------- report
def top_symbols_table(symbols: pd.DataFrame, top: int = REPORT_TOP) -> pd.DataFrame:
    """One cell group's table: per policy and event, the top symbols with their mean
    count per repetition (summed over vCPUs, modes and data kinds) and the share of
    it on device-written lines."""
    present = {str(p) for p in symbols["policy"].dropna().unique()}
    policies = [p for p in REPORT_POLICIES if p in present]
    policies += sorted(present - set(policies))
    columns: dict[str, list[str]] = {}
    for event, label in REPORT_EVENTS:
        for policy in policies:
            sel = symbols[(symbols["policy"] == policy) & (symbols["event"] == event)]
            nrep = sel[["cell_id", "repetition"]].drop_duplicates().shape[0]
            if not nrep:
                continue
            per = sel.groupby("symbol")["value"].sum() / nrep
            dev = sel[sel["data"] == "device"].groupby("symbol")["value"].sum() / nrep
            best = per.sort_values(ascending=False, kind="stable").head(top)
            columns[f"{policy}: {label} (n={nrep})"] = [
                f"{sym} {val:,.0f}" + (f" ({dev.get(sym, 0) / val:.0%} dev)"
                                       if dev.get(sym, 0) else "")
                for sym, val in best.items()]
    if not columns:
        return pd.DataFrame()
    depth = max(len(v) for v in columns.values())
    return pd.DataFrame({k: v + [""] * (depth - len(v)) for k, v in columns.items()},
                        index=pd.RangeIndex(1, depth + 1, name="rank"))


def c2c_summary(c2c: pd.DataFrame, top: int = REPORT_TOP) -> pd.DataFrame:
    """Top lines of each cell's first repetition, one row per line, both sides in one
    cell each (every repetition's top C2C_TOP are in c2c_lines.csv)."""
    if c2c.empty:
        return pd.DataFrame()
    first_rep = c2c.groupby("cell_id")["repetition"].transform("min")
    c2c = c2c[c2c["repetition"] == first_rep]
    rows = []
    keys = ["cell_id", "repetition", "rank", "line", "line_c2c"]
    for (_cell, rep, rank, line, n), g in c2c[c2c["rank"] <= top].groupby(keys, sort=True):
        sides = {side: "; ".join(f"{r.symbol}@cpu{r.vcpu} {r.count}"
                                 for r in gs.itertuples()) for side, gs in g.groupby("side")}
        first = g.iloc[0]
        rows.append({"cell": cell_label(first), "rep": rep, "rank": rank, "line": line,
                     "c2c": n, "requester (HITM)": sides.get("requester", ""),
                     "owner (dirtied it)": sides.get("owner", "")})
    return pd.DataFrame(rows)


def report_sections(run_dir: Path) -> list[tuple[str, str, Any]]:
    """(title, kind, payload) sections of the report, read from analysis/ (empty if
    the run has no attribution tables)."""
    out = analysis_dir(run_dir)
    if not (out / "symbols.parquet").is_file():
        return []
    # only the events the tables rank: the others' rows are not read
    symbols = pd.read_parquet(out / "symbols.parquet",
                              filters=[("event", "in", [e for e, _ in REPORT_EVENTS])])
    c2c = pd.read_csv(out / "c2c_lines.csv") if (out / "c2c_lines.csv").is_file() else (
        pd.DataFrame())
    sections: list[tuple[str, str, Any]] = [(
        "Cache model: where the accesses and misses are", "text",
        "Mean count per repetition of the measured window, by guest symbol of the "
        "instruction (summed over vCPUs and modes); 'dev' is the share on lines last "
        "written by the device (DMA). " + USER_NOTE)]
    group_axes = [a for a in AXES if a != "policy"]
    for _, g in symbols.groupby(group_axes, dropna=False, sort=True):
        table = top_symbols_table(g)
        if not table.empty:
            label = cell_label(g.iloc[0], axes=group_axes)
            sections.append((f"Top symbols: {label}", "table-index", table))
    summary = c2c_summary(c2c, top=5)
    if not summary.empty:
        sections.append(("Cache model: top cache lines by c2c transfers (top 5 of each "
                         "cell's first repetition; every repetition's top 20 in "
                         "c2c_lines.csv)", "table", summary))
    return sections
