"""A stand-in for netserver on the host: a shell binary named `netserver` whose child
(also `netserver`) spins, like netserver's data process (the reader)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fake_netserver(folder: Path, wait_s: float = 30.0) -> Iterator[int]:
    """Yields the child's pid once it exists. Under host load the fork can take seconds:
    the sampler under test must not start before there is a reader to find."""
    dash = shutil.which("dash")
    assert dash, "needs dash"
    fake = folder / "netserver"
    shutil.copy(dash, fake)
    parent = subprocess.Popen([str(fake), "-c", f"{fake} -c 'while :; do :; done' & wait"])
    child = ""
    try:
        deadline = time.monotonic() + wait_s
        while True:
            out = subprocess.run(["pgrep", "-x", "-P", str(parent.pid), "netserver"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                break
            assert time.monotonic() < deadline, f"no child of the fake netserver in {wait_s} s"
            time.sleep(0.05)
        others = set(subprocess.run(["pgrep", "-x", "netserver"], capture_output=True,
                                    text=True).stdout.split()) - {str(parent.pid), out[0]}
        assert not others, f"another netserver runs on this host ({others}): the sampler " \
                           "picks the oldest, so this test needs it stopped"
        child = out[0]
        yield int(child)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()
        # the orphaned child is reaped by init a moment later; until then the next
        # test's sampler could find it
        end = time.monotonic() + 10
        while child and time.monotonic() < end and child in subprocess.run(
                ["pgrep", "-x", "netserver"], capture_output=True, text=True).stdout.split():
            time.sleep(0.05)
