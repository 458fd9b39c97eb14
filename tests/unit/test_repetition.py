"""testbed.run.repetition: the window's way back (one tar stream). The window script
itself is tested in test_window.py."""

from __future__ import annotations

import base64
import io
import tarfile

import pytest

from testbed.errors import GuestError
from testbed.run.folder import RunDir
from testbed.run.repetition import fetch_window_command, unpack_window
from testbed.run.window import GUEST_DIR
from testbed.shell import HostShell


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
