"""The analysis pipeline of a run directory: raw files -> tidy table -> statistics ->
figures -> report.

Entry points for tasks.py:

- `analyze_run(run_dir)` writes `<run>/analysis/` tables (tidy.parquet, tidy.csv,
  summary.csv, comparison.csv, comparison.txt) and returns them in memory too;
- `write_report(run_dir, compare_to=None)` does the same, draws the figures and
  writes `<run>/analysis/report.html` (self-contained), `report.md` and `claims.txt`
  (the claims table `invoke run-matrix` prints; analysis.answer).

Both work on partial runs (failed or unfinished repetitions are listed, not
hidden), on runs merged from shards (the layout is the same) and compare two
runs on cells with equal axes.

The package reads run folders only: it imports `testbed.formats` (the parsers),
`testbed.run.folder` (the layout) and the base modules, never the code that
runs guests (an import-linter contract in pyproject.toml holds it to that), and
importing it changes no process state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.answer import build_answer_parts
from analysis.beside import Beside
from analysis.collate import (
    TablePaths,
    analysis_dir,
    by_kind,
    collate_run,
    collate_run_with_facts,
    write_tables,
)
from analysis.compare import (
    Comparison,
    compare_runs,
    compare_to_baseline,
    format_table,
    is_headline,
    run_differences,
    summarize,
)
from analysis.plots import plot_all
from analysis.report import ReportPaths, build_report
from analysis.symbols import attribution_reps, write_attribution, write_attribution_tables
from testbed.errors import NetbedError
from testbed.files import atomic_write_text
from testbed.run.folder import RunDir
from testbed.vocabulary import TABLE_AXES as AXES

__all__ = [
    "AnalysisResult",
    "ReportPaths",
    "analyze_run",
    "check_comparable",
    "collate_run",
    "compare_runs",
    "compare_to_baseline",
    "parse_baseline",
    "summarize",
    "write_report",
]

# Repetitions with cache-model attribution inputs from which write_report writes their
# tables in a process of its own (quick.yaml has 36; each takes ~0.1 s, a process ~1 s).
BESIDE_MIN_REPS = 8


@dataclass
class AnalysisResult:
    """In-memory results plus where they were written."""

    run_dir: Path
    tidy: pd.DataFrame
    summary: pd.DataFrame
    comparison: Comparison
    tables: TablePaths
    summary_csv: Path
    comparison_csv: Path
    comparison_txt: Path
    facts: dict[tuple[str, int], Any]

    @property
    def text_table(self) -> str:
        return format_table(self.comparison)

    @property
    def counts(self) -> dict[str, int]:
        """Repetitions by status (ok / failed / incomplete)."""
        reps = self.tidy[self.tidy["metric"] == "rep.status"]
        return {str(k): int(v) for k, v in reps["status"].value_counts().items()}


def analyze_run(run_dir: Path, baseline: Mapping[str, object] | None = None,
                seed: int = 0, attribution: bool = True) -> AnalysisResult:
    """Collate, summarise and compare against the baseline; write the tables (the
    cache-model attribution's too, unless `attribution` is False: write_report writes
    those in a process of its own meanwhile)."""
    run_dir = Path(run_dir)
    tidy, facts = collate_run_with_facts(run_dir)
    tables = write_tables(run_dir, tidy)
    view = by_kind(tidy)  # plain repetitions' rates, instrumented ones' cache counts
    summary = summarize(view, seed=seed)
    headline = sorted(m for m in tidy["metric"].dropna().unique() if is_headline(m))
    comparison = compare_to_baseline(view, baseline, metrics=headline)
    out = analysis_dir(run_dir)
    summary_csv, comparison_csv, comparison_txt = (out / "summary.csv", out / "comparison.csv",
                                                   out / "comparison.txt")
    atomic_write_text(summary_csv, summary.to_csv(index=False))
    atomic_write_text(comparison_csv, comparison.table.to_csv(index=False))
    atomic_write_text(comparison_txt, format_table(comparison))
    if attribution:  # analysis/symbols.py: symbols.parquet/.csv, c2c_lines.csv
        write_attribution_tables(run_dir)
    return AnalysisResult(run_dir, tidy, summary, comparison, tables, summary_csv,
                          comparison_csv, comparison_txt, facts)


def check_comparable(run_dir: Path, other: Path, force: bool = False) -> list[str]:
    """Differences in QEMU, plugin, kernel build or image between two runs: NetbedError
    unless `force`, else returned as warnings for the report."""
    diffs = run_differences(_versions(Path(other)), _versions(Path(run_dir)))
    if diffs and not force:
        raise NetbedError(f"runs {Path(other).name} and {Path(run_dir).name} differ: "
                          + "; ".join(diffs),
                          hint="their numbers are not comparable as they stand; pass "
                               "--force to compare anyway (the report says what differs)")
    return [f"warning: runs differ: {d}" for d in diffs]


def _versions(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(RunDir(run_dir).versions_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_report(run_dir: Path, compare_to: Path | None = None,
                 baseline: Mapping[str, object] | None = None, seed: int = 0,
                 force: bool = False) -> ReportPaths:
    """Analyse the run (and `compare_to` as the base run, if given) and write the report.
    Two runs that differ in QEMU, plugin, kernel build or image are refused unless
    `force` (then the comparison's notes say what differs)."""
    warnings = check_comparable(run_dir, compare_to, force) if compare_to is not None else []
    # The attribution tables need only the run folder, and the report reads them last:
    # they and the report's sections on them are made beside everything else
    # (analysis/beside.py) when there are enough of them to pay for a process.
    separate = attribution_reps(Path(run_dir)) >= BESIDE_MIN_REPS
    with Beside(write_attribution, Path(run_dir), separate=separate) as attribution:
        result = analyze_run(run_dir, baseline, seed, attribution=False)
        run_cmp = None
        if compare_to is not None:
            other = collate_run(Path(compare_to))
            headline = sorted(m for m in result.tidy["metric"].dropna().unique()
                              if is_headline(m))
            run_cmp = compare_runs(by_kind(other), by_kind(result.tidy), metrics=headline)
            run_cmp.notes[:0] = warnings
            atomic_write_text(analysis_dir(run_dir) / "comparison-runs.csv",
                              run_cmp.table.to_csv(index=False))
        figures = plot_all(by_kind(result.tidy), analysis_dir(run_dir) / "plots")
        answer = build_answer_parts(run_dir, result.tidy, analysis_dir(run_dir) / "plots")
        claims_txt = analysis_dir(run_dir) / "claims.txt"
        atomic_write_text(claims_txt, answer.claims_text)
        cachemodel = attribution.result()
    paths = build_report(run_dir, result.tidy, result.facts, result.summary, result.comparison,
                         run_cmp, figures, lead=[*answer.first, *answer.details],
                         cachemodel=cachemodel)
    return replace(paths, claims=claims_txt)


def parse_baseline(text: str | None) -> dict[str, str] | None:
    """"policy=default,kernel=stock" -> {"policy": "default", "kernel": "stock"}."""
    if not text:
        return None
    out: dict[str, str] = {}
    for part in text.split(","):
        axis, sep, value = part.partition("=")
        axis = axis.strip()
        if not sep or axis not in AXES or not value.strip():
            raise NetbedError(f"bad baseline entry {part!r}",
                              hint=f"use axis=value pairs, axes: {', '.join(AXES)}; "
                                   "e.g. policy=default,nic=e1000")
        out[axis] = value.strip()
    return out
