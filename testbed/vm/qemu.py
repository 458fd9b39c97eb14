"""Guest spec -> QEMU argv (pure), and the lifecycle of one QEMU process.

The argv is a pure function of a `GuestSpec`, so every NIC model, accelerator and
network attachment is unit-tested without starting anything. `QemuProcess` owns
one running QEMU: it waits for readiness in stages (process alive, QMP answers,
the init's `NETBED-READY` line on the serial console), quits it over QMP and
kills it after a timeout. Every process started is registered so an exception,
a Ctrl-C or interpreter exit cannot leave one behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from testbed.errors import GuestError

NicModel = Literal["e1000", "virtio", "virtio-nocsum"]
NIC_MODELS: tuple[str, ...] = ("e1000", "virtio", "virtio-nocsum")
Accel = Literal["kvm", "tcg"]
READY_MARKER = "NETBED-READY"

# The guest kernel driver that each model binds to (checked by integration tests).
NIC_DRIVER = {"e1000": "e1000", "virtio": "virtio_net", "virtio-nocsum": "virtio_net"}

# virtio-net with every checksum and segmentation offload off, in both directions,
# so the guest driver is virtio but checksums are verified in software as with e1000.
VIRTIO_NOCSUM_PROPS = (
    "csum=off", "guest_csum=off", "gso=off",
    "guest_tso4=off", "guest_tso6=off", "guest_ecn=off", "guest_ufo=off",
    "host_tso4=off", "host_tso6=off", "host_ecn=off", "host_ufo=off",
)


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
    """A TCG plugin and its arguments (`-plugin file=...,k=v`)."""

    path: Path
    args: tuple[tuple[str, str], ...] = ()

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
    nic: NicModel | None = None
    data: DataAttachment | None = None
    data_ip: str | None = None  # CIDR, e.g. 198.18.0.1/24
    index: int = 0  # distinguishes MACs of guests in one run
    mgmt_net: str = "198.19.255.0/24"
    tcg_threads: Literal["multi", "single"] = "multi"
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


def nic_device_arg(model: NicModel, netdev: str, mac: str) -> str:
    if model == "e1000":
        return f"e1000,netdev={netdev},mac={mac}"
    if model == "virtio":
        return f"virtio-net-pci,netdev={netdev},mac={mac}"
    if model == "virtio-nocsum":
        return ",".join([f"virtio-net-pci,netdev={netdev},mac={mac}", *VIRTIO_NOCSUM_PROPS])
    raise ValueError(f"unknown NIC model {model!r} (allowed: {', '.join(NIC_MODELS)})")


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
    return " ".join(parts)


def qemu_argv(spec: GuestSpec, qemu_binary: str = "qemu-system-x86_64") -> list[str]:
    """The full QEMU command line for `spec` (pure)."""
    if spec.accel == "kvm":
        accel, cpu = ["-accel", "kvm"], ["-cpu", "host,pmu=on"]
    else:
        accel, cpu = ["-accel", f"tcg,thread={spec.tcg_threads}"], ["-cpu", "max"]
    mgmt_host = spec.mgmt_net.split("/")[0].rsplit(".", 1)[0] + ".2"
    argv = [
        qemu_binary, "-name", spec.name, "-machine", "q35", *accel, *cpu,
        "-smp", str(spec.cpus), "-m", str(spec.memory_mb),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
        "-append", kernel_append(spec),
        "-chardev", f"file,id=console,path={spec.console_log}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
        "-device", "virtio-rng-pci",
        "-netdev",
        f"user,id=mgmt,net={spec.mgmt_net},host={mgmt_host},restrict=on,"
        f"hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={spec.mgmt_mac}",
    ]
    if spec.nic is not None and spec.data is not None:
        argv += ["-netdev", data_netdev_arg(spec.data),
                 "-device", nic_device_arg(spec.nic, "data", spec.data_mac)]
    for plugin in spec.plugins:
        argv += ["-plugin", plugin.render()]
    return argv


def short_socket_path(name: str) -> Path:
    """A fresh, short path for a UNIX socket (AF_UNIX paths are limited to 107 bytes)."""
    import tempfile

    base = Path(tempfile.gettempdir()) / "netbed-sockets"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{os.getpid()}-{secrets.token_hex(4)}-{name}.sock"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (QEMU's bind fails loudly if we lose a race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready_line(console_text: str) -> str | None:
    """The init's readiness line, if the console has printed it (pure)."""
    m = re.search(rf"^{READY_MARKER}\b.*$", console_text, re.MULTILINE)
    return m.group(0) if m else None


def console_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_LIVE: dict[int, QemuProcess] = {}
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills QEMU if we die, even by SIGKILL,
    which no atexit handler survives (a kill -9'd run must not leave guests behind)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_all() -> None:
    for proc in list(_LIVE.values()):
        proc.kill()


atexit.register(_kill_all)


def _on_signal(signum: int, _frame: object) -> None:
    """SIGTERM: stop our guests, then unwind like an exit so context managers remove
    tap devices and bridges too (a later run would sweep them, but why wait)."""
    _kill_all()
    raise SystemExit(128 + signum)


def _on_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: stop our guests first. invoke's runner swallows KeyboardInterrupt while a
    remote command runs (it forwards it to the remote side, which a non-pty command
    ignores), so killing QEMU is what makes the SSH session, and then the task, end."""
    _kill_all()
    signal.default_int_handler(signum, frame)  # type: ignore[arg-type]


with contextlib.suppress(ValueError):  # not in the main thread: atexit still covers us
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)


class QemuProcess:
    """One running QEMU; a context manager that always leaves nothing behind."""

    def __init__(self, spec: GuestSpec, qemu_binary: str = "qemu-system-x86_64") -> None:
        self.spec = spec
        self.argv = qemu_argv(spec, qemu_binary)
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None

    def __enter__(self) -> QemuProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        self.spec.workdir.mkdir(parents=True, exist_ok=True)
        self.spec.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
        for stale in (self.spec.console_log, self.spec.qmp_socket):
            stale.unlink(missing_ok=True)
        self.spec.console_log.touch()
        log = open(self.spec.qemu_log, "wb")  # noqa: SIM115 - handed to the child
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        log.close()
        _LIVE[self.popen.pid] = self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _fail(self, what: str) -> GuestError:
        qemu_out = console_tail(self.spec.qemu_log, 10)
        msg = f"guest {self.spec.name}: {what}"
        if qemu_out:
            msg += f"\n--- qemu output ---\n{qemu_out}"
        tail = console_tail(self.spec.console_log, 15)
        if tail:
            msg += f"\n--- console tail ---\n{tail}"
        return GuestError(msg, console_log=str(self.spec.console_log))

    def wait_ready(self, timeout: float) -> float:
        """Block until the console shows the readiness line; returns seconds since start."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise self._fail(f"QEMU exited with status {self.popen and self.popen.poll()}")
            text = self.spec.console_log.read_text(errors="replace")
            if ready_line(text):
                self.ready_at = time.monotonic()
                return self.ready_at - self.started_at
            time.sleep(0.1)
        raise self._fail(f"no {READY_MARKER} line within {timeout:.0f} s")

    def qmp(self, command: str, timeout: float = 5.0) -> object:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        mon = QEMUMonitorProtocol(str(self.spec.qmp_socket))
        try:
            mon.connect()
            return mon.cmd(command)
        finally:
            mon.close()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit over QMP; kill it if it has not gone after `timeout`."""
        if self.popen is None:
            return
        if self.alive:
            with contextlib.suppress(Exception):
                self.qmp("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
        _LIVE.pop(self.popen.pid, None)
        self.spec.qmp_socket.unlink(missing_ok=True)
