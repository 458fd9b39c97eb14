""""The answer": the report's first section, one screen long, and the terminal's summary.

It opens with the seed's claims (analysis.claims): for each, what was measured, the
figure with its 95% CI and n, the verdict and why, then one figure (the locality
effect per NIC against the queue depth, analysis.claimsfig) and a paragraph on how to
read them: the method (analysis.stats), where the checksum ran, and what this run did
not measure. Every policy against its NIC's own default (analysis.policy_effects)
follows underneath as details. `invoke run-matrix` prints the same claims as a short
table (`format_claims`), written to `<run>/analysis/claims.txt` too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.claims import (
    Claims,
    build_claims,
    claims_frame,
    format_claims,
    unmeasured_text,
)
from analysis.claimsfig import plot_locality
from analysis.collate import instrumented_reps, plain_reps
from analysis.policy_effects import detail_report_sections
from analysis.stats import MEANINGFUL_PP, MEANINGFUL_RATIO, METHOD_TEXT
from testbed.run.folder import RunDir

Section = tuple[str, str, object]


@dataclass(frozen=True)
class AnswerParts:
    """The report's opening sections, the details under them, and the terminal text."""

    first: list[Section]
    details: list[Section]
    claims_text: str
    figure: Path | None


def _reps_per_cell(tidy: pd.DataFrame) -> str:
    """"3 instrumented + 1 plain repetitions per cell" (ranges when cells differ)."""
    inst, plain = instrumented_reps(tidy), plain_reps(tidy)

    def per_cell(keys: set[tuple[str, str, int]]) -> str:
        counts: dict[str, int] = {}
        for _, cell, _ in keys:
            counts[cell] = counts.get(cell, 0) + 1
        if not counts:
            return "0"
        lo, hi = min(counts.values()), max(counts.values())
        return str(lo) if lo == hi else f"{lo}-{hi}"

    if not inst:
        return f"{per_cell(plain)} repetitions per cell"
    if not plain:
        return f"{per_cell(inst)} instrumented repetitions per cell"
    return f"{per_cell(inst)} instrumented + {per_cell(plain)} plain repetitions per cell"


def headline(claims: Claims, tidy: pd.DataFrame) -> str:
    """Two or three sentences: what was judged, on how much data, and the verdicts."""
    if not claims.rows:
        return ("No claim could be judged from this run; what each one needs is listed "
                "under the claims.")
    counts = pd.Series([r.verdict for r in claims.rows]).value_counts()
    verdicts = ", ".join(f"{v} {k}" for k, v in counts.items())
    cells = tidy["cell_id"].nunique()
    n = len(claims.rows)
    plain = ("rates and placement from the plain ones" if plain_reps(tidy) else
             "this run has no plain repetitions, so no rates or placement")
    return (f"{n} contrast{'s' if n != 1 else ''} of the seed's claims on {cells} cells "
            f"({_reps_per_cell(tidy)}): {verdicts}. Locality claims compare pin-cross with "
            "pin-same (the reader bound in both, so the scheduler's wake-affine choices "
            "are out of the comparison); cache figures come from the repetitions under "
            f"the cache model, {plain}.")


def reading_note(claims: Claims) -> str:
    meaningful = (f"An effect that matters is taken as {(MEANINGFUL_RATIO - 1) * 100:.0f}% "
                  f"of a per-KB count or rate and {MEANINGFUL_PP * 100:.0f} percentage points "
                  "of a share: an interval inside that rules the effect out (contradicted, "
                  "or supported for claim 1, which says placement does not matter, and "
                  "which only an interval wholly beyond it contradicts); one that includes "
                  "no change and reaches past it is not detectable.")
    return " ".join([METHOD_TEXT, meaningful, *claims.notes, *unmeasured_text(claims)])


def first_section(claims: Claims, tidy: pd.DataFrame, figure: Path | None) -> list[Section]:
    out: list[Section] = [("The answer", "text", headline(claims, tidy))]
    if claims.rows:
        out.append(("The claims", "table", claims_frame(claims)))
    if figure is not None:
        out.append(("Locality effect against queue depth (pin-cross / pin-same private "
                    "misses per KB, 95% CI)", "figure", figure))
    else:
        out.append(("Locality effect against queue depth", "text",
                    "Not measured in this run: it needs pin-same and pin-cross TCP_STREAM "
                    "cells with private-miss counts (the cache model)."))
    out.append(("How to read the claims", "text", reading_note(claims)))
    return out


def cache_source_note(versions: Mapping[str, Any]) -> str:
    """Where this run's cache numbers come from, as versions.json records it."""
    counters = versions.get("counters")
    if not isinstance(counters, Mapping):
        return ("Cache numbers: source not recorded (a run from before `counters: auto`); "
                "cache.* rows come from the cache model, perf.* rows from perf.")
    source = counters.get("cache_source", "unknown")
    said = {"cachemodel": "the cache model (TCG plugin: private L1D/L2 per vCPU, shared LLC)",
            "hardware": "hardware PMU events in the guest",
            "software": "nowhere: software events only, so no cache numbers"}
    notes = counters.get("notes") or []
    return (f"Cache numbers come from {said.get(str(source), str(source))}."
            + "".join(f" {n}." for n in notes if isinstance(n, str)))


def build_answer_parts(run_dir: Path, tidy: pd.DataFrame, plots_dir: Path) -> AnswerParts:
    """The answer for a run folder: the claims first, the details under them."""
    try:
        versions = json.loads(RunDir(Path(run_dir)).versions_file.read_text())
    except (OSError, ValueError):
        versions = {}
    claims = build_claims(tidy)
    figure = plot_locality(claims.points, plots_dir)
    details = detail_report_sections(
        tidy, plots_dir, cache_source_note(versions if isinstance(versions, dict) else {}))
    return AnswerParts(first_section(claims, tidy, figure), details, format_claims(claims),
                       figure)
