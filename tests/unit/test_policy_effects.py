"""analysis.policy_effects (the answer's details) on synthetic tidy tables at the
repetitions quick.yaml uses (n = 3 per cell): what it compares and its wording. The
method's error rates are in test_stats.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.collate import TIDY_COLUMNS
from analysis.policy_effects import (
    Answer,
    build_answer,
    detail_sections,
    plot_answer,
)

N = 3  # repetitions per cell in configs/quick.yaml
SIGMA = 0.05  # log-normal spread between repetitions (5%)


def draw(rng: np.random.Generator, median: float, n: int = N, sigma: float = SIGMA) -> list[float]:
    return list(median * np.exp(rng.normal(0, sigma, n)))


def tidy_run(rng: np.random.Generator, effects: dict[tuple[str, str], float],
             plugin: bool = True, kernel: str = "patched",
             workload: str = "TCP_STREAM") -> pd.DataFrame:
    """A synthetic tidy table: c2c per KB (per transaction for RR) and throughput."""
    rows = []
    per = ".per_trans" if workload == "TCP_RR" else ".per_kb"
    for (nic, policy), effect in effects.items():
        cell_id = f"{kernel}-{nic}-2cpu-{policy}-{workload}-gro_on"
        for rep in range(1, N + 1):
            ids = {"run_id": "r", "cell_id": cell_id, "repetition": rep, "kernel": kernel,
                   "nic": nic, "cpus": 2, "policy": policy, "workload": workload,
                   "message_size": 16384, "gro": True, "cpu": "all", "status": "ok",
                   "note": ""}
            rows.append({**ids, "metric": "cache.c2c_transfers" + per, "unit": "1/KB",
                         "source": "derived", "value": draw(rng, 2.0 * effect, 1)[0]})
            if plugin:
                rows.append({**ids, "metric": "cache.c2c_transfers", "unit": "count",
                             "source": "cachemodel", "value": 1e6})
            rows.append({**ids, "metric": "throughput", "unit": "10^6bits/s",
                         "source": "netperf", "value": draw(rng, 300.0, 1)[0]})
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))


EFFECTS = {("e1000", "default"): 1.0, ("e1000", "pin-same"): 0.6, ("e1000", "wake-local"): 1.0,
           ("virtio-notso", "default"): 1.0, ("virtio-notso", "pin-same"): 0.95,
           ("virtio-notso", "wake-local"): 1.0}


def test_the_answer_confirms_a_planted_interaction_and_states_no_throughput_effect():
    ans = build_answer(tidy_run(np.random.default_rng(5), EFFECTS))
    pin = ans.interactions[(ans.interactions["policy"] == "pin-same")
                           & (ans.interactions["metric"] == "c2c transfers per KB")]
    assert list(pin["verdict"]) == ["supported"]
    assert list(pin["contrast"]) == ["e1000 / virtio-notso"]
    # every repetition had the plugin: rates are not taken from them
    assert "throughput" not in set(ans.effects["metric"])
    assert any("No throughput" in n for n in ans.notes)
    text = "\n".join(ans.sentences)
    assert "pin-same has lower c2c transfers per KB than default" in text
    assert "n = 3 vs 3" in text


def test_wording_never_claims_an_effect_whose_ci_includes_no_change():
    ans = build_answer(tidy_run(np.random.default_rng(6), EFFECTS, plugin=False))
    for s, (_, r) in zip(ans.sentences, ans.effects.iterrows(), strict=False):
        if r["ci_lo"] <= 1 <= r["ci_hi"]:
            assert "no change detected" in s
        else:
            assert "no change detected" not in s
    assert "throughput" in set(ans.effects["metric"])  # plugin-free: rates are used


def test_patched_default_is_compared_with_stock_default():
    rng = np.random.default_rng(7)
    both = pd.concat([tidy_run(rng, EFFECTS), tidy_run(rng, {("e1000", "default"): 1.0},
                                                       kernel="stock")])
    ans = build_answer(both)
    assert list(ans.patch["contrast"]) == ["patched-default / stock-default"]
    assert any(s.startswith("The patch switched off") for s in ans.sentences)


def test_sections_and_figure(tmp_path):
    ans = build_answer(tidy_run(np.random.default_rng(8), EFFECTS))
    ans.figure = plot_answer(ans, tmp_path)
    assert ans.figure is not None and ans.figure.stat().st_size > 1000
    titles = [t for t, _, _ in detail_sections(ans)]
    assert titles[0] == "Details: policies against their NIC's default"
    assert "Details: policies against default, figure" in titles
    assert plot_answer(Answer(pd.DataFrame(), pd.DataFrame(), pd.DataFrame()), tmp_path) is None


def test_rr_cells_are_answered_per_transaction_beside_bulk_cells_per_kb():
    rng = np.random.default_rng(9)
    ans = build_answer(pd.concat([tidy_run(rng, EFFECTS),
                                  tidy_run(rng, EFFECTS, workload="TCP_RR")]))
    by = ans.effects.groupby("workload")["metric"].agg(set).to_dict()
    assert by == {"TCP_STREAM": {"c2c transfers per KB"},
                  "TCP_RR": {"c2c transfers per transaction"}}


def mixed_run(rng: np.random.Generator, plain: int, locality: dict[str, float]) -> pd.DataFrame:
    """Instrumented repetitions 0..N-1 (cache model: c2c planted 0.6x for pin-same, their
    throughput a tenth of the truth and unequal) and `plain` repetitions after them (no
    plugin: true throughput, equal for both policies, and a locality share)."""
    rows = []
    for policy, c2c, slow in (("default", 1.0, 30.0), ("pin-same", 0.6, 10.0)):
        cell_id = f"patched-e1000-2cpu-{policy}-TCP_STREAM-gro_on"
        for rep in range(N + plain):
            under = rep < N
            ids = {"run_id": "r", "cell_id": cell_id, "repetition": rep, "kernel": "patched",
                   "nic": "e1000", "cpus": 2, "policy": policy, "workload": "TCP_STREAM",
                   "message_size": 16384, "gro": True, "cpu": "all", "status": "ok",
                   "note": ""}
            rows.append({**ids, "metric": "rep.status", "unit": "", "source": "runner",
                         "value": 1.0})
            rows.append({**ids, "metric": "rep.instrumented", "unit": "", "source": "runner",
                         "value": float(under)})
            rows.append({**ids, "metric": "window.throughput", "unit": "10^6bits/s",
                         "source": "window",
                         "value": draw(rng, slow if under else 300.0, 1)[0]})
            if under:
                rows.append({**ids, "metric": "cache.c2c_transfers.per_kb", "unit": "1/KB",
                             "source": "derived", "value": draw(rng, 2.0 * c2c, 1)[0]})
            else:
                rows.append({**ids, "metric": "locality.processing_on_reader_cpu",
                             "unit": "fraction", "source": "trace",
                             "value": locality[policy]
                             + (rng.normal(0, 0.01) if plain > 1 else 0.0)})
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))


def test_rates_and_locality_come_from_plain_reps_and_cache_from_instrumented_ones():
    ans = build_answer(mixed_run(np.random.default_rng(10), 1,
                                 {"default": 0.0, "pin-same": 1.0}))
    e = ans.effects.set_index("metric")
    tp, c2c = e.loc["throughput"], e.loc["c2c transfers per KB"]
    # the plain throughput is equal for both policies; the instrumented 10 vs 30 is ignored
    assert (tp["n_policy"], tp["n_default"], tp["repetitions"]) == (1, 1, "plain")
    assert tp["ratio"] == pytest.approx(1.0, rel=0.2) and math.isnan(tp["ci_lo"])
    assert (c2c["n_policy"], c2c["n_default"], c2c["repetitions"]) == (N, N, "instrumented")
    assert c2c["ratio"] == pytest.approx(0.6, rel=0.15) and c2c["detected"]
    loc = ans.locality.iloc[0]
    assert (loc["policy"], loc["n_policy"], loc["diff"]) == ("pin-same", 1, pytest.approx(1.0,
                                                                                          abs=0.05))
    text = "\n".join(ans.sentences)
    # n = 1: a point estimate, said to have no interval, never worded as an effect
    tp_line = next(s for s in ans.sentences if "throughput" in s)
    assert "no interval" in tp_line and "n = 1 vs 1 plain repetitions (no plugin)" in tp_line
    assert "higher throughput" not in tp_line and "lower throughput" not in tp_line
    loc_line = next(s for s in ans.sentences if "processing on the reader's CPU" in s)
    assert "100% vs 0% for default" in loc_line and "no interval" in loc_line
    assert "n = 3 vs 3 instrumented repetitions (cache model)" in text
    assert any("from the 2 plain repetitions" in n for n in ans.notes)
    titles = [t for t, _, _ in detail_sections(ans)]
    assert "Details: where the receive path ran (policy vs its NIC's default)" in titles


def test_two_plain_reps_give_intervals_for_rates_and_locality():
    ans = build_answer(mixed_run(np.random.default_rng(11), 2,
                                 {"default": 0.2, "pin-same": 0.9}))
    tp = ans.effects.set_index("metric").loc["throughput"]
    assert (tp["n_policy"], tp["n_default"]) == (2, 2) and not math.isnan(tp["ci_lo"])
    loc = ans.locality.iloc[0]
    assert loc["detected"] and loc["ci_lo"] > 0.5
    line = next(s for s in ans.sentences if "processing on the reader's CPU" in s)
    assert ": a change (n = 2 vs 2 plain" in line and "pp [" in line


def test_a_run_all_under_the_plugin_has_no_rates_and_says_why_no_locality():
    tidy = mixed_run(np.random.default_rng(12), 0, {})
    ans = build_answer(tidy)
    assert "throughput" not in set(ans.effects["metric"]) and ans.locality.empty
    assert any("No throughput" in n for n in ans.notes)
    assert any("not traced" in n for n in ans.notes)


def test_the_comparison_table_and_the_answer_give_the_same_interval():
    """One method (analysis.stats): the same two cells get the same ratio and 95% CI in
    comparison.csv and in the answer."""
    from analysis.compare import compare_to_baseline

    tidy = tidy_run(np.random.default_rng(13), EFFECTS, plugin=False)
    ans = build_answer(tidy).effects
    table = compare_to_baseline(tidy).table
    rows = ans[ans["source"] == "cache.c2c_transfers.per_kb"]
    assert len(rows) == 4  # pin-same and wake-local on both NICs
    for _, e in rows.iterrows():
        row = table[(table["metric"] == e["source"]) & (table["nic"] == e["nic"])
                    & (table["policy"] == e["policy"])].iloc[0]
        assert row["ratio"] == pytest.approx(e["ratio"])
        assert 1 + row["pct_lo"] / 100 == pytest.approx(e["ci_lo"])
        assert 1 + row["pct_hi"] / 100 == pytest.approx(e["ci_hi"])
        assert row["significant"] == e["detected"]
