"""Run directory bookkeeping: atomic writes, done markers, clean re-attempts."""

from pathlib import Path

from testbed.files import atomic_write_text
from testbed.run.folder import RunDir


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]


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
