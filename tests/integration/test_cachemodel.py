"""The cache-model plugin inside real TCG guests, checked with guest microbenchmarks.

Each boot is a tiny busybox initramfs with the guest tools (images/tools/*.c),
the Debian kernel and the plugin, through the same testbed.vm.cachemodel code the
runner uses to build and configure the plugin. Counts are read from the regions
the benchmarks mark themselves, in user mode (the kernel's own timer work in the
same window is counted as kernel and left out of these checks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from testbed.formats import cachemodel as cmfmt
from testbed.settings import Settings
from testbed.vm import cachemodel as cm

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

WRITES = 2000
L1D = 32 << 10
LINE = 64
BIG, SMALL, PASSES = 4 * L1D, L1D // 2, 5

SCRIPT = f"""\
nbbench_pingpong {WRITES} 0 1 30
nbbench_pingpong {WRITES} 1 1 40
nbbench_stream {BIG} {PASSES} 10
nbbench_stream {SMALL} {PASSES} 20
nbmark run 50 -- nbbench_stream 65536 2
"""


@pytest.fixture(scope="module")
def settings_() -> Settings:
    if shutil.which(Settings().qemu_binary) is None:
        pytest.skip("QEMU is not installed")
    return Settings()


def boot(settings: Settings, workdir: Path, threads: str = "single") -> pd.DataFrame:
    run = cm.run_with_model(settings, SCRIPT, workdir, tcg_threads=threads)
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
