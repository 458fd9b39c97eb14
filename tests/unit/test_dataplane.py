"""Data-plane plans: tap + bridge as root, socket netdev otherwise."""

from testbed.vm.dataplane import plan_dataplane
from testbed.vm.qemu import SocketAttachment, TapAttachment


def test_tap_plan_names_are_tagged_and_short_enough():
    plan = plan_dataplane("tap", tag="a1b2c3")
    assert plan.bridge == "nbbra1b2c3"
    assert plan.receiver == TapAttachment("nbta1b2c3r")
    assert plan.sender == TapAttachment("nbta1b2c3s")
    names = {cmd[cmd.index("dev") + 1] for cmd in plan.setup if "tuntap" in cmd}
    assert names == {"nbta1b2c3r", "nbta1b2c3s"}
    assert all(len(n) <= 15 for n in [*names, plan.bridge])  # IFNAMSIZ - 1


def test_taps_have_vnet_hdr_and_join_the_bridge_which_has_no_address():
    plan = plan_dataplane("tap", tag="t")
    tuntaps = [c for c in plan.setup if "tuntap" in c]
    assert all("vnet_hdr" in c for c in tuntaps)
    assert ("ip", "link", "set", "nbttr", "master", "nbbrt") in plan.setup
    assert not any("addr" in c for c in plan.setup)


def test_teardown_removes_everything_setup_creates():
    plan = plan_dataplane("tap", tag="z")
    created = {c[c.index("name") + 1] for c in plan.setup if "add" in c and "name" in c}
    created |= {c[c.index("dev") + 1] for c in plan.setup if "tuntap" in c}
    removed = {c[-1] for c in plan.teardown}
    assert created == removed


def test_socket_plan_pairs_listener_and_connector_on_one_port():
    plan = plan_dataplane("socket", port=40404)
    assert plan.receiver == SocketAttachment(40404, listen=True)
    assert plan.sender == SocketAttachment(40404, listen=False)
    assert plan.setup == () and plan.teardown == ()
    assert "no NIC has checksum offload" in plan.offload_note


def test_cap_net_admin_is_read_from_capeff():
    from testbed.vm.dataplane import has_cap_net_admin

    assert has_cap_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_cap_net_admin("CapEff:\t0000000000001000\n")
    assert not has_cap_net_admin("CapEff:\t0000000000000000\n")
    assert not has_cap_net_admin("CapEff:\t0000000000000fff\n")
    assert not has_cap_net_admin("Name:\tx\n")
