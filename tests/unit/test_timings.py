"""testbed.timings: the steps of a run in timings.json, and what a run builds up front
(testbed.vm.topology.plan_assets)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from testbed import timings
from testbed.experiment.config import Cell
from testbed.timings import Step, Timings, load_steps, recording
from testbed.vm.topology import AssetPlan, plan_assets, run_kernels


def fake_timings(step_s: float = 2.0) -> Timings:
    ticks = itertools.count(0.0, step_s)
    return Timings(clock=lambda: next(ticks), now=lambda: "2026-12-07T01:00:00+00:00")


def test_steps_before_the_run_folder_exists_are_written_when_it_is_attached(tmp_path: Path):
    t = fake_timings()
    with recording(t), timings.step("probe", "kvm") as note:
        note.detail = "booted stock"
    assert not (tmp_path / "timings.json").exists()
    t.attach(tmp_path / "timings.json")
    assert load_steps(tmp_path / "timings.json") == [
        Step("probe", "kvm", "2026-12-07T01:00:00+00:00", 2.0, "booted stock")]


def test_a_failing_step_is_recorded_as_not_ok_and_still_raises(tmp_path: Path):
    t = fake_timings()
    t.attach(tmp_path / "timings.json")
    with pytest.raises(RuntimeError), recording(t), timings.step("build", "image"):
        raise RuntimeError("mmdebstrap failed")
    (step,) = load_steps(tmp_path / "timings.json")
    assert step.name == "image" and not step.ok and step.seconds == 2.0


def test_outside_a_run_nothing_is_recorded():
    t = fake_timings()
    with timings.step("build", "image"):
        pass
    timings.record("build", "kernel stock", 300.0)
    assert t.steps == []


def test_a_resumed_run_keeps_the_steps_of_earlier_sessions(tmp_path: Path):
    path = tmp_path / "timings.json"
    first = fake_timings()
    first.attach(path)
    with recording(first):
        timings.record("build", "kernel stock", 360.0, "681 CPU-s")
    second = fake_timings()
    with recording(second), timings.step("probe", "kvm"):
        pass
    second.attach(path)
    with recording(second), timings.step("repetition", "cell rep 0"):
        pass
    steps = load_steps(path)
    assert [(s.name, s.session) for s in steps] == [
        ("kernel stock", 0), ("kvm", 1), ("cell rep 0", 1)]
    assert json.loads(path.read_text())["format"] == 1


def cell(kernel: str, nic: str = "e1000") -> Cell:
    return Cell(kernel=kernel, nic=nic, cpus=2, policy="default", workload="TCP_STREAM",
                gro=True)


def test_a_run_builds_the_kernels_of_its_pending_repetitions_in_first_use_order():
    items = [(cell("patched"), 0), (cell("stock"), 0), (cell("patched", "virtio"), 1)]
    assert plan_assets(items, cachemodel=True, is_plain=lambda r: False) == AssetPlan(
        ("patched", "stock"), plugin=True)
    assert run_kernels([c for c, _ in items]) == ("patched", "stock")


def test_the_plugin_is_built_only_when_an_instrumented_repetition_is_pending():
    items = [(cell("patched"), 3)]
    assert not plan_assets(items, cachemodel=True, is_plain=lambda r: r >= 3).plugin
    assert not plan_assets([(cell("patched"), 0)], cachemodel=False,
                           is_plain=lambda r: False).plugin
    assert plan_assets([], cachemodel=True, is_plain=lambda r: False) == AssetPlan((), False)
