"""The native sender's plan, command lines and fallback (pure parts of testbed.vm.netns)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from testbed.vm.dataplane import plan_dataplane
from testbed.vm.netns import namespace_argv, plan_netns
from testbed.vm.topology import sender_kind, sender_note
from testbed.vocabulary import GUEST_DIR

IFNAMSIZ = 16  # Linux: 15 characters and the NUL


def test_names_are_tagged_short_enough_and_distinct_from_the_data_plane():
    dp = plan_dataplane("tap", tag="a1b2c3")
    ns = plan_netns(dp.bridge or "", dp.tag)
    assert ns.namespace == "nbnsa1b2c3"
    for dev in (ns.veth_bridge, ns.veth_inner):
        assert len(dev) < IFNAMSIZ and dev.startswith("nbv") and "a1b2c3" in dev
    assert ns.tag != dp.tag  # its own registry entry beside the data plane's


def test_the_namespace_joins_the_bridge_with_the_senders_address_and_nothing_else():
    ns = plan_netns("nbbrx", "x")
    cmds = [" ".join(c) for c in ns.setup]
    assert f"ip link set {ns.veth_bridge} master nbbrx" in cmds
    assert f"ip -n {ns.namespace} addr add 198.18.0.2/24 dev {ns.veth_inner}" in cmds
    assert not any("route" in c or "nat" in c or "forward" in c for c in cmds)
    # the bridge end is created in the host namespace, the inner end directly inside
    add = next(c for c in ns.setup if "veth" in c)
    assert add[-2:] == ("netns", ns.namespace)


def test_teardown_kills_what_runs_inside_before_removing_the_devices():
    ns = plan_netns("nbbrx", "x")
    assert "ip netns pids" in ns.teardown[0][-1] and "kill -9" in ns.teardown[0][-1]
    assert ns.teardown[1] == ("ip", "link", "del", ns.veth_bridge)
    assert ns.teardown[-1] == ("ip", "netns", "del", ns.namespace)
    created = {c[c.index("add") + 1] for c in ns.setup if "add" in c and c[1] != "-n"}
    assert created == {ns.namespace, ns.veth_bridge}  # both removed by the teardown


def test_a_command_runs_in_the_namespace_with_the_files_bound_and_a_time_limit():
    argv = namespace_argv("nbnsx", Path("/w/sender files"), Path("/c/host-bin"),
                          "echo 'a b' > /tmp/netbed/x", 42)
    assert argv[:5] == ["ip", "netns", "exec", "nbnsx", "sh"]
    inner = argv[-1]
    assert inner.startswith(f"mount --bind '/w/sender files' {GUEST_DIR} && ")
    assert "PATH=/c/host-bin:$PATH" in inner
    assert "exec timeout -k 5 42 sh -c " in inner
    # the command reaches the inner shell intact
    assert shlex.split(inner.split(" sh -c ", 1)[1]) == ["echo 'a b' > /tmp/netbed/x"]


def test_a_namespace_needs_the_tap_bridge_else_the_sender_is_a_guest_and_says_why():
    tap, sock = plan_dataplane("tap", tag="t"), plan_dataplane("socket", tag="s", port=1)
    assert sender_kind("netns", tap) == "netns"
    assert sender_kind("netns", sock) == "guest"
    assert sender_kind("guest", tap) == "guest"
    assert "socket" in sender_note("guest", "netns", sock)
    assert sender_note("netns", "netns", tap).startswith("netns:")
    assert sender_note("guest", "guest", tap).startswith("guest:")


def test_a_disjoint_placement_pins_each_sender_command_and_what_it_starts():
    argv = namespace_argv("nbnsx", Path("/w"), Path("/b"), "netperf", 10, cpus=(1, 2, 3))
    assert "exec taskset -c 1-3 timeout -k 5 10 sh -c netperf" in argv[-1]
    assert "taskset" not in namespace_argv("nbnsx", Path("/w"), Path("/b"), "netperf", 10)[-1]


@pytest.mark.process
def test_netperf_is_extracted_from_the_image_once_even_by_runs_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from testbed.build.images import GuestImage
    from testbed.build.newc import CpioEntry, write_newc
    from testbed.vm.netns import host_netperf

    cpio = tmp_path / "rootfs.cpio"
    write_newc(cpio, [CpioEntry.directory("usr"), CpioEntry.directory("usr/bin"),
                      CpioEntry.file("usr/bin/netperf", b"#!/bin/sh\necho 2.7.0\n", 0o755)])
    image = GuestImage("k", cpio, "ssh-ed25519 AAAA", tmp_path / "manifest.json")
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: host_netperf(image), range(4)))
    assert len(set(dirs)) == 1
    assert (dirs[0] / "netperf").read_bytes() == b"#!/bin/sh\necho 2.7.0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-bin", "rootfs.cpio"]
