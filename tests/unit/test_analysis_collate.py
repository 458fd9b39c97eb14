"""analysis.collate on the host-captured fixture run (see tests/fixtures/runs/README.md)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import collate as c
from testbed.formats import cachemodel as cmfmt

FIX = Path(__file__).resolve().parent.parent / "fixtures"
RUN = FIX / "runs" / "20261125T100000Z-hostloop"
PIN_SAME = "host-loopback-2cpu-pin-same-tcp_stream-16384-gro"
PIN_CROSS = "host-loopback-2cpu-pin-cross-tcp_stream-16384-gro"
DEFAULT = "host-loopback-2cpu-default-tcp_stream-16384-gro"


@pytest.fixture(scope="module")
def tidy() -> pd.DataFrame:
    return c.collate_run(RUN)


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "20261125T100000Z-hostloop"
    shutil.copytree(RUN, dest)
    return dest


def val(df: pd.DataFrame, cell: str, rep: int, metric: str, cpu: str = "all") -> float:
    row = df[(df.cell_id == cell) & (df.repetition == rep) & (df.metric == metric) &
             (df.cpu == cpu)]
    assert len(row) == 1, (cell, rep, metric, cpu, len(row))
    return float(row["value"].iloc[0])


def test_columns_axes_and_ids(tidy: pd.DataFrame) -> None:
    assert list(tidy.columns) == list(c.TIDY_COLUMNS)
    assert set(tidy["run_id"]) == {RUN.name}
    one = tidy[tidy.cell_id == PIN_SAME].iloc[0]
    assert (one["kernel"], one["nic"], one["cpus"], one["policy"]) == ("host", "loopback", 2,
                                                                        "pin-same")
    assert (one["workload"], one["message_size"], one["gro"]) == ("TCP_STREAM", 16384, "on")
    assert set(tidy["source"]) >= {"netperf", "perf", "proc", "derived", "runner"}
    assert set(tidy["status"]) <= {"ok", "not-supported", "failed", "incomplete", "error"}


def test_failed_and_incomplete_reps_are_rows_not_zeros(tidy: pd.DataFrame) -> None:
    failed = tidy[(tidy.cell_id == PIN_CROSS) & (tidy.repetition == 3)]
    assert list(failed["metric"]) == ["rep.status"]
    assert failed["status"].item() == "failed"
    assert "SSH" in failed["note"].item()
    assert math.isnan(failed["value"].item())
    inc = tidy[(tidy.cell_id == DEFAULT) & (tidy.repetition == 3)]
    assert inc["status"].tolist() == ["incomplete"]
    ok = tidy[(tidy.metric == "rep.status") & (tidy.status == "ok")]
    assert len(ok) == 6


def test_not_supported_counters_stay_nan(tidy: pd.DataFrame) -> None:
    cyc = tidy[tidy.metric.isin(["perf.cycles", "perf.cycles.per_kb"])]
    assert len(cyc) == 6 * 4  # 6 reps x (CPU0, CPU1, all, per_kb)
    assert cyc["value"].isna().all()
    assert (cyc["status"] == "not-supported").all()
    ok = tidy[tidy.status == "ok"]
    assert ok["value"].notna().all()


def row(df: pd.DataFrame, cell: str, rep: int, metric: str, cpu: str = "all") -> pd.Series:
    rows = df[(df.cell_id == cell) & (df.repetition == rep) & (df.metric == metric) &
              (df.cpu == cpu)]
    assert len(rows) == 1, (cell, rep, metric, cpu, len(rows))
    return rows.iloc[0]


def test_netperf_results_keep_their_own_names(tidy: pd.DataFrame) -> None:
    thr = val(tidy, PIN_SAME, 1, "netperf.throughput")
    text = (RUN / "cells" / PIN_SAME / "rep-1" / "netperf.txt").read_text()
    assert f"THROUGHPUT={thr:.2f}" in text
    kb = val(tidy, PIN_SAME, 1, "netperf.kbytes")
    assert kb == pytest.approx(thr * 1e6 / 8 * val(tidy, PIN_SAME, 1, "netperf.elapsed") / 1024)
    assert not tidy.metric.isin(["throughput", "kbytes", "elapsed"]).any()
    cs = val(tidy, PIN_SAME, 1, "perf.context-switches")
    assert cs == val(tidy, PIN_SAME, 1, "perf.context-switches", "0") + val(
        tidy, PIN_SAME, 1, "perf.context-switches", "1")


def test_old_runs_have_no_window_units_and_no_per_kb_from_netperf(tidy: pd.DataFrame) -> None:
    """A run made before window units: per-KB figures are not available, never netperf-based."""
    for metric in ("window.kbytes", "window.seconds", "perf.context-switches.per_kb",
                   "locality.processing_on_reader_cpu", "wakeups.on_waker_cpu"):
        r = row(tidy, PIN_SAME, 1, metric)
        assert r["status"] == "not-supported" and math.isnan(r["value"]), metric
        assert r["note"], metric


def test_per_cpu_shares_follow_the_pinning(tidy: pd.DataFrame) -> None:
    """Loopback runs NET_RX on the sender's CPU 0: the pinned reader shares it or not."""
    assert not tidy.metric.isin(["locality.netrx_on_reader_cpu",
                                 "locality.reader_on_netrx_cpus"]).any()
    for rep in (1, 2):
        assert val(tidy, PIN_SAME, rep, "share.reader", "0") == 1.0
        assert val(tidy, PIN_SAME, rep, "share.reader", "1") == 0.0  # never seen there
        assert val(tidy, PIN_CROSS, rep, "share.reader", "1") == 1.0
        shares = tidy[(tidy.cell_id == PIN_CROSS) & (tidy.repetition == rep) &
                      (tidy.metric == "share.netrx")]["value"]
        assert shares.sum() == pytest.approx(1.0)


def test_readback_without_irqs_gives_not_supported_nic_irq(tidy: pd.DataFrame) -> None:
    nic = tidy[tidy.metric == "irq.nic"]
    assert (nic["status"] == "not-supported").all()
    assert nic["note"].str.contains("readback").all()


def test_write_tables_round_trip(run_copy: Path) -> None:
    paths = c.write_tables(run_copy)
    back = c.read_tidy(paths.parquet)
    fresh = c.collate_run(run_copy)
    pd.testing.assert_frame_equal(back, fresh)
    csv = pd.read_csv(paths.csv, dtype={"cpu": str})
    assert len(csv) == len(fresh)


def test_broken_raw_file_gives_error_rows_not_a_crash(run_copy: Path) -> None:
    rep = run_copy / "cells" / PIN_SAME / "rep-2"
    (rep / "netperf.txt").write_text("netperf: cannot connect\n")
    (rep / "proc-after" / "softirqs").unlink()
    df = c.collate_run(run_copy)
    mine = df[(df.cell_id == PIN_SAME) & (df.repetition == 2)]
    err = mine[mine.status == "error"]
    assert set(err["metric"]) == {"netperf.throughput", "proc.softirqs"}
    assert err["note"].str.len().gt(0).all()
    assert (mine["metric"] == "perf.context-switches").any()  # the rest still counts


def test_cell_json_missing_falls_back_to_cells_json(run_copy: Path) -> None:
    (run_copy / "cells" / PIN_SAME / "rep-1" / "cell.json").unlink()
    df = c.collate_run(run_copy)
    assert set(df[df.cell_id == PIN_SAME]["policy"]) == {"pin-same"}


def test_missing_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    from testbed.errors import NetbedError

    with pytest.raises(NetbedError, match="does not exist"):
        c.collate_run(tmp_path / "nope")


def test_merged_shards_collate_like_one_run(tmp_path: Path) -> None:
    """Shards each hold some cells; merged, the folders sit side by side."""
    merged = tmp_path / "merged"
    shutil.copytree(RUN, merged, ignore=shutil.ignore_patterns("*pin-cross*"))
    shutil.copytree(RUN / "cells" / PIN_CROSS, merged / "cells" / PIN_CROSS)
    a = c.collate_run(merged).drop(columns="run_id")
    b = c.collate_run(RUN).drop(columns="run_id")
    pd.testing.assert_frame_equal(a, b)


def test_cachemodel_window_and_rows(run_copy: Path) -> None:
    """Shape of the cache-model plugin's CSV (printf "%d,%s,%s,%llu,%s"; values are a
    format sample, not a measurement): counts are end:1 minus begin:1."""
    sample = (FIX / "raw" / "cachemodel" / "cachemodel.csv").read_text()
    w = cmfmt.measured_window(sample)
    assert len(w) == 2 * 2 * 9
    loads = w[(w.event == "loads")]["value"]
    assert (loads == 4000).all()
    shutil.copy(FIX / "raw" / "cachemodel" / "cachemodel.csv",
                run_copy / "cells" / PIN_SAME / "rep-1" / "cachemodel.csv")
    df = c.collate_run(run_copy)
    assert val(df, PIN_SAME, 1, "cache.l1d_misses", "1") == 2 * 4000 * 3
    assert val(df, PIN_SAME, 1, "cache.kernel.l1d_misses", "0") == 4000 * 3
    assert val(df, PIN_SAME, 1, "cache.l1d_misses") == 4 * 4000 * 3
    # an old run has no window units: no per-KB figure rather than one over netperf's KB
    assert row(df, PIN_SAME, 1, "cache.l1d_misses.per_kb")["status"] == "not-supported"
    assert set(df[df.metric.str.startswith("cache.")]["source"]) <= {"cachemodel", "derived"}


def test_cachemodel_tolerates_single_marker_and_rejects_bad_header() -> None:
    one = "vcpu,mode,event,value,marker\n0,kernel,loads,7,snapshot:1\n"
    assert cmfmt.measured_window(one)["value"].tolist() == [7]
    from testbed.errors import NetbedError

    with pytest.raises(NetbedError, match="columns"):
        cmfmt.measured_window("cpu,event,value\n0,loads,1\n")


def test_rr_netperf_rows_and_no_per_trans_without_window(run_copy: Path) -> None:
    rep = run_copy / "cells" / PIN_SAME / "rep-1"
    cell = json.loads((rep / "cell.json").read_text())
    cell["workload"] = {"name": "TCP_RR", "message_size": 1}
    (rep / "cell.json").write_text(json.dumps(cell))
    (rep / "netperf.txt").write_text(
        "THROUGHPUT=2000.00\nTHROUGHPUT_UNITS=Trans/s\nELAPSED_TIME=2.00\n"
        "P50_LATENCY=480\nP99_LATENCY=900\nMEAN_LATENCY=495.5\nREMOTE_CPU_UTIL=-1.00\n")
    df = c.collate_run(run_copy)
    assert val(df, PIN_SAME, 1, "netperf.transactions") == 4000
    assert val(df, PIN_SAME, 1, "netperf.latency_p99") == 900
    assert row(df, PIN_SAME, 1, "perf.context-switches.per_trans")["status"] == "not-supported"
    assert row(df, PIN_SAME, 1, "window.transactions")["status"] == "not-supported"
    util = df[(df.cell_id == PIN_SAME) & (df.repetition == 1) &
              (df.metric == "netperf.cpu_util_receiver")]
    assert util["status"].item() == "not-supported"  # netperf's -1 is not 0 % or -1 %


def test_cell_label() -> None:
    row = {"kernel": "stock", "nic": "e1000", "cpus": 2, "policy": "rfs",
           "workload": "TCP_RR", "message_size": 1, "gro": "off"}
    assert c.cell_label(row) == "stock/e1000/2cpu/rfs/TCP_RR/1/gro-off"
    assert c.cell_label(row, ["policy", "nic"]) == "rfs/e1000"
    assert c.cell_label({**row, "rcvbuf": "auto"}) == "stock/e1000/2cpu/rfs/TCP_RR/1/gro-off"
    assert c.cell_label({**row, "rcvbuf": "64K"}).endswith("/gro-off/rcvbuf-64K")


def test_cell_axes_accepts_nested_and_flat_cells() -> None:
    nested = {"kernel": "stock", "nic": "virtio", "cpus": 4, "policy": "rps",
              "workload": {"name": "TCP_MAERTS", "message_size": 65536}, "gro": False}
    flat = {**nested, "workload": "TCP_MAERTS", "message_size": 65536}
    want = {"kernel": "stock", "nic": "virtio", "cpus": 4, "policy": "rps",
            "workload": "TCP_MAERTS", "message_size": 65536, "gro": "off", "rcvbuf": "auto"}
    assert c.cell_axes(nested) == want
    assert c.cell_axes(flat) == want
    assert c.cell_axes({**nested, "rcvbuf": "64K"})["rcvbuf"] == "64K"


@pytest.mark.process  # a process pool
def test_parallel_collation_equals_serial(tidy: pd.DataFrame) -> None:
    par, _ = c.collate_run_with_facts(RUN, workers=2)
    pd.testing.assert_frame_equal(par, tidy)


def test_cachemodel_repeated_markers_window_last_begin_to_its_end() -> None:
    """The runner's rule (testbed.run.cachemodel_window.window_blocks) and analysis' are
    one function: the last begin block and the end block after it."""
    head = "vcpu,mode,event,value,marker\n"
    blocks = [("begin:1", 10), ("snapshot:2", 15), ("end:1", 20), ("begin:1", 30),
              ("end:1", 50), ("snapshot:3", 90)]
    text = head + "".join(f"0,kernel,loads,{v},{m}\n0,user,loads,{v * 2},{m}\n"
                          for m, v in blocks)
    w = cmfmt.measured_window(text).set_index("mode")["value"]
    assert w["kernel"] == 50 - 30 and w["user"] == 100 - 60
    from testbed.run.cachemodel_window import window_blocks

    kept = cmfmt.measured_window(window_blocks(text)).set_index("mode")["value"]
    assert kept.to_dict() == w.to_dict()


def test_readback_irqs_from_nicstate_readback() -> None:
    """readback.json as testbed.formats.readback.Readback.as_dict writes it."""
    rb = {"iface": "eth1", "irq_affinity": {"27": "0", "28": "0", "29": "0-1"},
          "irq_effective": {}, "offloads": {"rx-checksumming": "on"}}
    assert c.readback_irqs(rb) == ["27", "28", "29"]
    assert c.readback_irqs({"irqs": [23]}) == ["23"]
    assert c.readback_irqs({"irq_affinity": {}}) is None
    assert c.readback_irqs({}) is None


def test_each_repetition_says_whether_it_ran_under_the_plugin(run_copy: Path) -> None:
    """`done`'s plugin flag decides; an old run's repetitions are judged by cachemodel.csv."""
    import json

    shutil.copy(FIX / "raw" / "cachemodel" / "cachemodel.csv",
                run_copy / "cells" / PIN_SAME / "rep-1" / "cachemodel.csv")
    df = c.collate_run(run_copy)
    marks = df[df.metric == c.INSTRUMENTED]
    assert set(marks["note"]) == {"inferred: cachemodel.csv present",
                                  "inferred: cachemodel.csv absent"}
    assert val(df, PIN_SAME, 1, c.INSTRUMENTED) == 1.0
    assert val(df, DEFAULT, 1, c.INSTRUMENTED) == 0.0
    # a new run's done says so; it wins over the files present
    done = run_copy / "cells" / PIN_SAME / "rep-1" / "done"
    done.write_text(json.dumps({**json.loads(done.read_text()), "plugin": False}))
    df = c.collate_run(run_copy)
    assert val(df, PIN_SAME, 1, c.INSTRUMENTED) == 0.0
    assert row(df, PIN_SAME, 1, c.INSTRUMENTED)["note"] == "done: plugin off (plain)"
    # failed or unfinished repetitions get no mark: they measured nothing
    assert len(df[df.metric == c.INSTRUMENTED]) == len(
        df[(df.metric == "rep.status") & (df.status == "ok")])


def test_by_kind_takes_cache_rows_from_instrumented_reps_and_the_rest_from_plain(
        run_copy: Path) -> None:
    import json

    for cell in (PIN_SAME, DEFAULT):
        shutil.copy(FIX / "raw" / "cachemodel" / "cachemodel.csv",
                    run_copy / "cells" / cell / "rep-1" / "cachemodel.csv")
        done = run_copy / "cells" / cell / "rep-1" / "done"
        done.write_text(json.dumps({**json.loads(done.read_text()), "plugin": True}))
    df = c.collate_run(run_copy)
    inst = c.instrumented_reps(df)
    assert {(cell, r) for _, cell, r in inst} == {(PIN_SAME, 1), (DEFAULT, 1)}
    assert c.plain_reps(df) and not c.plain_reps(df) & inst
    view = c.by_kind(df)
    keys = list(zip(view.cell_id, view.repetition, strict=True))
    under = pd.Series([(cell, r) in {(PIN_SAME, 1), (DEFAULT, 1)} for cell, r in keys],
                      index=view.index)
    metric = view.metric.astype(str)
    # instrumented reps: only cache.*, socket.* and rep.* rows; plain reps: none of those
    assert set(metric[under & ~metric.str.startswith("rep.")].str.split(".").str[0]) <= \
        {"cache", "socket"}
    assert "cache" in set(metric[under].str.split(".").str[0])
    assert not metric[~under].str.startswith(("cache.", "socket.")).any()
    assert (metric[under] == "netperf.throughput").sum() == 0
    assert (metric[~under] == "netperf.throughput").sum() > 0
    # one kind only (an old cache-model run, or a run without the model): unchanged
    old = df[~df.cell_id.isin([PIN_SAME, DEFAULT]) | (df.repetition == 1)]
    old = old[~old.metric.eq(c.INSTRUMENTED)]
    only_inst = old[old.cell_id.isin([PIN_SAME, DEFAULT])]
    pd.testing.assert_frame_equal(c.by_kind(only_inst), only_inst)


def test_perf_kept_out_of_a_window_gives_not_supported_rows_with_the_reason(
        run_copy: Path) -> None:
    """A cache-model window has no perf-stat.csv but `perf-unsupported` (testbed.run.window):
    every software event is a not-supported row that says why, never a zero."""
    rep = run_copy / "cells" / PIN_SAME / "rep-1"
    (rep / "perf-stat.csv").unlink()
    (rep / "perf-unsupported").write_text("perf is kept out of cache-model windows\n")
    df = c.collate_run(run_copy)
    mine = df[(df.cell_id == PIN_SAME) & (df.repetition == 1) &
              df.metric.str.startswith("perf.")]
    assert set(mine["metric"]) >= {"perf.context-switches", "perf.task-clock",
                                   "perf.context-switches.per_kb"}
    assert (mine["status"] == "not-supported").all()
    assert mine["value"].isna().all()
    assert row(df, PIN_SAME, 1, "perf.context-switches")["note"] == \
        "perf is kept out of cache-model windows"
    # other repetitions still have perf's counts
    assert val(df, PIN_SAME, 2, "perf.context-switches") > 0


def test_only_the_model_s_counts_are_divided_by_the_window_s_work() -> None:
    from analysis.collate import _derive_per_unit, _Rows
    from analysis.window_metrics import Units

    out = _Rows([])
    out.add("cache.l2_misses", "all", 2048.0, "count", "cachemodel")
    out.add("cache.payload_checksum_cpu_is_copy_cpu", "all", 1.0, "fraction", "cachemodel")
    _derive_per_unit(out, Units(seconds=2.0, kbytes=1024.0, packets=100.0, transactions=None),
                     "TCP_STREAM")
    derived = {r["metric"]: r["value"] for r in out.rows if r["source"] == "derived"}
    assert derived == {"cache.l2_misses.per_kb": 2.0}  # a share per KB is no number
