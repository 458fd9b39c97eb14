"""testbed.formats.netperf: the netperf command builder and its keyval parser.

tests/fixtures/raw/host/ holds /proc snapshots and a `perf stat -a -A -x;` run
captured on a development host (Linux 6.18, 2 CPUs, no PMU), taken before and
after a one-second perf window; tests/fixtures/raw/guest-distro-e1000/ the same
captured in a netbed guest: real kernel formats, real `<not supported>`."""

from __future__ import annotations

import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.errors import NetbedError
from testbed.formats import netperf

GUEST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-distro-e1000"


def guest(*parts: str) -> str:
    return GUEST.joinpath(*parts).read_text()


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


RSR = {"RSR_SIZE_REQ", "RSR_SIZE", "RSR_SIZE_END"}
RCVBUF_CAPTURES = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-rcvbuf"


def test_guest_netperf_reads_back_netservers_receive_buffer() -> None:
    """netperf 2.7 in our guest, TCP_STREAM with and without `-S ,65536 -M 131072`: every
    selector printed, the buffer as Linux set it (doubled) and the recv size pinned."""
    shallow = netperf.parse_netperf((RCVBUF_CAPTURES / "distro-64K" / "netperf.txt").read_text())
    assert set(shallow.raw) == set(netperf.NETPERF_SELECTORS)
    assert (shallow.get("RSR_SIZE_REQ"), shallow.get("RSR_SIZE"),
            shallow.get("RSR_SIZE_END")) == (65536, 131072, 131072)
    assert shallow.get("REMOTE_RECV_SIZE") == 131072
    auto = netperf.parse_netperf((RCVBUF_CAPTURES / "distro-auto" / "netperf.txt").read_text())
    assert auto.get("RSR_SIZE_REQ") == -1 and auto.get("RSR_SIZE") == 131072
    assert (auto.get("RSR_SIZE_END") or 0) > 131072  # autotuning grew it
    assert auto.get("REMOTE_RECV_SIZE") == 131072  # what -M pins for every level


def test_guest_netperf_stream_maerts_rr() -> None:
    """netperf 2.7 in our guest accepted every selector and printed keyval lines."""
    stream = netperf.parse_netperf(guest("TCP_STREAM", "netperf.txt"))
    # captured before the receive-buffer selectors were asked (tests below)
    assert set(stream.raw) == set(netperf.NETPERF_SELECTORS) - RSR
    assert stream.throughput_units == "10^6bits/s" and stream.get("THROUGHPUT") > 0
    assert stream.get("REMOTE_CPU_BIND") == 1 and stream.get("LOCAL_CPU_BIND") == 0
    assert stream.get("LOCAL_SEND_SIZE") == 16384
    maerts = netperf.parse_netperf(guest("TCP_MAERTS", "netperf.txt"))
    assert maerts.raw["DIRECTION"] == "Receive"
    assert maerts.get("REMOTE_SEND_SIZE") == 16384  # "-m S,S": netserver sends S bytes
    rr = netperf.parse_netperf(guest("TCP_RR", "netperf.txt"))
    assert set(rr.raw) == (set(netperf.NETPERF_SELECTORS) - RSR) | set(netperf.NETPERF_RR_SELECTORS)
    assert rr.throughput_units == "Trans/s"
    assert rr.get("TRANSACTION_RATE") == pytest.approx(rr.get("THROUGHPUT"), rel=1e-3)
    assert rr.get("P50_LATENCY") <= rr.get("P90_LATENCY") <= rr.get("P99_LATENCY")
