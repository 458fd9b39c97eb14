"""Attribution on traces: model.c's per-instruction counters and c2c line records
(through cachemodel/plugin/model_trace.c), resolved to symbols by analysis/symbols.py."""

from __future__ import annotations

import random
import subprocess
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

from analysis.symbols import c2c_line_rows, symbol_rows
from testbed.formats import cachemodel as cmfmt
from testbed.formats import symbols as symfmt

PING, PONG = 0x401000, 0x402000  # user functions ping (0x401000..) and pong (0x402000..)
COPY = 0xFFFFFFFF81000100  # a kernel copy routine
USER = symfmt.SymbolTable.build([symfmt.Symbol(PING, PING + 0x100, "tool:ping"),
                                 symfmt.Symbol(PONG, PONG + 0x100, "tool:pong")])
KERNEL = symfmt.parse_kallsyms("ffffffff81000000 T _text\nffffffff81000100 T copy_user\n"
                               "ffffffff81000200 T other\n")


def run(binary: Path, trace: str, tmp: Path, **cfg: int
        ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    sites, c2c = tmp / "sites.csv", tmp / "c2c.csv"
    args = [f"{k}={v}" for k, v in cfg.items()] + [f"sites={sites}", f"c2c={c2c}"]
    proc = subprocess.run([str(binary), *args], input=trace, capture_output=True, text=True,
                          check=True)
    return (pd.read_csv(StringIO(proc.stdout)), cmfmt.read_sites(sites.read_text()),
            cmfmt.read_c2c(c2c.read_text()))


def pingpong(n: int, addr: int = 0x4000) -> str:
    """cpu 0 runs ping (load at PING, store at PING+4), cpu 1 pong, alternating."""
    lines = []
    for i in range(n):
        cpu, pc = (0, PING) if i % 2 == 0 else (1, PONG)
        lines += [f"@{pc:#x} {cpu} u l {addr:#x}", f"@{pc + 4:#x} {cpu} u s {addr:#x}"]
    return "\n".join(lines) + "\n"


@pytest.mark.process
def test_every_access_and_miss_is_attributed_to_its_instruction(model_trace, tmp_path):
    trace = pingpong(100) + "".join(f"@{COPY + 8:#x} 1 k s {0x10000 + 8 * i:#x}\n"
                                    for i in range(512))
    totals, sites, _ = run(model_trace, trace, tmp_path)
    for event in cmfmt.SITE_EVENTS:
        assert sites[event].sum() == totals.loc[totals["event"] == event, "value"].sum(), event
    rows = symbol_rows(sites, KERNEL, USER)
    by = rows.groupby(["symbol", "event"])["value"].sum()
    assert by[("tool:ping", "loads")] == 50 and by[("tool:pong", "stores")] == 50
    assert by[("copy_user", "stores")] == 512
    assert by[("copy_user", "l1d_misses")] == 64  # 512 x 8 bytes = 64 lines
    assert set(rows["mode"][rows["symbol"] == "copy_user"]) == {"kernel"}


@pytest.mark.process
def test_c2c_records_name_both_sides_and_their_cpus(model_trace, tmp_path):
    totals, _, c2c = run(model_trace, pingpong(1000), tmp_path)
    assert c2c["count"].sum() == totals.loc[totals["event"] == "c2c_transfers", "value"].sum()
    lines = c2c_line_rows(c2c, KERNEL, USER)
    assert set(lines["line"]) == {"0x4000"} and set(lines["line_c2c"]) == {999}
    req = lines[lines["side"] == "requester"].set_index("symbol")
    own = lines[lines["side"] == "owner"].set_index("symbol")
    # the loads miss (HITM); the stores that dirtied the line are the owners
    assert req.loc["tool:ping", "vcpu"] == 0 and req.loc["tool:pong", "vcpu"] == 1
    assert own.loc["tool:pong", "vcpu"] == 1 and own.loc["tool:ping", "vcpu"] == 0
    assert req["count"].sum() == own["count"].sum() == 999
    raw = c2c.set_index("pc")
    assert raw.loc[PING, "owner_pc"] == PONG + 4  # the exact store instruction


@pytest.mark.process
def test_c2c_table_keeps_the_top_lines_in_order(model_trace, tmp_path):
    # line k bounces k+1 times: 25 lines, only the 20 busiest are kept, busiest first
    trace = "".join(pingpong(k + 2, addr=0x100000 + 64 * k) for k in range(25))
    _, _, c2c = run(model_trace, trace, tmp_path)
    lines = c2c_line_rows(c2c, KERNEL, USER, top=20)
    ranked = lines.drop_duplicates("rank").set_index("rank")["line_c2c"]
    assert list(ranked.index) == list(range(1, 21))
    assert list(ranked) == sorted(ranked, reverse=True) and ranked.iloc[0] == 25


@pytest.mark.process
def test_lines_written_by_the_device_are_told_apart_from_cpu_data(model_trace, tmp_path):
    trace = (f"@{COPY:#x} 0 k l 0x40 8 111\n"       # first sight: CPU data
             f"@{COPY:#x} 0 k l 0x40 8 222\n"       # changed behind the model: device
             f"@{COPY:#x} 0 k l 0x40 8 222\n"       # still the device's data
             f"@{COPY + 4:#x} 1 k l 0x40 8 222\n"   # another CPU reads it: still device
             f"@{COPY + 8:#x} 0 k s 0x40 8 333\n"   # a CPU writes it: from now CPU data
             f"@{COPY:#x} 0 k l 0x40 8 333\n")
    _, sites, _ = run(model_trace, trace, tmp_path)
    rows = symbol_rows(sites, KERNEL, None)
    loads = rows[rows["event"] == "loads"].groupby("data")["value"].sum()
    assert loads["device"] == 3 and loads["cpu"] == 2
    stores = rows[rows["event"] == "stores"].groupby("data")["value"].sum()
    assert stores["device"] == 1  # the store found the device's line
    dev = rows[(rows["event"] == "device_writes")]
    assert list(dev["data"]) == ["device"] and dev["value"].sum() == 1


@pytest.mark.process
def test_repeat_shortcut_is_attributed_too(model_trace, tmp_path):
    trace = f"@{COPY:#x} 0 k s 0x40\n" + "".join(
        f"@{COPY:#x} R 0 k s 0x40\n" for _ in range(10))
    totals, sites, _ = run(model_trace, trace, tmp_path)
    assert sites["stores"].sum() == 11 == totals.loc[totals["event"] == "stores", "value"].sum()


@pytest.mark.process
def test_a_new_window_drops_earlier_counts_and_keeps_the_row_order(model_trace, tmp_path):
    # sites are zeroed when first counted in a window (not all at its start): the
    # tables hold that window only, rows in the order the sites were created
    trace = (f"@{PING:#x} 0 u l 0x40\n@{PONG:#x} 1 u l 0x80\n@{COPY:#x} 0 k s 0x1000\n"
             "window\n"  # COPY's first count here is a repeat: it takes the locked path
             f"@{COPY:#x} R 0 k s 0x1000\n@{COPY:#x} R 0 k s 0x1000\n"
             f"@{PING:#x} 0 u l 0x40\n")
    _, sites, _ = run(model_trace, trace, tmp_path)
    assert list(sites["pc"]) == [PING, COPY]  # PONG not counted in this window
    assert list(sites["loads"]) == [1, 0] and list(sites["stores"]) == [0, 2]


@pytest.mark.process
def test_randomized_user_code_shares_a_site_per_block_and_keeps_its_labels(
        model_trace, tmp_path):
    """User pcs above USER_EXACT_BELOW (ASLR'd executables and libraries: new pcs in every
    process) are charged to their USER_GRANULE block, so sites stay bounded (3.7 M sites,
    ~1.5 GB, grew in ~80 s of a matrix run without it); every pc keeps the label analysis
    gives it, and our static tools below stay exact."""
    rng = random.Random(7)
    starts = [0x400000, symfmt.USER_EXACT_BELOW, 0x2_0000_0000, 0x55_0000_000000,
              0x56_ffff_ffff00, 0x7E_0000_000000, 0x7f_ffff_ffff00, 0x60_0000_000000]
    pcs = [s + rng.randrange(0, 1 << 20) for s in starts for _ in range(50)]
    pcs += [PING, PING + 4, PONG]
    trace = "".join(f"@{pc:#x} 0 u l {0x1000 + 64 * (i % 64):#x}\n" for i, pc in enumerate(pcs))
    exact, _, _ = run(model_trace, trace, tmp_path)
    _, sites, _ = run(model_trace, trace, tmp_path, user_exact=symfmt.USER_EXACT_BELOW,
                      user_granule=symfmt.USER_GRANULE)
    assert len(set(pcs)) > 300 and sites["pc"].nunique() <= 50 + 3 + 8
    assert {PING, PING + 4, PONG} <= set(sites["pc"])  # static tools: still exact
    def key(pc: int) -> str:  # what analysis shows: a range label, or the exact tool pc
        return symfmt.user_range_label(pc) if pc >= symfmt.USER_EXACT_BELOW else f"{pc:#x}"

    got = sites.groupby([key(int(p)) for p in sites["pc"]])["loads"].sum().to_dict()
    want: dict[str, int] = {}
    for pc in pcs:
        want[key(pc)] = want.get(key(pc), 0) + 1
    assert got == want
    assert {k for k in want if k.startswith("[")} == {"[user:other]", "[user:pie-exe]",
                                                     "[user:mmap/libs/stack]"}
    # the counters themselves do not change
    assert exact.equals(run(model_trace, trace, tmp_path, user_exact=symfmt.USER_EXACT_BELOW,
                            user_granule=symfmt.USER_GRANULE)[0])


def test_user_range_bounds_are_whole_blocks():
    """The plugin's block starts keep their pcs' labels only if every range bound above
    USER_EXACT_BELOW is a multiple of the granule."""
    assert symfmt.USER_RANGES[0][1] == symfmt.USER_EXACT_BELOW
    for start, end, _ in symfmt.USER_RANGES[1:]:
        assert start % symfmt.USER_GRANULE == 0 and end % symfmt.USER_GRANULE == 0
