"""analysis.pipeline.write_report / analyze_run on a copy of the fixture run."""

from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import pipeline
from analysis.report import pmu_verdict

RUN = Path(__file__).resolve().parent.parent / "fixtures" / "runs" / "20261125T100000Z-hostloop"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> pipeline.ReportPaths:
    run = tmp_path_factory.mktemp("runs") / RUN.name
    shutil.copytree(RUN, run)
    return pipeline.write_report(run, compare_to=RUN)


def test_html_is_self_contained(report: pipeline.ReportPaths) -> None:
    text = report.html.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text, re.I)
    assert "<script" not in text.lower()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', text)
    # throughput and per-CPU shares; an old run has no per-KB counters (no window units)
    assert len(srcs) == len(report.figures) == 4  # answer, throughput, locality, drift
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_report_says_what_failed_and_where_numbers_came_from(
        report: pipeline.ReportPaths) -> None:
    for text in (report.html.read_text(), report.md.read_text()):
        assert "did not answer SSH" in text  # the failure reason
        assert "incomplete" in text
        assert "QEMU emulator version 7.2" in text  # versions.json
        assert "NOT counted" in text  # no PMU: said, not hidden
        assert "samples per repetition" in text
        assert "rx-checksumming" in text  # offload read-back
        assert "against policy=default with its own NIC, kernel" in text  # baseline note
        assert "Against the other run" in text
        assert "no window units" in text  # an old run: per-KB figures absent, said so
        assert "processing_on_reader_cpu" in text and "not available in this run" in text


def test_markdown_links_existing_figures(report: pipeline.ReportPaths) -> None:
    md = report.md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4
    for link in links:
        assert (report.md.parent / link).is_file()


def test_analyze_run_writes_tables(tmp_path: Path) -> None:
    run = tmp_path / RUN.name
    shutil.copytree(RUN, run)
    res = pipeline.analyze_run(run)
    for p in (res.tables.parquet, res.tables.csv, res.summary_csv, res.comparison_csv,
              res.comparison_txt):
        assert p.is_file() and p.stat().st_size > 0
    assert res.counts == {"ok": 6, "failed": 1, "incomplete": 1}
    assert "%change" in res.comparison_txt.read_text()
    summary = pd.read_csv(res.summary_csv, dtype={"cpu": str})
    assert {"n", "median", "iqr", "ci_lo", "ci_hi", "n_failed"} <= set(summary.columns)


def test_empty_run_still_reports(tmp_path: Path) -> None:
    """A run that has not finished a single repetition yet: report, don't crash."""
    run = tmp_path / "20261125T000000Z-empty"
    run.mkdir()
    (run / "cells.json").write_text('[{"cell_id": "a", "policy": "default"}]')
    paths = pipeline.write_report(run)
    assert "(no comparisons)" in paths.md.read_text()
    assert "1 cell(s) of cells.json not started" in paths.html.read_text()
    assert paths.figures == []


def test_pmu_verdict() -> None:
    def frame(statuses: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"metric": "perf.cycles", "cpu": "all", "status": statuses,
                             "source": "perf"})

    assert "PMU valid" in pmu_verdict(frame(["ok", "ok"]))
    assert "NOT counted" in pmu_verdict(frame(["not-supported"]))
    assert "partly" in pmu_verdict(frame(["ok", "not-counted"]))


def test_offload_facts_reads_the_runner_format(tmp_path: Path) -> None:
    """offloads.txt as testbed.formats.offloads.OFFLOAD_SCRIPT prints it: the virtio feature
    bits decide, not ethtool's "on [fixed]"."""
    from analysis.report import offload_facts

    f = tmp_path / "offloads.txt"
    f.write_text("iface=eth1\ndriver=virtio_net\nvirtio_features=1000000\n--- ethtool -k\n"
                 "Features for eth1:\nrx-checksumming: on [fixed]\ntx-checksumming: on\n"
                 "generic-receive-offload: on\n")
    facts = offload_facts(f)
    assert facts["driver"] == "virtio_net"
    assert facts["rx_checksum_offload"] is False  # bit 1 (GUEST_CSUM) not negotiated
    assert facts["rx-checksumming"] == "on"
    plain = RUN.parent.parent / "raw" / "guest-distro-e1000" / "offloads.txt"
    assert offload_facts(plain)["rx-checksumming"] == "off"
    assert offload_facts(tmp_path / "missing.txt")["rx_checksum_offload"] == "n/a"


def test_the_answer_opens_both_reports(report: pipeline.ReportPaths) -> None:
    md = report.md.read_text()
    first = re.findall(r"^## (.*)$", md, re.M)
    assert first[0] == "The answer"
    # the claims first, the policy-vs-default details under them, then the rest
    assert first.index("How to read the claims") < first.index(
        "Details: policies against their NIC's default") < first.index("Status")
    html_heads = re.findall(r"<h2>(.*?)</h2>", report.html.read_text())
    assert html_heads[0] == "The answer"
    # a host-loopback run has no cache model: no locality figure, said, never zeros
    assert "not measured in this run" in md
    assert report.figures[0].name == "policy-effects.png"
    assert "Cache numbers" in md and "Welch t" in md
    assert report.claims is not None and "not measured in this run" in report.claims.read_text()


def test_comparing_runs_that_differ_is_refused_without_force(tmp_path: Path) -> None:
    import json

    from testbed.errors import NetbedError

    run, other = tmp_path / RUN.name, tmp_path / "other"
    shutil.copytree(RUN, run)
    shutil.copytree(RUN, other)
    v = json.loads((other / "versions.json").read_text())
    (other / "versions.json").write_text(json.dumps({**v, "qemu_version": "QEMU 9.0"}))
    with pytest.raises(NetbedError, match="differ: QEMU") as e:
        pipeline.write_report(run, compare_to=other)
    assert "--force" in (e.value.hint or "")
    paths = pipeline.write_report(run, compare_to=other, force=True)
    assert "warning: runs differ: QEMU" in paths.md.read_text()


def test_the_report_says_which_kind_of_repetition_each_number_comes_from():
    import numpy as np

    from analysis.report import kinds_verdict
    from tests.unit.test_policy_effects import mixed_run

    one = kinds_verdict(mixed_run(np.random.default_rng(0), 1, {"default": 0.0,
                                                                  "pin-same": 1.0}))
    assert one.startswith("6 repetitions ran under the cache-model plugin (instrumented) and "
                          "2 without it (plain: 1 per cell, traced)")
    assert "One plain repetition per cell gives no interval" in one
    none = kinds_verdict(mixed_run(np.random.default_rng(0), 0, {}))
    assert none.startswith("All 6 finished repetitions ran under the cache-model plugin")
    plain = mixed_run(np.random.default_rng(0), 2, {"default": 0.0, "pin-same": 1.0})
    plain = plain[plain["repetition"] >= 3]
    assert kinds_verdict(plain).startswith("All 4 finished repetitions ran without")
