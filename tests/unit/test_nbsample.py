"""nbsample, the guest's reader sampler, built and run on the host against a stand-in
netserver: the same output lines the bash fallback prints, for the same process."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.formats import reader
from testbed.settings import IMAGES_DIR
from tests.unit.fake_netserver import fake_netserver as spinning_netserver

pytestmark = pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("dash")),
                                reason="needs gcc and dash")


@pytest.fixture
def fake_netserver(tmp_path: Path):
    """A binary named netserver whose child, also netserver, spins like a data process."""
    with spinning_netserver(tmp_path) as child:
        yield child


@pytest.mark.process
def test_nbsample_samples_the_data_process_at_the_asked_rate(tmp_path: Path, fake_netserver):
    binary = tmp_path / "nbsample"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary),
                    str(IMAGES_DIR / "tools" / "nbsample.c")], check=True)
    out = subprocess.run([str(binary), "1", "0.05"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    samples = reader.parse_reader_samples(out.stdout)
    assert samples.pids == [fake_netserver]
    assert samples.ignored == 0
    assert samples.total >= 5  # 20 asked; a loaded host may deliver fewer, never none
    assert set(samples.counts) <= {str(c) for c in range(64)}


@pytest.mark.process
def test_nbsample_rejects_bad_arguments(tmp_path: Path):
    binary = tmp_path / "nbsample"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(IMAGES_DIR / "tools" / "nbsample.c")],
                   check=True)
    out = subprocess.run([str(binary), "x"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage" in out.stderr


def test_sampler_command_prefers_nbsample_and_keeps_the_fallback():
    cmd = reader.reader_sampler_command(5, 0.05)
    assert cmd.startswith("if command -v nbsample") and "nbsample 5 0.05" in cmd
    assert "bash -c" in cmd
