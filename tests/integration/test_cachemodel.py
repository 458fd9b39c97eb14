"""The cache-model plugin inside real TCG guests, checked with guest microbenchmarks.

Each boot is a tiny busybox initramfs with the guest tools (images/tools/*.c),
the Debian kernel and the plugin, through the same testbed.vm.cachemodel code the
runner uses to build and configure the plugin. Counts are read from the regions
the benchmarks mark themselves, in user mode (the kernel's own timer work in the
same window is counted as kernel and left out of these checks).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.symbols import c2c_line_rows, symbol_rows
from testbed.formats import cachemodel as cmfmt
from testbed.formats import symbols as symfmt
from testbed.settings import Settings
from testbed.vm import cachemodel as cm
from testbed.vocabulary import TcgThreads

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

WRITES = 2000
L1D = 32 << 10
LINE = 64
BIG, SMALL, PASSES = 4 * L1D, L1D // 2, 5

# The streams stay on vCPU 0 (taskset): a stream the scheduler moved to the other vCPU
# mid-pass missed again on the lines the first vCPU's caches held (QEMU 10.0,
# 2026-11-30: 6427 loads on vCPU 0, then 803 = 6427 / 8 extra L2 misses on vCPU 1),
# which is the model being right about another experiment.
SCRIPT = f"""\
nbbench_pingpong {WRITES} 0 1 30
nbbench_pingpong {WRITES} 1 1 40
taskset 1 nbbench_stream {BIG} {PASSES} 10
taskset 1 nbbench_stream {SMALL} {PASSES} 20
nbmark run 50 -- nbbench_stream 65536 2
"""


@pytest.fixture(scope="module")
def settings_() -> Settings:
    if shutil.which(Settings().qemu_binary) is None:
        pytest.skip("QEMU is not installed")
    # INVOKE_NETBED_QEMU=backport runs the validation on QEMU 10 (plugin API >= 2)
    return Settings.from_mapping({"qemu": os.environ.get("INVOKE_NETBED_QEMU")})


def boot(settings: Settings, workdir: Path, threads: TcgThreads = "single") -> pd.DataFrame:
    # with attribution on, as the runner uses the plugin
    run = cm.run_with_model(settings, SCRIPT, workdir, tcg_threads=threads, attribution=True)
    assert run.csv is not None
    return cmfmt.read_snapshots(run.csv.read_text())


@pytest.fixture(scope="module")
def runs(settings_: Settings, tmp_path_factory: pytest.TempPathFactory) -> list[pd.DataFrame]:
    """Two identical boots with thread=single."""
    return [boot(settings_, tmp_path_factory.mktemp(f"run{i}")) for i in range(2)]


def user(df: pd.DataFrame, first: str, last: str) -> dict[str, int]:
    return cmfmt.window(df, first, last, mode="user")


def test_pingpong_across_cpus_moves_the_line_once_per_write(runs):
    c2c = user(runs[0], "begin:30", "end:30")["c2c_transfers"]
    print(f"c2c transfers for {WRITES} alternating writes on CPUs 0,1: {c2c}")
    assert abs(c2c - WRITES) <= 0.05 * WRITES


def test_pingpong_on_one_cpu_moves_nothing(runs):
    c2c = user(runs[0], "begin:40", "end:40")["c2c_transfers"]
    print(f"c2c transfers for {WRITES} alternating writes on CPU 1 only: {c2c}")
    assert c2c <= 0.01 * WRITES


def test_streaming_four_times_l1d_misses_every_line(runs):
    lines = BIG // LINE
    first = user(runs[0], "begin:10", "snapshot:11")
    later = user(runs[0], "snapshot:11", "end:10")
    print(f"L1D misses: first pass {first['l1d_misses']}, next {PASSES - 1} passes "
          f"{later['l1d_misses']}, lines per pass {lines}")
    assert abs(first["l1d_misses"] - lines) <= 0.05 * lines
    assert abs(later["l1d_misses"] - (PASSES - 1) * lines) <= 0.05 * (PASSES - 1) * lines
    assert first["loads"] >= BIG // 8


def test_half_l1d_hits_after_the_first_pass(runs):
    lines = SMALL // LINE
    first = user(runs[0], "begin:20", "snapshot:21")
    later = user(runs[0], "snapshot:21", "end:20")
    print(f"half-L1D buffer: first pass {first['l1d_misses']} misses, "
          f"later passes {later['l1d_misses']}")
    assert abs(first["l1d_misses"] - lines) <= 0.05 * lines
    # Not always 0: an interrupt on the same vCPU runs kernel code that shares the
    # L1D and evicts some lines (seen: 0 in most runs, 20-63 of the 1024 line reads
    # when the window had kernel work, e.g. 4257 kernel loads for 28 misses).
    assert later["l1d_misses"] <= 0.1 * lines * (PASSES - 1)


def test_nbmark_run_brackets_a_command(runs):
    w = user(runs[0], "begin:50", "end:50")
    assert w["loads"] >= 2 * 65536 // 8


# (window, event, scale): runs agree within 1% of `scale`, the count the window is
# about. Without -icount, timer interrupts land at different guest instructions in
# each run, and a tick's kernel work evicts ~20 user lines from the L1D. So the
# half-L1D window, whose count is ~0 by design, is left out: its runs differ by
# those few interrupt-caused misses (seen: 260 vs 276 and 260 vs 283 for 256 lines).
AGREEMENT = [
    ("begin:10", "end:10", "l1d_misses", PASSES * BIG // LINE),
    ("begin:10", "end:10", "l2_misses", BIG // LINE),
    ("begin:30", "end:30", "c2c_transfers", WRITES),
]


@pytest.mark.parametrize(("first", "last", "event", "scale"), AGREEMENT)
def test_repeated_runs_agree(runs, first, last, event, scale):
    a, b = (user(df, first, last)[event] for df in runs)
    print(f"{first}..{last} {event}: run 1 {a}, run 2 {b}, scale {scale}")
    assert abs(a - b) <= 0.01 * scale


def test_multi_threaded_tcg_runs_and_reports_its_bias(settings_, tmp_path):
    """MTTCG: memory-safe (one lock), but callbacks follow host timing, not memory order."""
    df = boot(settings_, tmp_path, threads="multi")
    c2c = user(df, "begin:30", "end:30")["c2c_transfers"]
    print(f"thread=multi: c2c {c2c} for {WRITES} writes ({(c2c - WRITES) / WRITES:+.1%})")
    assert 0.5 * WRITES <= c2c <= 1.05 * WRITES
    big = user(df, "snapshot:11", "end:10")["l1d_misses"]
    assert abs(big - (PASSES - 1) * BIG // LINE) <= 0.05 * (PASSES - 1) * BIG // LINE


def test_device_writes_of_received_packets_are_noticed(settings_, tmp_path):
    """e1000 DMA into the RX ring: with detection, ~every payload line is a device write."""
    mib = 4
    lines = mib * (1 << 20) // LINE
    on = cm.run_receive_with_model(settings_, tmp_path / "on", mib, dma=True)
    off = cm.run_receive_with_model(settings_, tmp_path / "off", mib, dma=False)
    for name, res in (("on", on), ("off", off)):
        k = res["kernel"]
        print(f"dma={name}: kernel device_writes {k['device_writes']}, l1d {k['l1d_misses']}, "
              f"l2 {k['l2_misses']}, llc {k['llc_misses']} for {lines} payload lines")
    assert 0.9 * lines <= on["kernel"]["device_writes"] <= 1.2 * lines
    assert off["kernel"]["device_writes"] == 0
    assert on["user"]["device_writes"] <= 0.01 * lines


# ---------------------------------------------------------------- attribution
# One window around known code: two functions of a static guest tool ping-ponging a
# line (nbbench_attrib, cachemodel/guest/), and the kernel copying through a pipe.
PIPE_BYTES = 1 << 20
ATTR_SCRIPT = cm.KALLSYMS_DUMP + f"""\
nbmark begin 90
nbbench_attrib pingpong {WRITES} 0 1 91
nbbench_attrib pipe {PIPE_BYTES} 92
nbmark end 90
"""
COPY_SYMBOL = re.compile(r"copy_user|copy_to_user|copy_from_user|memcpy|movs")


@pytest.fixture(scope="module")
def attributed(settings_: Settings, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    run = cm.run_with_model(settings_, ATTR_SCRIPT, tmp_path_factory.mktemp("attr"),
                            attribution=True)
    assert run.csv is not None and run.sites is not None and run.c2c is not None
    kernel = symfmt.parse_kallsyms(cm.console_kallsyms(run.console), "micro guest")
    user = cm.tool_symbols(cm.build_guest_tools(settings_))
    sites = cmfmt.read_sites(run.sites.read_text())
    c2c = cmfmt.read_c2c(run.c2c.read_text())
    return (sites, symbol_rows(sites, kernel, user), c2c_line_rows(c2c, kernel, user),
            cmfmt.read_snapshots(run.csv.read_text()))


def test_attribution_adds_up_to_the_model_counters(attributed):
    sites, _, _, snaps = attributed
    for mode in cmfmt.MODES:
        win = cmfmt.window(snaps, "begin:90", "end:90", mode=mode)
        got = sites[sites["mode"] == mode]
        for event in cmfmt.SITE_EVENTS:
            assert int(got[event].sum()) == win[event], (mode, event)


def test_pingpong_misses_are_attributed_to_its_two_functions(attributed):
    _, rows, _, _ = attributed
    c2c = rows[(rows["event"] == "c2c_transfers") & (rows["mode"] == "user")]
    by = c2c.groupby("symbol")["value"].sum()
    print("user c2c by symbol:", by.sort_values(ascending=False).head(5).to_dict())
    ping, pong = by.get("nbbench_attrib:ping_side", 0), by.get("nbbench_attrib:pong_side", 0)
    assert ping + pong >= 0.95 * WRITES
    assert min(ping, pong) >= 0.4 * WRITES


def test_c2c_line_table_names_both_sides_and_cpus(attributed):
    _, _, lines, _ = attributed
    top = lines[lines["rank"] == 1]
    print(top.to_string())
    assert abs(int(top["line_c2c"].iloc[0]) - WRITES) <= 0.05 * WRITES
    for side in ("requester", "owner"):
        s = top[top["side"] == side]
        sides = s.groupby("symbol")["count"].sum()
        assert set(sides[sides >= 0.4 * WRITES].index) == {
            "nbbench_attrib:ping_side", "nbbench_attrib:pong_side"}, side
        cpus = s.groupby("symbol")["vcpu"].first()
        assert cpus["nbbench_attrib:ping_side"] == 0 and cpus["nbbench_attrib:pong_side"] == 1


def test_pipe_copies_are_attributed_to_the_kernel_copy_routine(attributed):
    _, rows, _, _ = attributed
    kernel = rows[rows["mode"] == "kernel"]
    stores = kernel[kernel["event"] == "stores"].groupby("symbol")["value"].sum()
    best = stores.sort_values(ascending=False)
    print("kernel stores by symbol:", best.head(5).to_dict())
    assert COPY_SYMBOL.search(best.index[0]), best.index[0]
    # the pipe moves PIPE_BYTES in and out: at least one store per 8 bytes each way
    assert best.iloc[0] >= 2 * PIPE_BYTES // 8
    # no device wrote these buffers (QEMU helpers' own writes, e.g. page-table A/D
    # bits, look like device writes to the model: README, DMA)
    copy = kernel[(kernel["symbol"] == best.index[0]) & (kernel["event"] == "stores")]
    assert copy[copy["data"] == "device"]["value"].sum() <= 0.01 * best.iloc[0]
