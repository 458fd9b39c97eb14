"""The claims-first answer (analysis.claims, analysis.answer) on synthetic tidy tables
with stated effects (tests/unit/claims_data.py) at the repetitions quick.yaml uses: a
planted interaction is supported at n = 3, no effect is "not detectable" with the
reason (or ruled out when the data are tight), a run without a metric says so instead
of showing zeros, and the first section fits one screen."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.answer import first_section, headline
from analysis.claims import build_claims, claims_frame, format_claims, unmeasured_text
from analysis.claimsfig import plot_locality
from analysis.stats import CONTRADICTED, NOT_DETECTABLE, SUPPORTED
from tests.unit.claims_data import MISSES, locality_run

NO_EFFECT = {k: (39.0 if k[0] == "e1000" else 18.0) for k in MISSES}


def verdict(rows, claim: str, where: str) -> tuple[str, str]:
    r = next(r for r in rows if r.claim == claim and r.where == where)
    return r.verdict, r.why


def test_a_planted_interaction_is_supported_at_n3_in_most_seeds():
    """e1000: pin-cross 2x pin-same's misses at 64K; virtio 1.06x; 5% noise, 3 vs 3."""
    seen = [verdict(build_claims(locality_run(np.random.default_rng(s))).rows, "offload",
                    "rcvbuf 64K")[0] for s in range(60)]
    assert seen.count(SUPPORTED) / len(seen) >= 0.8
    assert CONTRADICTED not in seen


def test_the_planted_locality_effect_and_the_payload_path():
    claims = build_claims(locality_run(np.random.default_rng(1)))
    assert verdict(claims.rows, "copy", "e1000, rcvbuf 64K")[0] == SUPPORTED
    # the copy in pin-same finds the lines the checksum read: claim 1 contradicted there
    word, why = verdict(claims.rows, "dma", "e1000, rcvbuf 64K")
    assert word == CONTRADICTED and why.startswith("CI beyond")
    # virtio offloads the checksum: no CPU read the payload, placement does not matter
    assert verdict(claims.rows, "dma", "virtio, rcvbuf 64K")[0] == SUPPORTED
    dma = next(r for r in claims.rows if r.claim == "dma" and r.where.startswith("e1000"))
    assert "own/peer/LLC/mem %: same 7" in dma.mechanism and "lag p50" in dma.mechanism
    point = next(p for p in claims.points if p.nic == "e1000" and p.level == "64K")
    assert point.effect.ratio == pytest.approx(2.0, rel=0.2)
    assert point.queue_kb == pytest.approx(40, rel=0.2)


def test_no_effect_with_noisy_data_is_not_detectable_and_says_why():
    claims = build_claims(locality_run(np.random.default_rng(2), NO_EFFECT, sigma=0.2))
    word, why = verdict(claims.rows, "copy", "e1000, rcvbuf auto")
    assert word == NOT_DETECTABLE
    assert "includes 1 and reaches past ±10%" in why and "n = 3 vs 3" in why


def test_no_effect_with_tight_data_rules_the_claim_out():
    claims = build_claims(locality_run(np.random.default_rng(3), NO_EFFECT, sigma=0.01))
    word, why = verdict(claims.rows, "copy", "e1000, rcvbuf auto")
    assert word == CONTRADICTED and "no effect of 10% or more" in why and "within ±10%" in why


def test_the_false_claim_rate_without_an_effect_stays_near_5_percent():
    """Without an effect the claim is supported (interval excludes 1 upwards) rarely."""
    claims = [build_claims(locality_run(np.random.default_rng(100 + s), NO_EFFECT, sigma=0.05))
              for s in range(100)]
    wrong = sum(r.verdict == SUPPORTED for c in claims for r in c.rows if r.claim == "copy")
    assert wrong / (4 * len(claims)) <= 0.06


def test_the_wake_claim_reads_misses_rate_and_placement():
    claims = build_claims(locality_run(np.random.default_rng(4)))
    row = next(r for r in claims.rows if r.claim == "wake" and r.where == "e1000")
    assert row.verdict == SUPPORTED and row.figure.startswith("misses/trans 0.")
    assert "trans/s" in row.figure and "no CI" in row.figure  # one plain repetition
    assert "wake-ups on the waking CPU 95% vs 40%" in row.mechanism


def test_a_run_without_the_new_metrics_says_not_measured_never_zero():
    tidy = locality_run(np.random.default_rng(5), payload=False, queue=False,
                        rcvbuf_column=False)
    assert "rcvbuf" not in tidy.columns
    claims = build_claims(tidy)
    assert not any(r.claim == "dma" for r in claims.rows)
    assert any(m.startswith('"DMA\'d data') and "not measured in this run" in m
               for m in unmeasured_text(claims))
    assert {p.level for p in claims.points} == {"auto"}  # no column: one level
    assert any("Queue depth" in n and "not measured" in n for n in claims.notes)
    text = format_claims(claims)
    assert "not measured in this run" in text and "+0 pp" not in text


def test_steering_policies_say_where_the_checksum_ran():
    tidy = locality_run(np.random.default_rng(6))
    rfs = tidy[tidy["policy"] == "pin-cross"].assign(
        policy="pin-cross-rfs", cell_id=lambda d: d["cell_id"] + "-rfs")
    claims = build_claims(pd.concat([tidy, rfs]))
    note = " ".join(claims.notes)
    assert "pin-cross-rfs" in note and "before the steering" in note


def test_claims_table_and_first_section_fit_one_screen(tmp_path: Path):
    tidy = locality_run(np.random.default_rng(7))
    claims = build_claims(tidy)
    assert len(format_claims(claims).splitlines()) <= 20
    figure = plot_locality(claims.points, tmp_path)
    assert figure is not None and figure.stat().st_size > 5000
    sections = first_section(claims, tidy, figure)
    kinds = [k for _, k, _ in sections]
    assert kinds.count("table") == 1 and kinds.count("figure") == 1
    table = claims_frame(claims)
    text_lines = sum(len(textwrap.wrap(str(p), 100)) + 1 for _, k, p in sections if k == "text")
    assert text_lines + len(table) + 1 <= 40, text_lines
    assert headline(claims, tidy).startswith(f"{len(claims.rows)} contrasts")


def test_the_figure_falls_back_to_rcvbuf_levels_and_is_absent_without_pairs(tmp_path: Path):
    claims = build_claims(locality_run(np.random.default_rng(8), queue=False))
    assert plot_locality(claims.points, tmp_path) is not None
    assert plot_locality([], tmp_path) is None


def test_two_kernels_make_two_series_not_one_line(tmp_path: Path):
    tidy = locality_run(np.random.default_rng(9), wake=False)
    stock = tidy.assign(kernel="stock", cell_id=lambda d: "stock-" + d["cell_id"])
    claims = build_claims(pd.concat([tidy, stock]))
    assert {p.series for p in claims.points} == {
        "e1000, kernel patched", "e1000, kernel stock", "virtio, kernel patched",
        "virtio, kernel stock"}
    assert plot_locality(claims.points, tmp_path) is not None
