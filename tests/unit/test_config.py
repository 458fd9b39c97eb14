"""Experiment YAML: every validation error (message and position), the models, shipped configs."""

from __future__ import annotations

import io
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from testbed.build import kernels
from testbed.errors import ConfigError, NetbedError
from testbed.experiment.config import (
    DEFAULT_MESSAGE_SIZE,
    Cell,
    Experiment,
    Workload,
)
from testbed.experiment.kernelfile import load_kernels
from testbed.experiment.load import (
    dump_experiment,
    experiment_from_dict,
    load_experiment,
    loads_experiment,
)
from testbed.experiment.matrix import expand
from testbed.experiment.policies import MAX_POLICY_NAME, load_policies
from testbed.experiment.yamlload import display_path
from testbed.run.folder import new_run_id
from testbed.runname import (
    MAX_NAME_BYTES,
    MAX_SHARDS,
    NAME_MAX,
    name_problem,
    run_folder_name,
)

# messages name kernels of tests/fixtures/configs/kernels/good.yaml (conftest.py)
pytestmark = pytest.mark.usefixtures("fixture_kernels")

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


def test_kernel_names_come_from_the_kernels_file() -> None:
    assert load_kernels().names == ["distro", "stock", "patched", "affine-copy"]
    kernels.check_kernel_name("stock")
    with pytest.raises(ConfigError, match=r"unknown kernel 'stok' \(.*good.yaml has: "
                                          r"stock, patched, affine-copy\)"):
        kernels.check_kernel_name("stok")


def test_defaults_and_source(policies) -> None:
    exp = load_experiment(FIXTURES / "good" / "minimal.yaml", policies)
    assert exp.name == "minimal"
    assert exp.source == FIXTURES / "good" / "minimal.yaml"
    assert exp.policies is policies
    assert (exp.order, exp.retries, exp.counters) == ("interleaved", 2, ["auto"])
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
    assert len(cells) == 12  # the study in small: 6 per NIC
    assert {c.nic for c in cells} == {"e1000", "virtio"}
    assert {c.kernel for c in cells} == {"patched"}
    # the locality contrast at a shallow and a deep queue, under bulk load, per NIC
    stream = {(c.nic, c.policy, c.rcvbuf) for c in cells if c.workload.name == "TCP_STREAM"}
    assert stream == {(n, p, r) for n in ("e1000", "virtio") for p in ("pin-same", "pin-cross")
                      for r in ("64K", "auto")}
    # the wake-up question under request/response
    assert {c.policy for c in cells if c.workload.name == "TCP_RR"} == {"default",
                                                                       "wake-local"}
    assert exp.repetitions >= 3 and exp.duration <= 10 and exp.counters == ["auto"]


def test_full_yaml_loads_and_expands() -> None:
    exp = load_experiment(REPO / "configs" / "full.yaml")
    cells = expand(exp)
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids))
    assert {c.kernel for c in cells} == {"distro", "stock", "patched", "affine-copy"}
    # the affine-copy kernel runs one pair of cells (included, not an axis value)
    assert sorted(c.policy for c in cells if c.kernel == "affine-copy") == ["affine-copy",
                                                                            "pin-irq"]
    assert {c.kernel for c in cells if c.policy == "affine-copy"} == {"affine-copy"}
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


# ------------------------------------------------------------------ refusals (issue #15)
#
# Every bad file is refused with a ConfigError at file:line:col naming the key and
# what is allowed; never a traceback, never a hang. Text cases are fixture files
# with their expected lines (`# expect:`); byte-level cases are generated below.

REFUSED = sorted((FIXTURES / "refused").glob("*.yaml"))
REFUSED_POLICIES = sorted((FIXTURES / "refused-policies").glob("*.yaml"))


def _normalized(message: str, path: Path) -> list[str]:
    """Message lines without the file's own path; other fixture paths as <fixtures>."""
    out = []
    for line in message.splitlines():
        line = re.sub(r"^.*?" + re.escape(path.name) + ":", "", line)
        for form in (str(FIXTURES.resolve()), display_path(FIXTURES)):
            line = line.replace(form, "<fixtures>")
        out.append(line)
    return out


def _expected_bytes(path: Path) -> list[str]:
    return [line.removeprefix(b"# expect: ").decode() for line in path.read_bytes().splitlines()
            if line.startswith(b"# expect: ")]


@pytest.mark.parametrize("path", REFUSED, ids=[p.stem for p in REFUSED])
def test_refused_experiment(path: Path) -> None:
    expected = _expected_bytes(path)
    assert expected, f"{path.name} has no '# expect:' lines"
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert _normalized(info.value.message, path) == expected
    assert len(str(info.value)) < 1000  # a few lines, never an echo of a huge value


@pytest.mark.parametrize("path", REFUSED_POLICIES, ids=[p.stem for p in REFUSED_POLICIES])
def test_refused_policies(path: Path) -> None:
    expected = _expected_bytes(path)
    assert expected, f"{path.name} has no '# expect:' lines"
    with pytest.raises(ConfigError) as info:
        load_policies(path)
    assert _normalized(info.value.message, path) == expected


def test_refusal_fixtures_cover_the_issue_cases() -> None:
    text = "\n".join("\n".join(_expected_bytes(p)) for p in REFUSED + REFUSED_POLICIES)
    for needle in ("true/false is not a number", "a number in quotes is text",
                   "is a mapping because of the space after ':'", "YAML 1.2 reads yes/no",
                   "use ASCII digits", "binary data (!!binary)", "on appears twice",
                   "limits: {cells: 115200}", "limits: {repetitions: 5000}",
                   "at most 222 fit in the run folder's name", "CPU numbers run from 0 to 1023",
                   "without control characters", "control character U+0007",
                   "the policies file named here", "is a directory, not a regular file",
                   "is a character device", "holds more than", "nested too deeply",
                   "a number of 5000 digits"):
        assert needle in text, needle


# Byte-level and file-type cases: (id, file bytes, expected message regex).
GENERATED = [
    ("utf16", "name: x\n".encode("utf-16"), r"x\.yaml:1:1: the file is UTF-16; save it as UTF-8"),
    ("latin1-comment", "name: x\n# caf\xe9\n".encode("latin-1"),
     r"x\.yaml:2:6: not UTF-8 text \(byte 0xE9\)"),
    ("random-bytes", bytes(range(256)) * 4, r"x\.yaml:\d+:\d+: (not UTF-8|control character)"),
    ("nul-bytes", b"\0" * 100, r"x\.yaml:1:1: control character U\+0000"),
    ("empty", b"", r"x\.yaml: empty experiment: nothing to run; see configs/quick\.yaml$"),
    ("comments-only", b"# nothing\n\n   # here\n",
     r"x\.yaml: empty experiment: nothing to run; see configs/quick\.yaml$"),
    ("too-big", b"description: " + b"a" * (2 << 20) + b"\n", r"x\.yaml: larger than 128 KiB"),
    ("deep-5000", b"axes: " + b"[" * 5000, r"x\.yaml:1:\d+: more than 200 unclosed"),
    ("deep-block", "\n".join(" " * i + f"k{i}:" for i in range(450)).encode(),
     r"x\.yaml(:\d+:\d+)?: nested"),
]


@pytest.mark.parametrize(("data", "pattern"), [g[1:] for g in GENERATED],
                         ids=[g[0] for g in GENERATED])
def test_refused_bytes(tmp_path: Path, data: bytes, pattern: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert re.search(pattern, info.value.message), info.value.message
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/", "fifo"])
def test_special_files_are_refused_without_reading(tmp_path: Path, special: str) -> None:
    path = Path(special)
    if special == "fifo":  # nobody writes it: reading would block forever
        path = tmp_path / "fifo.yaml"
        os.mkfifo(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_experiment(path)


def test_alias_bomb_under_x_key_is_never_expanded(tmp_path: Path) -> None:
    lines = ["x-a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"x-{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]"
              for i in range(8)]  # 9 levels x 9: 387 million leaves if expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join([*lines, "name: bomb"]) + "\n")
    assert load_experiment(path).name == "bomb"
    path.write_text("\n".join([*lines, "description: *i"]) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml:\d+:\d+: description\[0\].*holds more "
                       r"than 20000 values"):
        load_experiment(path)


def test_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"axes: {nic: [e1000]}\n")))
    exp = load_experiment(Path("-"))
    assert exp.name == "stdin" and exp.source_text == "axes: {nic: [e1000]}\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"axes: {nic: [e100]}\n")))
    with pytest.raises(ConfigError, match=r"^<stdin>:1:14: axes\.nic\[0\]: bad value 'e100'"):
        load_experiment(Path("-"))


def test_file_name_with_a_space_gives_a_valid_name(tmp_path: Path) -> None:
    path = tmp_path / "f17 my exp.yaml"
    path.write_text("axes: {nic: [e1000]}\n")
    exp = load_experiment(path)
    assert exp.name == "f17-my-exp"
    assert any("named 'f17-my-exp' after the file" in w for w in exp.warnings)


def test_exclude_that_matches_nothing_warns(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("axes:\n  nic: [e1000, virtio]\nexclude:\n  - {nic: virtio-nocsum}\n"
                    "  - {nic: virtio}\n")
    exp = load_experiment(path)
    assert [re.sub(r"^.*w\.yaml:", "", w) for w in exp.warnings] == [
        "4:5: warning: exclude[0]: matches no combination of the axes (a typo?)"]
    assert [c.nic for c in expand(exp)] == ["e1000"]


def test_tilde_policies_file_resolves_like_the_runner(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.yaml").write_text((FIXTURES / "policies" / "custom.yaml").read_text())
    exp_dir = tmp_path / "elsewhere"
    exp_dir.mkdir()
    path = exp_dir / "e.yaml"
    path.write_text("policies_file: ~/mine.yaml\naxes: {policy: [pin-last]}\n")
    exp = load_experiment(path)
    assert exp.policies_path == tmp_path / "mine.yaml"  # what run/loop.open_run copies
    assert exp.policies.names == ["default", "pin-last"]


def test_run_folder_names_fit_name_max() -> None:
    when = datetime(2026, 11, 29, 13, 0, 0, tzinfo=UTC)
    longest = "n" * MAX_NAME_BYTES
    assert name_problem(longest) is None and name_problem(longest + "n") is not None
    folder = run_folder_name(longest, when, (MAX_SHARDS, MAX_SHARDS))
    assert len(folder.encode()) == NAME_MAX
    assert folder.startswith("20261129T130000Z-n")
    with pytest.raises(NetbedError):
        run_folder_name("a b", when)
    assert new_run_id("quick", (2, 4)).endswith("-quick-shard2of4")
    # cell ids are folder names too: the longest possible one fits
    cell = Cell(kernel="patched", nic="virtio-nocsum", cpus=64, policy="p" * MAX_POLICY_NAME,
                workload="TCP_MAERTS:16777216", gro=False)
    assert len(cell.cell_id.encode()) <= NAME_MAX


@pytest.mark.parametrize("name", ["quick.yaml", "full.yaml"])
def test_shipped_configs_round_trip_through_dump(tmp_path: Path, name: str) -> None:
    exp = load_experiment(REPO / "configs" / name)
    again = loads_experiment(dump_experiment(exp), tmp_path / name, exp.policies)
    assert expand(again) == expand(exp)
    assert again.model_dump() == exp.model_dump()


@pytest.mark.process
def test_cli_refuses_with_status_2_and_no_traceback(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for args, stdin in ((["-c", str(fifo)], b""), (["-c", "-"], b"repetitions: true\n")):
        res = subprocess.run(["invoke", "run-matrix", *args, "--dry-run"], cwd=REPO,
                             input=stdin, capture_output=True, timeout=60)
        err = res.stderr.decode()
        assert res.returncode == 2, err
        assert "Traceback" not in err and err.startswith("netbed: error: "), err


def test_runner_opens_the_run_with_the_validated_text_and_policies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run/local.open_run keeps what validation read: the text, the resolved `~` path."""
    from testbed.run.local import open_run
    from testbed.settings import Settings

    monkeypatch.setenv("HOME", str(tmp_path))
    custom = FIXTURES / "policies" / "custom.yaml"
    (tmp_path / "mine.yaml").write_text(custom.read_text())
    text = "name: tilde\npolicies_file: ~/mine.yaml\naxes: {policy: [pin-last]}\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    run, exp, cells = open_run(Settings(results_dir=tmp_path / "results"), Path("-"), None,
                               (1, 1))
    assert run.experiment_file.read_text() == text
    assert (run.path / "policies.yaml").read_text() == custom.read_text()
    assert re.fullmatch(r"\d{8}T\d{6}Z-tilde-shard1of1", run.run_id)
    assert [c.policy for c in cells] == ["pin-last"] and exp.policies_path == tmp_path / "mine.yaml"


def test_many_problems_are_counted_not_all_printed(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text("axes:\n  cpus: [" + ", ".join(["0"] * 50) + "]\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    lines = info.value.message.splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 30 more problems"
