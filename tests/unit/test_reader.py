"""testbed.formats.reader: the reader sampler and its samples.

tests/fixtures/raw/host/ holds /proc snapshots and a `perf stat -a -A -x;` run
captured on a development host (Linux 6.18, 2 CPUs, no PMU), taken before and
after a one-second perf window; tests/fixtures/raw/guest-distro-e1000/ the same
captured in a netbed guest: real kernel formats, real `<not supported>`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.formats import reader
from tests.unit.fake_netserver import fake_netserver

GUEST = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-distro-e1000"


def guest(*parts: str) -> str:
    return GUEST.joinpath(*parts).read_text()


# ---------------------------------------------------------------- reader samples


def test_parse_reader_samples() -> None:
    s = reader.parse_reader_samples("# pid 812\n12.03 1\n12.13 1\n12.23 0\n12.33 1\n")
    assert s.counts == {"1": 3, "0": 1}
    assert s.pids == [812]
    assert s.shares() == {"0": 0.25, "1": 0.75}
    assert reader.parse_reader_samples("").shares() == {}
    noisy = reader.parse_reader_samples("1.0 0\nbash: line 3: oops\n2.0 1\n")
    assert noisy.counts == {"0": 1, "1": 1}
    assert noisy.ignored == 1 and noisy.first_ignored.startswith("bash:")


@pytest.mark.process
@pytest.mark.skipif(not (shutil.which("pgrep") and shutil.which("dash")),
                    reason="needs pgrep and dash")
def test_reader_sampler_finds_the_netserver_child(tmp_path: Path) -> None:
    """Runs the real sampler script against a stand-in: a shell binary named
    `netserver` whose child (also `netserver`) spins, like netserver's data process."""
    with fake_netserver(tmp_path) as child:
        out = subprocess.run(["bash", "-c", reader.reader_sampler_command(1.5, 0.1)],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
    samples = reader.parse_reader_samples(out.stdout)
    assert samples.pids == [child]
    assert samples.total >= 1  # how many depends on host load; where is what matters
    assert set(samples.counts) <= {str(c) for c in range(64)}


@pytest.mark.parametrize("workload", ["TCP_STREAM", "TCP_MAERTS", "TCP_RR"])
def test_guest_reader_ran_where_netperf_bound_it(workload: str) -> None:
    """`-T 0,1` binds netserver's data process to CPU 1: the sampler saw exactly that."""
    s = reader.parse_reader_samples(guest(workload, "reader-cpus.txt"))
    assert len(s.pids) == 1
    assert s.total >= 3
    assert s.shares() == {"1": 1.0}
