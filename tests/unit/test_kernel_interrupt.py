"""A kernel build killed during its first stage (extracting the source, for real, into a
cache of the test's own): nothing counts as built, and the next build says what it
removes before it extracts again. Stopped there too: a full build takes many minutes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.build.kernel_build import SOURCE_TARBALL

pytestmark = [pytest.mark.slow, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
BUILD = ("import sys; from pathlib import Path; from testbed.settings import Settings; "
         "from testbed.build.kernel_build import ensure_built; "
         "ensure_built('stock', Settings(cache_dir=Path(sys.argv[1])), "
         "lambda m: print(m, flush=True))")


def start(cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def until_extracting(proc: subprocess.Popen[str]) -> list[str]:
    """The build's lines up to the one that starts extracting."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if "extracting" in line:
            return lines
    raise AssertionError("the build ended before extracting:\n" + "\n".join(lines))


def kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its tar
    proc.wait()


@pytest.mark.skipif(not SOURCE_TARBALL.is_file(), reason=f"needs {SOURCE_TARBALL}")
def test_a_kernel_build_killed_while_extracting_is_redone_and_says_so(tmp_path):
    cache = tmp_path / "cache"
    first = start(cache)
    until_extracting(first)
    tmp = cache / "kernels" / "tmp"
    deadline = time.monotonic() + 120
    while not any(tmp.glob("tree-*/Makefile")):  # tar has written into the work tree
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    kill(first)
    left = sorted(p.name for p in tmp.iterdir())
    assert left and not list((cache / "kernels").glob("stock-*/metadata.json"))
    assert not list((cache / "kernels").glob("tree-*"))  # never published half

    second = start(cache)
    try:
        lines = until_extracting(second)
    finally:
        kill(second)
    shutil.rmtree(cache, ignore_errors=True)  # a partial kernel tree is large
    text = "\n".join(lines)
    assert "is not built yet: building it now" in text
    assert "removing the work folders of earlier kernel builds" in text
    assert all(name in text for name in left), text
