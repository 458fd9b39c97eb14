"""A real matrix run under TCG: it completes, its raw files parse, a kill -9 resumes
exactly the missing work, and a hanging guest fails its cell without stopping the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.formats import netperf, perfstat, procfs
from testbed.run.folder import RunDir
from tests.waits import poll_until

from .conftest import links_named

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
name: itest
axes:
  kernel: [distro]
  nic: [e1000]
  cpus: [2]
  policy: [default, pin-cross]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: 2
duration: 2
warmup: 0
order: sequential
retries: {retries}
plain_repetitions: 0
"""


def invoke_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", "run-matrix", "--no-report", *args]


def env_for(results: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "INVOKE_NETBED_RESULTS_DIR": str(results), **extra}


def only_run(results: Path) -> RunDir:
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return RunDir(runs[0])


REGISTRY = REPO / ".cache" / "dataplanes"


def dataplanes_of(pid: int) -> dict[str, list[str]]:
    """Data planes a run (by pid) registered and has not removed: tag -> device names."""
    out = {}
    for entry in REGISTRY.glob("*.json") if REGISTRY.is_dir() else []:
        data = json.loads(entry.read_text())
        if data["pid"] == pid:
            out[entry.stem] = [cmd[-1] for cmd in data["teardown"]]
    return out


def done_stamps(run: RunDir) -> dict[tuple[str, int], str]:
    return {(r.cell_id, r.repetition): (r.path / "done").read_text()
            for r in run.reps() if r.is_done}


def test_kill_9_then_resume_completes_exactly_the_missing_work(tmp_path: Path):
    config = tmp_path / "itest.yaml"
    config.write_text(CONFIG.format(retries=1))
    results = tmp_path / "results"
    proc = subprocess.Popen(invoke_argv("-c", str(config)), cwd=REPO, env=env_for(results),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    run = None
    while time.monotonic() < deadline:
        if results.exists() and any(results.iterdir()):
            run = only_run(results)
            if done_stamps(run):
                break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    assert run is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    poll_until(lambda: subprocess.run(["pgrep", "-f", f"qemu-system.*{run.path}"],
                                      capture_output=True).returncode == 1,
               "QEMU to die with its parent (PDEATHSIG)")
    left = dataplanes_of(proc.pid)
    assert left, "a killed run leaves its tap devices and bridge registered"
    before = done_stamps(run)
    assert 1 <= len(before) < 4
    assert subprocess.run(["pgrep", "-f", f"qemu-system.*{run.path}"],
                          capture_output=True).returncode == 1

    resumed = subprocess.run(invoke_argv("--resume", str(run.path)), cwd=REPO,
                             env=env_for(results), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{len(before)} of 4 repetitions already done" in resumed.stderr
    after = done_stamps(run)
    assert len(after) == 4
    assert {k: after[k] for k in before} == before  # finished work untouched, not redone
    assert dataplanes_of(proc.pid) == {}  # the resumed run swept the dead run's devices
    for devices in left.values():
        assert not [d for d in devices if links_named(d)]

    for rep in run.reps():
        check_raw_files_parse(rep.path)
    versions = json.loads(run.versions_file.read_text())
    assert versions["accel"] in ("tcg", "kvm") and "distro" in versions["kernels"]


def check_raw_files_parse(rep: Path) -> None:
    result = netperf.parse_netperf((rep / "netperf.txt").read_text())
    assert result.get("THROUGHPUT") and result.get("THROUGHPUT") > 0
    if json.loads((rep / "done").read_text()).get("plugin"):
        # perf is kept out of cache-model windows (testbed.run.window), and says so
        assert not (rep / "perf-stat.csv").exists()
        assert "kept out of cache-model windows" in (rep / "perf-unsupported").read_text()
        assert (rep / "cachemodel.csv").is_file()
    else:
        perf = perfstat.parse_perf_stat((rep / "perf-stat.csv").read_text())
        assert {"context-switches", "task-clock"} <= set(perf["metric"])
        assert len(set(perf["cpu"])) == 2
    softirqs = procfs.parse_proc_pair("softirqs", (rep / "proc-before/softirqs").read_text(),
                                       (rep / "proc-after/softirqs").read_text())
    assert softirqs[softirqs["metric"] == "NET_RX"]["value"].sum() > 0
    readback = json.loads((rep / "readback.json").read_text())
    assert readback["driver"] == "e1000" and readback["irqs"]
    assert readback["offloads"]["rx_checksum_offload"] is False
    policy = json.loads((rep / "policy.json").read_text())
    if policy["name"] == "pin-cross":
        assert result.raw["REMOTE_CPU_BIND"] == str(policy["reader_cpu"])


def test_a_hanging_guest_fails_its_cell_and_the_next_cell_still_runs(tmp_path: Path):
    config = tmp_path / "itest.yaml"
    config.write_text(CONFIG.format(retries=0).replace("repetitions: 2", "repetitions: 1"))
    results = tmp_path / "results"
    hung = "distro-e1000-c2-default-TCP_STREAM-16384-gro_on"
    proc = subprocess.Popen(invoke_argv("-c", str(config), "--inject-fault", f"hang:{hung}"),
                            cwd=REPO, env=env_for(results, INVOKE_NETBED_COMMAND_TIMEOUT_S="20"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=900)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.returncode == 1, out.stdout + out.stderr
    run = only_run(results)
    failed = run.rep(hung, 0)
    assert failed.is_failed and not failed.is_done
    reason = json.loads((failed.path / "failed").read_text())["reason"]
    assert "timed out" in reason
    assert (failed.path / "console-receiver.log").is_file()
    ok = run.rep("distro-e1000-c2-pin-cross-TCP_STREAM-16384-gro_on", 0)
    assert ok.is_done
    assert "1 failed" in out.stdout and hung in (run.path / "summary.txt").read_text()
    assert dataplanes_of(proc.pid) == {}
