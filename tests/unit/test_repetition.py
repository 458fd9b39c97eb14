"""testbed.run.repetition: the measured-window script (pure text) and the window's way back."""

from __future__ import annotations

import base64
import io
import tarfile

import pytest

from testbed.errors import GuestError
from testbed.experiment.load import experiment_from_dict
from testbed.experiment.policies import load_policies
from testbed.run.folder import RunDir
from testbed.run.repetition import (
    GUEST_DIR,
    PERF_FILE,
    fetch_window_command,
    unpack_window,
    window_script,
)
from testbed.shell import HostShell


def experiment(**over):
    data = {"name": "t", "axes": {"kernel": ["distro"], "nic": ["e1000"], "cpus": [2],
                                  "policy": ["default"], "workload": ["TCP_STREAM"],
                                  "gro": ["on"]},
            "repetitions": 1, "duration": 3, "warmup": 0, **over}
    return experiment_from_dict(data, load_policies())


def test_window_waits_for_the_reader_then_measures_between_snapshots():
    script = window_script(experiment(), pmu=False, cachemodel=False)
    order = [script.index(s) for s in ("until ", "proc-before", "perf", "wait",
                                       "proc-after", "finished")]
    assert order == sorted(order)
    assert "-- sleep 3" in script  # perf stat spans exactly the window
    assert "cycles" not in script  # no hardware events without a PMU
    assert "nbmark" not in script


def test_window_asks_for_hardware_events_with_a_pmu_and_marks_the_cache_model_region():
    script = window_script(experiment(), pmu=True, cachemodel=True)
    assert "cycles" in script and "LLC-load-misses" in script
    assert script.index("nbmark begin 1") < script.index("perf stat") < \
        script.index("nbmark end 1") < script.index("proc-after")


def test_window_script_is_valid_sh_and_leaves_every_raw_file_in_the_window_folder():
    script = window_script(experiment(), pmu=False, cachemodel=True)
    assert HostShell().run(["sh", "-n", "-c", script]).ok
    for name in ("proc-before", "proc-after", "reader-cpus.txt", "reader-affinity.txt",
                 f"win/{PERF_FILE}", "finished"):
        assert f"{GUEST_DIR}/win/{name.removeprefix('win/')}" in script, name
    # a reader that never shows up is an error file, not an empty measurement
    assert f"> {GUEST_DIR}/win/error" in script


def test_the_window_comes_back_as_one_tar_stream_byte_for_byte(tmp_path):
    win = tmp_path / "win"
    (win / "proc-before").mkdir(parents=True)
    (win / "proc-before" / "softirqs").write_bytes(b"                    CPU0\n NET_RX: 7\n")
    (win / "perf-stat.csv").write_text("1.0;;task-clock;0\n")
    (win / "odd \xe9 name.txt").write_bytes(bytes(range(256)))
    (win / "finished").touch()
    cmd = fetch_window_command().replace(f"{GUEST_DIR}/win", str(win))
    armoured = HostShell().run(["sh", "-c", cmd]).stdout
    assert "\n" not in armoured.strip()  # one line of base64: safe through any text channel
    rep = RunDir(tmp_path / "run").start_rep("c", 0)
    written = unpack_window(armoured, rep)
    assert sorted(written) == ["odd \xe9 name.txt", "perf-stat.csv", "proc-before/softirqs"]
    for rel in written:
        assert (rep.path / rel).read_bytes() == (win / rel).read_bytes()
    assert not (rep.path / "finished").exists()


def test_a_tar_stream_that_leaves_the_folder_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    rep = RunDir(tmp_path / "run").start_rep("c", 0)
    with pytest.raises(GuestError, match="escape"):
        unpack_window(base64.b64encode(buf.getvalue()).decode(), rep)
    assert not (tmp_path / "run" / "cells" / "c" / "escape").exists()
