"""testbed.formats.perfstat: the `perf stat` command and its output parser.

tests/fixtures/raw/host/ holds /proc snapshots and a `perf stat -a -A -x;` run
captured on a development host (Linux 6.18, 2 CPUs, no PMU), taken before and
after a one-second perf window; tests/fixtures/raw/guest-distro-e1000/ the same
captured in a netbed guest: real kernel formats, real `<not supported>`."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.formats import perfstat

HOST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "host"


def read(name: str) -> str:
    return (HOST / name).read_text()


GUEST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-distro-e1000"


def guest(*parts: str) -> str:
    return GUEST.joinpath(*parts).read_text()


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


def test_guest_perf_stat_has_no_pmu() -> None:
    df = perfstat.parse_perf_stat(guest("TCP_RR", "perf-stat.csv"))
    assert set(df["cpu"]) == {"0", "1"}
    sw = df[df.metric.isin(perfstat.SOFTWARE_EVENTS)]
    assert len(sw) == 2 * len(perfstat.SOFTWARE_EVENTS) and (sw["status"] == "ok").all()
    hw = df[df.metric.isin(perfstat.HARDWARE_EVENTS)]
    assert len(hw) == 2 * len(perfstat.HARDWARE_EVENTS)
    assert (hw["status"] == "not-supported").all() and hw["value"].isna().all()
