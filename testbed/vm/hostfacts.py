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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from testbed.build.cachemodel_plugin import cached_plugin_api, qemu_source
from testbed.build.kernels import get_kernel
from testbed.build.newc import CpioEntry, write_newc
from testbed.build.qemu_backport import resolve_qemu
from testbed.build.sysdeps import ensure_packages
from testbed.errors import CommandTimeout, MissingDependency, NetbedError
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


def _cache_key(settings: Settings) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    bid = boot_id.read_text().strip() if boot_id.exists() else "unknown"
    return f"{bid}:{platform.release()}:{qemu_version(resolve_qemu(settings))}"


def probe_kvm(settings: Settings, log: Log = print, use_cache: bool = True) -> KvmVerdict:
    """Boot the probe under KVM with a short timeout; cached per host boot."""
    if not os.path.exists("/dev/kvm"):
        return KvmVerdict(False, "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is not accessible to this user")
    cache = settings.cache_dir / "host" / "kvm-probe.json"
    key = _cache_key(settings)
    if use_cache and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return KvmVerdict(**data["verdict"])
    verdict = _run_probe(settings, log)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "verdict": asdict(verdict)}))
    return verdict


def _run_probe(settings: Settings, log: Log) -> KvmVerdict:
    ensure_packages({"busybox-static": BUSYBOX_STATIC}, log)
    kernel = get_kernel("distro", settings, log)
    log(f"probing KVM: booting a tiny guest under -accel kvm (timeout {PROBE_TIMEOUT_S:.0f} s)")
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
            return KvmVerdict(False, f"a stock kernel did not boot under KVM within "
                                     f"{PROBE_TIMEOUT_S:.0f} s (hangs: modules "
                                     f"{', '.join(kvm_modules()) or '?'})")
        took = time.monotonic() - start
        text = console.read_text(errors="replace") if console.exists() else ""
        if PROBE_MARKER in text:
            return KvmVerdict(True, f"probe guest booted under KVM in {took:.1f} s", took)
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return KvmVerdict(False, f"QEMU under KVM failed: {err[-1] if err else 'no output'}")


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


def resolve_accel(settings: Settings, log: Log = print) -> tuple[Accel, str]:
    if settings.accel == "tcg":
        return "tcg", "tcg requested"
    return choose_accel(settings.accel, probe_kvm(settings, log))


def gather(settings: Settings, log: Log = print, probe: bool = True) -> HostFacts:
    """Every fact doctor prints; `probe=False` skips booting the KVM probe."""
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
        verdict = probe_kvm(settings, log)
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
                 f"{facts.qemu_binary})"),
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
