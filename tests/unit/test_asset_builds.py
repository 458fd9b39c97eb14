"""An asset build killed in its slowest step (SIGKILL of a real process; the builders'
effects are fakes from tests/unit/asset_builds.py): the asset does not count as built,
the next call says the earlier build was interrupted, rebuilds that asset only and
publishes it; published folders are never removed or replaced under a reader.
(The kernel build, interrupted for real during extraction: tests/unit/test_kernel_interrupt.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import files as publish
from testbed.settings import Settings

from .asset_builds import STARTED, Fakes

REPO = Path(__file__).resolve().parents[2]
ASSETS = ["image", "distro", "header", "plugin", "qemu"]
WORDS = {"image": "guest image", "distro": "Debian kernel linux-image-6.1.0-99-amd64",
         "header": "the plugin header of qemu 1:7.2+dfsg-7",
         "plugin": "the cache-model plugin plugin-", "qemu": "QEMU 1:8.2.2"}


def interrupted_build(asset: str, cache: Path) -> None:
    """Start a build that hangs in its slow step, and SIGKILL it there."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.asset_builds", asset,
                             str(cache)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (cache / STARTED).exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the build never reached its slow step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (cache / STARTED).unlink()


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of everything under path: what `untouched` compares."""
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


@pytest.mark.process  # the interrupted build is a child process
@pytest.mark.parametrize("asset", ASSETS)
def test_an_interrupted_build_is_redone_alone_and_says_so(asset, tmp_path, monkeypatch,
                                                          capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    other = cache / "kernels" / "stock-0123456789abcdef"  # another asset, complete
    other.mkdir(parents=True)
    (other / "metadata.json").write_text("{}")
    before = tree(other)

    interrupted_build(asset, cache)
    leftovers = [p for p in cache.rglob(f"*{publish.BUILD_MARK}*")]
    assert leftovers, "the killed build left its work behind"

    build = Fakes(cache, hang=False, patch=monkeypatch.setattr).build(asset)
    result = build(Settings(cache_dir=cache))
    out = capsys.readouterr().out
    assert f"an earlier build of {WORDS[asset]}" in out and "was interrupted" in out, out
    assert not [p for p in cache.rglob(f"*{publish.BUILD_MARK}*")]  # swept
    assert tree(other) == before  # nothing else was rebuilt or touched

    again = build(Settings(cache_dir=cache))  # built now: the next call builds nothing
    assert str(again) == str(result)
    assert "interrupted" not in capsys.readouterr().out


def test_publishing_never_replaces_a_complete_folder(tmp_path):
    dest = tmp_path / "images" / "key"
    dest.mkdir(parents=True)
    (dest / "done").write_text("ok\n")
    (dest / "rootfs.cpio").write_bytes(b"in use by a run")
    inode = (dest / "rootfs.cpio").stat().st_ino
    work = tmp_path / "images" / ".key.build-x"
    work.mkdir()
    (work / "done").write_text("ok\n")
    (work / "rootfs.cpio").write_bytes(b"another build of the same key")
    assert not publish.publish_dir(work, dest, lambda d: (d / "done").is_file())
    assert (dest / "rootfs.cpio").stat().st_ino == inode  # the reader's file is still there
    assert (dest / "rootfs.cpio").read_bytes() == b"in use by a run"


def test_an_incomplete_folder_is_moved_aside_not_deleted_then_swept(tmp_path):
    dest = tmp_path / "qemu" / "v1"
    dest.mkdir(parents=True)
    (dest / "half").write_text("")
    work = tmp_path / "qemu" / ".v1.build-y"
    work.mkdir()
    (work / "manifest.json").write_text("{}")
    assert publish.publish_dir(work, dest, lambda d: (d / "manifest.json").is_file())
    assert (dest / "manifest.json").is_file()
    aside = [p for p in dest.parent.iterdir() if p.name.startswith(".stale-v1.")]
    assert len(aside) == 1 and (aside[0] / "half").is_file()
    lines: list[str] = []
    with publish.building(dest):
        publish.sweep_leftovers(dest, "QEMU v1", lines.append)
    assert not aside[0].exists() and "an earlier build of QEMU v1 was interrupted" in lines[0]


def test_a_new_recipe_is_published_beside_the_old_one(tmp_path):
    old, new = tmp_path / "images" / "aaaa", tmp_path / "images" / "bbbb"
    old.mkdir(parents=True)
    (old / "done").write_text("ok\n")
    work = tmp_path / "images" / ".bbbb.build-z"
    work.mkdir()
    (work / "done").write_text("ok\n")
    assert publish.publish_dir(work, new, lambda d: (d / "done").is_file())
    assert (old / "done").is_file() and (new / "done").is_file()
