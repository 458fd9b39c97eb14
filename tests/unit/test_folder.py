"""testbed.run.folder: done markers, clean re-attempts, finding a run by name."""

import errno
import json
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.run.folder import RepDir, RunDir, disk_full, resolve_run


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


# ------------------------------------------------------------ damage and a full disk


def finished(tmp_path: Path) -> RepDir:
    run = RunDir(tmp_path / "run")
    rep = run.start_rep("cell-a", 0)
    (rep.path / "netperf.txt").write_text("THROUGHPUT=1\n")
    (rep.path / "proc-after").mkdir()
    (rep.path / "proc-after" / "softirqs").write_text("NET_RX: 1 2\n")
    (rep.path / ".netperf.txt.tmp123").write_text("an atomic write's temporary")
    run.mark_done(rep, {"attempts": 1})
    return rep


def test_done_lists_every_file_with_its_size_but_itself_and_temporaries(tmp_path: Path):
    rep = finished(tmp_path)
    files = json.loads(rep.file("done").read_text())["files"]
    assert files == {"netperf.txt": 13, "proc-after/softirqs": 12}
    assert rep.is_complete and rep.damage() is None


@pytest.mark.parametrize("harm, words", [
    (lambda rep: rep.file("done").write_text('{"attempts": 1, "fi'), "unreadable"),
    (lambda rep: rep.file("done").write_text("[1, 2]"), "not a JSON object"),
    (lambda rep: rep.file("proc-after/softirqs").write_text("NET_RX: 1"),
     "proc-after/softirqs has 9 bytes, done recorded 12"),
    (lambda rep: rep.file("netperf.txt").unlink(), "netperf.txt missing"),
])
def test_damage_names_what_is_wrong(tmp_path: Path, harm, words):
    rep = finished(tmp_path)
    harm(rep)
    assert rep.is_done and not rep.is_complete
    assert words in (rep.damage() or "")


def test_unknown_files_and_old_done_markers_are_not_damage(tmp_path: Path):
    rep = finished(tmp_path)
    (rep.path / "notes.txt").write_text("someone's notes")
    assert rep.damage() is None
    rep.file("done").write_text('{"attempts": 1}')  # written before done listed files
    assert rep.is_complete


def test_disk_full_names_the_file_and_the_free_space(tmp_path: Path):
    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / ".f.tmp"))
    full = disk_full(exc, tmp_path, "resume it")
    assert full is not None
    assert f"while writing {tmp_path / 'x' / '.f.tmp'} (" in str(full)
    assert "MiB free of" in str(full) and "No space left on device" in str(full)
    assert "free space on that file system, then resume it" in str(full)
    wrapped = RuntimeError("arrow failed")
    wrapped.__cause__ = OSError("[Errno 28] Error writing bytes to file")  # no errno attr
    assert disk_full(wrapped, tmp_path) is not None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    assert disk_full(ValueError("x"), tmp_path) is None
