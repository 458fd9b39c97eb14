"""The isolated L2 segment between the receiver and the sender.

As root: tap devices with `vnet_hdr` on a bridge of our own with no IP address and
no uplink (virtio keeps its checksum offload). Otherwise: QEMU's socket netdev on
127.0.0.1, which carries no vnet header, so QEMU clears virtio's offloads and both
NICs verify checksums in software: the plan records that so results can say it.
Names carry a per-run tag so parallel runs never collide, and teardown always
runs, within a budget: a live data plane is registered with
`testbed.vm.interrupts.TEARDOWN`, so an emergency (a second Ctrl-C) removes it
after the QEMU processes are dead.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from testbed.errors import CommandError
from testbed.vm.interrupts import TEARDOWN, Stage
from testbed.vm.process import free_port, pid_alive
from testbed.vm.qemu import DataAttachment, SocketAttachment, TapAttachment

Mode = Literal["tap", "socket"]
# Data-plane addresses: 198.18.0.0/15 is set aside for benchmarking (RFC 2544).
RECEIVER_IP = "198.18.0.1"
SENDER_IP = "198.18.0.2"
PREFIX = 24
# `ip` answers in milliseconds; these only bound a host that does not.
SETUP_COMMAND_TIMEOUT_S = 20.0
TEARDOWN_BUDGET_S = 5.0


@dataclass(frozen=True)
class DataPlanePlan:
    mode: Mode
    tag: str
    receiver: DataAttachment
    sender: DataAttachment
    setup: tuple[tuple[str, ...], ...]  # host commands, in order
    teardown: tuple[tuple[str, ...], ...]
    offload_note: str

    @property
    def bridge(self) -> str | None:
        return f"nbbr{self.tag}" if self.mode == "tap" else None


CAP_NET_ADMIN = 12


def has_cap_net_admin(proc_status: str) -> bool:
    """Whether the CapEff line of /proc/<pid>/status grants CAP_NET_ADMIN (pure)."""
    for line in proc_status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def can_use_taps() -> tuple[bool, str]:
    """Whether we may create taps and bridges here, and why not."""
    if not has_cap_net_admin(Path("/proc/self/status").read_text()):
        return False, "no CAP_NET_ADMIN (tap devices and bridges need root or that capability)"
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun is missing"
    return True, f"{'root' if os.geteuid() == 0 else 'CAP_NET_ADMIN'} with /dev/net/tun"


def plan_dataplane(mode: Mode, tag: str | None = None, port: int | None = None) -> DataPlanePlan:
    """The devices and QEMU attachments for one receiver/sender pair (pure but for names)."""
    tag = tag or secrets.token_hex(3)
    if mode == "socket":
        port = port or free_port()
        return DataPlanePlan(
            "socket", tag, SocketAttachment(port, listen=True),
            SocketAttachment(port, listen=False), (), (),
            "socket netdev: no vnet header, so no NIC has checksum offload",
        )
    br, rx, tx = f"nbbr{tag}", f"nbt{tag}r", f"nbt{tag}s"
    setup: list[tuple[str, ...]] = [
        ("ip", "link", "add", "name", br, "type", "bridge", "stp_state", "0"),
        ("sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{br}/disable_ipv6"),
        ("ip", "link", "set", br, "up"),
    ]
    for tap in (rx, tx):
        setup += [
            ("ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"),
            ("sh", "-c", f"echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6"),
            ("ip", "link", "set", tap, "master", br),
            ("ip", "link", "set", tap, "up"),
        ]
    teardown = (("ip", "link", "del", rx), ("ip", "link", "del", tx), ("ip", "link", "del", br))
    return DataPlanePlan("tap", tag, TapAttachment(rx), TapAttachment(tx), tuple(setup),
                         teardown, "tap with vnet_hdr: virtio keeps checksum offload")


def sweep_stale(registry: Path) -> list[str]:
    """Remove devices left by runs that died without cleaning up (kill -9, power loss).

    Each live data plane has a small file naming its owner's pid and its teardown
    commands; a file whose owner is gone is torn down now. Returns the tags swept.
    """
    swept = []
    for entry in sorted(registry.glob("*.json")) if registry.is_dir() else []:
        try:
            data = json.loads(entry.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(int(data.get("pid", 0))) and data.get("boot_id") == _boot_id():
            continue
        run_commands(data.get("teardown", []), TEARDOWN_BUDGET_S)
        entry.unlink(missing_ok=True)
        swept.append(entry.stem)
    return swept


def run_commands(commands: Sequence[Sequence[str]], budget: float) -> list[str]:
    """Run every command (failures tolerated: a device may already be gone) within
    `budget` seconds in all; returns the commands that did not finish in time.

    An interrupt during one command ends that command, not the removal: the rest
    still run, then the interrupt goes on.
    """
    end = time.monotonic() + budget
    late = []
    interrupt: BaseException | None = None
    for cmd in commands:
        try:
            subprocess.run(cmd, capture_output=True, timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            late.append(" ".join(cmd))
        except OSError:
            continue
        except (KeyboardInterrupt, SystemExit) as exc:  # subprocess.run killed the command
            late.append(" ".join(cmd))
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt
    return late


def _boot_id() -> str:
    p = Path("/proc/sys/kernel/random/boot_id")
    return p.read_text().strip() if p.exists() else ""


class DevicePlan(Protocol):
    """Host devices to create and remove: a data plane, or a sender namespace on it."""

    @property
    def tag(self) -> str: ...

    @property
    def setup(self) -> tuple[tuple[str, ...], ...]: ...

    @property
    def teardown(self) -> tuple[tuple[str, ...], ...]: ...


PlanT = TypeVar("PlanT", bound=DevicePlan)


class DataPlane(Generic[PlanT]):
    """Creates the plan's devices on enter and removes them on exit, whatever happened."""

    def __init__(self, plan: PlanT, registry: Path | None = None) -> None:
        self.plan = plan
        self.registry = registry
        self._token: int | None = None

    @property
    def _entry(self) -> Path | None:
        return self.registry / f"{self.plan.tag}.json" if self.registry else None

    def __enter__(self) -> PlanT:
        if self._entry is not None and self.plan.teardown:
            self._entry.parent.mkdir(parents=True, exist_ok=True)
            self._entry.write_text(json.dumps({"pid": os.getpid(), "boot_id": _boot_id(),
                                               "teardown": self.plan.teardown}))
        if self.plan.teardown:
            self._token = TEARDOWN.register(Stage.DEVICES, f"devices {self.plan.tag}",
                                            self.close)
        try:
            for cmd in self.plan.setup:
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True,
                                          timeout=SETUP_COMMAND_TIMEOUT_S)
                except subprocess.TimeoutExpired as exc:
                    raise CommandError(list(cmd), None, f"no answer within {exc.timeout:.0f} s"
                                       ) from None
                if proc.returncode != 0:
                    raise CommandError(list(cmd), proc.returncode, proc.stderr)
        except BaseException:
            self.close()
            raise
        return self.plan

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, budget: float = TEARDOWN_BUDGET_S) -> None:
        """Remove the devices (bounded by `budget` s); safe to call twice, from two threads."""
        late = ["?"]
        try:
            late = run_commands(self.plan.teardown, budget)
        finally:
            TEARDOWN.unregister(self._token)
            self._token = None
            if self._entry is not None and not late:
                self._entry.unlink(missing_ok=True)  # else the next run's sweep retries


def choose_mode(requested: str = "auto") -> tuple[Mode, str]:
    """auto -> tap when allowed, else socket; the reason is recorded with results."""
    ok, why = can_use_taps()
    if requested == "tap" or (requested == "auto" and ok):
        return "tap", why
    return "socket", why if requested == "auto" else "socket requested"
