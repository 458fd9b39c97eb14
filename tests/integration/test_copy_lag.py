"""The copy-lag axis on real guests: a set level reaches the measured socket and bounds
its queue. Kept small: e1000, TCP_STREAM, pin-same, auto vs 64K, one plain repetition of
2 s each (software counters: no cache model), one boot.

The buffer read back (netperf's RSR_SIZE, and sk_rcvbuf in the window's samples where
the kernel has sock_diag's TCP handler) is what Linux makes of 64K: doubled, 131072.
The queue (payload received, not yet copied) stays below the 64 KiB window at 64K,
while autotuning lets a saturating stream queue more."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from analysis.collate import collate_run
from testbed.files import read_json
from testbed.formats import sockqueue
from testbed.run.folder import RunDir
from testbed.run.local import run_matrix
from testbed.settings import Settings

pytestmark = pytest.mark.integration

KERNEL = os.environ.get("NETBED_TEST_KERNEL", "distro")

CONFIG = f"""\
name: copylag
axes:
  kernel: [{KERNEL}]
  nic: [e1000]
  cpus: [2]
  policy: [pin-same]
  workload: [TCP_STREAM]
  rcvbuf: [auto, 64K]
repetitions: 1
duration: 2
warmup: 1
order: sequential
counters: [software]
tracing: off
retries: 1
"""


def value(tidy: pd.DataFrame, rcvbuf: str, metric: str) -> pd.Series:
    row = tidy[(tidy["rcvbuf"] == rcvbuf) & (tidy["metric"] == metric) & (tidy["cpu"] == "all")]
    assert len(row) == 1, (rcvbuf, metric, row)
    return row.iloc[0]


def test_a_set_level_reaches_the_socket_and_bounds_its_queue(tmp_path: Path):
    config = tmp_path / "copylag.yaml"
    config.write_text(CONFIG)
    settings = replace(Settings(), results_dir=tmp_path / "results")
    summary = run_matrix(settings, config, log=print)
    assert summary.ok and summary.done == 2, summary.failed
    run = RunDir(summary.run_dir)
    by_level = {read_json(rep.path / "cell.json").get("rcvbuf", "auto"): rep
                for rep in run.reps()}
    shallow = read_json(by_level["64K"].path / sockqueue.RAW_RCVBUF)
    assert shallow["asked_bytes"] == 65536 and shallow["rmem_max"] == 212992
    assert shallow["netperf"]["RSR_SIZE_REQ"] == 65536
    assert shallow["netperf"]["RSR_SIZE"] == shallow["expected_rcvbuf_bytes"] == 131072
    auto = read_json(by_level["auto"].path / sockqueue.RAW_RCVBUF)
    assert auto["asked_bytes"] is None and auto["netperf"]["RSR_SIZE_REQ"] == -1

    tidy = collate_run(run.path)
    for level in ("auto", "64K"):
        for metric in ("socket.queue_kb.p50", "socket.queue_kb.p95", "socket.rcvbuf_kb"):
            assert value(tidy, level, metric)["status"] == "ok", (level, metric)
    assert value(tidy, "64K", "socket.rcvbuf_kb")["value"] == 128  # 2 x 64 KiB, as set
    assert value(tidy, "auto", "socket.rcvbuf_kb")["value"] > 128  # autotuning grew it
    deep = value(tidy, "auto", "socket.queue_kb.p95")["value"]
    capped = value(tidy, "64K", "socket.queue_kb.p95")["value"]
    assert capped <= 64 < deep, (capped, deep)
    assert value(tidy, "64K", "socket.queue_kb.p50")["value"] \
        < value(tidy, "auto", "socket.queue_kb.p50")["value"]
