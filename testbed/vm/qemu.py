"""Guest spec -> QEMU argv (pure): the one builder of every QEMU command line.

The argv is a pure function of a spec, so every NIC model, accelerator and
network attachment is unit-tested without starting anything. `DirectBoot` is
what every netbed guest shares (machine, accelerator, CPU model, direct kernel
boot, serial console, TCG plugins); experiment guests (`GuestSpec`), the KVM
probe (`testbed.vm.hostfacts`) and the cache model's micro guests
(`testbed.vm.cachemodel`) all go through `direct_boot_argv`. Running an argv is
`testbed.vm.process`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from testbed.build.qemu_backport import QemuInstall
from testbed.vocabulary import NIC_NAMES, Accel, NicName, TcgThreads

READY_MARKER = "NETBED-READY"

# The guest kernel driver that each model binds to (checked by integration tests).
NIC_DRIVER = {"e1000": "e1000", "virtio": "virtio_net", "virtio-nocsum": "virtio_net",
              "virtio-notso": "virtio_net"}

# virtio-net with every checksum and segmentation offload off, in both directions,
# so the guest driver is virtio but checksums are verified in software as with e1000.
VIRTIO_NOCSUM_PROPS = (
    "csum=off", "guest_csum=off", "gso=off",
    "guest_tso4=off", "guest_tso6=off", "guest_ecn=off", "guest_ufo=off",
    "host_tso4=off", "host_tso6=off", "host_ecn=off", "host_ufo=off",
)

# virtio-net that keeps receive checksum offload (guest_csum) but takes no TSO/GSO
# frames: the host segments to MSS-sized frames as for e1000, so virtio-notso vs e1000
# contrasts only the checksum, and virtio vs virtio-notso only the segmentation.
VIRTIO_NOTSO_PROPS = (
    "guest_csum=on", "guest_tso4=off", "guest_tso6=off", "guest_ecn=off", "guest_ufo=off",
)


# Under -icount the secondary vCPU's delay-loop calibration fails ("calibrate_delay_direct()
# failed") and its bring-up stalls for minutes (measured: no console line after CPU #1 in
# 180 s); a fixed lpj (the 1 GHz virtual TSC at HZ=250, as the boot CPU measures it) and a
# trusted TSC let both guests boot (~30 s under shift=auto).
ICOUNT_APPEND = ("lpj=3999972", "tsc=reliable")

@dataclass(frozen=True)
class TapAttachment:
    """Data plane over a host tap device (with vnet_hdr: virtio keeps its offloads)."""

    ifname: str


@dataclass(frozen=True)
class SocketAttachment:
    """Data plane over QEMU's socket netdev on loopback (no vnet header: no offloads)."""

    port: int
    listen: bool


DataAttachment = TapAttachment | SocketAttachment


@dataclass(frozen=True)
class PluginSpec:
    """A TCG plugin and its arguments (`-plugin file=...,k=v`).

    `guest_ram_arg`: the plugin reads guest RAM through a mapping of its own when RAM
    is a shared memfd (QEMU 10.0's plugin API has no host pointer); on the backport
    QEMU the argv then puts RAM in one and passes its size as `<guest_ram_arg>=<M>M`."""

    path: Path
    args: tuple[tuple[str, str], ...] = ()
    guest_ram_arg: str = ""

    def render(self) -> str:
        return ",".join([f"file={self.path}", *(f"{k}={v}" for k, v in self.args)])


@dataclass(frozen=True)
class GuestSpec:
    """Everything that decides how one guest is started."""

    name: str
    kernel: Path
    initrd: Path
    cpus: int
    memory_mb: int
    accel: Accel
    ssh_port: int
    workdir: Path  # console log, QMP socket, pid file live here
    ssh_pubkey_b64: str  # base64 blob of the run's ed25519 public key
    nic: NicName | None = None
    data: DataAttachment | None = None
    data_ip: str | None = None  # CIDR, e.g. 198.18.0.1/24
    index: int = 0  # distinguishes MACs of guests in one run
    mgmt_net: str = "198.19.255.0/24"
    tcg_threads: TcgThreads = "multi"
    icount: str = ""  # QEMU -icount value under TCG ("" off); implies thread=single
    extra_append: tuple[str, ...] = ()
    plugins: tuple[PluginSpec, ...] = field(default_factory=tuple)
    # UNIX socket paths must be < 108 bytes, and results folders can be deep: callers
    # put the QMP socket somewhere short (see short_socket_path).
    qmp_path: Path | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / f"console-{self.name}.log"

    @property
    def qmp_socket(self) -> Path:
        return self.qmp_path or self.workdir / f"qmp-{self.name}.sock"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / f"qemu-{self.name}.log"

    @property
    def mgmt_mac(self) -> str:
        return f"52:54:00:ff:00:{self.index:02x}"

    @property
    def data_mac(self) -> str:
        return f"52:54:00:12:00:{self.index:02x}"

    @property
    def mgmt_ip(self) -> str:
        base = self.mgmt_net.split("/")[0].rsplit(".", 1)[0]
        return f"{base}.15/24"


def nic_device_arg(model: NicName, netdev: str, mac: str) -> str:
    if model == "e1000":
        return f"e1000,netdev={netdev},mac={mac}"
    if model == "virtio":
        return f"virtio-net-pci,netdev={netdev},mac={mac}"
    if model == "virtio-nocsum":
        return ",".join([f"virtio-net-pci,netdev={netdev},mac={mac}", *VIRTIO_NOCSUM_PROPS])
    if model == "virtio-notso":
        return ",".join([f"virtio-net-pci,netdev={netdev},mac={mac}", *VIRTIO_NOTSO_PROPS])
    raise ValueError(f"unknown NIC model {model!r} (allowed: {', '.join(NIC_NAMES)})")


def data_netdev_arg(attachment: DataAttachment) -> str:
    if isinstance(attachment, TapAttachment):
        return f"tap,id=data,ifname={attachment.ifname},script=no,downscript=no,vnet_hdr=on"
    role = "listen" if attachment.listen else "connect"
    return f"socket,id=data,{role}=127.0.0.1:{attachment.port}"


def kernel_append(spec: GuestSpec) -> str:
    """Kernel command line: quiet serial console, and our init's settings."""
    parts = [
        "console=ttyS0", "quiet", "loglevel=3", "panic=-1", "rdinit=/init", "net.ifnames=0",
        f"netbed.name={spec.name}",
        f"netbed.mgmt_mac={spec.mgmt_mac}", f"netbed.mgmt_ip={spec.mgmt_ip}",
        f"netbed.ssh_key={spec.ssh_pubkey_b64}",
    ]
    if spec.nic is not None and spec.data is not None:
        parts += [f"netbed.data_mac={spec.data_mac}", f"netbed.data_ip={spec.data_ip}"]
    parts += list(spec.extra_append)
    if spec.icount and spec.accel == "tcg":
        parts += list(ICOUNT_APPEND)
    return " ".join(parts)


@dataclass(frozen=True)
class DirectBoot:
    """What every netbed QEMU command line has: a q35 machine on one accelerator,
    a kernel and initramfs booted directly, a serial console, no default devices."""

    name: str
    kernel: Path
    initrd: Path
    append: str
    cpus: int
    memory_mb: int
    accel: Accel
    tcg_threads: TcgThreads = "multi"
    icount: str = ""  # QEMU -icount value under TCG ("" off); implies thread=single
    console: Path | None = None  # serial console to this file; None: to QEMU's stdout
    devices: tuple[str, ...] = ()  # more arguments: QMP, netdevs and their devices
    plugins: tuple[PluginSpec, ...] = ()


# A QEMU to start: a binary name/path (the host's), or a QemuInstall (binary, firmware
# dirs passed as -L, environment) such as the unpacked backport.
Qemu = str | QemuInstall


def qemu_head(qemu: Qemu) -> list[str]:
    """The command line's start: environment, binary and -L firmware dirs (pure)."""
    return [qemu] if isinstance(qemu, str) else qemu.argv_head()


RAM_BACKEND_ID = "netbed-ram"


def uses_ram_memfd(boot: DirectBoot, qemu_binary: Qemu) -> bool:
    """Guest RAM goes into a shared memfd: the backport QEMU (10.0) with a plugin that
    maps it (the cache model, cachemodel/README.md "QEMU 10.0 (the default) and 7.2") (pure)."""
    return (isinstance(qemu_binary, QemuInstall) and qemu_binary.kind == "backport"
            and any(p.guest_ram_arg for p in boot.plugins))


def direct_boot_argv(boot: DirectBoot, qemu_binary: Qemu = "qemu-system-x86_64") -> list[str]:
    """The QEMU command line for `boot` (pure)."""
    if boot.accel == "kvm":
        accel, cpu = ["-accel", "kvm"], ["-cpu", "host,pmu=on"]
    else:
        # -icount needs one TCG thread (QEMU refuses it with multi-threaded TCG)
        threads = "single" if boot.icount else boot.tcg_threads
        accel, cpu = ["-accel", f"tcg,thread={threads}"], ["-cpu", "max"]
        if boot.icount:
            accel += ["-icount", boot.icount]
    if boot.console is not None:
        serial = ["-chardev", f"file,id=console,path={boot.console}",
                  "-serial", "chardev:console"]
    else:
        serial = ["-serial", "stdio"]
    plugins = boot.plugins
    ram: list[str] = []
    if uses_ram_memfd(boot, qemu_binary):
        # a memfd needs no cleanup (it goes with QEMU); -m stays and must match
        ram = ["-object", f"memory-backend-memfd,id={RAM_BACKEND_ID},size={boot.memory_mb}M,"
                          "share=on", "-machine", f"memory-backend={RAM_BACKEND_ID}"]
        plugins = tuple(replace(p, args=(*p.args, (p.guest_ram_arg, f"{boot.memory_mb}M")))
                        if p.guest_ram_arg else p for p in plugins)
    argv = [
        *qemu_head(qemu_binary), "-name", boot.name, "-machine", "q35", *accel, *cpu,
        "-smp", str(boot.cpus), "-m", str(boot.memory_mb), *ram,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(boot.kernel), "-initrd", str(boot.initrd),
        "-append", boot.append, *serial, *boot.devices,
    ]
    for plugin in plugins:
        argv += ["-plugin", plugin.render()]
    return argv


def qemu_argv(spec: GuestSpec, qemu_binary: Qemu = "qemu-system-x86_64") -> list[str]:
    """The full QEMU command line of an experiment guest (pure)."""
    mgmt_host = spec.mgmt_net.split("/")[0].rsplit(".", 1)[0] + ".2"
    devices = [
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-device", "virtio-rng-pci",
        "-netdev",
        f"user,id=mgmt,net={spec.mgmt_net},host={mgmt_host},restrict=on,"
        f"hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={spec.mgmt_mac}",
    ]
    if spec.nic is not None and spec.data is not None:
        devices += ["-netdev", data_netdev_arg(spec.data),
                    "-device", nic_device_arg(spec.nic, "data", spec.data_mac)]
    return direct_boot_argv(DirectBoot(
        name=spec.name, kernel=spec.kernel, initrd=spec.initrd, append=kernel_append(spec),
        cpus=spec.cpus, memory_mb=spec.memory_mb, accel=spec.accel,
        tcg_threads=spec.tcg_threads, icount=spec.icount, console=spec.console_log,
        devices=tuple(devices),
        plugins=spec.plugins), qemu_binary)


