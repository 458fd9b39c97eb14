"""testbed.vm.hostfacts: choosing the accelerator, the probe guest's command line, which
kernel the probe boots and its verdict cached per host, KVM module and QEMU."""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from testbed.build.kernel import Kernel
from testbed.build.qemu_backport import system_qemu
from testbed.errors import NetbedError
from testbed.settings import Settings
from testbed.vm import hostfacts
from testbed.vm.cachemodel import micro_argv
from testbed.vm.hostfacts import (
    KvmVerdict,
    ProbeEffects,
    ProbeKey,
    choose_accel,
    choose_probe_kernel,
    probe_argv,
    probe_cache_file,
    probe_kvm,
    stored_verdict,
    verdict_record,
)


def test_auto_falls_back_to_tcg_and_says_why():
    accel, why = choose_accel("auto", KvmVerdict(False, "a stock kernel did not boot"))
    assert accel == "tcg" and why == "TCG, because a stock kernel did not boot"


def test_auto_takes_kvm_when_probe_booted():
    assert choose_accel("auto", KvmVerdict(True, "booted in 1.0 s", 1.0))[0] == "kvm"


def test_kvm_requested_but_unusable_is_an_error_with_a_fix():
    with pytest.raises(NetbedError, match="use --accel tcg"):
        choose_accel("kvm", KvmVerdict(False, "hangs"))


def test_probe_and_micro_guests_share_the_experiment_guests_argv_builder():
    probe = probe_argv("qemu", Path("/k"), Path("/i"), "kvm", Path("/c.log"))
    micro = micro_argv("qemu", Path("/k"), Path("/i"), 2, "single")
    for argv in (probe, micro):
        assert argv[argv.index("-machine") + 1] == "q35"
        assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert probe[probe.index("-accel") + 1] == "kvm" and probe[probe.index("-smp") + 1] == "1"
    assert "file,id=console,path=/c.log" in probe
    assert micro[micro.index("-serial") + 1] == "stdio"
    assert micro[micro.index("-accel") + 1] == "tcg,thread=single"


# ---- the probe: which kernel it boots, and its verdict cached per host + KVM + QEMU

KEY = ProbeKey("6.12.0-host", ("kvm", "kvm_pvm"), "qemu-system-x86_64", "7.2.22")


@dataclass
class FakeHost:
    """Records what the probe asked for: kernels fetched/built and probe boots."""

    key: ProbeKey = KEY
    cached: tuple[str, ...] = ()
    boots_ok: bool = False
    problem: str | None = None
    fetched: list[str] = field(default_factory=list)
    booted: list[str] = field(default_factory=list)

    def effects(self) -> ProbeEffects:
        def kernel(name: str, settings: Settings, log: object) -> Kernel:
            self.fetched.append(name)
            return Kernel(name, Path(f"/k/{name}"), f"6.1-{name}")

        def boot(settings: Settings, k: Kernel, log: object) -> KvmVerdict:
            self.booted.append(k.name)
            return (KvmVerdict(True, "booted in 0.4 s", 0.4, f"{k.name} {k.release}", "t")
                    if self.boots_ok else
                    KvmVerdict(False, "did not boot within 25 s", None, f"{k.name}", "t"))

        return ProbeEffects(device_problem=lambda: self.problem, key=lambda s: self.key,
                            kernel_cached=lambda name, s: name in self.cached,
                            kernel=kernel, boot=boot)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    # the host's QEMU: the default (the backport) would be downloaded
    return Settings(cache_dir=tmp_path / "cache", results_dir=tmp_path / "results",
                    qemu="system")


def quiet(msg: str) -> None:
    pass


def test_a_run_probes_with_its_own_kernel_not_a_downloaded_one(settings):
    host = FakeHost()
    verdict = probe_kvm(settings, quiet, kernels=("patched",), effects=host.effects())
    assert host.fetched == ["patched"] and host.booted == ["patched"]
    assert not verdict.usable and not verdict.cached


def test_the_probe_prefers_a_run_kernel_that_is_already_built():
    cached = {"stock"}
    assert choose_probe_kernel(("patched", "stock"), cached.__contains__) == "stock"
    assert choose_probe_kernel(("patched", "stock"), set().__contains__) == "patched"
    # without a run (doctor): anything in the cache, else Debian's prebuilt kernel
    assert choose_probe_kernel((), cached.__contains__) == "stock"
    assert choose_probe_kernel((), set().__contains__) == "distro"


def test_a_stored_verdict_is_reused_without_building_or_booting(settings):
    first = FakeHost(boots_ok=True)
    probe_kvm(settings, quiet, kernels=("stock",), effects=first.effects())
    again = FakeHost(boots_ok=False)  # would say otherwise if it booted
    verdict = probe_kvm(settings, quiet, kernels=("patched",), effects=again.effects())
    assert again.fetched == [] and again.booted == []
    assert verdict.usable and verdict.cached and verdict.probe_kernel == "stock 6.1-stock"


@pytest.mark.parametrize("changed", [
    ProbeKey("6.13.0-host", KEY.kvm_modules, KEY.qemu_binary, KEY.qemu_version),
    ProbeKey(KEY.host_kernel, ("kvm", "kvm_intel"), KEY.qemu_binary, KEY.qemu_version),
    ProbeKey(KEY.host_kernel, KEY.kvm_modules, "/cache/qemu/usr/bin/qemu", "10.0.2"),
])
def test_another_host_kernel_kvm_module_or_qemu_probes_again(settings, changed):
    probe_kvm(settings, quiet, kernels=("stock",), effects=FakeHost().effects())
    host = FakeHost(key=changed, boots_ok=True)
    verdict = probe_kvm(settings, quiet, kernels=("stock",), effects=host.effects())
    assert host.booted == ["stock"] and verdict.usable and not verdict.cached
    stored = json.loads(probe_cache_file(settings).read_text())
    assert stored_verdict(stored, changed) is not None and stored_verdict(stored, KEY) is None


def test_a_working_kvm_is_detected_and_cached_as_usable(settings):
    host = FakeHost(boots_ok=True)
    verdict = probe_kvm(settings, quiet, kernels=("stock",), effects=host.effects())
    assert verdict.usable and choose_accel("auto", verdict)[0] == "kvm"
    assert stored_verdict(json.loads(probe_cache_file(settings).read_text()), KEY).usable


def test_no_usable_device_needs_no_probe_and_is_not_cached(settings):
    host = FakeHost(problem="/dev/kvm does not exist")
    verdict = probe_kvm(settings, quiet, kernels=("stock",), effects=host.effects())
    assert verdict == KvmVerdict(False, "/dev/kvm does not exist")
    assert host.fetched == [] and not probe_cache_file(settings).exists()


@pytest.mark.parametrize("text", ["{", "[]", '{"key": 1}', json.dumps(
    {"key": KEY.to_dict(), "verdict": {"usable": True}})])
def test_an_unreadable_probe_cache_means_probing_again(settings, text):
    probe_cache_file(settings).parent.mkdir(parents=True)
    probe_cache_file(settings).write_text(text)
    host = FakeHost()
    probe_kvm(settings, quiet, kernels=("stock",), effects=host.effects())
    assert host.booted == ["stock"]


def test_the_cache_stores_the_verdict_not_that_it_was_reused():
    record = verdict_record(KEY, KvmVerdict(True, "ok", 0.3, "stock x", "t", cached=True))
    assert record["verdict"]["cached"] is False and record["key"]["kvm_modules"] == [
        "kvm", "kvm_pvm"]


def test_a_run_installs_qemu_before_gathering_so_its_facts_name_the_qemu_it_uses(
        settings, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(hostfacts, "ensure_packages",
                        lambda pkgs, log=print: calls.append(",".join(sorted(pkgs))))
    monkeypatch.setattr(hostfacts, "qemu_version",
                        lambda q: calls.append("version") or "7.2.22")
    monkeypatch.setattr(hostfacts, "qemu_has_plugins", lambda q: True)
    monkeypatch.setattr(hostfacts, "plugin_api", lambda s: (None, "n/a"))
    monkeypatch.setattr(hostfacts, "can_use_taps", lambda: (False, "no root"))
    facts = hostfacts.gather(settings, quiet, probe=False, kernels=("patched",))
    assert calls[0] == "qemu-system-x86,qemu-utils" and calls[1] == "version"
    assert facts.qemu_version == "7.2.22"
    calls.clear()
    hostfacts.gather(settings, quiet, probe=False)  # doctor installs nothing
    assert calls == ["version"]


def test_facts_record_a_fallback_from_the_backport(settings, monkeypatch):
    fell_back = system_qemu(settings, fallback="apt-get exit 100: E: Failed to fetch x")
    monkeypatch.setattr(hostfacts, "resolve_qemu", lambda s, log=print: fell_back)
    monkeypatch.setattr(hostfacts, "qemu_version", lambda q: "7.2.22")
    monkeypatch.setattr(hostfacts, "qemu_has_plugins", lambda q: True)
    monkeypatch.setattr(hostfacts, "plugin_api", lambda s: (1, "d"))
    monkeypatch.setattr(hostfacts, "can_use_taps", lambda: (False, "no root"))
    facts = hostfacts.gather(replace(settings, qemu="backport"), quiet, probe=False)
    assert facts.qemu_kind == "system" and facts.to_dict()["qemu_fallback"] == \
        "apt-get exit 100: E: Failed to fetch x"
    row = dict(hostfacts.facts_table(facts))["qemu"]
    assert row.endswith("the backport could not be downloaded: apt-get exit 100: E: Failed "
                        "to fetch x")


def test_a_known_verdict_needs_no_probe_and_an_unknown_one_is_none(settings):
    from testbed.vm.hostfacts import known_kvm_verdict

    assert known_kvm_verdict(settings, FakeHost().effects()) is None  # nothing probed yet
    missing = known_kvm_verdict(settings, FakeHost(problem="/dev/kvm does not exist").effects())
    assert missing is not None and not missing.usable
    probe_kvm(settings, quiet, kernels=("stock",), effects=FakeHost(boots_ok=True).effects())
    host = FakeHost()
    stored = known_kvm_verdict(settings, host.effects())
    assert stored is not None and stored.usable and host.booted == []
    other_qemu = ProbeKey(KEY.host_kernel, KEY.kvm_modules, KEY.qemu_binary, "10.0.2")
    assert known_kvm_verdict(settings, FakeHost(key=other_qemu).effects()) is None
