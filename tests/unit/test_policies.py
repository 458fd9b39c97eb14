"""Policies: loading, CPU specs, commands; the read-back format (testbed.formats.readback)
and the policy/read-back diff (testbed.experiment.nicstate).

/proc/interrupts and read-back texts are captured from real guests (see
tests/fixtures/readback/README.md) and from the development host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.errors import ConfigError, NetbedError
from testbed.experiment.nicstate import diff_readback
from testbed.experiment.policies import (
    DEFAULT_POLICIES_FILE,
    Policy,
    ResolvedPolicy,
    apply_commands,
    apply_script,
    load_policies,
    netserver_cpu,
    resolve,
)
from testbed.formats import procfs
from testbed.formats.offloads import parse_ethtool_features, parse_offloads
from testbed.formats.readback import (
    cpu_mask,
    find_nic_irqs,
    fmt_cpulist,
    interrupt_lines,
    nic_info_command,
    parse_cpulist,
    parse_interrupts,
    parse_mask,
    parse_nic_info,
    parse_readback,
    readback_commands,
    reader_affinity_command,
    shared_irqs,
)

# messages name kernels of tests/fixtures/configs/kernels/good.yaml (conftest.py)
pytestmark = pytest.mark.usefixtures("fixture_kernels")

FIX = Path(__file__).resolve().parent.parent / "fixtures"
E1000_IRQS = (FIX / "interrupts" / "guest-distro-e1000.txt").read_text()
VIRTIO_IRQS = (FIX / "interrupts" / "guest-distro-virtio.txt").read_text()
HOST_IRQS = (FIX / "interrupts" / "host-6x-pcimsix.txt").read_text()


@pytest.fixture(scope="module")
def shipped():
    return load_policies(DEFAULT_POLICIES_FILE)


@pytest.fixture(scope="module")
def policies():
    return load_policies(FIX / "configs" / "policies" / "good.yaml")


def _readback(name: str):
    return parse_readback((FIX / "readback" / name).read_text())


# ------------------------------------------------------------------ loading


def test_shipped_policies(shipped) -> None:
    for name in ("default", "pin-same", "pin-cross", "rps", "rfs", "wake-local", "affine-copy"):
        assert name in shipped
    assert shipped["wake-local"].requires_kernel == ["patched"]
    assert shipped["affine-copy"].requires_kernel == ["affine-copy"]
    assert shipped["pin-cross"].min_cpus == 2
    # every policy turns the patched kernels' switches off where they exist, except
    # the one policy that turns its own on
    switches = {"wake-local": "net.core.rx_wake_local",
                "affine-copy": "net.core.rx_affine_copy"}
    for name in shipped.names:
        r = shipped.resolve(name, 2)
        on = switches.get(name)
        assert r.sysctls == ({on: "1"} if on else {})
        assert r.sysctls_if_present == {k: "0" for k in switches.values() if k != on}


def test_fixture_copy_matches_shipped(shipped, policies) -> None:
    assert policies == shipped  # refresh tests/fixtures/configs/policies/good.yaml if not


def test_unknown_policy_lookup(shipped) -> None:
    with pytest.raises(NetbedError, match="unknown policy 'nope'"):
        shipped["nope"]


BAD_POLICY_LINES = [
    "bad.yaml:8:5: policies.typo-key: unknown key 'irq_cpu' (allowed: name, description, "
    "requires_kernel, min_cpus, irq_cpus, reader_cpu, rps_cpus, rps_sock_flow_entries, "
    "rps_flow_cnt, sysctls, sysctls_if_present); did you mean 'irq_cpus' or 'rps_cpus'?",
    "bad.yaml:10:5: policies.bad-token.irq_cpus: unknown CPU token 'first' (allowed: integers, "
    "ranges like 0-2, last, all, default)",
    "bad.yaml:13:17: policies.reader-all.reader_cpu: unknown CPU token 'all' (allowed: "
    "integers, ranges like 0-2, last, same-as-irq, other, any)",
    "bad.yaml:14:3: policies.relative-default: 'same-as-irq' and 'other' need irq_cpus pinned "
    "to CPUs; with irq_cpus: default the IRQ may land on any CPU",
    "bad.yaml:17:28: policies.not-pow2.rps_sock_flow_entries: 1000 is not a power of two (the "
    "kernel rounds it up to 1024; write that)",
    "bad.yaml:19:5: policies.bad-kernel.requires_kernel: unknown kernel 'custom' (allowed: "
    "distro, stock, patched, affine-copy; variants come from good.yaml)",
    "bad.yaml:20:3: policies.both: sysctl net.core.busy_read is in both sysctls and "
    "sysctls_if_present; keep one",
    "bad.yaml:23:3: policies.Upper.name: policy name 'Upper' must be lowercase letters, digits "
    "and '-', at most 64 (it becomes part of cell ids and folder names)",
    "bad.yaml:26:15: policies.irq-other.irq_cpus: unknown CPU token 'other' (allowed: "
    "integers, ranges like 0-2, last, all, default)",
    "bad.yaml:28:5: policies.bad-sysctl.sysctls: bad sysctl name 'net core' (write it dotted, "
    "e.g. net.core.busy_read)",
]


def test_bad_policies_file_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_policies(FIX / "configs" / "policies" / "bad.yaml")
    got = [re.sub(r"^.*/", "", line) for line in str(info.value).splitlines()]
    assert got == BAD_POLICY_LINES


def test_policies_yaml_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("policies:\n  a: {irq_cpus: [0}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:2:\d+: YAML syntax error"):
        load_policies(p)


# ------------------------------------------------------------------ resolution


def _policy(**kw) -> Policy:
    return Policy(name="t", **kw)


@pytest.mark.parametrize(("kw", "cpus", "irq", "reader", "rps"), [
    ({}, 4, (0, 1, 2, 3), None, ()),
    ({"irq_cpus": 0, "reader_cpu": "same-as-irq"}, 2, (0,), 0, ()),
    ({"irq_cpus": 0, "reader_cpu": "other"}, 4, (0,), 3, ()),
    ({"irq_cpus": "last", "reader_cpu": "other"}, 4, (3,), 2, ()),
    ({"irq_cpus": "0-1", "reader_cpu": 3, "rps_cpus": "other"}, 4, (0, 1), 3, (3,)),
    ({"irq_cpus": [0, "last"], "rps_cpus": "all"}, 3, (0, 2), None, (0, 1, 2)),
    ({"irq_cpus": "0,2", "rps_cpus": "same-as-irq"}, 4, (0, 2), None, (0, 2)),
])
def test_resolve_cpu_specs(kw, cpus, irq, reader, rps) -> None:
    r = resolve(_policy(**kw), cpus)
    assert (r.irq_cpus, r.reader_cpu, r.rps_cpus) == (irq, reader, rps)
    assert netserver_cpu(r) == reader


@pytest.mark.parametrize(("kw", "cpus", "message"), [
    ({"min_cpus": 2}, 1, "needs at least 2 CPUs, the cell has 1"),
    ({"irq_cpus": 3}, 2, "irq_cpus names CPU 3, but the cell has 2 CPU(s) (0-1)"),
    ({"irq_cpus": 0, "reader_cpu": "other"}, 1, "'other' needs a CPU besides the IRQ CPUs 0"),
    ({"irq_cpus": "all", "reader_cpu": "same-as-irq"}, 2, "reader_cpu resolves to 0-1"),
])
def test_resolve_errors(kw, cpus, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(_policy(**kw), cpus)


@pytest.mark.parametrize(("kw", "message"), [
    ({"reader_cpu": "0-1"}, "name exactly one CPU"),
    ({"reader_cpu": [0, 1]}, "name exactly one CPU"),
    ({"irq_cpus": True}, "expected a CPU spec"),
    ({"irq_cpus": "2-1"}, "range '2-1' runs backwards"),
    ({"irq_cpus": [0, "default"]}, "'default' cannot be combined"),
    ({"rps_flow_cnt": 3}, "not a power of two"),
    ({"requires_kernel": []}, "an empty list allows no kernel"),
])
def test_policy_validation(kw, message) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        _policy(**kw)


def test_baseline_merge(shipped) -> None:
    r = shipped.resolve("rfs", 4)
    assert r.sysctls == {} and r.sysctls_if_present == {"net.core.rx_wake_local": "0",
                                                        "net.core.rx_affine_copy": "0"}
    assert r.sysctl_keys == ["net.core.rps_sock_flow_entries", "net.core.rx_affine_copy",
                             "net.core.rx_wake_local"]


# ------------------------------------------------------------------ cpu lists and masks


@pytest.mark.parametrize(("cpus", "text", "mask"), [
    ((), "", "0"),
    ((0,), "0", "1"),
    ((0, 1), "0-1", "3"),
    ((0, 2, 3, 4, 7), "0,2-4,7", "9d"),
    ((0, 40), "0,40", "00000100,00000001"),
])
def test_cpulist_and_mask(cpus, text, mask) -> None:
    assert fmt_cpulist(cpus) == text and parse_cpulist(text) == cpus
    assert cpu_mask(cpus) == mask and parse_mask(mask) == cpus


# ------------------------------------------------------------------ commands


def test_apply_rfs(shipped) -> None:
    cmds = apply_commands(shipped.resolve("rfs", 2), "eth0", [23], ["rx-0"], gro=False)
    assert cmds == [
        "echo 0 > /proc/irq/23/smp_affinity_list",
        "echo 32768 > /proc/sys/net/core/rps_sock_flow_entries",
        "echo 3 > /sys/class/net/eth0/queues/rx-0/rps_cpus",
        "echo 32768 > /sys/class/net/eth0/queues/rx-0/rps_flow_cnt",
        "if [ -e /proc/sys/net/core/rx_affine_copy ]; then "
        "sysctl -q -w net.core.rx_affine_copy=0; fi",
        "if [ -e /proc/sys/net/core/rx_wake_local ]; then "
        "sysctl -q -w net.core.rx_wake_local=0; fi",
        "ethtool -K eth0 gro off",
    ]


def test_default_resets_what_others_change(shipped) -> None:
    cmds = apply_commands(shipped.resolve("default", 4), "eth1", [27, 28, 29],
                          ["rx-0", "rx-1"])
    assert "echo 0-3 > /proc/irq/28/smp_affinity_list" in cmds
    assert "echo 0 > /proc/sys/net/core/rps_sock_flow_entries" in cmds
    for q in ("rx-0", "rx-1"):
        assert f"echo 0 > /sys/class/net/eth1/queues/{q}/rps_cpus" in cmds
        assert f"echo 0 > /sys/class/net/eth1/queues/{q}/rps_flow_cnt" in cmds
    assert not [c for c in cmds if "ethtool" in c]  # gro not given: untouched


def test_wake_local_sysctl_is_mandatory(shipped) -> None:
    script = apply_script(shipped.resolve("wake-local", 2), "eth1", [27], ["rx-0"])
    assert script.startswith("set -eu\n")
    assert "\nsysctl -q -w net.core.rx_wake_local=1\n" in script


def test_commands_reject_bad_names(shipped) -> None:
    r = shipped.resolve("default", 2)
    with pytest.raises(NetbedError, match="bad interface name"):
        apply_commands(r, "eth0; reboot", [], [])
    with pytest.raises(NetbedError, match="bad rx queue name"):
        apply_commands(r, "eth0", [], ["tx-0"])


def test_sysctl_values_are_quoted() -> None:
    r = resolve(_policy(sysctls={"net.ipv4.tcp_rmem": "4096 131072 6291456"}), 2)
    assert "sysctl -q -w 'net.ipv4.tcp_rmem=4096 131072 6291456'" in apply_commands(
        r, "eth0", [], [])


# ------------------------------------------------------------------ which NIC, which IRQs


def test_nic_info() -> None:
    cmd = nic_info_command("52:54:00:12:00:01")
    assert '= "52:54:00:12:00:01" ]' in cmd
    virtio = parse_nic_info("iface=eth1\ndevice=virtio2\ndriver=virtio_net\n")
    assert virtio.irq_names == ["eth1", "virtio2"]
    e1000 = parse_nic_info("iface=eth0\ndevice=0000:00:03.0\ndriver=e1000\n")
    assert e1000.irq_names == ["eth0"]
    with pytest.raises(NetbedError, match="no interface with MAC 52:54"):
        parse_nic_info("", "52:54:00:12:00:01")
    with pytest.raises(NetbedError, match="bad MAC"):
        nic_info_command("52:54:00:12:00")


def test_find_nic_irqs_e1000_guest() -> None:
    # data NIC eth0 on IO-APIC line 23; the management virtio NIC is virtio1
    assert find_nic_irqs(E1000_IRQS, ["eth0"]) == [23]
    assert find_nic_irqs(E1000_IRQS, ["eth1", "virtio1"]) == [24, 25, 26]
    assert find_nic_irqs(E1000_IRQS, ["eth"]) == []


def test_find_nic_irqs_virtio_guest() -> None:
    assert find_nic_irqs(VIRTIO_IRQS, ["eth1", "virtio2"]) == [27, 28, 29]
    assert find_nic_irqs(VIRTIO_IRQS, ["virtio2-input"]) == [28]
    assert find_nic_irqs(VIRTIO_IRQS, ["virtio0"]) == [30, 31]  # not virtio0x / virtio1


def test_find_nic_irqs_host_pci_msix_format() -> None:
    # 6.x prints "PCI-MSIX-0000:00:03.0 1-edge"; virtio3-rx must not match virtio2
    assert find_nic_irqs(HOST_IRQS, ["virtio2"]) == [37, 38, 39]
    assert find_nic_irqs(HOST_IRQS, ["ttyS0"]) == [26]


def test_parse_interrupts_columns_and_shared_lines() -> None:
    lines = {ln.number: ln for ln in parse_interrupts(E1000_IRQS)}
    assert lines[23].chip == "IO-APIC" and lines[23].actions == ("eth0",)
    assert lines[25].counts == (0, 20)
    assert 0 in lines and "NMI" not in str(lines.keys())
    text = ("           CPU0       CPU1\n"
            " 11:       5678         23   IO-APIC  11-fasteoi   uhci_hcd:usb1, eth1\n"
            " 24:          0          0  IR-PCI-MSI 512000-edge      ahci[0000:00:1f.2]\n")
    assert find_nic_irqs(text, ["eth1"]) == [11]
    assert shared_irqs(text, [11, 24]) == {11: ("uhci_hcd:usb1", "eth1")}
    assert find_nic_irqs(text, ["ahci[0000:00:1f.2]"]) == [24]


# ------------------------------------------------------------------ read-back


def test_parse_readback_e1000_rfs() -> None:
    rb = _readback("e1000-readback-rfs-gro0.txt")
    assert rb.iface == "eth0"
    assert rb.irq_affinity == {23: (0,)}
    assert rb.rps_cpus == {"rx-0": (0, 1)} and rb.rps_flow_cnt == {"rx-0": 32768}
    assert rb.sysctls == {"net.core.rps_sock_flow_entries": "32768",
                          "net.core.rx_affine_copy": None, "net.core.rx_wake_local": None}
    assert rb.offloads["generic-receive-offload"] == "off"
    assert rb.offloads["rx-checksumming"] == "off"  # QEMU's e1000: no RX checksum offload
    assert rb.unparsed == ()
    assert rb.as_dict()["rps_cpus"] == {"rx-0": "3"}


def test_diff_empty_when_state_matches(shipped) -> None:
    assert diff_readback(shipped.resolve("rfs", 2), _readback("e1000-readback-rfs-gro0.txt"),
                         gro=False) == []
    assert diff_readback(shipped.resolve("rfs", 2), _readback("virtio-readback-rfs-gro0.txt"),
                         gro=False) == []
    assert diff_readback(shipped.resolve("default", 2),
                         _readback("virtio-readback-default-gro1.txt"), gro=True) == []
    assert diff_readback(shipped.resolve("pin-cross", 2),
                         _readback("virtio-readback-pin-cross-gro1.txt"), gro=True) == []


def test_diff_names_knob_wanted_and_got(shipped) -> None:
    rb = _readback("virtio-readback-rfs-gro0.txt")  # rfs state, GRO off
    assert diff_readback(shipped.resolve("pin-cross", 2), rb, gro=True) == [
        "rx-0 rps_cpus: wanted 0, got 3",
        "rx-0 rps_flow_cnt: wanted 0, got 32768",
        "sysctl net.core.rps_sock_flow_entries: wanted 0, got 32768",
        "generic-receive-offload: wanted on, got off",
    ]
    assert diff_readback(shipped.resolve("default", 2), rb)[:3] == [
        "irq 27 smp_affinity_list: wanted 0-1, got 0",
        "irq 28 smp_affinity_list: wanted 0-1, got 0",
        "irq 29 smp_affinity_list: wanted 0-1, got 0",
    ]


def test_diff_missing_sysctl_on_distro_kernel(shipped) -> None:
    rb = _readback("e1000-readback-wake-local-gro0.txt")
    diff = diff_readback(shipped.resolve("wake-local", 2), rb, gro=False)
    assert "sysctl net.core.rx_wake_local: wanted 1, got <absent> (this kernel does not have it)" \
        in diff
    assert "generic-receive-offload: wanted off, got on" in diff


def test_diff_when_nothing_was_read(shipped) -> None:
    diff = diff_readback(shipped.resolve("default", 2), parse_readback("iface=eth9\n"))
    assert diff[0].startswith("irq affinity: no NIC IRQ was read back")
    assert diff[1].startswith("rps_cpus: no rx queue was read back")


def test_parse_readback_keeps_unknown_lines() -> None:
    rb = parse_readback("garbage\nirq.x.smp_affinity_list=0\nirq.5.smp_affinity_list=<absent>\n")
    assert rb.unparsed == ("garbage", "irq.x.smp_affinity_list=0")
    assert rb.irq_affinity == {5: None}


@pytest.mark.process
@pytest.mark.skipif(not Path("/sys/class/net/lo/queues/rx-0").exists() or not shutil.which("sh"),
                    reason="needs a Linux loopback device")
def test_readback_script_runs_under_sh() -> None:
    """The script is POSIX sh; run it on this host's loopback (read-only) and parse it."""
    script = readback_commands("lo", [], ["net.core.rps_sock_flow_entries",
                                          "net.core.no_such_knob"])
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    rb = parse_readback(out.stdout)
    assert rb.iface == "lo" and "rx-0" in rb.rps_cpus and rb.unparsed == ()
    assert rb.sysctls["net.core.no_such_knob"] is None
    assert rb.sysctls["net.core.rps_sock_flow_entries"] is not None


@pytest.mark.process
@pytest.mark.skipif(not Path("/sys/class/net/lo/queues/rx-0").exists() or not shutil.which("sh"),
                    reason="needs a Linux loopback device")
def test_readback_carries_the_ethtool_table_as_printed(tmp_path: Path) -> None:
    """The read-back passes `ethtool -k` through (prefixed); one parser reads the table.

    A stand-in `ethtool` on PATH prints the table captured from a guest's e1000.
    """
    table = FIX / "raw" / "guest-distro-e1000" / "offloads.txt"
    fake = tmp_path / "ethtool"
    fake.write_text(f"#!/bin/sh\ncat {table}\n")
    fake.chmod(0o755)
    script = readback_commands("lo", [])
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10,
                         env=env)
    assert out.returncode == 0, out.stderr
    rb = parse_readback(out.stdout)
    assert rb.offloads == parse_ethtool_features(table.read_text())
    assert rb.offloads["tx-checksum-ipv4"] == "off [fixed]" and rb.unparsed == ()
    # the OFFLOAD_SCRIPT parser derives its on/off values from the same parser
    state = parse_offloads("iface=eth0\ndriver=e1000\n--- ethtool -k\n" + table.read_text())
    assert state.ethtool == {k: v.split()[0] for k, v in rb.offloads.items() if v}


@pytest.mark.parametrize("name", ["guest-distro-e1000.txt", "guest-distro-virtio.txt",
                                  "host-6x-pcimsix.txt"])
def test_one_interrupts_parser_behind_both_views(name: str) -> None:
    """find_nic_irqs (read-back) and procfs's tidy frame read the same IrqLines."""
    text = (FIX / "interrupts" / name).read_text()
    lines = interrupt_lines(text)
    frame = procfs.parse_interrupts(text)
    names = dict(zip(frame["irq"], frame["name"], strict=False))
    assert {ln.irq: ln.name for ln in lines if ln.counts} == names
    assert [ln.number for ln in parse_interrupts(text)] == [
        ln.number for ln in lines if ln.number is not None]


def test_resolved_as_dict_is_json_ready(shipped) -> None:
    d = shipped.resolve("pin-cross", 4).as_dict()
    assert d["irq_cpus"] == [0] and d["reader_cpu"] == 3 and d["rps_mask"] == "0"
    assert isinstance(shipped.resolve("default", 1), ResolvedPolicy)


def test_reader_affinity_readback(shipped) -> None:
    assert "Cpus_allowed_list" in reader_affinity_command()
    pinned = parse_readback("reader.4242=1\n")
    assert pinned.reader_affinity == {4242: (1,)}
    assert pinned.as_dict()["reader_affinity"] == {"4242": "1"}
    cross, same = shipped.resolve("pin-cross", 2), shipped.resolve("pin-same", 2)
    assert not [d for d in diff_readback(cross, pinned) if "reader" in d]
    assert [d for d in diff_readback(same, pinned) if "reader" in d] == [
        "reader affinity (netserver pid 4242): wanted 0, got 1"]
    gone = parse_readback("reader.none=<absent>\n")
    assert [d for d in diff_readback(same, gone) if "reader" in d] == [
        "reader affinity: wanted 0, got no netserver data process"]
    # an unpinned reader is not checked
    assert not [d for d in diff_readback(shipped.resolve("default", 2), pinned) if "reader" in d]
