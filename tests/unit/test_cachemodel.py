"""Cache model: the pure Python side, and model.c driven by traces (no QEMU).

The model tests compile cachemodel/plugin/model_trace.c (gcc, well under a second)
and feed it synthetic access traces whose right answers follow from the cache
geometry alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

from testbed.build import cachemodel_plugin as cmplugin
from testbed.errors import ConfigError, NetbedError
from testbed.formats import cachemodel as cmfmt
from testbed.settings import REPO_ROOT
from testbed.vm import cachemodel as cm

LINE = 64
L1D = 32 << 10


# ---------------------------------------------------------------- markers
def test_marker_bytes_encode_kind_and_id():
    assert cmfmt.marker_bytes("begin", 5) == bytes([0x0F, 0x1F, 0x80, 0x05, 0x00, 0x10, 0x4E])
    assert cmfmt.marker_bytes("end", 0xFFFFF) == bytes([0x0F, 0x1F, 0x80, 0xFF, 0xFF, 0x2F, 0x4E])
    assert cmfmt.marker_bytes("snapshot", 1)[5] == 0x30


@pytest.mark.parametrize(("kind", "marker_id"), [("start", 1), ("begin", -1), ("end", 1 << 20)])
def test_bad_markers_are_refused(kind, marker_id):
    with pytest.raises(NetbedError):
        cmfmt.nbmark_command(kind, marker_id)


def test_c_sources_use_the_same_marker_encoding():
    """nbmark.c, the benchmarks and plugin.c must agree with marker_displacement()."""
    tools = REPO_ROOT / "images" / "tools"
    for src in [tools / "nbmark.c", *tools.glob("nbbench_*.c")]:
        text = src.read_text()
        assert "0x4E000000u | (kind & 0xfu) << 20 | (id & 0xfffffu)" in text, src
        assert "KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3" in text, src
    plugin = (REPO_ROOT / "cachemodel" / "plugin" / "plugin.c").read_text()
    assert "#define MARKER_MAGIC 0x4Eu" in plugin
    assert "KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3" in plugin
    assert cmfmt.MARKER_KINDS == {"begin": 1, "end": 2, "snapshot": 3}


def test_csv_event_names_match_the_model():
    model_c = (REPO_ROOT / "cachemodel" / "plugin" / "model.c").read_text()
    names = re.search(r"model_event_names\[EV_COUNT\] = \{(.*?)\};", model_c, re.S)
    assert names is not None
    assert tuple(re.findall(r'"(\w+)"', names.group(1))) == cmfmt.EVENTS


# ---------------------------------------------------------------- parameters
def test_plugin_spec_renders_qemu_72_syntax():
    spec = cm.cachemodel_plugin_spec(Path("/c/libnetbed_cache.so"), Path("/r/cachemodel.csv"),
                                     l2_size=0)
    assert spec.render() == (
        "file=/c/libnetbed_cache.so,out=/r/cachemodel.csv,l1d_size=32768,l1d_assoc=8,"
        "l2_size=0,l2_assoc=16,llc_size=8388608,llc_assoc=16,line=64,cold=on,dma=on,ddio=on")


def test_plugin_spec_refuses_commas_and_unknown_parameters():
    with pytest.raises(ConfigError, match="comma"):
        cm.cachemodel_plugin_spec(Path("/a,b/x.so"), Path("/r/c.csv"))
    with pytest.raises(ConfigError, match=r"unknown parameter.*l3_size"):
        cm.cachemodel_plugin_spec(Path("/x.so"), Path("/r/c.csv"), l3_size=1)


@pytest.mark.parametrize("bad", [dict(line=48), dict(l1d_size=48 << 10), dict(llc_assoc=0),
                                 dict(l2_size=3 << 20)])
def test_bad_geometry_names_the_parameter_and_a_fix(bad):
    with pytest.raises(ConfigError) as exc:
        cmplugin.ModelParams(**bad).validate()
    assert next(iter(bad)).split("_")[0] in str(exc.value)
    assert exc.value.hint


def test_disabled_l2_needs_no_valid_l2_geometry():
    cmplugin.ModelParams(l2_size=0, l2_assoc=0).validate()


# ---------------------------------------------------------------- build helpers
def test_sources_list_has_suite_updates_and_security():
    text = cmplugin.deb_src_sources("http://deb.debian.org/debian/", "bookworm")
    assert text.splitlines() == [
        "deb-src http://deb.debian.org/debian bookworm main",
        "deb-src http://deb.debian.org/debian bookworm-updates main",
        "deb-src http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_apt_options_keep_apt_off_the_system_configuration(tmp_path):
    opts = cmplugin.apt_source_options(tmp_path, tmp_path / "s.list")
    joined = " ".join(opts)
    assert f"Dir::Etc::SourceList={tmp_path / 's.list'}" in joined
    assert "Dir::Etc::SourceParts=/dev/null" in joined
    assert f"Dir::State::Lists={tmp_path / 'lists'}" in joined
    assert f"Dir::Cache={tmp_path / 'apt'}" in joined


GIT_PATCH = """\
From: someone
Subject: two files

diff --git a/plugins/loader.c b/plugins/loader.c
--- a/plugins/loader.c
+++ b/plugins/loader.c
@@ -1 +1 @@
-a
+b
diff --git a/include/qemu/qemu-plugin.h b/include/qemu/qemu-plugin.h
index 1..2 100644
--- a/include/qemu/qemu-plugin.h
+++ b/include/qemu/qemu-plugin.h
@@ -1 +1 @@
-x
+y
"""


def test_patch_section_extracts_only_the_header():
    section = cmplugin.patch_section(GIT_PATCH, cmplugin.HEADER_PATH)
    assert section is not None
    assert "+++ b/include/qemu/qemu-plugin.h" in section and "+y" in section
    assert "loader.c" not in section
    assert cmplugin.patch_section(GIT_PATCH, "include/other.h") is None


def test_plugin_key_changes_with_source_version_and_header():
    base = cmplugin.plugin_key({"a.c": b"1"}, b"h", "7.2", "-I/x")
    assert base != cmplugin.plugin_key({"a.c": b"2"}, b"h", "7.2", "-I/x")
    assert base != cmplugin.plugin_key({"a.c": b"1"}, b"h2", "7.2", "-I/x")
    assert base != cmplugin.plugin_key({"a.c": b"1"}, b"h", "8.0", "-I/x")
    assert base == cmplugin.plugin_key({"a.c": b"1"}, b"h", "7.2", "-I/x")


def test_micro_argv_loads_plugins_and_selects_tcg_threads():
    spec = cm.cachemodel_plugin_spec(Path("/p.so"), Path("/o.csv"))
    argv = cm.micro_argv("qemu", Path("/k"), Path("/i"), 2, "single", [spec])
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert argv[argv.index("-plugin") + 1].startswith("file=/p.so,out=/o.csv,")


# ---------------------------------------------------------------- CSV
CSV = """vcpu,mode,event,value,marker
0,kernel,loads,10,begin:1
0,user,loads,0,begin:1
1,kernel,loads,5,begin:1
1,user,loads,1,begin:1
0,kernel,loads,20,end:1
0,user,loads,7,end:1
1,kernel,loads,5,end:1
1,user,loads,4,end:1
0,kernel,loads,30,end:1
0,user,loads,9,end:1
1,kernel,loads,6,end:1
1,user,loads,4,end:1
"""


def test_snapshots_are_numbered_even_when_a_marker_repeats():
    df = cmfmt.read_snapshots(CSV)
    assert list(df["snapshot"].unique()) == [0, 1, 2]
    assert cmfmt.window(df, "begin:1", "end:1", mode="user") == {"loads": 12}
    assert cmfmt.window(df, "begin:1", "end:1", mode="kernel", vcpu=0) == {"loads": 20}


def test_window_names_missing_markers():
    with pytest.raises(NetbedError, match="snapshot:9"):
        cmfmt.window(cmfmt.read_snapshots(CSV), "begin:1", "snapshot:9")


def test_csv_with_wrong_columns_is_refused():
    with pytest.raises(NetbedError, match="columns"):
        cmfmt.read_snapshots("cpu,mode,event,value,marker\n0,user,loads,1,x\n")


# ---------------------------------------------------------------- model.c via traces
@pytest.fixture(scope="module")
def model_trace(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("model") / "model_trace"
    src = REPO_ROOT / "cachemodel" / "plugin"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(src / "model_trace.c"), str(src / "model.c")], check=True)
    return out


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
