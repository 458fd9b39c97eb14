"""A native sender: netperf as a host process in a network namespace of ours (#11).

Why: on a 2-core host the sender guest is a second QEMU (2 vCPUs, its own I/O
thread) that competes with the receiver for the host CPUs, so the host scheduler
shapes what a policy seems to do. A native netperf costs a fraction of that. The
receiver, the system under test, is unchanged: same NIC, same tap with vnet_hdr.

The namespace holds one end of a veth pair with the sender's data-plane address;
the other end sits on the data plane's bridge (no IP, no uplink), so traffic still
only flows between our own receiver and our own namespace. The sender's commands
are the same shell text a sender guest gets (testbed.run.traffic,
testbed.formats.payload). They run through `ip netns exec`, which gives each
command a fresh mount namespace; in it a host directory of this boot is
bind-mounted over GUEST_DIR, so what one command writes (the fill file, netperf's
output and status) is there for the next, and parallel runs never share files.
netperf is the guest image's own binary (Debian's netperf, the version netserver
on the receiver runs), extracted from the image once.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.build.images import GuestImage
from testbed.errors import CommandError, GuestError
from testbed.formats.readback import fmt_cpulist
from testbed.shell import HostShell, Result
from testbed.vm.dataplane import PREFIX, SENDER_IP
from testbed.vocabulary import GUEST_DIR

NETPERF_IN_IMAGE = "usr/bin/netperf"
HOST_BIN = "host-bin"  # beside the image's rootfs.cpio
KILL_GRACE_S = 5


@dataclass(frozen=True)
class NetnsPlan:
    """Names and host commands of one sender namespace (pure)."""

    tag: str
    namespace: str
    veth_bridge: str  # on the data plane's bridge
    veth_inner: str  # in the namespace, with the sender's address
    address: str
    setup: tuple[tuple[str, ...], ...]
    teardown: tuple[tuple[str, ...], ...]


def plan_netns(bridge: str, tag: str, address: str = f"{SENDER_IP}/{PREFIX}") -> NetnsPlan:
    """The namespace for the data plane tagged `tag` on `bridge` (pure).

    Teardown first kills what still runs in the namespace (a netperf cut short keeps
    a namespace alive after its name is gone), then removes the veth pair (one end
    takes the other) and the name.
    """
    ns, outer, inner = f"nbns{tag}", f"nbv{tag}b", f"nbv{tag}n"
    setup: tuple[tuple[str, ...], ...] = (
        ("ip", "netns", "add", ns),
        ("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns),
        ("sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{outer}/disable_ipv6"),
        ("ip", "link", "set", outer, "master", bridge),
        ("ip", "link", "set", outer, "up"),
        ("ip", "-n", ns, "link", "set", "lo", "up"),
        ("ip", "-n", ns, "addr", "add", address, "dev", inner),
        ("ip", "-n", ns, "link", "set", inner, "up"),
    )
    teardown: tuple[tuple[str, ...], ...] = (
        ("sh", "-c", f"ip netns pids {ns} 2>/dev/null | xargs -r kill -9"),
        ("ip", "link", "del", outer),
        ("ip", "netns", "del", ns),
    )
    return NetnsPlan(f"{tag}ns", ns, outer, inner, address, setup, teardown)


def namespace_argv(namespace: str, workdir: Path, bin_dir: Path, command: str,
                   limit_s: float, cpus: Sequence[int] = ()) -> list[str]:
    """`command` as a sender guest would run it, in `namespace` (pure).

    `timeout` bounds it as the guest's own `timeout` does for SSH commands; what it
    starts in the background (netperf, under nohup) outlives it, like in a guest.
    With `cpus` (a disjoint host placement) it runs under `taskset`, and so does all
    it starts.
    """
    pin = f"taskset -c {fmt_cpulist(cpus)} " if cpus else ""
    inner = (f"mount --bind {shlex.quote(str(workdir))} {GUEST_DIR} && "
             f"PATH={shlex.quote(str(bin_dir))}:$PATH && export PATH && "
             f"exec {pin}timeout -k {KILL_GRACE_S} {int(limit_s)} "
             f"sh -c {shlex.quote(command)}")
    return ["ip", "netns", "exec", namespace, "sh", "-c", inner]


class NetnsShell:
    """The sender's commands in the namespace; a `testbed.shell.Shell`, as a guest's SSH is.

    Raises GuestError when a command outlives its timeout (the shape of a guest's hang)
    and CommandError for a non-zero status with `check`.
    """

    name = "sender"

    def __init__(self, namespace: str, workdir: Path, bin_dir: Path,
                 command_timeout_s: float, cpus: Sequence[int] = ()) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.command_timeout_s = command_timeout_s
        self.cpus = tuple(cpus)  # host CPUs of a disjoint placement; () = any

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        limit = timeout or self.command_timeout_s
        argv = namespace_argv(self.namespace, self.workdir, self.bin_dir, command, limit,
                              self.cpus)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=limit + KILL_GRACE_S + 5)
        except subprocess.TimeoutExpired as exc:
            raise GuestError(f"sender namespace {self.namespace}: command timed out after "
                             f"{limit:.0f} s: {command}") from exc
        result = Result(command, proc.returncode, proc.stdout, proc.stderr)
        if check and not result.ok:
            if proc.returncode == 124:
                raise GuestError(f"sender namespace {self.namespace}: command timed out "
                                 f"after {limit:.0f} s: {command}")
            raise CommandError(f"[{self.namespace}] {command}", proc.returncode, result.output)
        return result

    def close(self) -> None:
        """Nothing to close (no connection); the namespace's teardown ends its processes."""


def sender_files(workdir: Path) -> Path:
    """The host directory bound over GUEST_DIR in the namespace, and GUEST_DIR itself on
    the host, which only serves as the mount point (it stays empty)."""
    files = workdir / "sender-netns"
    files.mkdir(parents=True, exist_ok=True)
    Path(GUEST_DIR).mkdir(parents=True, exist_ok=True)
    return files


def host_netperf(image: GuestImage) -> Path:
    """The directory holding the image's netperf, extracted beside the image once.

    The same binary as the sender guest's and the same version as the receiver's
    netserver; Debian ships netperf in non-free, so the host has none of its own.
    """
    dest = image.rootfs_cpio.parent / HOST_BIN
    if (dest / "netperf").is_file():
        return dest
    # a staging directory of this call's own: two first runs may extract at once
    staging = Path(tempfile.mkdtemp(prefix=f"{HOST_BIN}.", dir=image.rootfs_cpio.parent))
    HostShell(cwd=staging).run(
        f"cpio -i --quiet -d --no-absolute-filenames {NETPERF_IN_IMAGE} "
        f"< {shlex.quote(str(image.rootfs_cpio))}",
        hint="the guest image holds netperf (images/rootfs/packages.txt); rebuild it with "
             "invoke build-image")
    binary = staging / NETPERF_IN_IMAGE
    if not binary.is_file():
        raise GuestError(f"no {NETPERF_IN_IMAGE} in {image.rootfs_cpio}")
    tmp_dir = staging / "bin"
    tmp_dir.mkdir()
    binary.rename(tmp_dir / "netperf")
    try:
        tmp_dir.rename(dest)  # whole directory at once: a half-written binary is never found
    except OSError:
        if not (dest / "netperf").is_file():  # (else another run got there first)
            raise
    HostShell().run(["rm", "-rf", str(staging)])
    return dest
