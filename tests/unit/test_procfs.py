"""testbed.formats.procfs: /proc snapshots and their deltas (softirqs, interrupts, softnet_stat,
snmp, stat).

tests/fixtures/raw/host/ holds /proc snapshots and a `perf stat -a -A -x;` run
captured on a development host (Linux 6.18, 2 CPUs, no PMU), taken before and
after a one-second perf window; tests/fixtures/raw/guest-distro-e1000/ the same
captured in a netbed guest: real kernel formats, real `<not supported>`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from testbed.errors import NetbedError
from testbed.formats import procfs

HOST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "host"


def read(name: str) -> str:
    return (HOST / name).read_text()


GUEST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-distro-e1000"


def guest(*parts: str) -> str:
    return GUEST.joinpath(*parts).read_text()


# ---------------------------------------------------------------- /proc


def test_softirqs_delta_matches_hand_computation() -> None:
    before, after = read("before/softirqs"), read("after/softirqs")
    d = procfs.parse_proc_pair("softirqs", before, after)
    assert set(d["cpu"]) == {"0", "1"}

    def rows(text: str) -> dict[str, list[str]]:
        return {ln.split(":")[0].strip(): ln.split(":")[1].split() for ln in text.splitlines()[1:]}

    b, a = rows(before), rows(after)
    got = d[(d.metric == "TIMER") & (d.cpu == "1")]["value"].item()
    assert got == int(a["TIMER"][1]) - int(b["TIMER"][1])
    assert got > 0
    assert (d["value"] >= 0).all()


def test_interrupts_names_and_mnemonics() -> None:
    df = procfs.parse_interrupts(read("after/interrupts"))
    names = df.drop_duplicates("irq").set_index("irq")["name"]
    assert names["38"] == "virtio2-input.0"
    assert names["26"] == "ttyS0"
    assert names["LOC"] == "Local timer interrupts"
    err = df[df.irq == "ERR"]
    assert len(err) == 1  # one count, not one per CPU


def test_interrupts_linux61_e1000_and_shared_line() -> None:
    text = ("           CPU0       CPU1       \n"
            "  0:         40          0   IO-APIC   2-edge      timer\n"
            " 11:       9123        877   IO-APIC  11-fasteoi   uhci_hcd:usb1, eth0\n"
            " 24:          0         12   PCI-MSI 49152-edge      virtio0-config\n"
            "NMI:          0          0   Non-maskable interrupts\n")
    df = procfs.parse_interrupts(text)
    names = df.drop_duplicates("irq").set_index("irq")["name"]
    assert names["11"] == "uhci_hcd:usb1, eth0"
    assert names["24"] == "virtio0-config"
    assert df[(df.irq == "11") & (df.cpu == "1")]["value"].item() == 877


def test_select_nic_irqs_readback_and_busiest_device() -> None:
    d = procfs.delta(procfs.parse_interrupts(read("before/interrupts")),
                procfs.parse_interrupts(read("after/interrupts")))
    assert procfs.select_nic_irqs(d, [38, "39"]) == (["38", "39"], "readback")
    irqs, how = procfs.select_nic_irqs(d)
    assert how.startswith("busiest-net-device:")
    assert irqs  # a virtio net device exists on this host
    assert all(d.drop_duplicates("irq").set_index("irq").loc[i, "name"].startswith("virtio")
               for i in irqs)


def test_softnet_stat_uses_cpu_column() -> None:
    text = ("00000010 00000000 00000001 00000000 00000000 00000000 00000000 00000000 "
            "00000000 00000002 00000000 00000000 00000000\n"
            "000000ff 00000001 00000000 00000000 00000000 00000000 00000000 00000000 "
            "00000000 00000000 00000000 00000000 00000003\n")  # 6.1 layout, CPU 3 second
    df = procfs.parse_softnet_stat(text).set_index(["metric", "cpu"])["value"]
    assert df["processed", "3"] == 255
    assert df["received_rps", "0"] == 2
    assert df["dropped", "3"] == 1
    real = procfs.parse_softnet_stat(read("after/softnet_stat"))
    assert set(real["cpu"]) == {"0", "1"}


def test_softnet_wrap_is_corrected() -> None:
    line = " ".join(["{:08x}"] + ["00000000"] * 11 + ["00000000"])
    d = procfs.parse_proc_pair("softnet_stat", line.format(0xFFFFFFF0), line.format(0x10))
    assert d[d.metric == "processed"]["value"].item() == 0x20


def test_snmp_and_stat() -> None:
    d = procfs.parse_proc_pair("snmp", read("before/snmp"), read("after/snmp")).set_index("metric")
    assert "Tcp.RetransSegs" in d.index and "Tcp.InSegs" in d.index
    assert "Tcp.MaxConn" not in d.index  # a setting, not a counter
    assert (d["cpu"] == "all").all()
    st = procfs.parse_proc_stat(read("after/stat"))
    assert set(st["cpu"]) == {"all", "0", "1"}
    assert st[(st.metric == "cpu_idle") & (st.cpu == "0")]["value"].item() > 0
    assert "ctxt" in set(st.metric)


def test_delta_marks_rows_missing_in_one_snapshot() -> None:
    b = pd.DataFrame({"metric": ["a", "a"], "cpu": ["0", "1"], "value": [1.0, 2.0]})
    a = pd.DataFrame({"metric": ["a"], "cpu": ["0"], "value": [5.0]})
    d = procfs.delta(b, a).set_index("cpu")["value"]
    assert d["0"] == 4 and math.isnan(d["1"])


def test_bad_header() -> None:
    with pytest.raises(NetbedError, match="CPU0"):
        procfs.parse_softirqs("garbage\nNET_RX: 1 2\n")


def test_proc_snapshot_command() -> None:
    cmd = procfs.proc_snapshot_command("/tmp/nb/proc-before")
    assert "cat /proc/net/softnet_stat > /tmp/nb/proc-before/softnet_stat" in cmd


GUEST_IRQS = Path(__file__).resolve().parent.parent / "fixtures" / "interrupts"


@pytest.mark.parametrize(("name", "irq", "device"), [
    ("guest-distro-e1000.txt", "23", "eth0"),
    ("guest-distro-virtio.txt", "28", "virtio2-input.0"),
])
def test_interrupts_of_real_guests(name: str, irq: str, device: str) -> None:
    """/proc/interrupts captured from distro-kernel guests (see ../fixtures/readback)."""
    df = procfs.parse_interrupts((GUEST_IRQS / name).read_text())
    names = df.drop_duplicates("irq").set_index("irq")["name"]
    assert names[irq] == device
    assert set(df["cpu"]) == {"0", "1"}
    assert procfs.select_nic_irqs(df, [irq]) == ([irq], "readback")


def test_guest_proc_deltas() -> None:
    d = procfs.parse_proc_pair("softirqs", guest("TCP_STREAM", "proc-before", "softirqs"),
                          guest("TCP_STREAM", "proc-after", "softirqs"))
    assert d[d.metric == "NET_RX"]["value"].sum() > 0
    for name in ("interrupts", "softnet_stat", "snmp", "stat"):
        pair = procfs.parse_proc_pair(name, guest("TCP_STREAM", "proc-before", name),
                                 guest("TCP_STREAM", "proc-after", name))
        assert pair["value"].notna().all(), name
    snmp = procfs.parse_proc_pair("snmp", guest("TCP_STREAM", "proc-before", "snmp"),
                             guest("TCP_STREAM", "proc-after", "snmp")).set_index("metric")
    assert snmp.loc["Tcp.InSegs", "value"] > 0
