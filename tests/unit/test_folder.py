"""testbed.run.folder: done markers, clean re-attempts, finding a run by name."""

from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.run.folder import RunDir, resolve_run


def test_start_rep_discards_an_interrupted_attempt(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    rep = run.start_rep("cell-a", 0)
    (rep.path / "netperf.txt").write_text("partial")
    assert not rep.is_done
    rep = run.start_rep("cell-a", 0)
    assert list(rep.path.iterdir()) == []
    run.mark_done(rep, {"ok": True})
    assert rep.is_done and not rep.is_failed


def test_reps_are_listed_in_numeric_order(tmp_path: Path):
    run = RunDir(tmp_path / "run")
    for n in (10, 2, 1):
        run.start_rep("c", n)
    assert [r.repetition for r in run.reps()] == [1, 2, 10]


def test_a_run_is_found_by_folder_by_id_or_as_the_latest(tmp_path: Path):
    results = tmp_path / "results"
    for name in ("20260101T000000Z-a", "20260102T000000Z-b"):
        RunDir(results / name).start_rep("c", 0)
    (results / "not-a-run").mkdir()
    assert resolve_run(str(results / "20260101T000000Z-a"), results) == \
        results / "20260101T000000Z-a"
    assert resolve_run("20260101T000000Z-a", results) == results / "20260101T000000Z-a"
    assert resolve_run("latest", results) == results / "20260102T000000Z-b"


def test_an_unknown_run_names_recent_ones(tmp_path: Path):
    RunDir(tmp_path / "20260101T000000Z-a").start_rep("c", 0)
    with pytest.raises(NetbedError, match="no run 'nope'") as err:
        resolve_run("nope", tmp_path)
    assert "20260101T000000Z-a" in str(err.value)
    with pytest.raises(NetbedError, match="no runs in"):
        resolve_run("latest", tmp_path / "empty")
