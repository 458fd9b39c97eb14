"""What a run ran on: host.json and versions.json, written in one place.

versions.json grows as the run learns things (the host and accelerator first,
then each kernel and the image when first booted, the data plane, whether the
guest has a PMU), and is rewritten atomically each time, so an interrupted run
still says what its finished repetitions ran on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


class Provenance:
    """Owns host.json and versions.json of one run folder."""

    def __init__(self, run: RunDir, counters: Sequence[str], log: Log) -> None:
        self.run = run
        self.counters = tuple(counters)
        self.log = log
        self.versions: dict[str, Any] = {}
        self.pmu = False  # hardware counters may be asked for in the guest

    def _write(self) -> None:
        atomic_write_json(self.run.versions_file, self.versions)

    def record_host(self, facts: HostFacts, commit: str) -> None:
        """The start of a session: host facts and what is known before any boot."""
        self.pmu = facts.pmu and facts.accel == "kvm"
        atomic_write_json(self.run.host_file, facts.to_dict())
        self.versions = {
            "netbed_commit": commit, "qemu_version": facts.qemu_version,
            "accel": facts.accel, "accel_reason": facts.kvm.reason,
            "pmu_in_guest": self.pmu,
            "hardware_counters_valid": self.pmu and "hardware" in self.counters,
            "kernels": {}, "image": None, "dataplane": None,
        }
        self._write()

    def record_assets(self, kernel: str, assets: Assets) -> None:
        """A kernel (and the image) booted for the first time in this session."""
        k = assets.kernel
        self.versions["kernels"][kernel] = {"name": k.name, "release": k.release, **k.metadata}
        pkgs = read_json(assets.image.manifest).get("packages", {})
        self.versions["image"] = {"key": assets.image.key,
                                  "packages": {p: pkgs.get(p) for p in IMAGE_PACKAGES_RECORDED}}
        self.versions["accel"] = assets.accel
        self._write()

    def record_dataplane(self, note: str | None) -> None:
        """The data plane of the first boot (all boots of a session share the mode)."""
        if self.versions.get("dataplane") is None:
            self.versions["dataplane"] = note
            self._write()

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
            self.versions.update(pmu_in_guest=False, hardware_counters_valid=False)
            self.log(f"note: {detail}")
        self._write()
