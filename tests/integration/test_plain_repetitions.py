"""A counters-auto run under TCG has both kinds of repetitions (real guests): the
instrumented ones ran under the cache-model plugin and have cache rows, the plain ones
booted without it, were traced and have locality and wake-up rows. Kept small: distro
kernel, e1000, 2 cells x (1 + 1 plain) repetitions of 2 s, one boot of each kind."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from analysis.collate import INSTRUMENTED, collate_run
from testbed.files import read_json
from testbed.run.folder import RunDir
from testbed.run.local import run_matrix
from testbed.settings import Settings

from .conftest import our_qemu_pids

pytestmark = pytest.mark.integration

CONFIG = """\
name: plain
axes:
  kernel: [distro]
  nic: [e1000]
  cpus: [2]
  policy: [default, pin-same]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: 1
plain_repetitions: 1
duration: 2
warmup: 0
order: sequential
counters: [auto]
retries: 1
"""


def rows(tidy: pd.DataFrame, rep: int, metric: str) -> pd.DataFrame:
    return tidy[(tidy["repetition"] == rep) & (tidy["metric"] == metric)
                & (tidy["cpu"] == "all")]


def test_counters_auto_runs_instrumented_and_plain_repetitions(tmp_path: Path):
    config = tmp_path / "plain.yaml"
    config.write_text(CONFIG)
    settings = replace(Settings(), results_dir=tmp_path / "results")
    lines: list[str] = []
    summary = run_matrix(settings, config, log=lines.append)
    assert summary.ok and summary.done == 4, summary.failed
    run = RunDir(summary.run_dir)
    if read_json(run.versions_file)["accel"] != "tcg":
        pytest.skip("counters auto under KVM counts without the cache model: no plain reps")
    # one boot with the plugin, one without: the two cells share each
    assert sum("booting receiver" in line for line in lines) == 2, lines
    assert any("1 repetitions + 1 plain (no plugin)" in line for line in lines)
    for rep in run.reps():
        done = read_json(rep.path / "done")
        assert done["plugin"] is (rep.repetition == 0)
        assert (rep.path / "cachemodel.csv").is_file() is (rep.repetition == 0)
        assert (rep.path / "trace.txt.gz").is_file() is (rep.repetition == 1)

    tidy = collate_run(run.path)
    assert list(rows(tidy, 0, INSTRUMENTED)["value"]) == [1.0, 1.0]
    assert list(rows(tidy, 1, INSTRUMENTED)["value"]) == [0.0, 0.0]
    for metric in ("locality.processing_on_reader_cpu", "wakeups.count"):
        plain = rows(tidy, 1, metric)
        assert len(plain) == 2 and (plain["status"] == "ok").all(), plain
        assert (rows(tidy, 0, metric)["status"] != "ok").all()  # not traced under the model
    cache = rows(tidy, 0, "cache.c2c_transfers")
    assert len(cache) == 2 and (cache["status"] == "ok").all() and (cache["value"] > 0).all()
    assert rows(tidy, 1, "cache.c2c_transfers").empty
    # pin-same: the reader runs where the NIC's packets are processed (measured, plain rep)
    pin = tidy[(tidy["policy"] == "pin-same") & (tidy["repetition"] == 1)
               & (tidy["metric"] == "locality.processing_on_reader_cpu")]
    assert float(pin["value"].iloc[0]) > 0.9
    assert not our_qemu_pids(str(run.path))
