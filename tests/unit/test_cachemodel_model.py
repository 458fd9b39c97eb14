"""model.c, the cache model itself, driven by traces (no QEMU).

The tests compile cachemodel/plugin/model_trace.c (gcc, well under a second) and
feed it synthetic access traces whose right answers follow from the cache
geometry alone."""

from __future__ import annotations

import subprocess
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.process  # compiles C, starts processes or opens sockets

LINE = 64
L1D = 32 << 10


# ---------------------------------------------------------------- model.c via traces
def run_trace(binary: Path, trace: str, **cfg: int) -> pd.DataFrame:
    args = [f"{k}={v}" for k, v in cfg.items()]
    proc = subprocess.run([str(binary), *args], input=trace, capture_output=True, text=True,
                          check=True)
    return pd.read_csv(StringIO(proc.stdout))


def total(df: pd.DataFrame, event: str, vcpu: int | None = None, mode: str = "user") -> int:
    sel = df[(df["event"] == event) & (df["mode"] == mode)]
    if vcpu is not None:
        sel = sel[sel["vcpu"] == vcpu]
    return int(sel["value"].sum())


def pingpong(n: int, cpu_a: int, cpu_b: int, addr: int = 0x4000) -> str:
    """Alternate writers: each turn reads the counter, then writes it."""
    lines = []
    for i in range(n):
        cpu = cpu_a if i % 2 == 0 else cpu_b
        lines += [f"{cpu} u l {addr:#x}", f"{cpu} u s {addr:#x}"]
    return "\n".join(lines) + "\n"


def test_alternating_writers_on_two_cpus_move_the_line_every_turn(model_trace):
    df = run_trace(model_trace, pingpong(1000, 0, 1))
    # the first write finds the line nowhere; every later turn finds it Modified elsewhere
    assert total(df, "c2c_transfers") == 999
    assert total(df, "invalidations_sent") == 999
    assert total(df, "invalidations_received") == 999


def test_alternating_writers_on_one_cpu_move_nothing(model_trace):
    df = run_trace(model_trace, pingpong(1000, 0, 0))
    assert total(df, "c2c_transfers") == 0
    assert total(df, "l1d_misses") == 1


def test_reading_a_clean_shared_line_is_not_a_c2c_transfer(model_trace):
    df = run_trace(model_trace, "0 u l 0x40\n1 u l 0x40\n1 u s 0x40\n")
    assert total(df, "c2c_transfers") == 0
    assert total(df, "invalidations_sent", vcpu=1) == 1  # S -> M upgrade invalidates cpu 0
    assert total(df, "llc_misses") == 1  # cpu 1's miss was served on chip


def test_streaming_over_four_times_l1d_misses_every_line_every_pass(model_trace):
    size, passes = 4 * L1D, 3
    df = run_trace(model_trace, f"S 0 u l 0x100000 {size} 8 {passes}\n")
    lines = size // LINE
    assert total(df, "loads") == passes * size // 8
    assert total(df, "l1d_misses") == passes * lines
    assert total(df, "l2_misses") == lines  # 128 KiB fits the 1 MiB L2
    assert total(df, "llc_misses") == lines


def test_half_l1d_read_repeatedly_misses_only_in_the_first_pass(model_trace):
    size = L1D // 2
    df = run_trace(model_trace, f"S 0 u l 0x200000 {size} 8 10\n")
    assert total(df, "l1d_misses") == size // LINE


def test_without_l2_every_l1d_miss_is_an_l2_miss(model_trace):
    df = run_trace(model_trace, f"S 0 u l 0 {4 * L1D} 64 2\n", l2_size=0)
    assert total(df, "l2_misses") == total(df, "l1d_misses") == 2 * 4 * L1D // LINE


def test_kernel_and_user_are_counted_apart(model_trace):
    df = run_trace(model_trace, "0 k s 0x80\n0 u l 0x1000\n0 u l 0x1000\n")
    assert total(df, "stores", mode="kernel") == 1 and total(df, "stores") == 0
    assert total(df, "loads") == 2 and total(df, "l1d_misses") == 1


def test_an_access_across_two_lines_counts_once_but_touches_both(model_trace):
    df = run_trace(model_trace, "0 u l 0x7c 8\n")
    assert total(df, "loads") == 1 and total(df, "l1d_misses") == 2


def test_dirty_line_evicted_from_l1_is_written_back_into_the_llc(model_trace):
    # one-line L1, no L2, two-set direct-mapped LLC. Line 0x80 replaces line 0x0 in
    # the LLC, but evicting the dirty 0x0 from L1 writes it back there, so rereading
    # 0x0 hits the LLC (3 misses if the write-back were lost).
    cfg = dict(l1d_size=64, l1d_assoc=1, l2_size=0, llc_size=128, llc_assoc=1)
    df = run_trace(model_trace, "0 u s 0x0\n0 u l 0x80\n0 u l 0x0\n", **cfg)
    assert total(df, "l1d_misses") == 3
    assert total(df, "llc_misses") == 2


def test_clear_empties_the_caches_but_keeps_counts(model_trace):
    df = run_trace(model_trace, "0 u l 0x0\nclear\n0 u l 0x0\n")
    assert total(df, "l1d_misses") == 2 and total(df, "loads") == 2


def test_bad_geometry_is_refused_by_the_c_model_too(model_trace):
    proc = subprocess.run([str(model_trace), "l1d_size=49152"], input="", capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "l1d_size" in proc.stderr


def test_repeated_access_shortcut_notices_a_remote_write(model_trace):
    # cpu 0 reads a line twice (the second is the shortcut), cpu 1 writes it, cpu 0
    # reads again: that read must miss and be a c2c transfer, not a remembered hit.
    df = run_trace(model_trace, "0 u l 0x40\n0 u l 0x48\n1 u s 0x40\n0 u l 0x40\n0 u s 0x40\n")
    assert total(df, "l1d_misses", vcpu=0) == 2
    assert total(df, "c2c_transfers", vcpu=0) == 1
    assert total(df, "invalidations_sent", vcpu=0) == 1  # its S -> M upgrade


def test_repeated_access_shortcut_does_not_skip_an_upgrade(model_trace):
    # a load leaves the line Shared; a store right after must still invalidate cpu 1
    df = run_trace(model_trace, "1 u l 0x40\n0 u l 0x40\n0 u s 0x40\n")
    assert total(df, "invalidations_received", vcpu=1) == 1


def test_a_line_changed_behind_the_model_is_a_device_write(model_trace):
    # same digest: hits; new digest on a load: the device wrote it, so a miss that
    # DDIO serves from the LLC
    trace = "0 k l 0x40 8 111\n0 k l 0x40 8 111\n0 k l 0x80 8 5\n0 k l 0x40 8 222\n"
    df = run_trace(model_trace, trace)
    assert total(df, "device_writes", mode="kernel") == 1
    assert total(df, "l1d_misses", mode="kernel") == 3
    assert total(df, "llc_misses", mode="kernel") == 2
    no_ddio = run_trace(model_trace, trace, ddio=0)
    assert total(no_ddio, "llc_misses", mode="kernel") == 3


def test_cpu_writes_are_not_mistaken_for_device_writes(model_trace):
    trace = ("0 u s 0x40 8 5\n0 u l 0x40 8 5\n"  # own store then load
             "1 u s 0x40 8 6\n0 u l 0x40 8 6\n"  # another CPU's store, then a c2c load
             "0 u s 0x40 8 7\n0 u l 0x40 8 7\n")  # store via the shortcut path, reload
    df = run_trace(model_trace, trace)
    assert total(df, "device_writes") == 0
    assert total(df, "c2c_transfers", vcpu=0) == 1


def test_device_write_to_a_line_cached_elsewhere_drops_every_copy(model_trace):
    trace = "0 k l 0x40 8 1\n1 k l 0x40 8 1\n1 k l 0x40 8 2\n0 k l 0x40 8 2\n"
    df = run_trace(model_trace, trace)
    assert total(df, "device_writes", mode="kernel") == 1  # found by cpu 1, cpu 0 loses it
    assert total(df, "l1d_misses", vcpu=0, mode="kernel") == 2


def test_plugin_fast_path_counts_repeats_and_steps_aside_when_the_line_left(model_trace):
    trace = ("0 u l 0x40\nR 0 u l 0x40\nR 0 u l 0x40\n"  # two repeats: plain hits
             "1 u s 0x40\nR 0 u l 0x40\n"  # cpu 1 took the line: the repeat must miss
             "R 0 u s 0x40\n")  # line is Shared now: a store needs the upgrade path
    df = run_trace(model_trace, trace)
    assert total(df, "loads", vcpu=0) == 4 and total(df, "stores", vcpu=0) == 1
    assert total(df, "l1d_misses", vcpu=0) == 2
    assert total(df, "c2c_transfers", vcpu=0) == 1
    assert total(df, "invalidations_sent", vcpu=0) == 1
