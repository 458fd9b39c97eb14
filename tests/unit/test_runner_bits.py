"""Pure parts of the runner: the measured-window script, fault specs, summaries, ETA, merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.experiment.config import experiment_from_dict
from testbed.experiment.policies import load_policies
from testbed.progress import eta_seconds, fmt_seconds
from testbed.run.folder import RunDir
from testbed.run.loop import Fault, RunSummary, summary_text
from testbed.run.merge import merge_runs, merged_name


def experiment(**over):
    data = {"name": "t", "axes": {"kernel": ["distro"], "nic": ["e1000"], "cpus": [2],
                                  "policy": ["default"], "workload": ["TCP_STREAM"],
                                  "gro": ["on"]},
            "repetitions": 1, "duration": 3, "warmup": 0, **over}
    return experiment_from_dict(data, load_policies())


@pytest.mark.parametrize("text", ["crash:x", "hang:", "hang", "x"])
def test_bad_fault_specs_are_rejected(text):
    with pytest.raises(NetbedError, match="hang:<cell-id>"):
        Fault.parse(text)


def test_fault_spec_parses():
    assert Fault.parse("hang:cell-a") == Fault("cell-a", "hang")
    assert Fault.parse(None) is None


def test_summary_lists_failures():
    s = RunSummary(Path("/r"), total=4, done=2, skipped=1, failed=[("c1", 0, "boom")])
    text = summary_text(s, 12.3)
    assert "4 total, 2 run now, 1 already done, 1 failed" in text
    assert "c1 rep 0: boom" in text and not s.ok


def test_eta_from_pace():
    assert eta_seconds(0, 10, 5) is None
    assert eta_seconds(2, 10.0, 3) == 15.0
    assert fmt_seconds(None) == "?" and fmt_seconds(75) == "1m15s" and fmt_seconds(3700) == "1h01m"


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
