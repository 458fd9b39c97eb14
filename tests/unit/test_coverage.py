"""cache.device_write_coverage on a real cache-model run: a figure for bulk receive only."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.collate import collate_rep
from testbed.run.folder import RunDir

RUN = Path(__file__).resolve().parent.parent / "fixtures" / "runs" / \
    "20261129T165819Z-cachemodel-window"


def coverage(workload: str) -> pd.Series:
    (rep,) = [r for r in RunDir(RUN).reps() if f"-{workload}-" in r.cell_id]
    df = pd.DataFrame(collate_rep(rep)[0])
    row = df[(df.metric == "cache.device_write_coverage") & (df.cpu == "all")]
    assert len(row) == 1
    return row.iloc[0]


def test_bulk_receive_gets_a_coverage_figure():
    row = coverage("TCP_STREAM")
    assert row["status"] == "ok" and row["value"] > 0.9 and "payload lines" in row["note"]


def test_sending_and_request_response_get_not_supported_with_the_reason_not_a_ratio():
    for workload in ("TCP_MAERTS", "TCP_RR"):
        row = coverage(workload)
        assert row["status"] == "not-supported" and math.isnan(row["value"])
        assert "only bulk receive" in row["note"] and workload in row["note"]
