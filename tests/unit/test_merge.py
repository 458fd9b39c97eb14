"""testbed.run.merge: joining shard runs into one run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.run.folder import RunDir
from testbed.run.merge import merge_runs, merged_name


def make_run(root: Path, name: str, experiment_text: str, reps: dict[tuple[str, int], str]) -> Path:
    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    run.experiment_file.write_text(experiment_text)
    cells = sorted({c for c, _ in reps})
    run.cells_file.write_text(json.dumps([{"cell_id": c} for c in cells]))
    run.host_file.write_text(json.dumps({"hostname": name}))
    run.versions_file.write_text(json.dumps({"accel": "tcg"}))
    for (cell, n), state in reps.items():
        rep = run.start_rep(cell, n)
        (rep.path / "netperf.txt").write_text(f"{name}\n")
        if state == "done":
            run.mark_done(rep, {})
        elif state == "failed":
            run.mark_failed(rep, "boom", {})
    return run.path


def test_merge_joins_disjoint_shards(tmp_path: Path):
    a = make_run(tmp_path, "20260101T000000Z-x-shard1of2", "name: x\n",
                 {("c1", 0): "done", ("c1", 1): "done"})
    b = make_run(tmp_path, "20260101T000001Z-x-shard2of2", "name: x\n",
                 {("c2", 0): "done", ("c2", 1): "failed"})
    out = merge_runs([a, b], None, tmp_path)
    assert out.name == "20260101T000000Z-x-merged"
    merged = RunDir(out)
    assert {(r.cell_id, r.repetition, r.is_done) for r in merged.reps()} == {
        ("c1", 0, True), ("c1", 1, True), ("c2", 0, True), ("c2", 1, False)}
    assert [c["cell_id"] for c in json.loads(merged.cells_file.read_text())] == ["c1", "c2"]
    assert json.loads((out / "host.json").read_text())["shards"] == [a.name, b.name]


def test_merge_prefers_a_done_copy_over_a_failed_one(tmp_path: Path):
    a = make_run(tmp_path, "a", "name: x\n", {("c1", 0): "failed"})
    b = make_run(tmp_path, "b", "name: x\n", {("c1", 0): "done"})
    out = merge_runs([a, b], tmp_path / "m", tmp_path)
    rep = RunDir(out).rep("c1", 0)
    assert rep.is_done and (rep.path / "netperf.txt").read_text() == "b\n"


def test_merge_refuses_overlapping_or_foreign_runs_and_leaves_nothing(tmp_path: Path):
    a = make_run(tmp_path, "a", "name: x\n", {("c1", 0): "done"})
    b = make_run(tmp_path, "b", "name: x\n", {("c1", 0): "done"})
    c = make_run(tmp_path, "c", "name: other\n", {("c9", 0): "done"})
    with pytest.raises(NetbedError, match="done in both"):
        merge_runs([a, b], tmp_path / "m1", tmp_path)
    with pytest.raises(NetbedError, match="different experiment file"):
        merge_runs([a, c], tmp_path / "m2", tmp_path)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merged_name_strips_shard_suffix():
    assert merged_name(["20260101T000000Z-full-shard3of8"]) == "20260101T000000Z-full-merged"


def test_merge_keeps_the_plain_repetitions_the_shards_ran(tmp_path: Path):
    a = make_run(tmp_path, "a", "name: x\n", {("c1", 0): "done", ("c1", 1): "failed"})
    b = make_run(tmp_path, "b", "name: x\n", {("c2", 0): "done", ("c2", 1): "done"})
    for run in (a, b):
        (run / "run.json").write_text(json.dumps({"shard": None, "plain_repetitions": 1}))
    out = merge_runs([a, b], tmp_path / "m", tmp_path)
    assert json.loads((out / "run.json").read_text())["plain_repetitions"] == 1
    old = merge_runs([make_run(tmp_path, "o", "name: x\n", {("c1", 0): "done"})],
                     tmp_path / "m2", tmp_path)  # shards from before: none recorded
    assert json.loads((old / "run.json").read_text())["plain_repetitions"] == 0
