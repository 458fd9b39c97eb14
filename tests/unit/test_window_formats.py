"""Window units and alignment parsers (tcpinfo, nicstats, stamps) and the payload recipe,
on output captured from guests (tests/fixtures/raw/guest-window)."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.formats import nicstats, payload, stamps, tcpinfo, trace

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-window"


def test_nic_statistics_delta_from_captured_files():
    d = nicstats.nicstats_delta((FIX / nicstats.RAW_BEFORE).read_text(),
                                (FIX / nicstats.RAW_AFTER).read_text())
    assert d["rx_packets"] > 1000 and d["rx_bytes"] > 1448 * d["rx_packets"] * 0.9
    assert d["rx_dropped"] == 0


@pytest.mark.parametrize("text", ["rx_packets\n", "rx_packets 12 13\n", "rx_packets x\n"])
def test_bad_nic_statistics_line_names_the_line(text):
    with pytest.raises(NetbedError, match="line 1"):
        nicstats.parse_nicstats(text)


def test_nic_statistics_need_rx_packets():
    with pytest.raises(NetbedError, match="rx_packets"):
        nicstats.nicstats_delta("rx_bytes 1\n", "rx_bytes 2\n")


def test_alignment_measures_each_source_against_the_units_reads():
    text = "\n".join([
        "perf-begin 1000000000", "units-before-start 1001000000", "units-before 1003000000",
        "proc-before-start 1003100000", "proc-before 1004100000",
        "trace-on-start 1004200000", "trace-on 1004300000",
        "trace-off-start 6004300000", "trace-off 6004400000",
        "proc-after-start 6004500000", "proc-after 6005500000",
        "units-after-start 6005600000", "units-after 6007600000", "perf-end 6010000000"])
    a = stamps.alignment(stamps.parse_stamps(text))
    assert a.seconds == pytest.approx(5.0046)
    assert a.read_ms == pytest.approx(2.0)
    # units read at 1002 ms and 6006.6 ms (middles of their reads)
    assert a.offsets_ms["perf"] == pytest.approx(3.4)  # end: 6010 - 6006.6
    assert a.offsets_ms["proc"] == pytest.approx(1.6)
    assert a.offsets_ms["trace"] == pytest.approx(2.25)
    assert a.skew_ms == pytest.approx(3.4) and a.worst == "perf"
    assert "cachemodel" not in a.offsets_ms


def test_cache_model_edges_are_where_the_plugin_starts_and_stops_counting():
    # captured from a cache-model repetition (patched e1000 TCP_STREAM, rep 1, TCG): the
    # plugin stalls the vCPU 84 ms at begin (snapshot, then counting) and 235 ms at end
    # (counting stops, then snapshot and tables)
    text = "\n".join([
        "perf-begin 9000000000",
        "mark-begin-start 9001600000", "mark-begin 9085300000",
        "units-before-start 9086100000", "units-before 9111100000",
        "proc-before-start 9111600000", "proc-before 9150000000",
        "proc-after-start 12583300000", "proc-after 12605400000",
        "units-after-start 12606100000", "units-after 12648500000",
        "mark-end-start 12649000000", "mark-end 12884100000", "perf-end 12884600000"])
    a = stamps.alignment(stamps.parse_stamps(text))
    # units at 9098.6 and 12627.3 ms; counting from 9085.3 to 12649.0 ms
    assert a.offsets_ms["cachemodel"] == pytest.approx(21.7)
    # the middles of the brackets would have said 55 and 138.3 ms
    assert a.offsets_ms["perf"] == pytest.approx(257.3)  # the end stall is inside perf's
    assert a.worst == "perf"


def test_alignment_needs_both_unit_reads_in_order():
    with pytest.raises(NetbedError, match="units-after"):
        stamps.alignment({"units-before": 1})
    with pytest.raises(NetbedError, match="closes before it opens"):
        stamps.alignment({"units-before": 5, "units-after": 4})
    with pytest.raises(NetbedError, match="line 2"):
        stamps.parse_stamps("a 1\nb\n")


def test_fill_file_recipe_and_netperf_arguments():
    p = payload.random_fill(16384)
    assert p.period_bytes == 16 * 1024 * 1024
    assert payload.netperf_global_args(p, "TCP_STREAM") == ["-F", "/tmp/nbfill"]
    assert payload.netperf_global_args(p, "TCP_MAERTS") == ["-F", ",/tmp/nbfill"]
    assert payload.netperf_global_args(p, "TCP_RR") == ["-F", "/tmp/nbfill,/tmp/nbfill"]
    assert payload.netperf_test_args(p) == ["-W", "1024,"]
    assert payload.sending_sides("TCP_MAERTS") == ("receiver",)
    d = payload.netperf_default(16384)
    assert d.period_bytes == 8
    assert payload.netperf_global_args(d, "TCP_STREAM") == [] == payload.netperf_test_args(d)


def test_fill_file_limits():
    with pytest.raises(NetbedError, match="31-character"):
        payload.random_fill(16384, path="/tmp/" + "x" * 40)
    with pytest.raises(NetbedError, match="shorter than the send ring"):
        payload.random_fill(65536, size=1024 * 1024)


@pytest.mark.process
def test_fill_command_makes_the_file_once_and_reports_its_digest(tmp_path: Path):
    path = tmp_path / "f"
    p = payload.Payload("random-fill", str(path), 1024 * 1024, 16, 1024)
    cmd = payload.make_fill_command(p)
    first = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True)
    mtime = path.stat().st_mtime_ns
    again = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True)
    assert path.stat().st_mtime_ns == mtime and first.stdout == again.stdout
    got = payload.parse_fill_provenance(p, first.stdout)
    import hashlib

    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(json.dumps(got.as_dict()))["period_bytes"] == 16 * 1024


def test_fill_provenance_without_digest_is_an_error():
    with pytest.raises(NetbedError, match="no sha256"):
        payload.parse_fill_provenance(payload.random_fill(16384), "{}")


# Raw files can be truncated or garbled (a guest that died mid-write): the parsers must
# answer with a NetbedError naming the problem, never another exception. Seeded, so a
# failure reproduces.
SAMPLES = ["local=1.2.3.4:5 peer=6.7.8.9:10 bytes_received=12",
           "local=1.2.3.4:5 peer=6.7.8.9:10 bytes_received=x", "local=:", "peer=a:b",
           "local=a:b peer=c:d",
           "units-before 12", "units-after 5", "units-before-start x", "rx_packets 7",
           "rx_packets", "  netserver-1 [000] ..s1. 1.000000: napi_poll: x",
           "  <idle>-0 [001] d.s3. 2.000000: sched_waking: comm=netserver pid=1 target_cpu=9",
           "  <idle>-0 [001] d..2. 2.000000: sched_switch: prev_pid=1 prev_state=S ==>"]


def garbled(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randrange(8)):
        line = rng.choice(SAMPLES)
        cut = rng.randrange(len(line) + 1)
        lines.append(line[:cut] if rng.random() < 0.5 else line)
        if rng.random() < 0.2:
            lines.append("".join(chr(rng.randrange(32, 0x250)) for _ in range(rng.randrange(20))))
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(300))
def test_window_parsers_fail_only_with_netbed_errors(seed: int):
    rng = random.Random(seed)
    a, b = garbled(rng), garbled(rng)
    for call in (lambda: tcpinfo.connection_delta(a, b), lambda: nicstats.nicstats_delta(a, b),
                 lambda: stamps.alignment(stamps.parse_stamps(a))):
        with contextlib.suppress(NetbedError):
            call()
    loc = trace.reduce_trace(trace.parse_trace((a + "\n" + b).splitlines()), "eth0", None)
    assert loc.processing_on_reader_cpu is None or 0 <= loc.processing_on_reader_cpu <= 1
