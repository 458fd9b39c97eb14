"""A program that boots fake guests through the real `topology.boot` and stops at one stage.

`python -m tests.unit.interrupt_scenario STAGE ROOT` is run by test_interrupts.py, which
waits for the stage's marker file in ROOT and then sends real signals. Everything on
the interrupt path is netbed's own code (handlers, QemuProcess, DataPlane, boot's
teardown order); only the effects are fakes that behave like the real ones where it
matters:

- QEMU is tests/unit/fake_qemu.py, started by the real QemuProcess;
- the guest connection (`FakeShell`) holds a TCP connection to the fake QEMU's SSH
  port; its `run` waits like invoke's runner with Fabric: a Ctrl-C is noted, and the
  wait goes on until the connection closes (QEMU gone), then the interrupt is raised;
- the data plane's commands create and remove files under ROOT/devices; its first
  removal command records in ROOT/events whether any fake QEMU was still alive.

Stages (where the program blocks until interrupted):
  dataplane-setup  a data-plane setup command hangs
  qemu-ready       QEMU never prints its readiness line
  ssh-wait         the SSH wait retries forever
  command          a guest command runs (the Fabric-like wait)
  command-stuck    a guest command that ignores every interrupt, forever
  qmp-quit         teardown: QMP quit to a QEMU that never answers
  device-removal   teardown: a device removal command hangs
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from testbed.settings import Settings
from testbed.vm import interrupts
from testbed.vm.dataplane import DataPlanePlan
from testbed.vm.guest import KeyPair
from testbed.vm.qemu import GuestSpec, TapAttachment
from testbed.vm.topology import Assets, BootEffects, boot

STAGES = ("dataplane-setup", "qemu-ready", "ssh-wait", "command", "command-stuck",
          "qmp-quit", "device-removal")
FAKE_QEMU = Path(__file__).with_name("fake_qemu.py")


def mark(root: Path, name: str) -> None:
    (root / f"stage-{name}").touch()


class FakeShell:
    """The guest connection: a TCP connection to the fake QEMU's SSH port."""

    def __init__(self, spec: GuestSpec, root: Path, stage: str) -> None:
        self.spec = spec
        self.root = root
        self.stage = stage
        self.sock: socket.socket | None = None

    def wait_ssh(self, timeout: float) -> float:
        if self.stage == "ssh-wait" and self.spec.name == "receiver":
            mark(self.root, "ssh-wait")
            while True:  # like the real retry loop, against an sshd that never answers
                time.sleep(0.1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.spec.ssh_port), 1)
                self.sock.settimeout(None)
                return 0.0
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def run(self, command: str) -> None:
        assert self.sock is not None
        if self.stage == "command-stuck":
            mark(self.root, "command-stuck")
            while True:
                with contextlib.suppress(BaseException):
                    time.sleep(0.05)
        if self.stage != "command":
            return
        mark(self.root, "command")
        noted: KeyboardInterrupt | None = None
        while True:  # invoke's runner: forward the Ctrl-C, wait for the channel to close
            try:
                if not self.sock.recv(1):
                    break
            except KeyboardInterrupt as exc:
                noted = exc
            except OSError:
                break
        if noted is not None:
            raise noted
        raise OSError("connection closed by the guest")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def fake_dataplane(root: Path, stage: str):
    devices = root / "devices"

    def plan(_requested: str) -> tuple[DataPlanePlan, str]:
        setup: list[tuple[str, ...]] = [
            ("sh", "-c", f"mkdir -p {devices} && touch {devices}/bridge {devices}/tap-r "
                         f"{devices}/tap-s")]
        if stage == "dataplane-setup":
            setup.append(("sh", "-c", f"touch {root}/stage-dataplane-setup; exec sleep 60"))
        # ([f]: the pattern must not match this shell's own command line)
        alive = (f"if pgrep -f '[f]ake_qemu.py .*{root}' >/dev/null; then echo qemu-alive; "
                 f"else echo qemu-gone; fi >> {root}/events")
        teardown: list[tuple[str, ...]] = [("sh", "-c", f"{alive}; rm -f {devices}/tap-r")]
        if stage == "device-removal":
            teardown.append(("sh", "-c", f"touch {root}/stage-device-removal; exec sleep 60"))
        teardown += [("rm", "-f", f"{devices}/tap-s"), ("rm", "-f", f"{devices}/bridge")]
        return DataPlanePlan("tap", "fake", TapAttachment("nbtfaker"),
                             TapAttachment("nbtfakes"), tuple(setup), tuple(teardown),
                             "fake devices"), "fake"

    return plan


def main(stage: str, root: Path) -> int:
    if os.environ.get("SCENARIO_DEADLINE_S"):
        interrupts.DEADLINE_S = float(os.environ["SCENARIO_DEADLINE_S"])
    qemu = root / "qemu"
    qemu.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_QEMU} \"$@\"\n")
    qemu.chmod(0o755)
    settings = Settings(cache_dir=root / "cache", qemu_binary=str(qemu), qemu="system",
                        boot_timeout_s=300,
                        ssh_timeout_s=300, sender="guest")  # the stages name a sender QEMU
    empty = root / "empty"
    empty.touch()
    assets = Assets(kernel=SimpleNamespace(name="fake", bzimage=empty),  # type: ignore[arg-type]
                    image=SimpleNamespace(host_key_pub="x y"),  # type: ignore[arg-type]
                    initrd=empty, key=KeyPair(empty, "AAAA"), accel="tcg",
                    accel_reason="fake")
    effects = BootEffects(connect=lambda spec, _a, _s: FakeShell(spec, root, stage),  # type: ignore[arg-type,return-value]
                          dataplane=fake_dataplane(root, stage))
    try:
        with boot(assets, settings, root / "guests", cpus=1, nic="e1000", with_sender=True,
                  dataplane_mode="tap", effects=effects, log=lambda m: None) as topo:
            mark(root, "booted")
            topo.receiver.ssh.run("sleep 300")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
