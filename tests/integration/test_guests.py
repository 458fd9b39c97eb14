"""Real guests under TCG: vCPUs, drivers, checksum offload, the data plane, cleanup."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.errors import GuestError
from testbed.formats.offloads import OFFLOAD_SCRIPT, parse_offloads
from testbed.settings import REPO_ROOT
from testbed.vm.interrupts import TEARDOWN_BOUND_S
from testbed.vm.qemu import NIC_DRIVER
from testbed.vm.topology import boot

from .conftest import links_named, our_qemu_pids

pytestmark = pytest.mark.integration

# Offload expected over tap + vnet_hdr (as root): only plain virtio keeps RX checksum offload.
EXPECTED_RX_CSUM_OFFLOAD = {"e1000": False, "virtio": True, "virtio-nocsum": False,
                            "virtio-notso": True}
# virtio-net feature bits the guest negotiated for taking TSO frames (GUEST_TSO4/6).
VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6 = 7, 8


@pytest.mark.parametrize("nic", ["e1000", "virtio", "virtio-nocsum", "virtio-notso"])
def test_pair_boots_with_nic_offloads_and_data_plane(nic, assets, settings, workdir):
    if os.geteuid() != 0:
        pytest.skip("tap data plane needs root")
    with boot(assets, replace(settings, sender="guest"), workdir, cpus=2, nic=nic,
              with_sender=True) as topo:
        rx, tx = topo.receiver.ssh, topo.sender_shell
        assert rx.run("nproc").stdout.strip() == "2"
        state = parse_offloads(rx.run(OFFLOAD_SCRIPT).stdout)
        assert state.driver == NIC_DRIVER[nic]
        assert state.rx_checksum_offload is EXPECTED_RX_CSUM_OFFLOAD[nic]
        if nic == "e1000":
            assert state.ethtool["rx-checksumming"] == "off"
        if nic.startswith("virtio"):  # TSO frames into the guest only for plain virtio
            bits = state.virtio_features or ""
            tso = [bits[b] == "1" for b in (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6)]
            assert tso == [nic == "virtio"] * 2, bits
        assert topo.dataplane is not None and topo.dataplane.mode == "tap"
        bridge = topo.dataplane.bridge
        assert links_named(bridge)
        assert "0% packet loss" in rx.run("ping -c 2 -W 5 198.18.0.2").stdout
        assert "0% packet loss" in tx.run("ping -c 2 -W 5 198.18.0.1").stdout
        pid = topo.receiver.process.popen.pid
    assert links_named(bridge) == []
    assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("nic", ["e1000", "virtio"])
def test_a_native_sender_in_a_namespace_sends_to_the_receiver_and_leaves_nothing(
        nic, assets, settings, workdir):
    """Setting sender: netns: no sender QEMU; netperf from the namespace reaches netserver
    on the receiver over the data plane; a process still running there and the devices
    go with the boot."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace on the tap bridge needs root")
    with boot(assets, replace(settings, sender="netns"), workdir, cpus=2, nic=nic,
              with_sender=True) as topo:
        assert topo.sender is None and topo.native_sender is not None
        assert topo.notes["sender"].startswith("netns:")
        assert len(our_qemu_pids(str(workdir))) == 1
        rx, tx = topo.receiver.ssh, topo.sender_shell
        ns = topo.native_sender.namespace
        assert topo.dataplane is not None
        veths = f"nbv{topo.dataplane.tag}"
        assert len(links_named(veths)) == 1  # the bridge's end (the other is in the namespace)
        rx.run("netserver -p 12865 >/dev/null 2>&1")
        out = tx.run("netperf -P 0 -H 198.18.0.1 -t TCP_STREAM -l 1 -- -k THROUGHPUT",
                     timeout=60).stdout
        assert float(out.split("=")[1]) > 10, out  # Mbit/s
        tx.run("echo kept > /tmp/netbed/file")  # one command's files are there for the next
        assert tx.run("cat /tmp/netbed/file").stdout.strip() == "kept"
        assert not Path("/tmp/netbed/file").exists()  # but not in the host's /tmp
        tx.run("nohup sleep 300 </dev/null >/dev/null 2>&1 &")
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout.split()
        assert pids
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout
    assert _gone(lambda: [p for p in pids if os.path.exists(f"/proc/{p}")])
    assert links_named(veths) == []


def test_socket_data_plane_has_no_offload_even_for_virtio(assets, settings, workdir):
    with boot(assets, settings, workdir, cpus=1, nic="virtio", with_sender=True,
              dataplane_mode="socket") as topo:
        state = parse_offloads(topo.receiver.ssh.run(OFFLOAD_SCRIPT).stdout)
        assert state.driver == "virtio_net"
        assert state.rx_checksum_offload is False
        assert "no NIC has checksum offload" in topo.notes["dataplane"]
        assert "0% packet loss" in topo.receiver.ssh.run("ping -c 2 -W 5 198.18.0.2").stdout


def test_guest_that_never_gets_ready_fails_cleanly(assets, settings, workdir):
    broken = replace(assets, initrd=assets.kernel.bzimage)  # not an initramfs: no /init
    quick = replace(settings, boot_timeout_s=60)
    with pytest.raises(GuestError) as err, boot(broken, quick, workdir, cpus=1, nic=None,
                                                with_sender=False):
        pass
    assert "console log" in str(err.value)
    assert our_qemu_pids(str(workdir)) == []


def test_invoke_shell_runs_a_command_and_returns_its_status():
    out = subprocess.run(["invoke", "shell", "--cpus", "2", "--nic", "e1000", "--command",
                          "nproc; cat /sys/class/net/$(cat /run/netbed-data-iface)/device/"
                          "driver/module/drivers 2>/dev/null | head -1; exit 7"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 7, out.stderr
    assert out.stdout.splitlines()[0] == "2"


def test_a_lone_shell_guest_has_the_data_plane_experiments_measure():
    """`invoke shell --nic virtio` alone: as root the NIC sits on a tap with vnet_hdr, so it
    shows the checksum offload experiments have; the shell says which data plane it got."""
    if os.geteuid() != 0:
        pytest.skip("tap data plane needs root")
    out = subprocess.run(["invoke", "shell", "--cpus", "1", "--nic", "virtio", "--command",
                          OFFLOAD_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert parse_offloads(out.stdout).rx_checksum_offload is True
    assert "data plane: tap" in out.stderr and "(as in experiments)" in out.stderr


def _reset_sigint() -> None:
    """What a terminal gives: the default SIGINT (a background job inherits it ignored;
    netbed handles both, but the test should not depend on how pytest was started)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGINT, signal.SIGINT),
                                     (signal.SIGTERM,)],
                         ids=["ctrl-c", "ctrl-c-twice", "sigterm"])
def test_interrupt_leaves_no_qemu_or_devices_behind(signals):
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "shell", "--nic", "e1000",
                             "--with-sender", "--command", "sleep 300"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_reset_sigint)
    try:
        deadline = time.monotonic() + 300
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            if "guests ready" in line or not line:
                break
        assert "guests ready" in seen, seen
        children = subprocess.run(["pgrep", "-P", str(proc.pid), "qemu-system"],
                                  capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        cmdlines = " ".join(Path(f"/proc/{c}/cmdline").read_text().replace("\0", " ")
                            for c in children)
        taps = [t for t in links_named("nbt") if t in cmdlines]
        assert len(taps) == 2
        sockets = [Path(p) for p in re.findall(r"-qmp unix:([^,]+),", cmdlines)]
        assert len(sockets) == 2 and all(p.exists() for p in sockets)
        time.sleep(1)  # the guest command is running (any moment is fine: see test_interrupts)
        sent = time.monotonic()
        for sig in signals:
            os.kill(proc.pid, sig)
            time.sleep(0.1)
        code = proc.wait(timeout=TEARDOWN_BOUND_S * 6)  # generous; the bound is asserted
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = proc.stderr.read()
    print(f"{'+'.join(signal.Signals(s).name for s in signals)}: exit {code} "
          f"after {elapsed:.2f} s")
    assert code == 128 + signals[0], rest
    assert elapsed <= TEARDOWN_BOUND_S, rest
    assert _gone(lambda: [c for c in children if os.path.exists(f"/proc/{c}")])
    assert [t for t in taps if links_named(t)] == []
    assert [p for p in sockets if p.exists()] == []


def _gone(leftovers, wait: float = 5.0) -> bool:
    """True once `leftovers()` is empty (a killed QEMU is a zombie until it is reaped)."""
    end = time.monotonic() + wait
    while leftovers():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True
