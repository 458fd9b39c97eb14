"""Window units, per-unit ratios and trace locality on a run captured from guests
(tests/fixtures/runs/20261129T143000Z-window/README.md)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import collate as c
from analysis import pipeline
from analysis import window_metrics as wm
from testbed.formats import tcpinfo

RUN = Path(__file__).resolve().parent.parent / "fixtures" / "runs" / "20261129T143000Z-window"
CROSS = "distro-e1000-c2-pin-cross-TCP_STREAM-16384-gro_on"
RFS = "distro-e1000-c2-pin-cross-rfs-TCP_STREAM-16384-gro_on"
SAME = "distro-e1000-c2-pin-same-TCP_STREAM-16384-gro_on"
RR = "distro-e1000-c2-pin-irq-TCP_RR-1-gro_on"


@pytest.fixture(scope="module")
def tidy() -> pd.DataFrame:
    return c.collate_run(RUN)


def row(df: pd.DataFrame, cell: str, metric: str) -> pd.Series:
    r = df[(df.cell_id == cell) & (df.metric == metric) & (df.cpu == "all")]
    assert len(r) == 1, (cell, metric, len(r))
    return r.iloc[0]


def val(df: pd.DataFrame, cell: str, metric: str) -> float:
    r = row(df, cell, metric)
    assert r["status"] == "ok", (cell, metric, r["status"], r["note"])
    return float(r["value"])


def rep(cell: str) -> Path:
    return RUN / "cells" / cell / "rep-1"


def test_payload_bytes_come_from_the_data_connections_tcp_info():
    d = tcpinfo.connection_delta((rep(RFS) / tcpinfo.RAW_BEFORE).read_text(),
                                 (rep(RFS) / tcpinfo.RAW_AFTER).read_text())
    assert d.local.endswith(tuple(f":{p}" for p in range(1024, 65536))) and ":12865" not in d.local
    assert d.payload_bytes("in") > 100e6 and d.payload_bytes("out") == 0
    conns = tcpinfo.parse_tcpinfo((rep(RFS) / tcpinfo.RAW_AFTER).read_text())
    assert {x.local_port for x in conns} >= {12865}  # the control connection is there, not used


def test_window_units_and_rates(tidy: pd.DataFrame):
    for cell in (CROSS, RFS, SAME):
        seconds = val(tidy, cell, "window.seconds")
        assert 3.0 < seconds < 3.5  # the 3 s sleep plus the edges
        kb = val(tidy, cell, "window.kbytes")
        assert val(tidy, cell, "window.throughput") == pytest.approx(kb * 1024 * 8 / seconds / 1e6)
        # GRO off the wire: frames ~ payload / MSS
        assert val(tidy, cell, "window.packets") == pytest.approx(kb * 1024 / 1448, rel=0.05)
        assert val(tidy, cell, "window.skew") < wm.SKEW_LIMIT_MS
        assert "netperf" in row(tidy, cell, "netperf.throughput")["source"]
    assert val(tidy, RR, "window.transactions") == val(tidy, RR, "window.packets")
    assert val(tidy, RR, "window.transaction_rate") == pytest.approx(
        val(tidy, RR, "window.transactions") / val(tidy, RR, "window.seconds"))


def test_per_unit_ratios_divide_by_the_window_units(tidy: pd.DataFrame):
    cs = val(tidy, RFS, "perf.context-switches")
    assert val(tidy, RFS, "perf.context-switches.per_kb") == pytest.approx(
        cs / val(tidy, RFS, "window.kbytes"))
    assert val(tidy, RFS, "softirq.NET_RX.per_packet") == pytest.approx(
        val(tidy, RFS, "softirq.NET_RX") / val(tidy, RFS, "window.packets"))
    assert val(tidy, RR, "perf.context-switches.per_trans") == pytest.approx(
        val(tidy, RR, "perf.context-switches") / val(tidy, RR, "window.transactions"))
    assert not ((tidy.cell_id == RR) & (tidy.metric == "perf.context-switches.per_kb")).any()


def test_rate_mismatch_is_flagged_not_hidden(tidy: pd.DataFrame):
    rr = row(tidy, RR, "window.netperf_ratio")
    assert rr["value"] > 1 + wm.RATE_MISMATCH and "differ by 31%" in rr["note"]
    assert row(tidy, SAME, "window.netperf_ratio")["note"] == ""


def test_locality_from_the_trace_shows_the_known_effects(tidy: pd.DataFrame):
    """IRQ on CPU 0: reader pinned elsewhere -> 0; with RFS -> 1; reader on CPU 0 -> 1."""
    p = "locality.processing_on_reader_cpu"
    i = "locality.irq_on_reader_cpu"
    assert val(tidy, CROSS, p) < 0.05 and val(tidy, CROSS, i) < 0.05
    assert val(tidy, RFS, p) > 0.95 and val(tidy, RFS, i) < 0.05
    assert val(tidy, SAME, p) > 0.95 and val(tidy, SAME, i) > 0.95
    assert val(tidy, CROSS, "wakeups.on_waker_cpu") < 0.05
    assert val(tidy, RFS, "wakeups.on_waker_cpu") > 0.95  # woken by the steered softirq
    assert val(tidy, RR, "wakeups.count") > 1000
    assert 0.05 < val(tidy, RR, "wakeups.on_waker_cpu") < 0.95  # reader free: mixed
    assert val(tidy, RR, "wakeups.from_softirq") > 0.95


def test_unsupported_tracing_gives_not_supported_rows_with_the_reason(tmp_path: Path):
    run = tmp_path / RUN.name
    shutil.copytree(RUN, run)
    r = run / "cells" / SAME / "rep-1"
    (r / "trace.txt.gz").unlink()
    (r / "trace-unsupported").write_text("kernel has no tracepoint napi/napi_poll\n")
    df = c.collate_run(run)
    for metric in wm.LOCALITY_METRICS:
        x = row(df, SAME, metric)
        assert x["status"] == "not-supported" and math.isnan(x["value"])
        assert "napi/napi_poll" in x["note"]


def test_missing_tcp_info_gives_error_rows_and_no_per_kb(tmp_path: Path):
    run = tmp_path / RUN.name
    shutil.copytree(RUN, run)
    (run / "cells" / SAME / "rep-1" / "tcpinfo-after.txt").write_text("")
    df = c.collate_run(run)
    assert row(df, SAME, "window.kbytes")["status"] == "error"
    assert row(df, SAME, "perf.context-switches.per_kb")["status"] == "not-supported"
    assert row(df, SAME, "window.packets")["status"] == "ok"  # the rest still counts


def test_report_shows_window_checks_and_explains_metrics(tmp_path: Path):
    run = tmp_path / RUN.name
    shutil.copytree(RUN, run)
    paths = pipeline.write_report(run)
    md = paths.md.read_text()
    assert "Window rate / netperf rate" in md and "window vs netperf rate" in md
    assert "1.31x" in md  # the RR repetition, flagged
    assert "locality.processing_on_reader_cpu" in md and "weighted by len" in md
    assert any(p.name == "joint-locality.png" for p in paths.figures)


def test_the_done_record_rates_are_the_analysis_window_rates(tidy: pd.DataFrame):
    """The adaptive rule reads `done` during the run: its window rates (formats.windowrates)
    must be the figures analysis derives from the same files."""
    from testbed.formats import stamps
    from testbed.formats.windowrates import window_rates

    for cell, workload, size in ((CROSS, "TCP_STREAM", 16384), (RFS, "TCP_STREAM", 16384),
                                 (RR, "TCP_RR", 1)):
        texts = [(rep(cell) / name).read_text()
                 for name in (stamps.RAW, tcpinfo.RAW_BEFORE, tcpinfo.RAW_AFTER)]
        rates = window_rates(*texts, workload, size)
        assert rates["window.throughput"] == pytest.approx(val(tidy, cell, "window.throughput"))
        if workload == "TCP_RR":
            assert rates["window.transaction_rate"] == pytest.approx(
                val(tidy, cell, "window.transaction_rate"))
        else:
            assert "window.transaction_rate" not in rates


def test_done_record_rates_refuse_files_that_cannot_say():
    from testbed.errors import NetbedError
    from testbed.formats.windowrates import window_rates

    with pytest.raises(NetbedError):
        window_rates("", "", "", "TCP_STREAM", 16384)
