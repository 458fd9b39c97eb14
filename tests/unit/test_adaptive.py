"""Adaptive repetitions: the stopping rule on synthetic data, the loop's rounds with fake
guests (which cells get more, why each stopped, resume), config forms and the schedule."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.experiment.config import Cell
from testbed.experiment.load import experiment_from_dict
from testbed.experiment.matrix import cells_table, estimate_seconds, expand, round_order, schedule
from testbed.experiment.policies import load_policies
from testbed.run.adaptive import Rule, cv, decide, metric_value
from testbed.run.folder import RepDir, RunDir
from testbed.run.local import adaptive_plan
from testbed.run.loop import Collaborators, MatrixRunner

RULE = Rule(min=5, max=8, target_cv=0.05)


def test_cv_is_sample_sd_over_mean() -> None:
    assert cv([100.0, 100.0, 100.0]) == 0.0
    assert cv([90.0, 110.0]) == pytest.approx(14.142135 / 100, rel=1e-6)
    assert cv([1.0]) is None and cv([]) is None and cv([-1.0, 1.0]) is None
    assert cv([100.0, float("nan"), 100.0]) == 0.0


def test_a_steady_cell_stops_at_min_within_target() -> None:
    s = decide(RULE, "c", 5, [100, 101, 99, 100, 100], "throughput")
    assert s.reason == "within-target" and s.cv is not None and s.cv < 0.05


def test_before_min_nothing_stops_even_if_steady() -> None:
    assert decide(RULE, "c", 4, [100, 100, 100, 100], "throughput").reason is None


def test_a_noisy_cell_goes_on_until_max() -> None:
    noisy = [100, 150, 80, 130, 60]
    assert decide(RULE, "c", 5, noisy, "throughput").reason is None
    assert decide(RULE, "c", 8, [*noisy, 120, 70, 140], "throughput").reason == "max-reached"


def test_failed_repetitions_count_as_attempts_but_give_no_value() -> None:
    # 5 attempts, 4 values: cannot claim the target on fewer than min values
    assert decide(RULE, "c", 5, [100, 100, 100, 100], "throughput").reason is None
    assert decide(RULE, "c", 8, [100, 100, 100, 100], "throughput").reason == "max-reached"


def test_stopping_rule_on_synthetic_noise() -> None:
    """Cells with 1% noise stop at min; cells with 20% noise almost always run to max."""
    rng = random.Random(7)
    quiet = [[rng.gauss(1000, 10) for _ in range(5)] for _ in range(50)]
    loud = [[rng.gauss(1000, 200) for _ in range(8)] for _ in range(50)]
    assert all(decide(RULE, "q", 5, v, "m").reason == "within-target" for v in quiet)
    reached_max = sum(decide(RULE, "l", 5, v[:5], "m").reason is None
                      and decide(RULE, "l", 8, v, "m").reason == "max-reached" for v in loud)
    assert reached_max >= 45


def test_metric_value_prefers_the_window_then_netperf() -> None:
    assert metric_value({"throughput": 900.0, "window.throughput": 880.0}, None) == \
        ("window.throughput", 880.0)
    assert metric_value({"throughput": 900.0}, None) == ("throughput", 900.0)
    assert metric_value({"throughput": 900.0}, "window.throughput") == \
        ("window.throughput", None)
    assert metric_value({"throughput": None}, None) == ("throughput", None)
    assert metric_value({"throughput": True}, None) == ("throughput", None)


def experiment(reps: object, nics: list[str] | None = None, order: str = "interleaved"):
    return experiment_from_dict({
        "name": "t", "axes": {"nic": nics or ["e1000", "virtio"], "cpus": [2]},
        "repetitions": reps, "duration": 3, "warmup": 0, "order": order, "retries": 0},
        load_policies())


def test_plain_repetitions_keep_working() -> None:
    exp = experiment(3)
    assert exp.adaptive is None and exp.min_repetitions == exp.max_repetitions == 3
    assert adaptive_plan(exp, expand(exp)) is None


def test_adaptive_form_schedules_min_and_estimates_with_max() -> None:
    exp = experiment({"min": 5, "max": 12, "target_cv": 0.05, "metric": "window.throughput"})
    cells = expand(exp)
    assert len(schedule(exp, cells)) == 5 * len(cells)
    assert len(schedule(exp, cells, exp.max_repetitions)) == 12 * len(cells)
    fixed12 = experiment(12)
    assert estimate_seconds(exp, cells) == estimate_seconds(fixed12, cells)
    assert "at most 26 runs" in cells_table(exp, cells)  # + 1 plain per cell (auto)


@pytest.mark.parametrize("bad", [{"min": 4}, {"min": 6, "max": 5}, {"target_cv": 0},
                                 {"target_cv": 1.5}, {"mx": 9}, {"target_cv": True}, 0])
def test_bad_adaptive_forms_are_refused(bad: object) -> None:
    with pytest.raises((ConfigError, ValueError)):
        experiment(bad)


def test_random_rounds_continue_the_seeded_stream() -> None:
    exp = experiment({"min": 5, "max": 9}, nics=["e1000", "virtio", "virtio-nocsum"],
                     order="random")
    cells = expand(exp)
    sched = schedule(exp, cells, 9)
    for r in range(9):
        assert [c for c, rr in sched if rr == r] == round_order(exp, cells, r)


class Noisy:
    """Fake guests whose throughput per cell comes from a list (e1000 noisy, virtio steady)."""

    def __init__(self, series: dict[str, list[float]], fail: set[tuple[str, int]] = frozenset()):
        self.series = {k: list(v) for k, v in series.items()}
        self.fail = set(fail)
        self.measured: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def boot(self, cell: Cell, plain: bool = False) -> Iterator[str]:
        yield cell.nic + (" plain" if plain else "")

    def measure(self, guest: str, cell: Cell, rep: RepDir) -> dict[str, object]:
        self.measured.append((cell.nic, rep.repetition))
        if (cell.nic, rep.repetition) in self.fail:
            raise OSError("guest went away")
        return {"throughput": self.series[cell.nic][rep.repetition], "units": "Mbit/s"}


def run_adaptive(tmp_path: Path, world: Noisy, exp) -> tuple[RunDir, dict]:
    run = RunDir(tmp_path / "run")
    run.path.mkdir(exist_ok=True)
    cells = expand(exp)
    runner = MatrixRunner(run, schedule(exp, cells), exp.retries,
                          Collaborators(boot=world.boot, measure=world.measure),
                          lambda _: None, adaptive_plan(exp, cells))
    runner.execute()
    return run, json.loads((run.path / "stopping.json").read_text())


STEADY = [1000.0] * 8
NOISY = [1000.0, 1500.0, 700.0, 1300.0, 600.0, 1000.0, 1000.0, 1000.0]


def test_loop_adds_rounds_only_for_cells_above_target(tmp_path: Path) -> None:
    exp = experiment({"min": 5, "max": 8, "target_cv": 0.05})
    world = Noisy({"e1000": NOISY, "virtio": STEADY})
    _, stopping = run_adaptive(tmp_path, world, exp)
    assert [r for nic, r in world.measured if nic == "virtio"] == [0, 1, 2, 3, 4]
    assert [r for nic, r in world.measured if nic == "e1000"] == list(range(8))
    cells = stopping["cells"]
    by_nic = {c.split("-")[1]: v for c, v in cells.items()}
    assert by_nic["virtio"]["reason"] == "within-target" and by_nic["virtio"]["repetitions"] == 5
    assert by_nic["e1000"]["reason"] == "max-reached" and by_nic["e1000"]["repetitions"] == 8
    assert "optional stopping" in stopping["note"].lower() or "Stopping" in stopping["note"]


def test_a_cell_that_settles_stops_before_max(tmp_path: Path) -> None:
    settles = [1000.0, 1150.0, 1000.0, 1000.0, 1000.0] + [1000.0] * 40
    exp = experiment({"min": 5, "max": 12, "target_cv": 0.05}, nics=["e1000"])
    world = Noisy({"e1000": settles})
    _, stopping = run_adaptive(tmp_path, world, exp)
    (only,) = stopping["cells"].values()
    assert only["reason"] == "within-target" and 5 < only["repetitions"] < 12
    assert only["cv"] <= 0.05


def test_resume_takes_the_same_decisions(tmp_path: Path) -> None:
    exp = experiment({"min": 5, "max": 8, "target_cv": 0.05})
    first = Noisy({"e1000": NOISY, "virtio": STEADY}, fail={("e1000", 6)})
    run, _ = run_adaptive(tmp_path, first, exp)
    # the failed repetition is redone on resume; nothing else runs again
    (run.rep(next(c.cell_id for c in expand(exp) if c.nic == "e1000"), 6).path / "failed") \
        .unlink()
    again = Noisy({"e1000": NOISY, "virtio": STEADY})
    _, stopping = run_adaptive(tmp_path, again, exp)
    assert again.measured == [("e1000", 6)]
    assert sorted(v["repetitions"] for v in stopping["cells"].values()) == [5, 8]


def test_a_metric_never_recorded_runs_to_max_and_says_so(tmp_path: Path) -> None:
    exp = experiment({"min": 5, "max": 6, "metric": "window.throughput"}, nics=["e1000"])
    world = Noisy({"e1000": STEADY})
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    cells = expand(exp)
    lines: list[str] = []
    MatrixRunner(run, schedule(exp, cells), 0, Collaborators(boot=world.boot,
                 measure=world.measure), lines.append, adaptive_plan(exp, cells)).execute()
    stopping = json.loads((run.path / "stopping.json").read_text())
    (only,) = stopping["cells"].values()
    assert only["reason"] == "max-reached" and only["cv"] is None and only["values"] == 0
    assert any("no repetition recorded the metric window.throughput" in x for x in lines)
