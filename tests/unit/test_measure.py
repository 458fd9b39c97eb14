"""Command builders and parsers of testbed.formats.measure, on real captured output.

tests/fixtures/raw/host/ holds /proc snapshots and a `perf stat -a -A -x;` run
captured on this development host (Linux 6.18, 2 CPUs, no PMU), taken before and
after a one-second perf window: real kernel formats, real `<not supported>`.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from testbed.errors import NetbedError
from testbed.formats import netperf, offloads, perfstat, procfs, reader

HOST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "host"


def read(name: str) -> str:
    return (HOST / name).read_text()


# ---------------------------------------------------------------- netperf command


def wl(name: str, size: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, message_size=size)


def test_netperf_stream_binds_remote_reader_and_asks_keyval() -> None:
    argv = shlex.split(netperf.netperf_command("198.18.0.2", wl("TCP_STREAM", 16384), 5,
                                               remote_cpu=1))
    assert argv[:5] == ["timeout", "-k", "5", "35", "netperf"]
    assert argv[argv.index("-T") + 1] == ",1"
    assert argv[argv.index("-H") + 1] == "198.18.0.2"
    assert argv[argv.index("-l") + 1] == "5"
    assert {"-c", "-C"} <= set(argv)
    test = argv[argv.index("--") + 1 :]
    assert test[test.index("-m") + 1] == "16384"
    selectors = test[test.index("-k") + 1].split(",")
    assert "THROUGHPUT" in selectors and "REMOTE_CPU_UTIL" in selectors
    assert "P99_LATENCY" not in selectors
    assert "-j" not in argv


def test_netperf_rr_asks_latency_percentiles_with_j() -> None:
    argv = shlex.split(netperf.netperf_command("h", wl("tcp_rr", 1), 3, remote_cpu=None,
                                               local_cpu=0))
    assert "-j" in argv[: argv.index("--")]
    assert argv[argv.index("-T") + 1] == "0,"
    test = argv[argv.index("--") + 1 :]
    assert test[test.index("-r") + 1] == "1,1"
    sel = test[test.index("-k") + 1].split(",")
    assert {"P50_LATENCY", "P90_LATENCY", "P99_LATENCY", "MEAN_LATENCY"} <= set(sel)


def test_netperf_no_binding_without_cpus() -> None:
    argv = shlex.split(netperf.netperf_command("h", wl("TCP_MAERTS", 8192), 2, remote_cpu=None))
    assert "-T" not in argv
    assert argv[argv.index("-m") + 1] == "8192,8192"


@pytest.mark.parametrize(
    ("workload", "duration", "needle"),
    [(wl("UDP_STREAM", 1), 5, "unknown netperf workload"),
     (wl("TCP_STREAM", 0), 5, "message_size"),
     (wl("TCP_STREAM", 1), 2.5, "whole number"),
     (wl("TCP_STREAM", 1), 0, "positive")],
)
def test_netperf_command_rejects_bad_input(workload, duration, needle) -> None:
    with pytest.raises(NetbedError, match=needle) as exc:
        netperf.netperf_command("h", workload, duration, remote_cpu=None)
    assert exc.value.hint


# ---------------------------------------------------------------- netperf parser

# Shape of netperf 2.7 `-P 0 ... -k` output (KEY=VALUE per selector), with a
# warning line as netperf prints when it cannot set something.
NETPERF_STREAM = """\
netperf: send_omni: unable to set TCP_NODELAY
THROUGHPUT=307.42
THROUGHPUT_UNITS=10^6bits/s
ELAPSED_TIME=5.00
PROTOCOL=TCP
DIRECTION=Send
LOCAL_CPU_UTIL=41.20
REMOTE_CPU_UTIL=-1.00
REMOTE_CPU_BIND=1
LOCAL_TRANSPORT_RETRANS=0
"""


def test_parse_netperf_keyval() -> None:
    r = netperf.parse_netperf(NETPERF_STREAM)
    assert r.get("THROUGHPUT") == pytest.approx(307.42)
    assert r.throughput_units == "10^6bits/s"
    assert r.raw["PROTOCOL"] == "TCP"
    assert "PROTOCOL" not in r.values
    assert r.get("REMOTE_CPU_UTIL") == -1.0  # kept as printed, not invented
    assert r.get("MEAN_LATENCY") is None


def test_parse_netperf_without_throughput_is_an_error() -> None:
    with pytest.raises(NetbedError, match="THROUGHPUT"):
        netperf.parse_netperf("establish control: are you sure there is a netserver listening?\n")


@pytest.mark.parametrize(
    ("units", "kind", "factor"),
    [("10^6bits/s", "bytes", 125000.0), ("10^9bits/s", "bytes", 1.25e8),
     ("10^3bytes/s", "bytes", 1000.0), ("Trans/s", "trans", 1.0)],
)
def test_netperf_units(units, kind, factor) -> None:
    assert netperf.netperf_units_factor(units) == (kind, factor)


def test_netperf_units_unknown() -> None:
    with pytest.raises(NetbedError, match="THROUGHPUT_UNITS"):
        netperf.netperf_units_factor("furlongs")


# ---------------------------------------------------------------- perf stat


def test_perf_stat_command() -> None:
    cmd = perfstat.perf_stat_command(5, perfstat.perf_events(pmu=False), output="/tmp/p.csv")
    argv = shlex.split(cmd)
    assert argv[:4] == ["timeout", "-k", "5", "35"]
    assert "-a" in argv and "-A" in argv and "-x;" in argv
    assert argv[argv.index("-o") + 1] == "/tmp/p.csv"
    events = argv[argv.index("-e") + 1].split(",")
    assert events == list(perfstat.SOFTWARE_EVENTS)
    assert argv[-2:] == ["sleep", "5"]
    assert set(perfstat.HARDWARE_EVENTS) <= set(perfstat.perf_events(pmu=True))


@pytest.mark.parametrize("sep", [",", "-", "a", ";;"])
def test_perf_stat_rejects_ambiguous_separator(sep) -> None:
    with pytest.raises(NetbedError, match="separator"):
        perfstat.perf_stat_command(1, ["cycles"], sep=sep)


def test_parse_perf_stat_real_output_keeps_not_supported() -> None:
    df = perfstat.parse_perf_stat(read("perf-stat.csv"))
    assert set(df["cpu"]) == {"0", "1"}
    cs = df[(df.metric == "context-switches")].set_index("cpu")["value"]
    assert cs["0"] == 2499 and cs["1"] == 25387
    assert df.loc[df.metric == "task-clock", "unit"].iloc[0] == "msec"
    cyc = df[df.metric == "cycles"]
    assert len(cyc) == 2
    assert cyc["value"].isna().all()
    assert (cyc["status"] == "not-supported").all()
    assert (df.loc[df.value.notna(), "status"] == "ok").all()


def test_parse_perf_stat_not_counted_and_comments() -> None:
    text = ("# started on Wed Nov 25 09:00:00 2026\n\n"
            "CPU0;<not counted>;;cycles;0;0.00;;\n"
            "CPU0;12;;cpu-migrations;1000;100.00;12.0;/sec\n")
    df = perfstat.parse_perf_stat(text).set_index("metric")
    assert df.loc["cycles", "status"] == "not-counted"
    assert math.isnan(df.loc["cycles", "value"])
    assert df.loc["cpu-migrations", "value"] == 12


def test_parse_perf_stat_garbage_value() -> None:
    with pytest.raises(NetbedError, match="line 1"):
        perfstat.parse_perf_stat("CPU0;twelve;;cycles;0;100.00;;\n")


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


# ---------------------------------------------------------------- reader samples


def test_parse_reader_samples() -> None:
    s = reader.parse_reader_samples("# pid 812\n12.03 1\n12.13 1\n12.23 0\n12.33 1\n")
    assert s.counts == {"1": 3, "0": 1}
    assert s.pids == [812]
    assert s.shares() == {"0": 0.25, "1": 0.75}
    assert reader.parse_reader_samples("").shares() == {}
    noisy = reader.parse_reader_samples("1.0 0\nbash: line 3: oops\n2.0 1\n")
    assert noisy.counts == {"0": 1, "1": 1}
    assert noisy.ignored == 1 and noisy.first_ignored.startswith("bash:")


@pytest.mark.skipif(not (shutil.which("pgrep") and shutil.which("dash")),
                    reason="needs pgrep and dash")
def test_reader_sampler_finds_the_netserver_child(tmp_path: Path) -> None:
    """Runs the real sampler script against a stand-in: a shell binary named
    `netserver` whose child (also `netserver`) spins, like netserver's data process."""
    fake = tmp_path / "netserver"
    shutil.copy(shutil.which("dash"), fake)
    parent = subprocess.Popen([str(fake), "-c", f"{fake} -c 'while :; do :; done' & wait"])
    try:
        for _ in range(50):
            if subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True).stdout:
                break
            time.sleep(0.05)
        out = subprocess.run(["bash", "-c", reader.reader_sampler_command(1.5, 0.1)],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        child = int(subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                                   text=True).stdout.split()[0])
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()
    samples = reader.parse_reader_samples(out.stdout)
    assert samples.pids == [child]
    assert samples.total >= 1  # how many depends on host load; where is what matters
    assert set(samples.counts) <= {str(c) for c in range(64)}


def test_ethtool_features() -> None:
    text = ("Features for eth1:\nrx-checksumming: off [fixed]\ntx-checksumming: on\n"
            "\ttx-checksum-ipv4: off [fixed]\ngeneric-receive-offload: on\n")
    f = offloads.parse_ethtool_features(text)
    assert f["rx-checksumming"] == "off [fixed]"
    assert f["tx-checksum-ipv4"] == "off [fixed]"
    assert f["generic-receive-offload"] == "on"


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


# ---------------------------------------------------------------- captured in a netbed guest

GUEST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-distro-e1000"


def guest(*parts: str) -> str:
    return GUEST.joinpath(*parts).read_text()


def test_guest_netperf_stream_maerts_rr() -> None:
    """netperf 2.7 in our guest accepted every selector and printed keyval lines."""
    stream = netperf.parse_netperf(guest("TCP_STREAM", "netperf.txt"))
    assert set(stream.raw) == set(netperf.NETPERF_SELECTORS)
    assert stream.throughput_units == "10^6bits/s" and stream.get("THROUGHPUT") > 0
    assert stream.get("REMOTE_CPU_BIND") == 1 and stream.get("LOCAL_CPU_BIND") == 0
    assert stream.get("LOCAL_SEND_SIZE") == 16384
    maerts = netperf.parse_netperf(guest("TCP_MAERTS", "netperf.txt"))
    assert maerts.raw["DIRECTION"] == "Receive"
    assert maerts.get("REMOTE_SEND_SIZE") == 16384  # "-m S,S": netserver sends S bytes
    rr = netperf.parse_netperf(guest("TCP_RR", "netperf.txt"))
    assert set(rr.raw) == set(netperf.NETPERF_SELECTORS) | set(netperf.NETPERF_RR_SELECTORS)
    assert rr.throughput_units == "Trans/s"
    assert rr.get("TRANSACTION_RATE") == pytest.approx(rr.get("THROUGHPUT"), rel=1e-3)
    assert rr.get("P50_LATENCY") <= rr.get("P90_LATENCY") <= rr.get("P99_LATENCY")


def test_guest_perf_stat_has_no_pmu() -> None:
    df = perfstat.parse_perf_stat(guest("TCP_RR", "perf-stat.csv"))
    assert set(df["cpu"]) == {"0", "1"}
    sw = df[df.metric.isin(perfstat.SOFTWARE_EVENTS)]
    assert len(sw) == 2 * len(perfstat.SOFTWARE_EVENTS) and (sw["status"] == "ok").all()
    hw = df[df.metric.isin(perfstat.HARDWARE_EVENTS)]
    assert len(hw) == 2 * len(perfstat.HARDWARE_EVENTS)
    assert (hw["status"] == "not-supported").all() and hw["value"].isna().all()


@pytest.mark.parametrize("workload", ["TCP_STREAM", "TCP_MAERTS", "TCP_RR"])
def test_guest_reader_ran_where_netperf_bound_it(workload: str) -> None:
    """`-T 0,1` binds netserver's data process to CPU 1: the sampler saw exactly that."""
    s = reader.parse_reader_samples(guest(workload, "reader-cpus.txt"))
    assert len(s.pids) == 1
    assert s.total >= 3
    assert s.shares() == {"1": 1.0}


def test_guest_proc_deltas_and_offloads() -> None:
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
    feats = offloads.parse_ethtool_features(guest("offloads.txt"))
    assert feats["rx-checksumming"].startswith("off")  # QEMU's e1000: software checksums
