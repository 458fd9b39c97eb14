"""The real collaborators of the matrix loop for one run folder on this host.

`ExperimentGuests.boot` prepares a kernel's assets (recorded in versions.json),
attaches the cache model when the experiment counts with it, boots receiver and
sender, records the data plane, checks the guest's PMU, finds the data NIC and
starts netserver; `measure` runs one repetition and, with the cache model, cuts
its window out of the plugin's CSV. `Fault` is the test hook that hangs a cell.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import NetbedError
from testbed.experiment.config import Cell, Experiment
from testbed.progress import Log
from testbed.run.cachemodel_window import (
    collect_window,
    receiver_plugins,
    record_kernel_symbols,
)
from testbed.run.folder import RepDir, RunDir
from testbed.run.loop import Collaborators
from testbed.run.provenance import Provenance
from testbed.run.repetition import BootState, discover, run_repetition
from testbed.settings import Settings
from testbed.vm.qemu import PluginSpec
from testbed.vm.topology import Assets, Topology, boot, prepare_assets
from testbed.vocabulary import AccelSetting, TcgThreads


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


@dataclass(frozen=True)
class Booted:
    """Receiver and sender up, with what was found out about the receiver once per boot."""

    topo: Topology
    state: BootState
    symbols: dict[str, Any] | None = None  # the receiver's symbol table (cache model)


class ExperimentGuests:
    """Boots, measures and keeps logs for one run folder (see the module docstring)."""

    def __init__(self, settings: Settings, run: RunDir, exp: Experiment,
                 provenance: Provenance, log: Log = print, fault: Fault | None = None) -> None:
        self.settings = settings
        self.run = run
        self.exp = exp
        self.provenance = provenance
        self.log = log
        self.fault = fault
        self.assets: dict[str, Assets] = {}

    @property
    def guests_dir(self) -> Path:
        return self.run.work_dir / "guests"

    @property
    def cachemodel(self) -> bool:
        """The counter plan decides (auto under TCG, or asked for); without a plan (a
        session built in a test), the experiment's own words."""
        plan = self.provenance.plan
        return plan.cachemodel if plan is not None else "cachemodel" in self.exp.counters

    @property
    def accel(self) -> AccelSetting | None:
        """TCG for every cell when the cache model was asked for on a KVM host."""
        plan = self.provenance.plan
        return "tcg" if plan is not None and plan.force_tcg else None

    def collaborators(self, start: Callable[[], None]) -> Collaborators[Booted]:
        """The loop's collaborators; `start` runs once before the first repetition."""
        return Collaborators(boot=self.boot, measure=self.measure, start=start,
                             keep_logs=self.keep_logs)

    def _assets_for(self, kernel: str) -> Assets:
        if kernel not in self.assets:
            assets = prepare_assets(self.settings, kernel, self.run.work_dir, self.log,
                                    accel=self.accel)
            self.assets[kernel] = assets
            self.provenance.record_assets(kernel, assets)
        return self.assets[kernel]

    @contextlib.contextmanager
    def boot(self, cell: Cell) -> Iterator[Booted]:
        assets = self._assets_for(cell.kernel)
        workdir = self.guests_dir
        if workdir.exists():
            shutil.rmtree(workdir)
        plugins: tuple[PluginSpec, ...] = ()
        threads: TcgThreads = "multi"
        if self.cachemodel:
            plugins, threads = receiver_plugins(self.settings, workdir, self.log)
            # plugin-<key>/: the key hashes the plugin's sources, QEMU's header and flags
            self.provenance.record_plugin(plugins[0].path.parent.name if plugins else "")
        with boot(assets, self.settings, workdir, cpus=cell.cpus, nic=cell.nic,
                  with_sender=True, receiver_plugins=plugins, receiver_tcg_threads=threads,
                  memory_mb=self.exp.memory_mb, log=self.log) as topo:
            self.provenance.record_dataplane(topo.notes.get("dataplane"))
            self.provenance.record_placement(topo.placement)  # h-repeat (#11)
            self.provenance.check_guest_pmu(topo.receiver.ssh)
            symbols = (record_kernel_symbols(topo.receiver.ssh, self.run.path)
                       if self.cachemodel else None)
            booted = Booted(topo, discover(topo.receiver.ssh, topo.receiver.spec.data_mac),
                            symbols)
            if self.fault and self.fault.cell_id == cell.cell_id:
                self.log(f"fault injection: stopping the receiver's vCPUs for {cell.cell_id}")
                topo.receiver.process.qmp("stop")
            yield booted

    def measure(self, booted: Booted, cell: Cell, rep: RepDir) -> dict[str, object]:
        topo = booted.topo
        if topo.sender is None:
            raise NetbedError("a measured cell needs the sender guest")
        resolved = self.exp.policies.resolve(cell.policy, cell.cpus)
        info = run_repetition(topo.receiver.ssh, topo.sender.ssh, booted.state, self.exp,
                              cell, resolved, rep, self.provenance.pmu,
                              cachemodel=self.cachemodel)
        if self.cachemodel:
            collect_window(topo.receiver.spec.workdir, rep, booted.symbols)
        return info

    def keep_logs(self, rep: RepDir) -> None:
        """Serial and QEMU logs of the guests, kept with a repetition that went wrong."""
        if not self.guests_dir.is_dir():
            return
        for pattern in ("console-*.log", "qemu-*.log"):
            for log in self.guests_dir.glob(pattern):
                shutil.copy2(log, rep.path / log.name)
