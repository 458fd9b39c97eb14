"""testbed.formats.cachemodel: nbmark markers and the plugin's CSV (pure)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.formats import cachemodel as cmfmt
from testbed.settings import REPO_ROOT

LINE = 64
L1D = 32 << 10


# ---------------------------------------------------------------- markers
def test_marker_bytes_encode_kind_and_id():
    assert cmfmt.marker_bytes("begin", 5) == bytes([0x0F, 0x1F, 0x80, 0x05, 0x00, 0x10, 0x4E])
    assert cmfmt.marker_bytes("end", 0xFFFFF) == bytes([0x0F, 0x1F, 0x80, 0xFF, 0xFF, 0x2F, 0x4E])
    assert cmfmt.marker_bytes("snapshot", 1)[5] == 0x30
    assert cmfmt.marker_displacement("arm", 7) == 0x4E000000 | 4 << 20 | 7
    assert cmfmt.nbmark_command("arm", 7) == "nbmark arm 7"


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
    assert "KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3, KIND_ARM = 4" in plugin
    assert "KIND_BEGIN = 1, KIND_END = 2, KIND_SNAPSHOT = 3, KIND_ARM = 4" in (
        tools / "nbmark.c").read_text()
    assert cmfmt.MARKER_KINDS == {"begin": 1, "end": 2, "snapshot": 3, "arm": 4}
    # the plugin's translation-time filter takes every kind up to arm
    assert "kind >= KIND_BEGIN && kind <= KIND_ARM" in plugin


@pytest.fixture(scope="module")
def nbmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or platform.machine() != "x86_64":
        pytest.skip("needs gcc on x86-64 (the marker is an x86 NOP)")
    out = tmp_path_factory.mktemp("nbmark") / "nbmark"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(REPO_ROOT / "images" / "tools" / "nbmark.c")], check=True)
    return out


@pytest.mark.process
@pytest.mark.parametrize("args", [["arm", "0"], ["arm", "1048575"], ["begin", "3"],
                                  ["end", "3"], ["snapshot", "0x10"],
                                  ["run", "5", "--", "true"]])
def test_nbmark_runs_its_markers_as_nops_on_the_host(nbmark, args):
    assert subprocess.run([str(nbmark), *args], capture_output=True).returncode == 0


@pytest.mark.process
@pytest.mark.parametrize("args", [["arm"], ["arm", "1048576"], ["arm", "x"], ["arm", "1", "2"],
                                  ["disarm", "1"], ["armed", "1"], ["run", "5", "true"]])
def test_nbmark_refuses_junk(nbmark, args):
    proc = subprocess.run([str(nbmark), *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: nbmark begin|end|snapshot|arm <id>" in proc.stderr or "bad id" in proc.stderr


def test_csv_event_names_match_the_model():
    model_c = (REPO_ROOT / "cachemodel" / "plugin" / "model.c").read_text()
    names = re.search(r"model_event_names\[EV_COUNT\] = \{(.*?)\};", model_c, re.S)
    assert names is not None
    assert tuple(re.findall(r'"(\w+)"', names.group(1))) == cmfmt.EVENTS


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
