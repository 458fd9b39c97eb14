"""What a run ran on: host.json and versions.json, written in one place.

versions.json grows as the run learns things (the host and accelerator first,
then each kernel and the image when first booted, the data plane, whether the
guest has a PMU), and is rewritten atomically each time, so an interrupted run
still says what its finished repetitions ran on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from testbed.errors import ConfigError
from testbed.files import atomic_write_json, read_json
from testbed.progress import Log
from testbed.run.folder import RunDir
from testbed.settings import REPO_ROOT
from testbed.shell import HostShell, Shell
from testbed.vm.hostfacts import HostFacts
from testbed.vm.topology import Assets

# The guest's perf event sources; a core PMU shows up as cpu (cpu_core/cpu_atom on hybrids).
GUEST_PMU_PROBE = "ls /sys/bus/event_source/devices 2>/dev/null"
CORE_PMUS = ("cpu", "cpu_core", "cpu_atom")
IMAGE_PACKAGES_RECORDED = ("netperf", "linux-perf", "openssh-server", "ethtool")


def netbed_commit(shell: Shell | None = None) -> str:
    """The checkout's commit, with `-dirty` when tracked files differ from it."""
    sh = shell or HostShell(cwd=REPO_ROOT)
    commit = sh.run("git rev-parse HEAD", check=False).stdout.strip() or "unknown"
    dirty = sh.run("git status --porcelain --untracked-files=no", check=False).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def guest_pmu_verdict(event_sources: list[str]) -> tuple[bool, str]:
    """Whether the guest's event sources include a core PMU, and the sentence saying so
    (pure)."""
    core = [n for n in event_sources if n in CORE_PMUS]
    if core:
        return True, f"guest core PMU: {', '.join(core)}"
    return False, ("no core PMU in the guest (event sources: "
                   f"{', '.join(event_sources) or 'none'}); software events only")


CacheSource = Literal["cachemodel", "hardware", "software"]
AUTO_HINT = "use `counters: [auto]` (the default): it picks what this host can count"


@dataclass(frozen=True)
class CounterPlan:
    """Where a run's counters come from, decided once from the config and the host.

    Software events (/proc, perf software events) are always counted. `cache_source`
    says where cache numbers come from: the cache model (TCG plugin), hardware events
    (a core PMU in the guest, confirmed at the first boot) or nowhere (software).
    `force_tcg`: the cache model was asked for on a KVM host, so every cell runs under
    TCG. `notes` are the sentences the plan, versions.json and the report print.
    """

    cachemodel: bool
    hardware: bool
    force_tcg: bool
    cache_source: CacheSource
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {"cache_source": self.cache_source, "cachemodel": self.cachemodel,
                "hardware": self.hardware, "force_tcg": self.force_tcg,
                "notes": list(self.notes)}

    def without_guest_pmu(self, detail: str) -> CounterPlan:
        """The plan after the booted receiver showed no core PMU: software events only."""
        note = f"hardware cache events unavailable: {detail}"
        return CounterPlan(False, False, self.force_tcg,
                           "cachemodel" if self.cachemodel else "software",
                           (*self.notes, note))


def model_may_count(counters: Sequence[str], kvm_usable: bool | None) -> bool:
    """Whether the cache model may count this run's windows, before the KVM probe has
    run (pure; `kvm_usable` None: only a probe can tell). counter_plan decides for good:
    `auto` picks the model exactly when KVM is not usable."""
    if "cachemodel" in counters:
        return True
    return "auto" in counters and kvm_usable is not True


def counter_plan(counters: Sequence[str], accel: str, host_pmu: bool) -> CounterPlan:
    """Decide the counter sources (pure); ConfigError when the host cannot count them.

    `auto`: under TCG the cache model; under KVM hardware events when the host has a
    core PMU (the booted receiver confirms it), else software events only. `hardware`
    needs KVM and a PMU and is refused otherwise, before anything boots. `cachemodel`
    on a KVM host runs the cells under TCG (the plugin is a TCG feature) and says so.
    """
    wanted = set(counters)
    if "auto" in wanted and len(wanted) > 1:
        raise ConfigError("counters: `auto` chooses the sources itself; it cannot be "
                          f"combined with {', '.join(sorted(wanted - {'auto'}))}",
                          hint="write `counters: [auto]`, or name the sources without auto")
    notes: list[str] = []
    if "auto" in wanted:
        if accel != "kvm":
            return CounterPlan(True, False, False, "cachemodel",
                               ("counters auto: TCG, so cache numbers come from the cache "
                                "model; perf's software events from plain repetitions only "
                                "(perf is kept out of cache-model windows)",))
        if host_pmu:
            return CounterPlan(False, True, False, "hardware",
                               ("counters auto: KVM with a host PMU, so cache numbers come "
                                "from hardware events if the booted receiver sees a core "
                                "PMU",))
        return CounterPlan(False, False, False, "software",
                           ("counters auto: KVM without a PMU, so software events only (no "
                            "cache numbers); the cache model needs TCG: "
                            "`counters: [cachemodel]` runs the cells under TCG",))
    if "hardware" in wanted and (accel != "kvm" or not host_pmu):
        why = "this host runs guests under TCG" if accel != "kvm" else \
            "this host has no core PMU"
        raise ConfigError(f"counters: hardware needs a PMU in the guest, but {why}",
                          hint=AUTO_HINT)
    force_tcg = "cachemodel" in wanted and accel == "kvm"
    if force_tcg:
        notes.append("counters cachemodel on a KVM host: every cell runs under TCG "
                     "(the cache model is a TCG plugin)")
    source: CacheSource = ("cachemodel" if "cachemodel" in wanted
                           else "hardware" if "hardware" in wanted else "software")
    if source == "software":
        notes.append("counters software: no cache numbers")
    return CounterPlan("cachemodel" in wanted, "hardware" in wanted, force_tcg, source,
                       tuple(notes))


class Provenance:
    """Owns host.json and versions.json of one run folder."""

    def __init__(self, run: RunDir, counters: Sequence[str], log: Log) -> None:
        self.run = run
        self.counters = tuple(counters)
        self.log = log
        self.versions: dict[str, Any] = {}
        self.pmu = False  # hardware counters may be asked for in the guest
        self.plan: CounterPlan | None = None

    def _write(self) -> None:
        atomic_write_json(self.run.versions_file, self.versions)

    def decide(self, facts: HostFacts) -> CounterPlan:
        """The counter plan for this host (ConfigError before anything boots)."""
        self.plan = counter_plan(self.counters, facts.accel, facts.pmu)
        return self.plan

    def record_host(self, facts: HostFacts, commit: str) -> None:
        """The start of a session: host facts and what is known before any boot."""
        plan = self.plan or self.decide(facts)
        self.pmu = plan.hardware and facts.pmu and facts.accel == "kvm"
        atomic_write_json(self.run.host_file, facts.to_dict())
        self.versions = {
            "netbed_commit": commit, "qemu_version": facts.qemu_version,
            "qemu_binary": facts.qemu_binary, "qemu_kind": facts.qemu_kind,
            "qemu_fallback": facts.qemu_fallback,
            "accel": "tcg" if plan.force_tcg else facts.accel,
            "accel_reason": ("forced by counters: cachemodel" if plan.force_tcg
                             else facts.kvm.reason),
            "pmu_in_guest": self.pmu,
            "hardware_counters_valid": self.pmu,
            "counters": plan.as_dict(),
            "kernels": {}, "image": None, "dataplane": None,
        }
        for note in plan.notes:
            self.log(f"note: {note}")
        self._write()

    def record_assets(self, kernel: str, assets: Assets) -> None:
        """A kernel (and the image) booted for the first time in this session."""
        k = assets.kernel
        self.versions["kernels"][kernel] = {"name": k.name, "release": k.release, **k.metadata}
        pkgs = read_json(assets.image.manifest).get("packages", {})
        self.versions["image"] = {"key": assets.image.key,
                                  "packages": {p: pkgs.get(p) for p in IMAGE_PACKAGES_RECORDED}}
        self.versions["accel"] = assets.accel
        self._record_qemu(assets)
        self._write()

    def _record_qemu(self, assets: Assets) -> None:
        """The QEMU the guests boot with, asked when they are about to boot: the host facts
        were gathered before anything was installed, and may name no QEMU or another one."""
        if not assets.qemu_binary:
            return
        self.versions["qemu_version"] = assets.qemu_version
        self.versions["qemu_binary"] = assets.qemu_binary
        host = read_json(self.run.host_file) if self.run.host_file.is_file() else {}
        used = {"qemu_version": assets.qemu_version, "qemu_binary": assets.qemu_binary}
        if host and any(host.get(k) != v for k, v in used.items()):
            atomic_write_json(self.run.host_file, {**host, **used})

    def _set(self, key: str, value: Any) -> None:
        """versions.json's `key` holds `value` (written only when it changes)."""
        if self.versions.get(key) != value:
            self.versions[key] = value
            self._write()

    def record_plugin(self, plugin_path: str) -> None:
        """The cache-model plugin of this run: its build folder names its source hash."""
        self._set("cachemodel_plugin", plugin_path)

    def record_dataplane(self, note: str | None) -> None:
        """The data plane of the first boot (all boots of a session share the mode)."""
        if self.versions.get("dataplane") is None:
            self.versions["dataplane"] = note
            self._write()

    def record_sender(self, note: str | None) -> None:
        """What sent the test traffic: a sender guest or a native netperf in a namespace
        (#11); the last boot's, like the placement."""
        if note is not None:
            self._set("sender", note)

    def record_guest_clock(self, icount_note: str | None) -> None:
        """How guest time ran: the host clock (TCG's default, KVM) or QEMU's -icount (#11)."""
        self._set("guest_clock", icount_note or "host clock")

    def record_placement(self, placement: dict[str, Any]) -> None:
        """The host placement of the guests' QEMU processes, as read back from /proc (#11).

        versions.json keeps the last boot's record (plan + threads read back); host.json
        the plan alone, so the report can say where the guests ran."""
        if not placement:
            return
        self.versions["placement"] = placement
        self._write()
        host = read_json(self.run.host_file) if self.run.host_file.is_file() else {}
        plan = {k: placement.get(k) for k in ("mode", "host_cpus", "guests", "note")}
        if host.get("placement") != plan:
            atomic_write_json(self.run.host_file, {**host, "placement": plan})

    def check_guest_pmu(self, receiver: Shell) -> None:
        """A host PMU is not a guest PMU: KVM may not pass one through (kvm enable_pmu=0,
        a nested host without a vPMU). Count hardware events only where the guest has one,
        and say so in versions.json, so counters are never taken as real by assumption."""
        if not self.pmu:
            return
        sources = receiver.run(GUEST_PMU_PROBE, check=False).stdout.split()
        ok, detail = guest_pmu_verdict(sources)
        self.versions["pmu_detail"] = detail
        if not ok:
            self.pmu = False
            if self.plan is not None:
                self.plan = self.plan.without_guest_pmu(detail)
                self.versions["counters"] = self.plan.as_dict()
            self.versions.update(pmu_in_guest=False, hardware_counters_valid=False)
            self.log(f"note: {detail}")
        self._write()
