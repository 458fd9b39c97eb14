"""testbed.run.provenance: versions.json written in one place, the guest PMU believed only
when the guest shows one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.build.images import GuestImage
from testbed.build.kernel import Kernel
from testbed.errors import ConfigError
from testbed.run.folder import RunDir
from testbed.run.provenance import (
    Provenance,
    counter_plan,
    guest_pmu_verdict,
    netbed_commit,
)
from testbed.shell import Result
from testbed.vm.guest import KeyPair
from testbed.vm.hostfacts import HostFacts, KvmVerdict
from testbed.vm.topology import Assets


class FakeShell:
    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs
        self.commands: list[str] = []

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        self.commands.append(command)
        return Result(command, 0, self.outputs.get(command.split()[0] + " " +
                                                   command.split()[1], ""), "")


def facts(accel: str = "kvm", pmu: bool = True) -> HostFacts:
    return HostFacts(hostname="h", kernel="6.1", cpu_model="x", cores=2, memory_gib=8.0,
                     free_disk_gib=10.0, qemu_binary="qemu", qemu_version="7.2",
                     qemu_plugins=True, kvm_device=True, kvm_modules=["kvm"],
                     kvm=KvmVerdict(accel == "kvm", "probe booted"), accel=accel, pmu=pmu,
                     pmu_detail="core PMU: cpu", root=True, taps=True, taps_detail="root")


def versions(run: RunDir) -> dict[str, object]:
    return json.loads(run.versions_file.read_text())


def test_pmu_verdict_names_the_core_pmu_or_what_there_is():
    assert guest_pmu_verdict(["breakpoint", "cpu", "software"]) == (True, "guest core PMU: cpu")
    ok, why = guest_pmu_verdict(["software", "tracepoint"])
    assert not ok and "software, tracepoint" in why and "software events only" in why


def test_hardware_counters_are_valid_only_with_kvm_a_host_pmu_and_a_guest_pmu(tmp_path: Path):
    run = RunDir(tmp_path)
    prov = Provenance(run, ["software", "hardware"], log=lambda m: None)
    prov.record_host(facts(), "abc")
    assert versions(run)["hardware_counters_valid"] is True
    prov.check_guest_pmu(FakeShell({"ls /sys/bus/event_source/devices": "software\n"}))
    v = versions(run)
    assert v["hardware_counters_valid"] is False and v["pmu_in_guest"] is False
    assert "no core PMU in the guest" in v["pmu_detail"] and not prov.pmu
    assert json.loads(run.host_file.read_text())["hostname"] == "h"


def test_under_tcg_the_guest_is_not_even_asked(tmp_path: Path):
    prov = Provenance(RunDir(tmp_path), ["auto"], log=lambda m: None)
    prov.record_host(facts(accel="tcg"), "abc")
    shell = FakeShell({})
    prov.check_guest_pmu(shell)
    assert shell.commands == [] and versions(RunDir(tmp_path))["pmu_in_guest"] is False


def test_the_first_data_plane_is_kept(tmp_path: Path):
    prov = Provenance(RunDir(tmp_path), ["software"], log=lambda m: None)
    prov.record_host(facts(), "abc")
    prov.record_dataplane("tap: root")
    prov.record_dataplane("socket: later")
    assert versions(RunDir(tmp_path))["dataplane"] == "tap: root"


def test_commit_is_marked_dirty_when_tracked_files_changed():
    clean = FakeShell({"git rev-parse": "0123abc\n"})
    assert netbed_commit(clean) == "0123abc"
    dirty = FakeShell({"git rev-parse": "0123abc\n", "git status": " M tasks.py\n"})
    assert netbed_commit(dirty) == "0123abc-dirty"
    assert netbed_commit(FakeShell({})) == "unknown"


@pytest.mark.parametrize("accel,pmu,source,cachemodel,hardware", [
    ("tcg", False, "cachemodel", True, False),
    ("tcg", True, "cachemodel", True, False),
    ("kvm", True, "hardware", False, True),
    ("kvm", False, "software", False, False),
])
def test_auto_picks_the_cache_source_from_the_host(accel, pmu, source, cachemodel, hardware):
    plan = counter_plan(["auto"], accel, pmu)
    assert (plan.cache_source, plan.cachemodel, plan.hardware, plan.force_tcg) == \
        (source, cachemodel, hardware, False)
    assert plan.notes and "auto" in plan.notes[0]
    if source == "software":
        assert "needs TCG" in plan.notes[0]


@pytest.mark.parametrize("accel,pmu,why", [("tcg", True, "TCG"), ("kvm", False, "no core PMU")])
def test_hardware_without_a_pmu_is_refused_with_auto_as_the_fix(accel, pmu, why):
    with pytest.raises(ConfigError, match=why) as e:
        counter_plan(["software", "hardware"], accel, pmu)
    assert "counters: [auto]" in (e.value.hint or "")


def test_cachemodel_on_kvm_forces_tcg_and_says_so():
    plan = counter_plan(["cachemodel"], "kvm", True)
    assert plan.force_tcg and plan.cachemodel and plan.cache_source == "cachemodel"
    assert any("under TCG" in n for n in plan.notes)
    assert not counter_plan(["cachemodel"], "tcg", False).force_tcg


def test_auto_mixed_with_a_source_is_refused():
    with pytest.raises(ConfigError, match="auto"):
        counter_plan(["auto", "software"], "tcg", False)


def test_versions_say_where_cache_numbers_come_from(tmp_path: Path):
    run = RunDir(tmp_path)
    notes: list[str] = []
    prov = Provenance(run, ["auto"], log=notes.append)
    prov.record_host(facts(accel="kvm", pmu=True), "abc")
    assert versions(run)["counters"]["cache_source"] == "hardware"
    prov.check_guest_pmu(FakeShell({"ls /sys/bus/event_source/devices": "software\n"}))
    c = versions(run)["counters"]
    assert c["cache_source"] == "software" and not c["hardware"]
    assert "no core PMU in the guest" in c["notes"][-1] and notes


def test_cachemodel_forced_on_kvm_is_recorded_as_tcg(tmp_path: Path):
    run = RunDir(tmp_path)
    Provenance(run, ["cachemodel"], log=lambda m: None).record_host(facts(), "abc")
    v = versions(run)
    assert v["accel"] == "tcg" and "cachemodel" in v["accel_reason"]
    assert v["counters"]["force_tcg"] is True


def test_placement_is_recorded_in_versions_and_host(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    prov = Provenance(run, ["software"], lambda m: None)
    prov.record_host(facts("tcg", pmu=False), "abc")
    record = {"mode": "disjoint", "host_cpus": [0, 1], "note": "receiver on 0; sender on 1",
              "guests": {"receiver": "0", "sender": "1"},
              "threads": {"receiver": {"CPU 0/TCG": "0", "qemu-system-x86": "0"}}}
    prov.record_placement(record)
    assert versions(run)["placement"] == record
    host = json.loads(run.host_file.read_text())
    assert host["placement"]["guests"] == {"receiver": "0", "sender": "1"}
    assert "threads" not in host["placement"] and host["hostname"] == "h"
    prov.record_placement({})  # a lone guest without placement changes nothing
    assert versions(run)["placement"] == record


def assets(tmp_path: Path, qemu_version: str | None = "7.2.22") -> Assets:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"packages": {"netperf": "2.7.0"}}))
    return Assets(Kernel("patched", tmp_path / "bzImage", "6.1.192-netbed-wakelocal"),
                  GuestImage("img", tmp_path / "rootfs.cpio", "ssh-ed25519 AAAA", manifest),
                  tmp_path / "rootfs.cpio", KeyPair(tmp_path / "id", "AAAA"), "tcg",
                  "tcg requested", "qemu-system-x86_64", qemu_version)


def test_the_qemu_version_is_the_one_of_the_qemu_the_guests_booted_with(tmp_path: Path):
    # host facts gathered before QEMU was installed said nothing about it
    run = RunDir(tmp_path)
    prov = Provenance(run, ["auto"], log=lambda m: None)
    before = replace(facts(accel="tcg"), qemu_version=None, qemu_binary="qemu-system-x86_64",
                     kvm=KvmVerdict(False, "QEMU is not installed"))
    prov.record_host(before, "abc")
    assert versions(run)["qemu_version"] is None
    prov.record_assets("patched", assets(tmp_path))
    assert versions(run)["qemu_version"] == "7.2.22"
    assert versions(run)["qemu_binary"] == "qemu-system-x86_64"
    host = json.loads(run.host_file.read_text())
    assert host["qemu_version"] == "7.2.22" and host["hostname"] == "h"


def test_a_backport_qemu_is_named_with_its_own_binary(tmp_path: Path):
    run = RunDir(tmp_path)
    prov = Provenance(run, ["auto"], log=lambda m: None)
    prov.record_host(facts(accel="tcg"), "abc")
    used = replace(assets(tmp_path, "10.0.2"), qemu_binary="/c/qemu/usr/bin/qemu-system-x86_64")
    prov.record_assets("patched", used)
    assert versions(run)["qemu_version"] == "10.0.2"
    assert json.loads(run.host_file.read_text())["qemu_binary"] == used.qemu_binary
