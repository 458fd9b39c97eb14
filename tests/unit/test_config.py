"""Experiment YAML: every validation error (message and position), the models, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.build import kernels
from testbed.errors import ConfigError
from testbed.experiment.config import (
    DEFAULT_MESSAGE_SIZE,
    Cell,
    Experiment,
    Workload,
)
from testbed.experiment.load import experiment_from_dict, load_experiment
from testbed.experiment.matrix import expand
from testbed.experiment.policies import load_policies
from testbed.vocabulary import KERNEL_NAMES

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "configs"
REPO = Path(__file__).resolve().parent.parent.parent
BAD = sorted((FIXTURES / "bad").glob("*.yaml"))


@pytest.fixture(scope="module")
def policies():
    return load_policies(FIXTURES / "policies" / "good.yaml")


def _expected(path: Path) -> list[str]:
    """The fixture's `# expect: LINE:COL: path: message` header lines."""
    return [line.removeprefix("# expect: ") for line in path.read_text().splitlines()
            if line.startswith("# expect: ")]


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_file_reports_every_problem_at_its_line(path: Path, policies) -> None:
    expected = _expected(path)
    assert expected, f"{path.name} has no '# expect:' lines"
    with pytest.raises(ConfigError) as info:
        load_experiment(path, policies)
    lines = info.value.message.splitlines()
    # one line per problem, each starting with the file it is about
    for line in lines:
        assert re.match(r"^.*" + re.escape(path.name) + r":\d+:\d+: ", line), line
    got = [re.sub(r"^.*?\.yaml:", "", line) for line in lines]
    assert got == expected


def test_bad_files_cover_the_issue_cases() -> None:
    text = "\n".join("\n".join(_expected(p)) for p in BAD)
    for needle in ("unknown key", "bad value", "unknown policy", "needs kernel patched",
                   "needs at least 2 CPUs", "YAML syntax error", "(allowed: "):
        assert needle in text


def test_errors_are_sorted_by_line(policies) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(FIXTURES / "bad" / "bad-values.yaml", policies)
    positions = [tuple(int(x) for x in re.search(r"\.yaml:(\d+):(\d+):", ln).groups())
                 for ln in str(info.value).splitlines()]
    assert positions == sorted(positions)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_experiment(tmp_path / "nope.yaml")


def test_policy_and_schema_problems_are_reported_together(
        tmp_path: Path, policies) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("axes:\n  policy: [default, pin-same]\n  nic: [e100]\n")
    only_default = load_policies(FIXTURES / "policies" / "custom.yaml")
    with pytest.raises(ConfigError) as info:
        load_experiment(cfg, only_default)
    lines = str(info.value).splitlines()
    assert len(lines) == 2  # policy and nic problems together, not one after the other
    assert lines[0].endswith("exp.yaml:2:21: axes.policy[1]: unknown policy 'pin-same' "
                             "(allowed: default, pin-last); did you mean 'pin-last'?")
    assert "3:9: axes.nic[0]: bad value 'e100'" in lines[1]


# ------------------------------------------------------------------ models


@pytest.mark.parametrize(("text", "name", "size"), [
    ("TCP_STREAM", "TCP_STREAM", 16384),
    ("TCP_MAERTS", "TCP_MAERTS", 16384),
    ("TCP_RR", "TCP_RR", 1),
    ("TCP_RR:64", "TCP_RR", 64),
    ({"name": "TCP_STREAM", "message_size": 1448}, "TCP_STREAM", 1448),
    ({"name": "TCP_RR"}, "TCP_RR", 1),
])
def test_workload_forms(text, name: str, size: int) -> None:
    w = Workload.model_validate(text)
    assert (w.name, w.message_size) == (name, size)
    assert w.id == f"{name}-{size}"


def test_default_sizes_cover_every_workload() -> None:
    assert set(DEFAULT_MESSAGE_SIZE) == {"TCP_STREAM", "TCP_MAERTS", "TCP_RR"}


def test_cell_id_is_readable_and_stable() -> None:
    cell = Cell(kernel="distro", nic="e1000", cpus=2, policy="pin-same",
                workload="TCP_STREAM", gro="on")
    assert cell.cell_id == "distro-e1000-c2-pin-same-TCP_STREAM-16384-gro_on"
    off = cell.model_copy(update={"gro": False})
    assert off.cell_id.endswith("-gro_off")


def test_cell_round_trips_through_json() -> None:
    cell = Cell(kernel="patched", nic="virtio-nocsum", cpus=4, policy="wake-local",
                workload="TCP_RR:64", gro=False)
    again = Cell.model_validate_json(cell.model_dump_json())
    assert again == cell and again.cell_id == cell.cell_id
    assert cell.flat()["message_size"] == 64


def test_models_are_frozen_and_strict() -> None:
    cell = Cell(kernel="distro", nic="virtio", cpus=1, policy="default",
                workload="TCP_RR", gro=True)
    with pytest.raises(Exception, match="frozen"):
        cell.cpus = 2  # type: ignore[misc]
    with pytest.raises(Exception, match="Extra inputs"):
        Cell(kernel="distro", nic="virtio", cpus=1, policy="default", workload="TCP_RR",
             gro=True, colour="red")


def test_kernel_names_match_the_kernels_module() -> None:
    assert tuple(KERNEL_NAMES) == tuple(kernels.KERNEL_NAMES)
    assert set(Cell.model_fields["kernel"].annotation.__args__) == set(kernels.KERNEL_NAMES)


def test_defaults_and_source(policies) -> None:
    exp = load_experiment(FIXTURES / "good" / "minimal.yaml", policies)
    assert exp.name == "minimal"
    assert exp.source == FIXTURES / "good" / "minimal.yaml"
    assert exp.policies is policies
    assert (exp.order, exp.retries, exp.counters) == ("interleaved", 2, ["software"])
    assert [c.cell_id for c in expand(exp)] == [
        "distro-virtio-c2-default-TCP_STREAM-16384-gro_on"]


def test_policies_file_is_relative_to_the_experiment() -> None:
    exp = load_experiment(FIXTURES / "good" / "custom-policies.yaml")
    assert exp.policies.names == ["default", "pin-last"]
    assert [c.policy for c in expand(exp)] == ["default", "pin-last"]


def test_scalar_axis_and_gro_words(policies) -> None:
    exp = experiment_from_dict({"name": "x", "axes": {"nic": "e1000", "gro": ["on", "off"]}},
                               policies)
    assert exp.axes.nic == ["e1000"]
    assert exp.axes.gro == [True, False]


def test_experiment_from_dict_checks_policies(policies) -> None:
    with pytest.raises(ConfigError, match=r"axes\.policy\[0\]: unknown policy 'nope'"):
        experiment_from_dict({"name": "x", "axes": {"policy": ["nope"]}}, policies)


def test_experiment_dump_is_loadable_again(policies) -> None:
    exp = load_experiment(FIXTURES / "good" / "include-exclude.yaml", policies)
    again = Experiment.model_validate(exp.model_dump())
    assert expand(again) == expand(exp)


# ------------------------------------------------------------------ shipped configs


def test_quick_yaml_loads_and_expands() -> None:
    exp = load_experiment(REPO / "configs" / "quick.yaml")
    cells = expand(exp)
    assert len(cells) == 8
    assert {c.nic for c in cells} == {"e1000", "virtio"}
    assert {c.policy for c in cells} == {"default", "pin-same", "pin-cross", "rfs"}
    assert exp.repetitions == 2 and exp.duration <= 10


def test_full_yaml_loads_and_expands() -> None:
    exp = load_experiment(REPO / "configs" / "full.yaml")
    cells = expand(exp)
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids))
    assert {c.kernel for c in cells} == {"distro", "stock", "patched"}
    assert {c.cpus for c in cells} == {1, 2, 4}
    assert {c.workload.name for c in cells} == {"TCP_STREAM", "TCP_MAERTS", "TCP_RR"}
    assert {c.kernel for c in cells if c.policy == "wake-local"} == {"patched"}
    assert not [c for c in cells if c.cpus == 1 and c.policy in ("pin-cross", "rps", "rfs")]
    assert all(re.match(r"^[A-Za-z0-9_.-]+$", i) for i in ids)
    assert exp.repetitions == 5 and exp.order == "interleaved"


def test_x_keys_hold_anchors(policies) -> None:
    exp = load_experiment(FIXTURES / "good" / "anchors.yaml", policies)
    assert exp.axes.nic == ["e1000", "virtio"] and exp.axes.policy == ["default", "pin-same"]
    assert len(expand(exp)) == 4


def test_missing_policies_file_points_at_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: x\npolicies_file: nope.yaml\n")
    with pytest.raises(ConfigError,
                       match=r"exp\.yaml:2:16: policies_file: .*nope\.yaml: no such file"):
        load_experiment(cfg)
