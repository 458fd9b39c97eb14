"""The cache model's `arm` marker in real TCG guests, on QEMU 7.2 and 10.0.

`nbmark arm <id>` arms the plugin (QEMU flushes its code cache and retranslates with
the memory callbacks) without counting, so a later `begin` only starts counting:
the matrix's model windows arm after their warm-up (testbed.run.window). On QEMU 10.0
the plugin disarms after each region's last `end`, so there `arm` does the flush
that `begin` would otherwise do; on 7.2 the plugin stays armed after its first
region and `arm` changes nothing. Either way a region's counts must be those of a
region opened without an arm, and nothing run between `arm` and `begin` may be
counted. One micro guest per QEMU, the same workload in every region (user-mode
loads of nbbench_stream, deterministic: one per 8-byte word and pass).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from testbed.build.qemu_backport import resolve_qemu
from testbed.formats import cachemodel as cmfmt
from testbed.settings import Settings
from testbed.vm import cachemodel as cm

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

L1D = 32 << 10
LINE = 64
BIG, PASSES = 4 * L1D, 5
LOADS = PASSES * BIG // 8

SCRIPT = f"""\
nbbench_stream {BIG} {PASSES} 10
nbmark arm 70
nbmark arm 70
nbbench_stream {BIG} {PASSES}
nbbench_stream {BIG} {PASSES} 20
nbmark arm 71
nbmark end 72
nbbench_stream {BIG} {PASSES} 30
nbmark begin 40
nbmark arm 41
nbbench_stream {BIG} {PASSES} 42
nbmark end 40
"""
# region 10: opened unarmed (its begin arms: the way every region opened before `arm`)
# arm 70 twice, then the workload unmarked: armed but not counting
# region 20: its begin finds the plugin armed
# arm 71, then a stray end: the plugin stays armed; region 30 still counts
# region 40: an arm inside an open region changes nothing: counting goes on, and
# region 42 in it counts as region 10 did


@pytest.fixture(scope="module", params=["system", "backport"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[pd.DataFrame, str]:
    settings = Settings.from_mapping({"qemu": request.param})
    if request.param == "system" and shutil.which(settings.qemu_binary) is None:
        pytest.skip("QEMU is not installed")
    if request.param == "backport" and (qemu := resolve_qemu(settings)).fallback:
        pytest.skip(f"QEMU 10.0 (backport) could not be downloaded: {qemu.fallback}")
    workdir: Path = tmp_path_factory.mktemp(f"arm-{request.param}")
    got = cm.run_with_model(settings, SCRIPT, workdir)
    assert got.csv is not None
    (workdir / "console.log").write_text(got.console)
    return cmfmt.read_snapshots(got.csv.read_text()), got.console


def user(df: pd.DataFrame, first: str, last: str) -> dict[str, int]:
    return cmfmt.window(df, first, last, mode="user")


def blocks(df: pd.DataFrame, marker: str) -> list[pd.DataFrame]:
    """Every block the plugin wrote at `marker`, values indexed by (vcpu, mode, event)."""
    key = ["vcpu", "mode", "event"]
    return [g.set_index(key)["value"] for _, g in df[df["marker"] == marker]
            .groupby("snapshot")]


def test_arm_writes_its_block_and_nothing_is_counted_until_begin(run):
    df, _ = run
    arms = blocks(df, "arm:70")
    assert len(arms) == 2  # both arms are seen (the second changes nothing)
    (begin,) = blocks(df, "begin:20")
    # the unmarked workload between arm and begin left every counter of every vCPU
    # and mode where it was: arming does not count
    for arm in arms:
        pd.testing.assert_series_equal(arm, begin, check_names=False)


def test_a_region_after_arm_counts_what_one_without_it_does(run):
    df, _ = run
    plain = user(df, "begin:10", "end:10")
    print(f"user loads / l1d misses: unarmed region {plain['loads']} / {plain['l1d_misses']}")
    assert LOADS <= plain["loads"] <= 1.01 * LOADS
    for first, last in (("begin:20", "end:20"), ("begin:30", "end:30"),
                        ("begin:42", "end:42")):
        w = user(df, first, last)
        print(f"{first}..{last}: user loads {w['loads']}, l1d misses {w['l1d_misses']}")
        assert abs(w["loads"] - plain["loads"]) <= 0.01 * LOADS, first
        lines = PASSES * BIG // LINE
        assert abs(w["l1d_misses"] - plain["l1d_misses"]) <= 0.05 * lines, first


def test_a_stray_end_after_arm_leaves_it_armed_and_the_next_begin_counts(run):
    df, _ = run
    # (the plugin's complaint goes to QEMU's log, which shows it with `-d plugin` only)
    assert len(blocks(df, "arm:71")) == 1 and len(blocks(df, "end:72")) == 1
    assert user(df, "begin:30", "end:30")["loads"] >= LOADS


def test_arm_inside_an_open_region_changes_nothing(run):
    df, _ = run
    assert len(blocks(df, "arm:41")) == 1
    # counting goes on across it (nbmark's own work and the next exec are counted)
    assert user(df, "arm:41", "begin:42")["loads"] > 0
    assert user(df, "begin:40", "end:40")["loads"] > user(df, "begin:42", "end:42")["loads"]
