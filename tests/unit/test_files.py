"""testbed.files: atomic writes leave a whole file or none."""

from pathlib import Path

import pytest

from testbed.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["b.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_bytes_and_json_round_trip(tmp_path: Path):
    atomic_write_bytes(tmp_path / "raw", bytes(range(256)))
    assert (tmp_path / "raw").read_bytes() == bytes(range(256))
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [Path("/p")]})
    assert read_json(tmp_path / "x.json") == {"a": ["/p"], "b": 1}


def test_a_failed_write_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "keep.txt"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # the error under test
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
