"""The matrix loop: cells -> booted guests -> repetitions -> raw files, resumable.

Consecutive repetitions that need the same guests (kernel, NIC, vCPUs) share one
boot; every policy writes every knob and is read back, so a reused boot cannot
leak state. A repetition counts only when its `done` marker exists, so a run
killed at any moment resumes exactly the missing work. A guest that fails to
boot, hangs or drops SSH is rebooted and retried `retries` times; then the
repetition is marked failed with its console logs and the matrix goes on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import CommandError, GuestError, NetbedError
from testbed.experiment.config import Cell, Experiment
from testbed.experiment.load import load_experiment
from testbed.experiment.matrix import schedule, shard
from testbed.files import atomic_write_json, atomic_write_text, read_json
from testbed.progress import Log, Progress
from testbed.run.folder import RepDir, RunDir, new_run_id
from testbed.run.repetition import BootState, PolicyMismatch, discover, run_repetition
from testbed.settings import REPO_ROOT, Settings
from testbed.vm.topology import Assets, Topology, boot, prepare_assets

RUN_META = "run.json"
# The guest's perf event sources; a core PMU shows up as cpu (cpu_core/cpu_atom on hybrids).
GUEST_PMU_PROBE = "ls /sys/bus/event_source/devices 2>/dev/null"


@dataclass(frozen=True)
class Fault:
    """Test hook: make the receiver of `cell_id` hang (QMP stop) on every attempt."""

    cell_id: str
    kind: str = "hang"

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        if not text:
            return None
        kind, _, cell_id = text.partition(":")
        if kind != "hang" or not cell_id:
            raise NetbedError(f"bad fault injection {text!r}", hint="use hang:<cell-id>")
        return cls(cell_id, kind)


@dataclass
class RunSummary:
    run_dir: Path
    total: int
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def netbed_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def open_run(settings: Settings, config: Path | None, resume: str | None,
             shard_spec: tuple[int, int] | None) -> tuple[RunDir, Experiment, list[Cell]]:
    """A new run folder for `config`, or the existing one to resume; cells of this shard."""
    if resume:
        path = Path(resume)
        if not path.is_dir():
            path = settings.results_dir / resume
        run = RunDir(path)
        if not run.experiment_file.is_file():
            raise NetbedError(f"{path} is not a netbed run (no experiment.yaml)",
                              hint=f"pass a folder or run id under {settings.results_dir}")
        exp = load_experiment(run.experiment_file, _policies_of(run))
        meta = read_json(run.path / RUN_META)
        shard_spec = tuple(meta["shard"]) if meta.get("shard") else None  # type: ignore[assignment]
    else:
        assert config is not None
        exp = load_experiment(config)  # `-` reads standard input: keep the text validated
        run = RunDir(settings.results_dir / new_run_id(exp.name, shard_spec))
        run.path.mkdir(parents=True)
        atomic_write_text(run.experiment_file, exp.source_text or "")
        from testbed.experiment.policies import DEFAULT_POLICIES_FILE

        # the run carries its policies: the file validation resolved (`~`, relative paths)
        shutil.copy2(exp.policies_path or DEFAULT_POLICIES_FILE, run.path / "policies.yaml")
        atomic_write_json(run.path / RUN_META, {"shard": list(shard_spec) if shard_spec
                                                else None, "config": str(config)})
    from testbed.experiment.matrix import expand

    cells = expand(exp)
    if shard_spec:
        cells = shard(cells, *shard_spec)
    atomic_write_json(run.cells_file, [{**json.loads(c.model_dump_json()),
                                        "cell_id": c.cell_id} for c in cells])
    return run, exp, cells


def _policies_of(run: RunDir):
    from testbed.experiment.policies import load_policies

    copy = run.path / "policies.yaml"
    return load_policies(copy) if copy.is_file() else None


BootKey = tuple[str, str, int]


def boot_key(cell: Cell) -> BootKey:
    return (cell.kernel, cell.nic, cell.cpus)


class MatrixRunner:
    """Runs the scheduled repetitions of one run folder."""

    def __init__(self, settings: Settings, run: RunDir, exp: Experiment, cells: list[Cell],
                 log: Log = print, fault: Fault | None = None) -> None:
        self.settings = settings
        self.run = run
        self.exp = exp
        self.cells = cells
        self.log = log
        self.fault = fault
        self.assets: dict[str, Assets] = {}
        self.versions: dict[str, object] = {}

    # ------------------------------------------------------------------ provenance
    def _write_provenance(self) -> None:
        from testbed.vm.hostfacts import gather

        facts = gather(self.settings, log=self.log)
        self.pmu = facts.pmu and facts.accel == "kvm"
        atomic_write_json(self.run.host_file, facts.to_dict())
        self.versions = {
            "netbed_commit": netbed_commit(), "qemu_version": facts.qemu_version,
            "accel": facts.accel, "accel_reason": facts.kvm.reason,
            "pmu_in_guest": self.pmu,
            "hardware_counters_valid": self.pmu and "hardware" in self.exp.counters,
            "kernels": {}, "image": None, "dataplane": None,
        }
        atomic_write_json(self.run.versions_file, self.versions)

    def _assets_for(self, kernel: str) -> Assets:
        if kernel not in self.assets:
            a = prepare_assets(self.settings, kernel, self.run.path / ".work", self.log)
            self.assets[kernel] = a
            self.versions["kernels"][kernel] = {  # type: ignore[index]
                "name": a.kernel.name, "release": a.kernel.release, **a.kernel.metadata}
            manifest = json.loads(a.image.manifest.read_text())
            pkgs = manifest.get("packages", {})
            self.versions["image"] = {
                "key": a.image.key,
                "packages": {k: pkgs.get(k) for k in ("netperf", "linux-perf",
                                                      "openssh-server", "ethtool")}}
            self.versions["accel"] = a.accel
            atomic_write_json(self.run.versions_file, self.versions)
        return self.assets[kernel]

    # ------------------------------------------------------------------ the loop
    def execute(self) -> RunSummary:
        items = schedule(self.exp, self.cells)
        summary = RunSummary(self.run.path, total=len(items))
        todo = [(c, r) for c, r in items if not self.run.rep(c.cell_id, r).is_done]
        summary.skipped = len(items) - len(todo)
        if summary.skipped:
            self.log(f"resuming: {summary.skipped} of {len(items)} repetitions already done")
        self._write_provenance()
        if not todo:
            return summary
        progress = Progress(len(items), summary.skipped, self.log)
        with contextlib.ExitStack() as stack:
            current: tuple[BootKey, Topology, BootState] | None = None
            for cell, rep_no in todo:
                key = boot_key(cell)
                attempts = 0
                while True:
                    progress.start(f"{cell.cell_id} rep {rep_no}")
                    rep = self.run.start_rep(cell.cell_id, rep_no)
                    try:
                        if current is None or current[0] != key:
                            stack.close()
                            current = None
                            topo = stack.enter_context(self._boot(cell))
                            current = (key, topo, discover(topo))
                            self._inject(cell, current[1])
                        info = self._measure(current, cell, rep)
                        self.run.mark_done(rep, {"attempts": attempts + 1, **info})
                        summary.done += 1
                        progress.finish(_describe(info))
                        break
                    except PolicyMismatch as exc:
                        self._fail(rep, str(exc), attempts + 1, summary, cell)
                        progress.finish("FAILED (policy read-back)")
                        break
                    except (GuestError, CommandError, OSError) as exc:
                        attempts += 1
                        self._keep_consoles(rep)
                        stack.close()
                        current = None
                        if attempts > self.exp.retries:
                            self._fail(rep, f"{type(exc).__name__}: {exc}", attempts, summary,
                                       cell)
                            progress.finish(f"FAILED after {attempts} attempts")
                            break
                        self.log(f"{cell.cell_id} rep {rep_no}: {_first_line(exc)}; "
                                 f"rebooting and retrying ({attempts}/{self.exp.retries})")
        return summary

    @contextlib.contextmanager
    def _boot(self, cell: Cell) -> Iterator[Topology]:
        assets = self._assets_for(cell.kernel)
        workdir = self.run.path / ".work" / "guests"
        if workdir.exists():
            shutil.rmtree(workdir)
        plugins: tuple = ()
        threads = "multi"
        if "cachemodel" in self.exp.counters:
            from testbed.run.cachemodel_window import receiver_plugins

            plugins, threads = receiver_plugins(self.settings, workdir, self.log)
        with boot(assets, self.settings, workdir, cpus=cell.cpus, nic=cell.nic,
                  with_sender=True, receiver_plugins=plugins, receiver_tcg_threads=threads,
                  memory_mb=self.exp.memory_mb, log=self.log) as topo:
            if self.versions.get("dataplane") is None:
                self.versions["dataplane"] = topo.notes.get("dataplane")
                atomic_write_json(self.run.versions_file, self.versions)
            if self.pmu:
                self._check_guest_pmu(topo)
            yield topo

    def _check_guest_pmu(self, topo: Topology) -> None:
        """A host PMU is not a guest PMU: KVM may not pass one through (kvm enable_pmu=0,
        a nested host without a vPMU). Count hardware events only where the guest has one,
        and say so in versions.json, so counters are never taken as real by assumption."""
        out = topo.receiver.ssh.run(GUEST_PMU_PROBE, check=False).stdout.split()
        core = [n for n in out if n in ("cpu", "cpu_core", "cpu_atom")]
        self.versions["pmu_detail"] = (f"guest core PMU: {', '.join(core)}" if core else
                                       "no core PMU in the guest (event sources: "
                                       f"{', '.join(out) or 'none'}); software events only")
        if not core:
            self.pmu = False
            self.versions.update(pmu_in_guest=False, hardware_counters_valid=False)
            self.log(f"note: {self.versions['pmu_detail']}")
        atomic_write_json(self.run.versions_file, self.versions)

    def _inject(self, cell: Cell, topo: Topology) -> None:
        if self.fault and self.fault.cell_id == cell.cell_id:
            self.log(f"fault injection: stopping the receiver's vCPUs for {cell.cell_id}")
            topo.receiver.process.qmp("stop")

    def _measure(self, current: tuple[BootKey, Topology, BootState], cell: Cell,
                 rep: RepDir) -> dict[str, object]:
        _, topo, state = current
        resolved = self.exp.policies.resolve(cell.policy, cell.cpus)
        info = run_repetition(topo, state, self.exp, cell, resolved, rep, self.pmu)
        if "cachemodel" in self.exp.counters:
            from testbed.run.cachemodel_window import collect_window

            collect_window(topo, rep)
        return info

    def _keep_consoles(self, rep: RepDir) -> None:
        """Serial and QEMU logs of the guests, kept with a repetition that went wrong."""
        workdir = self.run.path / ".work" / "guests"
        for log in workdir.glob("console-*.log") if workdir.is_dir() else []:
            shutil.copy2(log, rep.path / log.name)
        for log in workdir.glob("qemu-*.log") if workdir.is_dir() else []:
            shutil.copy2(log, rep.path / log.name)

    def _fail(self, rep: RepDir, reason: str, attempts: int, summary: RunSummary,
              cell: Cell) -> None:
        self._keep_consoles(rep)
        self.run.mark_failed(rep, reason, {"attempts": attempts})
        summary.failed.append((cell.cell_id, rep.repetition, _first_line(reason)))
        self.log(f"{cell.cell_id} rep {rep.repetition} FAILED: {_first_line(reason)}")


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(info: dict[str, object]) -> str:
    tp = info.get("throughput")
    return f"{tp:.1f} {info.get('units', '')}" if isinstance(tp, float) else "done"


def run_matrix(settings: Settings, config: Path | None, *, resume: str | None = None,
               shard_spec: tuple[int, int] | None = None, fault: Fault | None = None,
               log: Log = print) -> RunSummary:
    run, exp, cells = open_run(settings, config, resume, shard_spec)
    for warning in exp.warnings:
        log(warning)
    log(f"run {run.run_id}: {len(cells)} cells x {exp.repetitions} repetitions -> {run.path}")
    started = time.monotonic()
    summary = MatrixRunner(settings, run, exp, cells, log, fault).execute()
    atomic_write_text(run.path / "summary.txt", summary_text(summary, time.monotonic() - started))
    return summary


def summary_text(summary: RunSummary, seconds: float) -> str:
    lines = [f"run: {summary.run_dir}",
             f"repetitions: {summary.total} total, {summary.done} run now, "
             f"{summary.skipped} already done, {len(summary.failed)} failed",
             f"time: {seconds:.0f} s"]
    if summary.failed:
        lines.append("failures:")
        lines += [f"  {cell} rep {rep}: {why}" for cell, rep, why in summary.failed]
    return "\n".join(lines) + "\n"

