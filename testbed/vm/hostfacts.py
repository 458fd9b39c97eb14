"""What this host can do: QEMU, usable KVM, PMU, privileges, resources (`invoke doctor`).

`/dev/kvm` existing is not enough: under some hypervisors (kvm_pvm here) a stock
guest kernel hangs under KVM. So we boot a tiny probe guest under KVM with a short
timeout and only call KVM usable when it prints its marker. The verdict is cached
per host boot and QEMU version, so tasks that ask for `accel=auto` stay fast.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from testbed import timings
from testbed.build.cachemodel_plugin import cached_plugin_api, qemu_source
from testbed.build.kernel import Kernel
from testbed.build.kernel_build import find_built_named
from testbed.build.kernels import get_kernel
from testbed.build.newc import CpioEntry, write_newc
from testbed.build.qemu_backport import resolve_qemu
from testbed.build.sysdeps import QEMU_PACKAGES, ensure_packages
from testbed.errors import CommandTimeout, MissingDependency, NetbedError
from testbed.files import atomic_write_json, now_iso
from testbed.progress import Log
from testbed.settings import Settings
from testbed.shell import HostShell
from testbed.vm.dataplane import can_use_taps
from testbed.vm.qemu import DirectBoot, Qemu, direct_boot_argv, qemu_head
from testbed.vocabulary import Accel, AccelSetting

PROBE_MARKER = "NETBED-PROBE-OK"
PROBE_TIMEOUT_S = 25.0
BUSYBOX_STATIC = "/bin/busybox"


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str
    boot_seconds: float | None = None
    # The guest kernel the probe booted ("patched 6.1.192-netbed-wakelocal"), when it ran.
    probe_kernel: str | None = None
    probed_at: str | None = None  # when the probe ran (a reused verdict keeps its time)
    cached: bool = False  # this verdict was reused from the host's probe cache (no boot)


@dataclass(frozen=True)
class ProbeKey:
    """What a KVM verdict depends on, and nothing else: the host kernel, the module that
    provides /dev/kvm (kvm_intel/kvm_amd run stock guests, kvm_pvm here does not) and the
    QEMU that boots the guests. Not the boot: a verdict survives reboots, so a run does
    not pay a probe (and on a hanging host its timeout) each time."""

    host_kernel: str
    kvm_modules: tuple[str, ...]
    qemu_binary: str
    qemu_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kvm_modules": list(self.kvm_modules)}


def stored_verdict(data: object, key: ProbeKey) -> KvmVerdict | None:
    """The verdict stored for `key` in the probe cache's JSON, if it is for this key (pure).
    Anything unreadable counts as no verdict: the probe runs again."""
    if not isinstance(data, dict) or data.get("key") != key.to_dict():
        return None
    verdict = data.get("verdict")
    if not isinstance(verdict, dict):
        return None
    try:
        return replace(KvmVerdict(**verdict), cached=True)
    except TypeError:
        return None


def verdict_record(key: ProbeKey, verdict: KvmVerdict) -> dict[str, Any]:
    """What the probe cache stores (pure)."""
    return {"key": key.to_dict(), "verdict": asdict(replace(verdict, cached=False))}


# Kernels doctor may probe with when the cache has one (no run names its own).
CACHED_PROBE_KERNELS = ("distro", "stock", "patched")


def choose_probe_kernel(run_kernels: Sequence[str], is_cached: Callable[[str], bool],
                        fallback: str = "distro") -> str:
    """The guest kernel the probe boots (pure but for `is_cached`).

    A run probes with a kernel it boots anyway: one already built if it has one, else
    its first (built now instead of at the first boot). Without a run (doctor), any
    kernel already in the cache, else Debian's prebuilt one (a download, cheaper than a
    build)."""
    for name in run_kernels:
        if is_cached(name):
            return name
    if run_kernels:
        return run_kernels[0]
    return next((k for k in (*CACHED_PROBE_KERNELS, fallback) if is_cached(k)), fallback)


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    kernel: str
    cpu_model: str
    cores: int
    memory_gib: float
    free_disk_gib: float
    qemu_binary: str
    qemu_version: str | None
    qemu_plugins: bool
    kvm_device: bool
    kvm_modules: list[str]
    kvm: KvmVerdict
    accel: str
    pmu: bool
    pmu_detail: str
    root: bool
    taps: bool
    taps_detail: str
    # Which QEMU the `qemu` setting selects (system | backport), and the plugin API
    # version of its qemu-plugin.h (None until a plugin build fetched the header).
    qemu_kind: str = "system"
    qemu_plugin_api: int | None = None
    qemu_plugin_api_detail: str = ""
    # Why the system QEMU runs although the setting selects the backport (its download
    # failed; testbed.build.qemu_backport.resolve_qemu), "" otherwise.
    qemu_fallback: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _runnable(qemu: Qemu) -> bool:
    binary = qemu if isinstance(qemu, str) else qemu.binary
    return shutil.which(binary) is not None


def qemu_version(qemu: Qemu) -> str | None:
    if not _runnable(qemu):
        return None
    out = HostShell().run([*qemu_head(qemu), "--version"], check=False).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip()


def qemu_has_plugins(qemu: Qemu) -> bool:
    if not _runnable(qemu):
        return False
    out = HostShell().run([*qemu_head(qemu), "-help"], check=False).stdout
    return "-plugin" in out


def host_pmu() -> tuple[bool, str]:
    """A core PMU shows up as an event source named cpu (or cpu_core/cpu_atom on hybrids)."""
    root = Path("/sys/bus/event_source/devices")
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    core = [n for n in names if n in ("cpu", "cpu_core", "cpu_atom")]
    if core:
        return True, f"core PMU: {', '.join(core)}"
    return False, f"no core PMU (event sources: {', '.join(names) or 'none'}); " \
                  "perf gives software events only"


def kvm_modules() -> list[str]:
    mods = Path("/sys/module")
    return sorted(p.name for p in mods.iterdir() if p.name.startswith("kvm")) \
        if mods.is_dir() else []


def probe_archive(busybox: Path, out: Path) -> None:
    """A tiny initramfs: static busybox whose init prints the marker and powers off."""
    init = (f"#!/bin/busybox sh\n/bin/busybox echo {PROBE_MARKER} > /dev/console\n"
            "/bin/busybox poweroff -f\n")
    write_newc(out, [
        CpioEntry.directory("dev"), CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755),
        CpioEntry.file("init", init.encode(), 0o755),
    ])


def probe_argv(qemu: Qemu, kernel: Path, initrd: Path, accel: Accel, console: Path) -> list[str]:
    """The probe guest: one vCPU, the busybox initramfs, the console to a file (pure)."""
    return direct_boot_argv(DirectBoot(
        name="kvm-probe", kernel=kernel, initrd=initrd,
        append="console=ttyS0 quiet panic=-1 rdinit=/init", cpus=1, memory_mb=256,
        accel=accel, console=console), qemu)


def host_probe_key(settings: Settings) -> ProbeKey:
    qemu = resolve_qemu(settings)
    return ProbeKey(platform.release(), tuple(kvm_modules()), qemu.binary, qemu_version(qemu))


def kvm_device_problem() -> str | None:
    """Why this user cannot open /dev/kvm, or None."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    return None


def kernel_is_cached(name: str, settings: Settings) -> bool:
    """Whether `name` is ready without a build or download (nothing is built here)."""
    if name == "distro":
        return any((d / "done").is_file()
                   for d in (settings.cache_dir / "kernels").glob("distro-*"))
    try:
        return find_built_named(name, settings) is not None
    except NetbedError:
        return False


def boot_probe(settings: Settings, kernel: Kernel, log: Log) -> KvmVerdict:
    """Boot `kernel` with the busybox initramfs under KVM; usable if the marker shows."""
    ensure_packages({"busybox-static": BUSYBOX_STATIC}, log)
    label = f"{kernel.name} {kernel.release}"
    log(f"probing KVM: booting a tiny guest ({label} kernel) under -accel kvm "
        f"(timeout {PROBE_TIMEOUT_S:.0f} s)")
    when = now_iso()
    with tempfile.TemporaryDirectory(prefix="netbed-probe-") as tmp_s:
        tmp = Path(tmp_s)
        probe_archive(Path(BUSYBOX_STATIC), tmp / "probe.cpio")
        console = tmp / "console.log"
        argv = probe_argv(resolve_qemu(settings, log), kernel.bzimage, tmp / "probe.cpio", "kvm",
                          console)
        start = time.monotonic()
        try:
            proc = HostShell().run(argv, timeout=PROBE_TIMEOUT_S, check=False)
        except CommandTimeout:
            return KvmVerdict(False, f"a {kernel.name} kernel did not boot under KVM within "
                                     f"{PROBE_TIMEOUT_S:.0f} s (hangs: modules "
                                     f"{', '.join(kvm_modules()) or '?'})",
                              probe_kernel=label, probed_at=when)
        took = time.monotonic() - start
        text = console.read_text(errors="replace") if console.exists() else ""
        if PROBE_MARKER in text:
            return KvmVerdict(True, f"probe guest booted under KVM in {took:.1f} s", took,
                              probe_kernel=label, probed_at=when)
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return KvmVerdict(False, f"QEMU under KVM failed: {err[-1] if err else 'no output'}",
                          probe_kernel=label, probed_at=when)


@dataclass(frozen=True)
class ProbeEffects:
    """What probe_kvm does besides deciding; tests replace them with fakes."""

    device_problem: Callable[[], str | None] = kvm_device_problem
    key: Callable[[Settings], ProbeKey] = host_probe_key
    kernel_cached: Callable[[str, Settings], bool] = kernel_is_cached
    kernel: Callable[[str, Settings, Log], Kernel] = get_kernel
    boot: Callable[[Settings, Kernel, Log], KvmVerdict] = boot_probe


def probe_cache_file(settings: Settings) -> Path:
    return settings.cache_dir / "host" / "kvm-probe.json"


def probe_kvm(settings: Settings, log: Log = print, use_cache: bool = True,
              kernels: Sequence[str] = (), effects: ProbeEffects = ProbeEffects()) -> KvmVerdict:
    """Whether KVM runs a guest here: the verdict cached for this host, kernel, KVM module
    and QEMU, else a probe boot with one of the run's `kernels` (choose_probe_kernel)."""
    if problem := effects.device_problem():
        return KvmVerdict(False, problem)
    cache = probe_cache_file(settings)
    key = effects.key(settings)
    if use_cache and (found := _cached_verdict(cache, key)) is not None:
        log(f"KVM verdict reused from {cache} (probed {found.probed_at or '?'} with "
            f"{found.probe_kernel or '?'}): {'usable' if found.usable else found.reason}")
        return found
    name = choose_probe_kernel(kernels, lambda k: effects.kernel_cached(k, settings))
    kernel = effects.kernel(name, settings, log)
    with timings.step("probe", "kvm", f"booted {name}"):
        verdict = effects.boot(settings, kernel, log)
    atomic_write_json(cache, verdict_record(key, verdict))
    return verdict


def known_kvm_verdict(settings: Settings,
                      effects: ProbeEffects = ProbeEffects()) -> KvmVerdict | None:
    """The KVM verdict when no probe boot is needed for it (the device is missing, or a
    verdict is cached for this host, kernel, KVM module and QEMU), else None."""
    if problem := effects.device_problem():
        return KvmVerdict(False, problem)
    cache = probe_cache_file(settings)
    return _cached_verdict(cache, effects.key(settings)) if cache.is_file() else None


def _cached_verdict(cache: Path, key: ProbeKey) -> KvmVerdict | None:
    """The verdict the probe cache holds for `key`; an unreadable cache holds none."""
    try:
        return stored_verdict(json.loads(cache.read_text()), key)
    except (OSError, ValueError):
        return None


def choose_accel(requested: AccelSetting, verdict: KvmVerdict) -> tuple[Accel, str]:
    """kvm | tcg from the request and the probe, with the reason (pure)."""
    if requested == "tcg":
        return "tcg", "tcg requested"
    if requested == "kvm":
        if not verdict.usable:
            raise NetbedError(f"KVM requested but not usable: {verdict.reason}",
                              hint="use --accel tcg (or accel: auto in invoke.yaml)")
        return "kvm", verdict.reason
    if verdict.usable:
        return "kvm", verdict.reason
    return "tcg", f"TCG, because {verdict.reason}"


def resolve_accel(settings: Settings, log: Log = print,
                  kernels: Sequence[str] = ()) -> tuple[Accel, str]:
    """kvm | tcg for `settings.accel`; a probe (if one is needed) boots one of `kernels`."""
    if settings.accel == "tcg":
        return "tcg", "tcg requested"
    return choose_accel(settings.accel, probe_kvm(settings, log, kernels=kernels))


def gather(settings: Settings, log: Log = print, probe: bool = True,
           kernels: Sequence[str] | None = None) -> HostFacts:
    """Every fact doctor prints; `probe=False` skips booting the KVM probe.

    `kernels`: the guest kernels of a run about to start. The run installs QEMU first
    (it needs it anyway), so the facts, the accelerator and the counter plan describe
    the QEMU it will use, and the probe boots one of those kernels."""
    if kernels is not None:
        ensure_packages(QEMU_PACKAGES, log)
    usage = shutil.disk_usage(settings.cache_dir if settings.cache_dir.exists()
                              else settings.cache_dir.parent)
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                   .splitlines() if line.startswith("MemTotal:"))
    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.machine())
    qemu = resolve_qemu(settings, log)
    version = qemu_version(qemu)
    api, api_detail = plugin_api(settings)
    if probe and version:
        verdict = probe_kvm(settings, log, kernels=kernels or ())
    else:
        verdict = KvmVerdict(False, "not probed" if version else "QEMU is not installed")
    accel, _why = choose_accel("auto", verdict) if settings.accel == "auto" else (
        settings.accel, f"{settings.accel} requested")
    pmu, pmu_detail = host_pmu()
    taps, taps_detail = can_use_taps()
    return HostFacts(
        hostname=platform.node(), kernel=platform.release(), cpu_model=cpu_model,
        cores=os.cpu_count() or 1, memory_gib=round(mem_kib / 2**20, 1),
        free_disk_gib=round(usage.free / 2**30, 1), qemu_binary=qemu.binary,
        qemu_version=version, qemu_plugins=qemu_has_plugins(qemu),
        kvm_device=os.path.exists("/dev/kvm"), kvm_modules=kvm_modules(), kvm=verdict,
        accel=f"{accel}", pmu=pmu, pmu_detail=pmu_detail, root=os.geteuid() == 0,
        taps=taps, taps_detail=taps_detail, qemu_kind=qemu.kind,
        qemu_fallback=qemu.fallback,
        qemu_plugin_api=api, qemu_plugin_api_detail=api_detail,
    )


def plugin_api(settings: Settings) -> tuple[int | None, str]:
    """The selected QEMU's plugin API version, from the qemu-plugin.h of its exact
    Debian source version (cached by the plugin build; nothing is fetched here)."""
    try:
        source = qemu_source(settings)
    except MissingDependency as exc:
        return None, str(exc)
    api = cached_plugin_api(settings, source)
    if api is None:
        return None, (f"unknown: the header of {source.package} {source.version} is not "
                      "fetched yet (invoke build-cachemodel fetches it)")
    return api, f"from {source.package} {source.version}'s qemu-plugin.h"


def refresh_plugin_api(facts: HostFacts, settings: Settings) -> HostFacts:
    """`facts` with the plugin API read again (a plugin build since gather fetched it)."""
    api, detail = plugin_api(settings)
    return replace(facts, qemu_plugin_api=api, qemu_plugin_api_detail=detail)


def plugin_api_row(api: int | None, detail: str) -> str:
    """doctor's line on the plugin API (pure). QEMU 10 loads only API >= 2 plugins;
    netbed's plugin builds for both."""
    if api is None:
        return detail
    level = ">= 2, as QEMU 10 requires" if api >= 2 else "< 2: QEMU 10 would refuse it"
    return f"{api} ({level}); {detail}"


def facts_table(facts: HostFacts) -> list[tuple[str, str]]:
    """Rows for the human table (pure)."""
    accel_why = facts.kvm.reason if facts.accel == "kvm" else f"because {facts.kvm.reason}"
    return [
        ("host", f"{facts.hostname} ({facts.kernel})"),
        ("cpu", f"{facts.cpu_model}, {facts.cores} cores"),
        ("memory", f"{facts.memory_gib} GiB"),
        ("free disk (cache)", f"{facts.free_disk_gib} GiB"),
        ("qemu", f"{facts.qemu_version or 'not installed'} ({facts.qemu_kind}: "
                 f"{facts.qemu_binary})" + (f"; the backport could not be downloaded: "
                                            f"{facts.qemu_fallback}"
                                            if facts.qemu_fallback else "")),
        ("tcg plugins", "yes" if facts.qemu_plugins else "no"),
        ("plugin api", plugin_api_row(facts.qemu_plugin_api, facts.qemu_plugin_api_detail)),
        ("/dev/kvm", f"{'present' if facts.kvm_device else 'absent'}; modules: "
                     f"{', '.join(facts.kvm_modules) or 'none'}"),
        ("accelerator", f"{facts.accel.upper()}, {accel_why}"),
        ("pmu", f"{'yes' if facts.pmu else 'no'}: {facts.pmu_detail}"),
        ("root", "yes" if facts.root else "no"),
        ("data plane", f"{'tap + bridge' if facts.taps else 'socket netdev'}: "
                       f"{facts.taps_detail}"),
    ]
