"""analysis.compare on seeded synthetic data with a known effect, and on the fixture run.

Synthetic values are generated here, in the open, with a stated effect size:
they test the statistics, not the testbed.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import compare as cmp
from analysis.collate import TIDY_COLUMNS, collate_run

RUN = Path(__file__).resolve().parent.parent / "fixtures" / "runs" / "20261125T100000Z-hostloop"


def test_ci_covers_the_true_effect_and_flags_it() -> None:
    """Base ~ N(100, 5), new ~ N(110, 5), 10 reps each: true change +10%."""
    rng = np.random.default_rng(1)
    trials, covered, flagged = 100, 0, 0
    for _ in range(trials):
        ch = cmp.compare_samples(rng.normal(100, 5, 10), rng.normal(110, 5, 10))
        covered += ch.pct_lo <= 10.0 <= ch.pct_hi
        flagged += ch.significant
    print(f"coverage {covered}/{trials}, power {flagged}/{trials}")
    assert covered >= 88
    assert flagged >= 80


def test_no_effect_is_rarely_flagged() -> None:
    """200 seeded null trials: false-positive rate at most ~2 x alpha."""
    rng = np.random.default_rng(2)
    trials = 200
    flagged = sum(cmp.compare_samples(rng.normal(100, 5, 8), rng.normal(100, 5, 8)).significant
                  for _ in range(trials))
    print(f"false positives {flagged}/{trials} at alpha {cmp.ALPHA}")
    assert flagged <= 2 * cmp.ALPHA * trials


def test_two_reps_with_a_clear_change_are_flagged() -> None:
    """The table uses the answer's method: 2 vs 2 can show a change (U could not: p >= 1/3)."""
    ch = cmp.compare_samples([100, 101], [200, 201])
    assert ch.pct == pytest.approx(100 * (math.sqrt(200 * 201) / math.sqrt(100 * 101) - 1))
    assert ch.p_value < 0.05 and ch.significant and ch.verdict == "higher"


def test_empty_and_zero_base() -> None:
    ch = cmp.compare_samples([], [1.0])
    assert math.isnan(ch.pct) and not ch.significant
    ch = cmp.compare_samples([0.0, 0.0], [1.0, 2.0])
    assert math.isnan(ch.ratio) and ch.scale == "linear"


def synthetic_tidy(effects: dict[tuple[str, str, str], float], reps: int = 6,
                   seed: int = 3) -> pd.DataFrame:
    """Throughput rows for cells (kernel, nic, policy) with median 100 x effect."""
    rng = np.random.default_rng(seed)
    rows = []
    for (kernel, nic, policy), effect in effects.items():
        cell_id = f"{kernel}-{nic}-{policy}"
        for r in range(1, reps + 1):
            base = {"run_id": "synth", "cell_id": cell_id, "repetition": r, "kernel": kernel,
                    "nic": nic, "cpus": 2, "policy": policy, "workload": "TCP_STREAM",
                    "message_size": 16384, "gro": "on", "cpu": "all", "source": "netperf",
                    "note": ""}
            rows.append({**base, "metric": "rep.status", "value": 1.0, "unit": "",
                         "status": "ok"})
            rows.append({**base, "metric": "netperf.throughput",
                         "value": rng.normal(100 * effect, 1), "unit": "10^6bits/s",
                         "status": "ok"})
    return pd.DataFrame(rows, columns=list(TIDY_COLUMNS))


GLOBAL = {"policy": "default", "kernel": "stock", "nic": "e1000"}  # the old default


def test_by_default_each_cell_is_compared_with_its_own_nic_and_kernels_default() -> None:
    tidy = synthetic_tidy({("stock", "e1000", "default"): 1.0,
                           ("stock", "e1000", "pin-same"): 1.2,
                           ("stock", "virtio", "default"): 2.0,
                           ("stock", "virtio", "pin-same"): 2.1,
                           ("patched", "virtio", "default"): 2.0,
                           ("patched", "virtio", "wake-local"): 1.8})
    t = cmp.compare_to_baseline(tidy).table.set_index("cell_id")
    assert t["base_cell_id"].to_dict() == {
        "stock-e1000-pin-same": "stock-e1000-default",
        "stock-virtio-pin-same": "stock-virtio-default",
        "patched-virtio-wake-local": "patched-virtio-default"}


def test_run_differences_name_qemu_plugin_kernel_build_and_image() -> None:
    a = {"qemu_version": "7.2", "cachemodel_plugin": "plugin-aa", "image": {"key": "i1"},
         "kernels": {"patched": {"release": "6.1", "patch_sha": "x"}}, "accel": "tcg"}
    assert cmp.run_differences(a, dict(a)) == []
    b = {**a, "qemu_version": "8.0", "cachemodel_plugin": "plugin-bb", "image": {"key": "i2"},
         "kernels": {"patched": {"release": "6.1", "patch_sha": "y"}}, "accel": "kvm"}
    diffs = cmp.run_differences(a, b)
    assert [d.split(":")[0] for d in diffs] == ["QEMU", "cache-model plugin",
                                                "kernel build patched", "guest image"]
    assert cmp.run_differences({}, {}) == []
    assert cmp.run_differences({}, {"qemu_version": "8.0"}) == ["QEMU: not recorded vs 8.0"]


def test_baseline_matches_cells_on_the_other_axes() -> None:
    tidy = synthetic_tidy({("stock", "e1000", "default"): 1.0,
                           ("stock", "e1000", "pin-same"): 1.2,
                           ("patched", "e1000", "default"): 0.9,
                           ("stock", "virtio", "default"): 2.0})
    comp = cmp.compare_to_baseline(tidy, GLOBAL)
    assert comp.notes == []
    t = comp.table.set_index("cell_id")
    assert set(t.index) == {"stock-e1000-pin-same", "patched-e1000-default",
                            "stock-virtio-default"}
    assert (t["base_cell_id"] == "stock-e1000-default").all()
    assert t.loc["stock-e1000-pin-same", "pct"] == pytest.approx(20, abs=3)
    assert t.loc["patched-e1000-default", "pct"] == pytest.approx(-10, abs=3)
    assert t["significant"].all()
    text = cmp.format_table(comp)
    assert "base |" in text and "%change ±" in text and "| metric" in text
    assert text.count("%*") == 3


def test_baseline_falls_back_and_says_so() -> None:
    tidy = synthetic_tidy({("distro", "virtio", "default"): 1.0,
                           ("distro", "virtio", "rfs"): 1.1,
                           ("distro", "e1000", "default"): 0.5,
                           ("distro", "e1000", "rfs"): 0.6})
    comp = cmp.compare_to_baseline(tidy, GLOBAL)
    assert any("kernel=stock is not in this run" in n for n in comp.notes)
    t = comp.table.set_index("cell_id")["base_cell_id"].to_dict()
    assert t == {"distro-virtio-default": "distro-e1000-default",
                 "distro-e1000-rfs": "distro-e1000-default",
                 "distro-virtio-rfs": "distro-e1000-default"}
    only_policy = cmp.compare_to_baseline(tidy, {"policy": "default"})
    assert only_policy.table.set_index("cell_id")["base_cell_id"].to_dict() == {
        "distro-e1000-rfs": "distro-e1000-default", "distro-virtio-rfs": "distro-virtio-default"}
    with pytest.raises(ValueError, match="not one of"):
        cmp.compare_to_baseline(tidy, {"colour": "red"})


def test_summarize_counts_failed_reps() -> None:
    tidy = synthetic_tidy({("stock", "e1000", "default"): 1.0}, reps=4)
    bad = tidy.iloc[[0]].assign(repetition=5, status="failed", value=math.nan)
    s = cmp.summarize(pd.concat([tidy, bad]), n_boot=200)
    row = s[s.metric == "netperf.throughput"].iloc[0]
    assert row["n"] == 4 and row["n_failed"] == 1
    assert row["q1"] <= row["median"] <= row["q3"]
    assert row["ci_lo"] <= row["median"] <= row["ci_hi"]


def test_compare_two_runs_on_matching_cells(tmp_path: Path) -> None:
    """Run B = the fixture with pin-same throughput scaled x1.5 in its raw files."""
    b = tmp_path / "20261126T100000Z-hostloop"
    shutil.copytree(RUN, b)
    for f in (b / "cells").glob("*pin-same*/rep-*/netperf.txt"):
        lines = []
        for line in f.read_text().splitlines():
            if line.startswith("THROUGHPUT="):
                line = f"THROUGHPUT={float(line.split('=')[1]) * 1.5:.2f}"
            lines.append(line)
        f.write_text("\n".join(lines) + "\n")
    comp = cmp.compare_runs(collate_run(RUN), collate_run(b), metrics=["netperf.throughput"])
    t = comp.table.set_index("policy")
    assert t.loc["pin-same", "pct"] == pytest.approx(50, abs=0.1)
    assert t.loc["pin-cross", "pct"] == pytest.approx(0, abs=1e-9)
    assert "base = run 20261125T100000Z-hostloop" in comp.notes[0]


def test_single_repetition_has_no_ci() -> None:
    ch = cmp.compare_samples([100.0], [120.0, 121.0])
    assert ch.pct == pytest.approx(100 * (math.sqrt(120 * 121) / 100 - 1))
    assert math.isnan(ch.pct_lo) and math.isnan(ch.pct_hi)
    assert not ch.significant
