"""CV per cell and metric, drift statistics and the stopping text (synthetic tidy tables)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import repeatability as rp
from testbed.run.folder import RunDir

AXES = {"kernel": "distro", "cpus": 2, "policy": "default", "workload": "TCP_STREAM",
        "message_size": 16384, "gro": True}


def tidy(values: dict[str, list[float]], metric: str = "throughput") -> pd.DataFrame:
    rows = []
    for nic, vs in values.items():
        for r, v in enumerate(vs):
            rows.append({"run_id": "r", "cell_id": f"distro-{nic}", "repetition": r,
                         **AXES, "nic": nic, "metric": metric, "cpu": "all", "value": v,
                         "unit": "Mbit/s", "source": "netperf", "status": "ok", "note": ""})
    return pd.DataFrame(rows)


def test_cv_per_cell_and_metric_marks_cells_above_goal() -> None:
    t = tidy({"e1000": [100, 100, 100, 100, 100], "virtio": [100, 120, 80, 110, 90]})
    cvs = rp.cv_table(t).set_index("cell_id")
    assert cvs.loc["distro-e1000", "cv"] == 0 and not cvs.loc["distro-e1000", "above_goal"]
    assert cvs.loc["distro-virtio", "cv"] == pytest.approx(0.1581, abs=1e-4)
    assert cvs.loc["distro-virtio", "above_goal"]
    assert set(cvs["n"]) == {5}


def test_a_lone_repetition_has_no_cv_and_is_not_called_repeatable() -> None:
    cvs = rp.cv_table(tidy({"e1000": [100]}))
    assert math.isnan(cvs["cv"].iloc[0]) and not cvs["above_goal"].iloc[0]


def test_missing_and_failed_values_are_left_out() -> None:
    t = tidy({"e1000": [100, float("nan"), 100, 100]})
    t.loc[3, "status"] = "error"
    assert rp.cv_table(t)["n"].iloc[0] == 2


def test_model_counts_have_the_tighter_goal() -> None:
    assert rp.goal_for("cache.l1d_misses.per_kb") == 0.02  # the model's rows are cache.*
    assert rp.goal_for("cache.c2c_transfers.per_trans") == 0.02
    assert rp.goal_for("cache.l1d_misses") == 0.05  # a window's raw count tracks its rate
    assert rp.goal_for("window.throughput") == 0.05


def test_default_metric_prefers_the_window() -> None:
    t = pd.concat([tidy({"e1000": [1, 2]}), tidy({"e1000": [3, 4]}, "window.throughput")])
    assert rp.default_metric(t) == "window.throughput"
    assert rp.default_metric(tidy({"e1000": [1, 2]})) == "throughput"


def test_drift_first_vs_last() -> None:
    d = rp.drift_table(tidy({"e1000": [110, 100, 90]}), "throughput").iloc[0]
    assert (d["first"], d["last"], d["first_rep"], d["last_rep"]) == (110, 90, 0, 2)
    assert d["last_vs_first"] == pytest.approx(-0.2)


def test_drift_trend_sees_a_slowing_host_and_not_noise() -> None:
    order = pd.DataFrame({"cell_id": ["a"] * 10, "repetition": range(10),
                          "order": range(10)})
    slowing = pd.DataFrame({"cell_id": ["a"] * 10, "repetition": range(10),
                            "relative": [1.1 - 0.02 * i for i in range(10)]}).merge(order)
    trend = rp.drift_trend(slowing)
    assert trend["rho"] == pytest.approx(-1.0) and trend["p"] < 0.01
    assert trend["change_over_run"] == pytest.approx(-0.18)
    flat = slowing.assign(relative=[1.0, 1.01, 0.99, 1.0, 1.01, 0.99, 1.0, 1.01, 0.99, 1.0])
    assert abs(rp.drift_trend(flat)["rho"]) < 0.5
    assert math.isnan(rp.drift_trend(slowing.head(2))["rho"])


def make_run(tmp_path: Path, values: dict[str, list[float]]) -> Path:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    minute = 0
    for r in range(max(len(v) for v in values.values())):
        for nic, vs in values.items():
            if r < len(vs):
                rep = run.start_rep(f"distro-{nic}", r)
                (rep.path / "done").write_text(json.dumps(
                    {"finished": f"2026-11-29T10:{minute:02d}:00+00:00", "throughput": vs[r]}))
                minute += 1
    return run.path


def test_finish_order_and_series_follow_the_done_records(tmp_path: Path) -> None:
    values = {"e1000": [100, 90, 80], "virtio": [200, 200, 200]}
    run_dir = make_run(tmp_path, values)
    order = rp.finish_order(run_dir)
    assert list(zip(order["cell_id"], order["repetition"], strict=True))[:3] == [
        ("distro-e1000", 0), ("distro-virtio", 0), ("distro-e1000", 1)]
    series = rp.normalised_series(tidy(values), "throughput", order)
    assert list(series["order"]) == list(range(6))
    assert series[series["cell_id"] == "distro-virtio"]["relative"].eq(1.0).all()


def test_report_parts_without_and_with_adaptive_stopping(tmp_path: Path) -> None:
    values = {"e1000": [100, 90, 80, 95, 85], "virtio": [200, 201, 199, 200, 200]}
    run_dir = make_run(tmp_path, values)
    sections, figures = rp.report_parts(run_dir, tidy(values), tmp_path / "plots")
    titles = [t for t, _, _ in sections]
    assert "Repeatability: CV per cell" in titles and figures and figures[0].is_file()
    assert "fixed in number" in dict((t, p) for t, _, p in sections)["Repeatability: stopping"]
    (run_dir / "stopping.json").write_text(json.dumps({
        "adaptive": True, "min": 5, "max": 8, "target_cv": 0.05, "metric": None,
        "note": "optional stopping note",
        "cells": {"distro-e1000": {"repetitions": 8, "values": 8, "cv": 0.08,
                                   "reason": "max-reached", "metric": "throughput"},
                  "distro-virtio": {"repetitions": 5, "values": 5, "cv": 0.004,
                                    "reason": "within-target", "metric": "throughput"}}}))
    sections, _ = rp.report_parts(run_dir, tidy(values), tmp_path / "plots")
    text = dict((t, p) for t, _, p in sections)["Repeatability: stopping"]
    assert "Adaptive" in text and "reached max above target: distro-e1000" in text
    assert "optional stopping note" in text


def test_key_table_gets_cv_and_marks() -> None:
    t = tidy({"e1000": [100, 100, 100], "virtio": [100, 130, 70]})
    labels = rp.cv_table(t).set_index("cell_id")["cell"]
    keys = pd.DataFrame({"throughput": ["100 [..] n=3", "100 [..] n=3"]},
                        index=[labels["distro-e1000"], labels["distro-virtio"]])
    out = rp.with_cv(keys, t)
    assert out.iloc[0, 0].endswith("CV 0.0%")
    assert "CV 30.0% > 5% !" in out.iloc[1, 0]


def test_the_benchmark_splits_cvs_by_kind_of_repetition() -> None:
    # reps 0-2 under the model (slow window, counts per KB), reps 3-5 plain
    from benchmarks.repeatability import cv_by_kind

    rate = tidy({"e1000": [50, 60, 40, 400, 404, 396]}, "window.throughput")
    per_kb = tidy({"e1000": [100, 101, 99, 0, 0, 0]}, "cache.l1d_misses.per_kb")
    per_kb = per_kb[per_kb["repetition"] < 3]  # plain windows have no model counts
    kind = tidy({"e1000": [1, 1, 1, 0, 0, 0]}, "rep.instrumented")
    rows = {(r["kind"], r["metric"]): r
            for r in cv_by_kind(pd.concat([rate, per_kb, kind], ignore_index=True))}
    assert rows[("plain", "window.throughput")]["n"] == 3
    assert rows[("plain", "window.throughput")]["cv"] == pytest.approx(0.01)
    assert rows[("instrumented", "window.throughput")]["cv"] == pytest.approx(0.2)
    assert rows[("instrumented", "cache.l1d_misses.per_kb")]["cv"] == pytest.approx(0.01)
    assert rows[("instrumented", "cache.l1d_misses.per_kb")]["goal"] == 0.02
    assert ("plain", "cache.l1d_misses.per_kb") not in rows


def test_explained_spread_says_how_much_goes_with_batching_and_what_is_left() -> None:
    # e1000: instructions per KB follow context switches per KB exactly (+-0.1);
    # virtio: the same spread, unrelated to them
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    follows = [1000 + 50 * v + d for v, d in zip(x, [0.1, -0.1, 0.1, -0.1, 0.0], strict=True)]
    unrelated = [1100, 1250, 1000, 1200, 1050]
    t = pd.concat([tidy({"e1000": follows, "virtio": unrelated}, "cache.instructions.per_kb"),
                   tidy({"e1000": x, "virtio": x}, rp.BATCHING)],
                  ignore_index=True)
    out = rp.explained_spread(t, ["cache.instructions.per_kb"]).set_index("cell_id")
    e, v = out.loc["distro-e1000"], out.loc["distro-virtio"]
    assert e["n"] == 5 and e["cv"] == pytest.approx(0.0678, abs=1e-3)
    assert e["r2"] > 0.999 and e["residual_cv"] < 0.001
    assert v["r2"] < 0.5 and v["residual_cv"] > 0.7 * v["cv"]


def test_explained_spread_needs_four_repetitions_and_both_measures() -> None:
    t = pd.concat([tidy({"e1000": [10, 12, 11]}, "cache.loads.per_kb"),
                   tidy({"e1000": [1, 2, 3]}, rp.BATCHING),
                   tidy({"virtio": [10, 12, 11, 13]}, "cache.loads.per_kb")],
                  ignore_index=True)
    out = rp.explained_spread(t, ["cache.loads.per_kb"]).set_index("cell_id")
    assert math.isnan(out.loc["distro-e1000", "r2"])  # n = 3: a line fits any 3 points too well
    assert out.loc["distro-e1000", "cv"] > 0
    assert "distro-virtio" not in out.index  # no batching measure: nothing to say
    assert rp.explained_spread(t.iloc[0:0], ["cache.loads.per_kb"]).empty


def test_the_benchmark_checks_limits_per_kind_of_repetition() -> None:
    from benchmarks.repeatability import limits_by_kind

    per_kb = tidy({"e1000": [100, 110, 120, 130, 0, 0, 0, 0]}, "cache.instructions.per_kb")
    per_kb = per_kb[per_kb["repetition"] < 4]
    rate = tidy({"e1000": [50, 50, 50, 50, 400, 380, 360, 340]}, "window.throughput")
    ctx = tidy({"e1000": [1, 2, 3, 4, 1, 2, 3, 4]}, rp.BATCHING)
    kind = tidy({"e1000": [1, 1, 1, 1, 0, 0, 0, 0]}, "rep.instrumented")
    rows = {(r["kind"], r["metric"], r["by"]): r
            for r in limits_by_kind(pd.concat([per_kb, rate, ctx, kind], ignore_index=True))}
    assert rows[("instrumented", "cache.instructions.per_kb", rp.BATCHING)]["r2"] == \
        pytest.approx(1.0)
    assert rows[("plain", "window.throughput", rp.BATCHING)]["n"] == 4
    assert ("instrumented", "window.throughput", rp.BATCHING) not in rows
