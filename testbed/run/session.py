"""The real collaborators of the matrix loop for one run folder on this host.

`ExperimentGuests.boot` prepares a kernel's assets (recorded in versions.json),
attaches the cache model when the experiment counts with it, boots receiver and
sender, records the data plane, checks the guest's PMU, finds the data NIC and
starts netserver; `measure` runs one repetition and, with the cache model, cuts
its window out of the plugin's CSV. `Fault` is the test hook that hangs a cell, or
kills its receiver's QEMU or netserver in the middle of a window.

When the cache model counts, a cell's plain repetitions (`is_plain`: numbers from
`exp.max_repetitions` on, testbed.experiment.matrix.plain_numbers) boot without the
plugin and measure as a software-counter run would: tracing on, no markers. Their
`done` says `"plugin": false`, an instrumented one's `"plugin": true`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import timings
from testbed.build.cachemodel_plugin import build_plugin
from testbed.errors import CommandError, GuestError, NetbedError
from testbed.experiment.config import Cell, Experiment
from testbed.formats import reader, record
from testbed.progress import Log
from testbed.run.cachemodel_window import (
    arm_model,
    collect_window,
    receiver_plugins,
    record_kernel_symbols,
)
from testbed.run.folder import RepDir, RunDir
from testbed.run.loop import Collaborators
from testbed.run.phases import Phases
from testbed.run.provenance import Provenance
from testbed.run.repetition import BootState, discover, run_repetition
from testbed.run.traffic import CONSOLE_POLL_S, console_text
from testbed.settings import Settings
from testbed.shell import Result, Shell
from testbed.vm.qemu import PluginSpec
from testbed.vm.topology import AssetPlan, Assets, Topology, boot, prepare_assets
from testbed.vocabulary import GUEST_DIR, AccelSetting, TcgThreads

FAULT_KINDS = ("hang", "kill-qemu", "kill-netserver")
# the window script as testbed.run.repetition.start_window_command starts it
WINDOW_SCRIPT = f"nohup sh {GUEST_DIR}/window.sh"


@dataclass(frozen=True)
class Fault:
    """Test hook: a fault injected into the repetitions of `cell_id`.

    hang: the receiver's vCPUs are stopped (QMP stop) after every boot.
    kill-qemu: the receiver's QEMU gets SIGKILL in the middle of the first attempt's
      window (what the OOM killer does).
    kill-netserver: netserver (the reader) is killed with SIGKILL inside the receiver in
      the middle of the first attempt's window.
    Both strike half a window after the window's own begin, timed in the guest
    (`strike_command`), not on a host timer.
    """

    cell_id: str
    kind: str = "hang"

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        if not text:
            return None
        kind, _, cell_id = text.partition(":")
        if kind not in FAULT_KINDS or not cell_id:
            raise NetbedError(f"bad fault injection {text!r}",
                              hint=f"use KIND:<cell-id> with KIND one of {', '.join(FAULT_KINDS)}")
        return cls(cell_id, kind)


STRIKE_MARK = "netbed-fault-struck"  # the receiver's console line once it has struck
STRIKE_WAIT_S = 600  # how long the strike waits for the window to open (bounded)


def strike_command(kind: str, duration: float, win: str = f"{GUEST_DIR}/win",
                   console: str = "/dev/console") -> str:
    """The receiver's half of a mid-window fault: a detached watcher (pure).

    It waits for this window's reader pid (written before the window opens) and for the
    reader sampler's file, which the window script creates right after the `units
    before` edge (testbed.run.window): that is the window's own begin, seen within one
    20 ms poll. Then it waits half the window on the guest's clock, the clock the
    window's own `sleep` runs on. kill-netserver kills the reader and its daemon there
    with bash's builtin `kill`; both kinds then write STRIKE_MARK with the guest's
    stamps to the serial console, a file on the host, where `watch_console` sees it
    without an SSH round trip.

    Nothing in it forks once it waits (bash's `read -t` on a FIFO of its own sleeps;
    reader.reader_sampler_command does the same), and it runs SCHED_FIFO (`chrt`), so
    when its time comes it preempts the traffic at once. A watcher that forked `sleep`
    struck 8.8 s into a 2 s window at host load 25, after the window had closed: each
    fork and exec of a binary cost seconds there under TCG. The first strike, a new SSH
    connection a fixed host delay after netperf started, was never checked at all."""
    pid_file, opened = f"{win}/{reader.RAW_PID}", f"{win}/{reader.RAW}"
    bound = int(STRIKE_WAIT_S * 100)
    steps = [
        'f=$(mktemp -u) && mkfifo "$f" && exec 9<>"$f" && rm -f "$f" || exit 1',
        "cs() { read -r up _ < /proc/uptime; now=$(( ${up%.*} * 100 + 1${up#*.} - 100 )); }",
        f"cs; end=$(( now + {bound} ))",
        f'until [ -s {pid_file} ]; do cs; [ "$now" -ge "$end" ] && exit 0; '
        "read -r -t 0.02 -u 9 _; done",
        f"read -r r < {pid_file} || exit 0",
        'read -r _ _ _ d _ < "/proc/$r/stat" || exit 0',  # the daemon: the reader's parent
        f'until [ -e {opened} ]; do cs; [ "$now" -ge "$end" ] && exit 0; '
        "read -r -t 0.02 -u 9 _; done",
        "read -r t0 _ < /proc/uptime",
        f"read -r -t {duration / 2:g} -u 9 _",
        *(['kill -9 "$r" "$d"'] if kind == "kill-netserver" else []),
        "read -r t1 _ < /proc/uptime",
        f'echo "{STRIKE_MARK} opened=$t0 struck=$t1" > {console}']
    watcher = f"bash -c {shlex.quote(chr(10).join(steps))}"
    return (f"if chrt -f 50 true 2>/dev/null; then w='chrt -f 50'; else w=; fi; "
            f"nohup $w {watcher} < /dev/null > /dev/null 2>&1 &")


def parse_mark(line: str) -> float | None:
    """Seconds from the window's opening to the strike, from a STRIKE_MARK line (pure)."""
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    try:
        return float(fields["struck"]) - float(fields["opened"])
    except (KeyError, ValueError):
        return None


def watch_console(path: Path, offset: int, stopped: Callable[[], bool],
                  sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The first STRIKE_MARK line written to `path` after byte `offset`; None once
    `stopped()` says so and one last look finds none."""
    while True:
        last = stopped()
        for line in console_text(path, offset).splitlines():
            if STRIKE_MARK in line:
                return line.strip()
        if last:
            return None
        sleep(CONSOLE_POLL_S)


class StrikeInWindow:
    """The receiver's Shell for a cell with a mid-window fault: once the command that
    starts the window has returned (the window is armed), it starts `strike_command` in
    the receiver and a host thread that waits for its console mark, then calls
    `on_mark(line)` (which SIGKILLs QEMU for kill-qemu, or logs). `stop` ends the wait
    at the end of the repetition."""

    def __init__(self, inner: Shell, command: str, console: Path,
                 on_mark: Callable[[str], None]) -> None:
        self.inner = inner
        self.command = command
        self.console = console
        self.on_mark = on_mark
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        result = self.inner.run(command, timeout=timeout, check=check)
        if self.thread is None and WINDOW_SCRIPT in command:
            offset = self.console.stat().st_size if self.console.exists() else 0
            self.inner.run(self.command)
            self.thread = threading.Thread(target=self._watch, args=(offset,), daemon=True)
            self.thread.start()
        return result

    def _watch(self, offset: int) -> None:
        line = watch_console(self.console, offset, self.done.is_set)
        if line is not None:
            self.on_mark(line)

    def stop(self) -> None:
        """The repetition is over: a mark already written is still acted on."""
        self.done.set()
        if self.thread is not None:
            self.thread.join(timeout=30)


def exit_text(status: int) -> str:
    """A QEMU's exit status in words (pure)."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name}" + (" (from outside netbed: the OOM killer or a user)"
                                      if -status == signal.SIGKILL else "")
    return f"exited with status {status}"


@dataclass(frozen=True)
class Booted:
    """Receiver and sender up, with what was found out about the receiver once per boot."""

    topo: Topology
    state: BootState
    symbols: dict[str, Any] | None = None  # the receiver's symbol table (cache model)
    plugin: bool = False  # the receiver runs under the cache-model plugin


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
        self.struck: set[str] = set()  # cells whose one-off fault has been injected
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
                             keep_logs=self.keep_logs, plain=self.is_plain)

    @property
    def plain_repetitions(self) -> int:
        """Plugin-less repetitions per cell this run schedules (none without the model)."""
        return self.exp.plain_repetitions if self.cachemodel else 0

    def is_plain(self, rep_no: int) -> bool:
        """Repetition `rep_no` is a plain one: the cache model counts and the number lies
        after every instrumented one (testbed.experiment.matrix.plain_numbers)."""
        return self.cachemodel and rep_no >= self.exp.max_repetitions

    def _assets_for(self, kernel: str) -> Assets:
        if kernel not in self.assets:
            assets = prepare_assets(self.settings, kernel, self.run.work_dir, self.log,
                                    accel=self.accel, kernels=self.exp.kernels)
            self.assets[kernel] = assets
            self.provenance.record_assets(kernel, assets)
        return self.assets[kernel]

    def prepare(self, plan: AssetPlan) -> None:
        """Build or fetch everything `plan` names before the first boot (each step timed)."""
        for kernel in plan.kernels:
            self._assets_for(kernel)
        if plan.plugin:
            with timings.step("build", "plugin"):
                build_plugin(self.settings, self.log)

    @contextlib.contextmanager
    def boot(self, cell: Cell, plain: bool = False) -> Iterator[Booted]:
        """Receiver and sender for `cell`; the receiver under the cache-model plugin when
        the model counts, unless `plain`."""
        assets = self._assets_for(cell.kernel)
        workdir = self.guests_dir
        if workdir.exists():
            shutil.rmtree(workdir)
        plugins: tuple[PluginSpec, ...] = ()
        threads: TcgThreads = "multi"
        plugin = self.cachemodel and not plain
        if plugin:
            plugins, threads = receiver_plugins(self.settings, workdir, self.log)
            # plugin-<key>/: the key hashes the plugin's sources, QEMU's header and flags
            self.provenance.record_plugin(plugins[0].path.parent.name if plugins else "")
        with boot(assets, self.settings, workdir, cpus=cell.cpus, nic=cell.nic,
                  with_sender=True, receiver_plugins=plugins, receiver_tcg_threads=threads,
                  memory_mb=self.exp.memory_mb, log=self.log) as topo:
            self.provenance.record_dataplane(topo.notes.get("dataplane"))
            self.provenance.record_sender(topo.notes.get("sender"))
            self.provenance.record_guest_clock(topo.notes.get("tcg_icount"))
            self.provenance.record_placement(topo.placement)  # h-repeat (#11)
            self.provenance.check_guest_pmu(topo.receiver.ssh)
            symbols = (record_kernel_symbols(topo.receiver.ssh, self.run.path,
                                             topo.receiver.spec.workdir) if plugin else None)
            booted = Booted(topo, discover(topo.receiver.ssh, topo.receiver.spec.data_mac),
                            symbols, plugin)
            if plugin:  # the region that arms the plugin, outside every measured window
                arm_model(topo.receiver.ssh)
            if self.fault and self.fault.kind == "hang" and self.fault.cell_id == cell.cell_id:
                self.log(f"fault injection: stopping the receiver's vCPUs for {cell.cell_id}")
                topo.receiver.process.qmp("stop")
            yield booted

    def measure(self, booted: Booted, cell: Cell, rep: RepDir) -> dict[str, object]:
        topo = booted.topo
        resolved = self.exp.policies.resolve(cell.policy, cell.cpus)
        strike = self._strike(booted, cell)
        phases = Phases()
        try:
            # tracing: the config's switch, and never where the plugin counts this window
            with timings.step("repetition" if booted.plugin else "plain",
                              f"{cell.cell_id} rep {rep.repetition}") as note:
                try:
                    info = run_repetition(strike or topo.receiver.ssh, topo.sender_shell,
                                          booted.state, self.exp, cell, resolved, rep,
                                          self.provenance.pmu, cachemodel=booted.plugin,
                                          tracing=self.exp.tracing and not booted.plugin,
                                          phases=phases,
                                          console=topo.receiver.spec.console_log)
                    if booted.plugin:
                        with phases.phase("collect"):
                            collect_window(topo.receiver.spec.workdir, rep, booted.symbols)
                finally:
                    note.detail = phases.summary()
        except (GuestError, CommandError) as exc:
            process = topo.receiver.process
            status = process.popen.poll() if process.popen is not None else None
            if status is None:
                raise
            # what broke the repetition is the receiver's death, not the SSH error it caused
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GuestError(f"the receiver's QEMU died during the repetition "
                             f"({exit_text(status)}); then: {first}",
                             console_log=str(topo.receiver.spec.console_log)) from exc
        finally:
            if strike is not None:
                strike.stop()
        return {**info, "plugin": booted.plugin}

    def _strike(self, booted: Booted, cell: Cell) -> StrikeInWindow | None:
        """With a one-off kill-qemu or kill-netserver fault for this cell (its first
        attempt), the receiver's shell that strikes half a window after the window opens;
        else None."""
        topo = booted.topo
        fault = self.fault
        if (fault is None or fault.kind == "hang" or fault.cell_id != cell.cell_id
                or cell.cell_id in self.struck):
            return None
        self.struck.add(cell.cell_id)
        half = self.exp.duration / 2

        def on_mark(line: str) -> None:
            into = parse_mark(line)
            when = (f"{into:.2f} s after the window opened (window {self.exp.duration:g} s, "
                    "guest clock)" if into is not None else f"(mark {line!r})")
            if fault.kind == "kill-qemu":
                popen = topo.receiver.process.popen
                if popen is not None and popen.poll() is None:
                    self.log(f"fault injection: SIGKILL to the receiver's QEMU (pid "
                             f"{popen.pid}) mid-window in {cell.cell_id}, {when}")
                    os.kill(popen.pid, signal.SIGKILL)
            else:
                self.log(f"fault injection: killed netserver (the reader) in the receiver "
                         f"mid-window in {cell.cell_id}, {when}")

        self.log(f"fault injection: {fault.kind} armed for {cell.cell_id}: {half:g} s after "
                 "its window opens")
        return StrikeInWindow(topo.receiver.ssh, strike_command(fault.kind, self.exp.duration),
                              topo.receiver.spec.console_log, on_mark)

    def keep_logs(self, rep: RepDir) -> None:
        """Serial and QEMU logs of the guests, kept with a repetition that went wrong."""
        if not self.guests_dir.is_dir():
            return
        for pattern in record.LOG_PATTERNS:
            for log in self.guests_dir.glob(pattern):
                shutil.copy2(log, rep.path / log.name)
