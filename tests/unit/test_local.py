"""testbed.run.local: where a run folder is born, and how a resumed run finds its shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.build.beside import SideJob
from testbed.errors import NetbedError
from testbed.experiment.kernelfile import DEFAULT_KERNELS_FILE
from testbed.experiment.load import load_experiment
from testbed.experiment.matrix import expand
from testbed.experiment.policies import DEFAULT_POLICIES_FILE
from testbed.run import local
from testbed.run.local import open_run
from testbed.settings import Settings

CONFIG = """\
name: tiny
axes:
  kernel: [distro]
  nic: [e1000, virtio]
  cpus: [2]
  policy: [default, pin-same]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: 1
duration: 2
warmup: 0
"""


@pytest.fixture(autouse=True)
def host_builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    """A new run's up-front host work (apt, the image and plugin beside the kernels) is
    recorded, not done."""
    from testbed.run import local

    calls: dict[str, list[object]] = {"packages": [], "side": []}
    monkeypatch.setattr(local, "ensure_packages",
                        lambda packages, log=print: calls["packages"].append(packages))
    for name in ("image", "plugin"):
        monkeypatch.setattr(local, f"{name}_job", lambda s, log, name=name: SideJob(
            name, lambda: calls["side"].append(name)))
    monkeypatch.setattr(local, "find_built_named", lambda name, s, kernels=None: None)
    monkeypatch.setattr(local, "known_kvm_verdict", lambda s: None)  # not probed yet
    monkeypatch.setattr(local, "refresh_plugin_api", lambda facts, s: facts)
    return calls


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")


def test_a_new_run_carries_its_experiment_policies_shard_and_cells(tmp_path, settings):
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    run, _, cells = open_run(settings, config, None, (2, 2))
    assert run.path.parent == settings.results_dir and run.run_id.endswith("-tiny-shard2of2")
    assert run.experiment_file.read_text() == CONFIG
    assert run.policies_file.read_bytes() == DEFAULT_POLICIES_FILE.read_bytes()
    assert json.loads(run.meta_file.read_text()) == {
        "shard": [2, 2], "config": str(config),
        "kernels_file": str(DEFAULT_KERNELS_FILE.resolve())}
    assert 0 < len(cells) < 4  # a share of the 4 cells
    assert [c["cell_id"] for c in json.loads(run.cells_file.read_text())] == \
        [c.cell_id for c in cells]


def test_a_resumed_run_keeps_its_shard_and_cells_whatever_is_passed(tmp_path, settings):
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    run, _, cells = open_run(settings, config, None, (1, 2))
    config.write_text(CONFIG.replace("[e1000, virtio]", "[e1000]"))  # the file moved on
    again, exp, resumed = open_run(settings, None, run.run_id, None)
    assert again.path == run.path and exp.name == "tiny"
    assert [c.cell_id for c in resumed] == [c.cell_id for c in cells]
    latest, _, _ = open_run(settings, None, "latest", None)
    assert latest.path == run.path


def test_resuming_a_folder_that_is_not_a_run_says_so(tmp_path, settings):
    (settings.results_dir / "stray").mkdir(parents=True)
    with pytest.raises(NetbedError, match="not a netbed run"):
        open_run(settings, None, "stray", None)


def test_hardware_counters_on_a_host_without_pmu_are_refused_before_any_folder(
        tmp_path, settings, monkeypatch):
    from testbed.errors import ConfigError
    from testbed.run import local
    from tests.unit.test_provenance import facts

    config = tmp_path / "hw.yaml"
    config.write_text(CONFIG + "counters: [software, hardware]\n")
    monkeypatch.setattr(local, "gather",
                        lambda s, log=print, kernels=None: facts(accel="kvm", pmu=False))
    booted: list[object] = []
    monkeypatch.setattr(local, "ExperimentGuests", lambda *a, **k: booted.append(a))
    with pytest.raises(ConfigError, match="no core PMU") as e:
        local.run_matrix(settings, config, log=lambda m: None)
    assert "counters: [auto]" in (e.value.hint or "")
    assert not settings.results_dir.exists() or not any(settings.results_dir.iterdir())
    assert booted == []


@pytest.mark.parametrize(("accel", "expected"), [("tcg", 4 * 2), ("kvm", 4 * 1)])
def test_a_cache_model_run_schedules_plain_repetitions_and_a_resume_keeps_them(
        tmp_path, settings, monkeypatch, accel, expected):
    from testbed.run import local
    from testbed.run.loop import RunSummary
    from tests.unit.test_provenance import facts

    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)  # counters auto, plain_repetitions 1 by default
    monkeypatch.setattr(local, "gather",
                        lambda s, log=print, kernels=None: facts(accel=accel, pmu=False))
    seen: list[list[tuple[str, int]]] = []

    class Runner:
        def __init__(self, run, items, retries, collaborators, log, adaptive):
            seen.append([(c.cell_id, r) for c, r in items])
            self.run, self.plain = run, collaborators.plain

        def execute(self) -> RunSummary:
            return RunSummary(self.run.path, total=len(seen[-1]))

    monkeypatch.setattr(local, "MatrixRunner", Runner)
    lines: list[str] = []
    summary = local.run_matrix(settings, config, log=lines.append)
    assert len(seen[-1]) == expected
    if accel == "tcg":
        assert {r for _, r in seen[-1][4:]} == {1}  # rep-1 of every cell, after rep-0s
        assert any("1 repetitions + 1 plain (no plugin)" in line for line in lines)
    meta = json.loads((summary.run_dir / "run.json").read_text())
    assert meta["plain_repetitions"] == (1 if accel == "tcg" else 0)
    local.run_matrix(settings, None, resume=summary.run_dir.name, log=lines.append)
    assert seen[-1] == seen[0]  # the resumed run keeps its plan
    # a run from before plain repetitions (no key in run.json) resumes without them
    (summary.run_dir / "run.json").write_text(json.dumps({"shard": None, "config": "x"}))
    local.run_matrix(settings, None, resume=summary.run_dir.name, log=lines.append)
    assert len(seen[-1]) == 4


def test_a_session_builds_up_front_what_its_pending_repetitions_boot(
        tmp_path, settings, monkeypatch, host_builds):
    from testbed.run import local
    from testbed.run.loop import RunSummary
    from testbed.run.session import ExperimentGuests
    from testbed.vm.topology import AssetPlan
    from tests.unit.test_provenance import facts

    config = tmp_path / "two-kernels.yaml"
    config.write_text(CONFIG.replace("[distro]", "[patched, stock]"))
    asked: list[tuple[str, ...]] = []
    monkeypatch.setattr(local, "gather", lambda s, log=print, kernels=None: (
        asked.append(kernels), facts(accel="tcg", pmu=False))[1])
    prepared: list[object] = []
    monkeypatch.setattr(ExperimentGuests, "prepare", lambda self, plan: prepared.append(plan))

    class Runner:
        def __init__(self, run, items, retries, collaborators, log, adaptive):
            self.run, self.start = run, collaborators.start

        def execute(self) -> RunSummary:
            self.start()
            return RunSummary(self.run.path, total=0)

    monkeypatch.setattr(local, "MatrixRunner", Runner)
    monkeypatch.setattr(local, "netbed_commit", lambda: "0" * 40)
    built: list[list[str]] = []  # a new run builds every kernel before its folder exists
    monkeypatch.setattr(local, "build_kernels", lambda s, exp, cells, log: built.append(
        [c.kernel for c in cells]))
    summary = local.run_matrix(settings, config, log=lambda m: None)
    assert built and set(built[0]) == {"patched", "stock"}
    # one apt call for every build's packages first; the plugin is built beside them
    assert len(host_builds["packages"]) == 1
    packages = host_builds["packages"][0]
    assert isinstance(packages, dict)
    assert {"bison", "linux-source-6.1", "mmdebstrap", "libglib2.0-dev"} <= set(packages)
    assert host_builds["side"] == ["image", "plugin"]  # TCG: the model counts
    # the probe may boot one of them, not distro; in build order (unpatched first), so
    # it never builds patched from fresh source before stock's tree
    assert asked == [("stock", "patched")]
    assert prepared[-1] == AssetPlan(("patched", "stock"), plugin=True)
    assert (summary.run_dir / "timings.json").is_file()
    # a resume with every stock repetition done builds nothing for stock
    for rep in range(2):
        for cell in json.loads((summary.run_dir / "cells.json").read_text()):
            if cell["kernel"] == "stock":
                folder = summary.run_dir / "cells" / cell["cell_id"] / f"rep-{rep}"
                folder.mkdir(parents=True)
                (folder / "done").write_text("{}")
    local.run_matrix(settings, None, resume=summary.run_dir.name, log=lambda m: None)
    assert prepared[-1] == AssetPlan(("patched",), plugin=True)


def test_run_packages_name_each_build_s_packages_once():
    from testbed.build import kernel_build
    from testbed.build.cachemodel_plugin import BUILD_PACKAGES as PLUGIN
    from testbed.build.sysdeps import GUEST_PACKAGES
    from testbed.experiment.load import load_experiment
    from testbed.run.local import run_packages

    exp = load_experiment(Path(__file__).parents[2] / "configs/quick.yaml")
    boots_only = exp.model_copy(update={"counters": ["software"]})
    assert run_packages(boots_only, []) == GUEST_PACKAGES  # all built, no model: boots only
    everything = run_packages(exp, ["stock-6.12"])  # counters auto: the model may count
    assert set(kernel_build.BUILD_PACKAGES) | set(PLUGIN) <= set(everything)
    assert "linux-source-6.1" not in everything  # 6.12 is fetched, not installed
    assert run_packages(exp, ["patched"])["linux-source-6.1"] == \
        "/usr/src/linux-source-6.1.tar.xz"


@pytest.mark.parametrize(("known", "accel", "side"), [
    (None, "tcg", ["image", "plugin"]),   # not probed yet: the plugin from the start
    (None, "kvm", ["image", "plugin"]),   # (a KVM host builds it once for nothing)
    (False, "tcg", ["image", "plugin"]),  # known TCG: from the start, surely needed
    (True, "kvm", ["image"]),             # known KVM: auto gives hardware or software
])
def test_the_plugin_is_built_beside_when_the_model_may_count(
        tmp_path, settings, monkeypatch, host_builds, known, accel, side):
    from testbed.run import local
    from testbed.vm.hostfacts import KvmVerdict
    from tests.unit.test_provenance import facts

    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    verdict = None if known is None else KvmVerdict(known, "cached")
    monkeypatch.setattr(local, "known_kvm_verdict", lambda s: verdict)
    monkeypatch.setattr(local, "gather",
                        lambda s, log=print, kernels=None: facts(accel=accel, pmu=False))

    def opened(settings, config, resume, shard_spec, check):
        check(load_experiment(config))
        raise RuntimeError("stop after check_host")

    monkeypatch.setattr(local, "open_run", opened)
    with pytest.raises(RuntimeError, match="stop after check_host"):
        local.run_matrix(settings, config, log=lambda m: None)
    assert host_builds["side"] == side


def test_the_model_may_count_unless_kvm_is_known_to_work():
    from testbed.run.provenance import model_may_count

    assert model_may_count(["auto"], None) and model_may_count(["auto"], False)
    assert not model_may_count(["auto"], True)
    assert model_may_count(["cachemodel"], True)
    assert not model_may_count(["software"], None)
def test_a_run_builds_unpatched_kernels_before_patched_ones(tmp_path, settings, monkeypatch):
    """patched listed first still waits for stock: built after stock's tree it recompiles
    what its patch touches; before it, it would compile from fresh source, then stock too."""
    config = tmp_path / "two.yaml"
    config.write_text(CONFIG.replace("kernel: [distro]", "kernel: [patched, distro, stock]"))
    exp = load_experiment(config)
    built: list[str] = []
    monkeypatch.setattr(local, "ensure_built", lambda v, s, log, kernels: built.append(v.name))
    cells = sorted(expand(exp), key=lambda c: ("patched", "distro", "stock").index(c.kernel))
    local.build_kernels(settings, exp, cells, lambda m: None)
    assert built == ["stock", "patched"]
