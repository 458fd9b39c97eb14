"""Boot the guests an experiment needs: a receiver alone, or receiver + sender.

This is the one place that turns (kernel, NIC, vCPUs) into running, SSH-reachable
guests, so `invoke shell`, the runner, the benchmarks and the tests all boot the
same way. Everything it starts (QEMU processes, taps, bridge) is torn down when
the context exits, on success, failure or Ctrl-C; booting installs the signal
handling of `testbed.vm.interrupts`, which bounds that teardown in time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from testbed import timings
from testbed.build.images import GuestImage, ensure_image, ensure_initrd
from testbed.build.kernel import Kernel
from testbed.build.kernels import get_kernel
from testbed.build.qemu_backport import resolve_qemu
from testbed.build.sysdeps import GUEST_PACKAGES, ensure_packages
from testbed.errors import NetbedError
from testbed.experiment.config import Cell
from testbed.experiment.kernelfile import KernelSet
from testbed.progress import Log
from testbed.settings import Settings
from testbed.shell import Shell
from testbed.vm import placement
from testbed.vm.dataplane import (
    PREFIX,
    RECEIVER_IP,
    SENDER_IP,
    DataPlane,
    DataPlanePlan,
    choose_mode,
    plan_dataplane,
    sweep_stale,
)
from testbed.vm.guest import Guest, KeyPair, make_keypair
from testbed.vm.interrupts import install_signal_handlers, interrupted
from testbed.vm.netns import NetnsShell, host_netperf, plan_netns, sender_files
from testbed.vm.process import QemuProcess, free_port, short_socket_path
from testbed.vm.qemu import GuestSpec, PluginSpec
from testbed.vocabulary import Accel, AccelSetting, NicName, TcgThreads


@dataclass(frozen=True)
class Assets:
    """What every guest boots from: kernel, image, initrd, run key, accelerator, and the
    QEMU that boots them (its version as `--version` says, for versions.json)."""

    kernel: Kernel
    image: GuestImage
    initrd: Path
    key: KeyPair
    accel: Accel
    accel_reason: str
    qemu_binary: str = ""
    qemu_version: str | None = None


@dataclass(frozen=True)
class AssetPlan:
    """What a run's pending repetitions boot from, found before anything is built: the
    kernels in the order the schedule first needs them, and whether any repetition runs
    under the cache-model plugin. Building exactly this, up front, means no download or
    build the run does not use, and a broken build stops the run before the first boot."""

    kernels: tuple[str, ...]
    plugin: bool


def plan_assets(items: Sequence[tuple[Cell, int]], cachemodel: bool,
                is_plain: Callable[[int], bool]) -> AssetPlan:
    """The assets of the scheduled (cell, repetition) pairs still to run (pure)."""
    kernels = tuple(dict.fromkeys(cell.kernel for cell, _ in items))
    plugin = cachemodel and any(not is_plain(rep) for _, rep in items)
    return AssetPlan(kernels, plugin)


def run_kernels(cells: Sequence[Cell]) -> tuple[str, ...]:
    """The guest kernels of `cells`, in first-use order (pure)."""
    return tuple(dict.fromkeys(cell.kernel for cell in cells))


@dataclass
class BootedGuest:
    spec: GuestSpec
    process: QemuProcess
    ssh: Guest
    boot_seconds: float = 0.0  # QEMU start -> readiness line
    ssh_seconds: float = 0.0  # readiness line -> SSH answered


@dataclass
class Topology:
    receiver: BootedGuest
    sender: BootedGuest | None  # a sender guest (setting sender: guest)
    dataplane: DataPlanePlan | None
    assets: Assets
    notes: dict[str, str] = field(default_factory=dict)
    placement: dict[str, object] = field(default_factory=dict)  # testbed.vm.placement record
    native_sender: NetnsShell | None = None  # netperf in a namespace (setting sender: netns)

    @property
    def sender_shell(self) -> Shell:
        """Where the sender's commands run, guest or namespace: the traffic is the same."""
        if self.sender is not None:
            return self.sender.ssh
        if self.native_sender is not None:
            return self.native_sender
        raise NetbedError("a measured cell needs a sender (booted with with_sender=False)")


def ssh_to(spec: GuestSpec, assets: Assets, settings: Settings) -> Guest:
    """The guest's SSH connection through its 127.0.0.1 port forward."""
    return Guest(spec.name, spec.ssh_port, assets.key, assets.image.host_key_pub,
                 settings.command_timeout_s)


def tap_or_socket(requested: str) -> tuple[DataPlanePlan, str]:
    """The data plane for a receiver/sender pair and why this mode was chosen."""
    mode, why = choose_mode(requested)
    return plan_dataplane(mode), why


@dataclass(frozen=True)
class BootEffects:
    """What boot() does besides running QEMU (whose binary is a setting): the guest
    connection and the data plane. Tests replace them to put an interrupt anywhere."""

    connect: Callable[[GuestSpec, Assets, Settings], Guest] = ssh_to
    dataplane: Callable[[str], tuple[DataPlanePlan, str]] = tap_or_socket


def prepare_assets(settings: Settings, kernel_name: str, workdir: Path,
                   log: Log = print, accel: AccelSetting | None = None,
                   kernels: KernelSet | None = None) -> Assets:
    """Install, build or fetch whatever booting needs (each step cached, each timed into
    the run's timings.json: a cached step takes no time); `kernels` is the kernels file
    the name comes from (default configs/kernels.yaml)."""
    from testbed.vm.hostfacts import qemu_version, resolve_accel

    with timings.step("packages", "host packages"):
        ensure_packages(GUEST_PACKAGES, log)
    if kernel_name == "distro":  # a built kernel times itself, each variant apart
        with timings.step("build", "kernel distro"):
            kernel = get_kernel(kernel_name, settings, log, kernels)
    else:
        kernel = get_kernel(kernel_name, settings, log, kernels)
    with timings.step("build", "image"):
        image = ensure_image(settings, log)
    with timings.step("build", f"initrd {kernel_name}"):
        initrd = ensure_initrd(image, kernel, settings)
    key = make_keypair(workdir / "ssh")
    chosen, why = resolve_accel(replace(settings, accel=accel) if accel else settings, log,
                                kernels=(kernel_name,))
    qemu = resolve_qemu(settings, log)  # what _boot starts: its version is the run's
    return Assets(kernel, image, initrd, key, chosen, why, qemu.binary, qemu_version(qemu))


def _spec(assets: Assets, settings: Settings, workdir: Path, name: str, index: int,
          cpus: int, nic: NicName | None, plan: DataPlanePlan | None, role: str,
          plugins: tuple[PluginSpec, ...], tcg_threads: TcgThreads,
          memory_mb: int | None) -> GuestSpec:
    attachment = None
    data_ip = None
    if plan is not None and nic is not None:
        attachment = plan.receiver if role == "receiver" else plan.sender
        data_ip = f"{RECEIVER_IP if role == 'receiver' else SENDER_IP}/{PREFIX}"
    return GuestSpec(
        name=name, kernel=assets.kernel.bzimage, initrd=assets.initrd, cpus=cpus,
        memory_mb=memory_mb or settings.guest_memory_mb, accel=assets.accel,
        ssh_port=free_port(), workdir=workdir, ssh_pubkey_b64=assets.key.public_b64,
        nic=nic, data=attachment, data_ip=data_ip, index=index, plugins=plugins,
        tcg_threads=tcg_threads,
        icount=settings.tcg_icount if assets.accel == "tcg" else "",
        qmp_path=short_socket_path(name),
    )


def _boot(spec: GuestSpec, assets: Assets, settings: Settings,
          stack: contextlib.ExitStack, effects: BootEffects) -> BootedGuest:
    process = QemuProcess(spec, resolve_qemu(settings))
    stack.callback(process.shutdown)
    process.start()
    return BootedGuest(spec, process, effects.connect(spec, assets, settings))


def _await(booted: BootedGuest, settings: Settings, stack: contextlib.ExitStack) -> None:
    booted.boot_seconds = booted.process.wait_ready(settings.boot_timeout_s)
    booted.ssh_seconds = booted.ssh.wait_ssh(settings.ssh_timeout_s)
    stack.callback(booted.ssh.close)


def _placed(receiver: BootedGuest,
            sender: BootedGuest | None) -> list[placement.PlacedProcess]:
    return [placement.PlacedProcess(b.spec.name, b.process.popen.pid, b.spec.cpus + 1)
            for b in (receiver, sender) if b is not None and b.process.popen is not None]


NATIVE_SENDER_WEIGHT = 1  # netperf is one thread (a guest weighs its vCPUs + 1)


def _place(settings: Settings, receiver: BootedGuest, sender: BootedGuest | None,
           native: NetnsShell | None = None) -> dict[str, object]:
    """Pin the started QEMU processes as the `host_placement` setting says (#11); a native
    sender gets its block too, which its shell applies to each command (taskset)."""
    record = placement.place_guests(
        placement.placement_mode(settings.host_placement), _placed(receiver, sender),
        others={"sender": NATIVE_SENDER_WEIGHT} if native else None)
    guests, threads = record.get("guests"), record.get("threads")
    if (native is not None and record.get("mode") != "shared" and isinstance(guests, dict)
            and isinstance(threads, dict)):
        native.cpus = tuple(sorted(placement.parse_cpu_list(str(guests["sender"]))))
        threads["sender"] = {"netperf (taskset on each command)": str(guests["sender"])}
        record["note"] = (f"{record.get('note')} (the sender is netperf in a namespace, "
                          "pinned by taskset)")
    return record


def sender_kind(requested: str, plan: DataPlanePlan | None) -> str:
    """`guest` or `netns` (pure): a namespace needs the bridge of the tap data plane, so
    without one (no root: socket data plane) the sender is a guest, and the note says so."""
    if requested == "netns" and (plan is None or plan.bridge is None):
        return "guest"
    return requested


def sender_note(kind: str, requested: str, plan: DataPlanePlan | None) -> str:
    """What sent the traffic, for versions.json and the report (pure)."""
    if kind == "netns":
        return ("netns: netperf as a host process in a network namespace on the data-plane "
                "bridge (the guest image's netperf)")
    if requested == "netns":
        return (f"guest (netns asked for, but the data plane is "
                f"{plan.mode if plan else 'missing'}: a namespace needs the tap bridge)")
    return "guest: a second QEMU guest runs netperf"


def _native_sender(assets: Assets, settings: Settings, workdir: Path, plan: DataPlanePlan,
                   stack: contextlib.ExitStack) -> NetnsShell:
    """The sender namespace on the data plane's bridge, torn down with the stack."""
    assert plan.bridge is not None
    bin_dir = host_netperf(assets.image)
    ns = plan_netns(plan.bridge, plan.tag)
    files = sender_files(workdir)
    registry = settings.cache_dir / "dataplanes"
    stack.enter_context(DataPlane(ns, registry))
    return NetnsShell(ns.namespace, files, bin_dir, settings.command_timeout_s)


@contextlib.contextmanager
def boot(assets: Assets, settings: Settings, workdir: Path, *, cpus: int,
         nic: NicName | None, with_sender: bool, sender_cpus: int = 2,
         dataplane_mode: str = "auto", receiver_plugins: tuple[PluginSpec, ...] = (),
         receiver_tcg_threads: TcgThreads = "multi", memory_mb: int | None = None,
         log: Log = print, effects: BootEffects = BootEffects()) -> Iterator[Topology]:
    """Boot the receiver (and the sender on a private data plane) and yield them."""
    install_signal_handlers()
    if interrupted():  # a caller that caught the interrupt must not boot again
        raise KeyboardInterrupt
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        plan = None
        notes: dict[str, str] = {"accel": f"{assets.accel} ({assets.accel_reason})"}
        if settings.tcg_icount and assets.accel == "tcg":
            notes["tcg_icount"] = (f"-icount {settings.tcg_icount}, one TCG thread per guest "
                                   "(guest time follows instructions, not the host clock)")
        if nic is not None:  # a lone guest gets the same data plane, its peer's tap unused
            plan, why = effects.dataplane(dataplane_mode)
            notes["dataplane"] = f"{plan.mode}: {why}; {plan.offload_note}"
            registry = settings.cache_dir / "dataplanes"
            sweep_stale(registry)
            stack.enter_context(DataPlane(plan, registry))
        started = time.monotonic()
        receiver = _boot(_spec(assets, settings, workdir, "receiver", 1, cpus, nic, plan,
                               "receiver", receiver_plugins, receiver_tcg_threads,
                               memory_mb), assets, settings, stack, effects)
        sender = None
        native = None
        kind = sender_kind(settings.sender, plan) if with_sender else "none"
        if kind == "guest":
            sender = _boot(_spec(assets, settings, workdir, "sender", 2, sender_cpus, nic,
                                 plan, "sender", (), "multi", memory_mb),
                           assets, settings, stack, effects)
        elif kind == "netns":
            assert plan is not None and plan.bridge is not None  # sender_kind checked
            native = _native_sender(assets, settings, workdir, plan, stack)
        if with_sender:
            notes["sender"] = sender_note(kind, settings.sender, plan)
        placement_record = _place(settings, receiver, sender, native)  # h-repeat (#11)
        who = ("receiver + sender" if sender else
               "receiver + native sender" if native else "guest")
        log(f"booting {who} "
            f"({assets.kernel.name} kernel, {nic or 'no'} NIC, {cpus} vCPUs, "
            f"{assets.accel.upper()})")
        _await(receiver, settings, stack)
        if sender is not None:
            _await(sender, settings, stack)
        ready = time.monotonic() - started
        log(f"guests ready in {ready:.1f} s")
        timings.record("boot", f"{assets.kernel.name}, {nic or 'no'} NIC, {cpus} vCPUs",
                       ready, f"{who}; plugin" if receiver_plugins else who)
        placement_record = placement.confirm(placement_record, _placed(receiver, sender))
        notes["placement"] = str(placement_record["note"])
        yield Topology(receiver, sender, plan if with_sender else None, assets, notes,
                       placement_record, native)
