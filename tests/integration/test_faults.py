"""Faults a long run meets, each injected into a small real matrix (distro kernel, e1000,
2 cells, 2 s windows, software counters): a full results disk during a window and during
the report, the receiver's QEMU killed mid-window, netserver killed mid-window, a run
folder damaged afterwards, a second run on the same host. Nothing finished is lost;
each fault is survived (retried, resumed) or refused with a message that says what
to do. docs/reliability.md lists them with these tests.

Each test boots guests (one to three minutes each under TCG): marker `faults`
(`pytest -m faults` runs them all). The full-disk test, which needs root to mount its
tmpfs, is in the default tier, so `.ci/run` (root) runs it; the others are also
`slow`: the full tier (`invoke test --tier full`). Where a test starts a run in the
background, a failure kills it (its QEMU dies with it), so nothing outlives the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.formats import netperf
from testbed.run.folder import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
CELL_A = "distro-e1000-c2-default-TCP_STREAM-16384-gro_on"
CELL_B = "distro-e1000-c2-pin-same-TCP_STREAM-16384-gro_on"

CONFIG = """\
name: faults
axes:
  kernel: [distro]
  nic: [e1000]
  cpus: [2]
  policy: [default, pin-same]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: {repetitions}
duration: 2
warmup: 0
order: sequential
retries: 1
plain_repetitions: 0
counters: [software]
"""


def invoke_argv(task: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", task, *args]


def env_for(results: Path, lock: Path) -> dict[str, str]:
    # A lock file of the test's own: the test's runs see each other, not other users'.
    return {**os.environ, "INVOKE_NETBED_RESULTS_DIR": str(results),
            "NETBED_HOST_LOCK": str(lock), "PYTHONPATH": str(REPO)}


def write_config(tmp_path: Path, repetitions: int) -> Path:
    config = tmp_path / "faults.yaml"
    config.write_text(CONFIG.format(repetitions=repetitions))
    return config


def only_run(results: Path) -> RunDir:
    runs = [p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return RunDir(runs[0])


def snapshot(run: RunDir) -> dict[str, str]:
    """sha256 of every file of the finished repetitions: what must never change."""
    out = {}
    for rep in run.reps():
        if rep.is_done:
            for path in sorted(p for p in rep.path.rglob("*") if p.is_file()):
                out[str(path.relative_to(run.path))] = hashlib.sha256(
                    path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def background() -> Iterator[Callable[[list[str], dict[str, str]], subprocess.Popen[str]]]:
    """Starts runs in the background; any still going when the test ends (it failed) is
    killed, its QEMU with it, so nothing outlives the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def wait_for(predicate, proc: subprocess.Popen[str], what: str, seconds: float = 900) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.2)


def struck_within_window(log: str, what: str) -> bool:
    """The fault's log line says it struck between the window's opening and its end
    (testbed.run.session: the guest stamps both)."""
    found = re.search(re.escape(what) + r".* mid-window in .*, ([0-9.]+) s after the window "
                      r"opened \(window ([0-9.]+) s", log)
    assert found, log
    print(found.group(0))  # shown with the test's output (pytest -rA) or its failure
    return 0 < float(found.group(1)) < float(found.group(2))


def check_done(run: RunDir) -> None:
    for rep in run.reps():
        assert rep.is_complete, (rep.path, rep.damage())
        result = netperf.parse_netperf(rep.file("netperf.txt").read_text())
        assert result.get("THROUGHPUT") and result.get("THROUGHPUT") > 0


# ---------------------------------------------------------------- a full results disk

def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs as results_dir (runs in .ci/run as root)"
    if shutil.which("mount") is None:
        return "needs mount(8)"
    return None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    why = _can_mount()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "results"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the file system (a file grown until ENOSPC)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):  # unbuffered: nothing is left to flush on close
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free < 1 << 16
    return filler


def test_a_full_results_disk_stops_the_run_and_resume_finishes_it(tmp_path: Path,
                                                                 small_disk: Path,
                                                                 background):
    config = write_config(tmp_path, repetitions=1)
    env = env_for(small_disk, tmp_path / "host.lock")
    proc = background(invoke_argv("run-matrix", "--no-report", "-c", str(config)), env)
    run: RunDir | None = None

    def b_window_started() -> bool:
        nonlocal run
        if run is None:
            runs = [p for p in small_disk.iterdir() if p.is_dir()]
            run = RunDir(runs[0]) if runs else None
        # payload.json is written right before the window starts; A is done by then
        return run is not None and run.rep(CELL_B, 0).file("payload.json").is_file()

    wait_for(b_window_started, proc, "cell B's window")
    filler = fill(small_disk)
    stdout, stderr = proc.communicate(timeout=900)
    assert run is not None
    assert proc.returncode == 2, stdout + stderr
    assert "no space left on the device while writing" in stderr, stderr
    assert str(run.rep(CELL_B, 0).path) in stderr and "MiB free" in stderr, stderr
    assert f"invoke run-matrix --resume {run.path}" in stderr
    assert "Traceback" not in stderr
    assert run.rep(CELL_A, 0).is_complete
    assert not run.rep(CELL_B, 0).is_done and not run.rep(CELL_B, 0).is_failed
    before = snapshot(run)

    filler.unlink()
    resumed = subprocess.run(invoke_argv("run-matrix", "--no-report", "--resume",
                                         str(run.path)),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 of 2 repetitions already done" in resumed.stderr
    check_done(run)
    after = snapshot(run)
    assert {k: after[k] for k in before} == before  # nothing written before was touched

    # the disk fills again while the report is written
    before = snapshot(run)
    filler = fill(small_disk)
    report = subprocess.run(invoke_argv("report", "--run", str(run.path)), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 2, report.stdout + report.stderr
    assert "no space left on the device while writing" in report.stderr, report.stderr
    assert "MiB free" in report.stderr and "Traceback" not in report.stderr
    assert snapshot(run) == before
    filler.unlink()
    report = subprocess.run(invoke_argv("report", "--run", str(run.path)), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (run.path / "analysis" / "report.html").is_file()
    assert snapshot(run) == before


# ------------------------------------------------------- the receiver's QEMU killed mid-window

@pytest.mark.slow
def test_sigkill_of_the_receivers_qemu_is_retried_on_a_fresh_boot_and_a_second_run_waits(
        tmp_path: Path, background):
    config = write_config(tmp_path, repetitions=1)
    results = tmp_path / "results"
    lock = tmp_path / "host.lock"
    env = env_for(results, lock)
    proc = background(invoke_argv("run-matrix", "--no-report", "-c", str(config),
                                  "--inject-fault", f"kill-qemu:{CELL_A}"), env)
    wait_for(lambda: results.is_dir() and any(results.iterdir()), proc, "the run folder")
    run = only_run(results)
    # the lock names the run once its folder is made (until then: "new run of <config>")
    wait_for(lambda: run.run_id in lock.read_text(), proc, "the run's id in the lock", 120)

    # a second run on this host: refused at once with --no-wait, naming the first
    second = subprocess.run(invoke_argv("run-matrix", "--no-report", "--no-wait", "-c",
                                        str(config)),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"run {run.run_id} (pid " in second.stderr and "Traceback" not in second.stderr
    held_by = json.loads(lock.read_text())
    assert held_by["run"] == run.run_id and held_by["pid"] == proc.pid
    assert str(held_by["pid"]) in second.stderr
    # what never waits: a dry run (analyze, report, doctor take no lock at all)
    dry = subprocess.run(invoke_argv("run-matrix", "--dry-run", "-c", str(config)), cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert [p.name for p in results.iterdir()] == [run.run_id]  # the refused run made nothing

    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stdout + stderr
    assert struck_within_window(stderr, "SIGKILL to the receiver's QEMU")
    assert "the receiver's QEMU died during the repetition (killed by SIGKILL" in stderr
    assert "rebooting and retrying (1/1)" in stderr
    done = json.loads(run.rep(CELL_A, 0).file("done").read_text())
    assert done["attempts"] == 2
    assert "QEMU died during the repetition (killed by SIGKILL" in done["retried"][0]
    assert json.loads(run.rep(CELL_B, 0).file("done").read_text())["attempts"] == 1
    check_done(run)
    assert lock.read_text() == ""  # released, and no stale name left behind


# ------------------------------------------------- netserver killed; then a damaged folder

@pytest.fixture(scope="module")
def netserver_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict[str, str],
                                                                      str]:
    tmp = tmp_path_factory.mktemp("netserver")
    config = write_config(tmp, repetitions=2)
    results = tmp / "results"
    env = env_for(results, tmp / "host.lock")
    out = subprocess.run(invoke_argv("run-matrix", "--no-report", "-c", str(config),
                                     "--inject-fault", f"kill-netserver:{CELL_A}"),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout + out.stderr
    return only_run(results), env, out.stderr


@pytest.mark.slow
def test_netserver_killed_mid_window_fails_that_attempt_and_it_is_retried(netserver_run):
    run, _, log = netserver_run
    # struck inside the window, timed from the window's own begin by the guest's clock
    assert struck_within_window(log, "killed netserver (the reader) in the receiver")
    assert "netserver, the reader, is no longer running" in log
    assert "rebooting and retrying (1/1)" in log
    rep = run.rep(CELL_A, 0)
    done = json.loads(rep.file("done").read_text())
    assert done["attempts"] == 2
    assert "netserver, the reader, is no longer running" in done["retried"][0]
    # the folder holds the good attempt only: exactly the files done lists
    listed = set(done["files"])
    present = {p.relative_to(rep.path).as_posix() for p in rep.path.rglob("*")
               if p.is_file() and p.name != "done"}
    assert present == listed
    assert done["window.throughput"] > 0
    check_done(run)


@pytest.mark.slow
def test_a_damaged_run_folder_is_analysed_and_resume_redoes_exactly_the_damage(netserver_run):
    run, env, _ = netserver_run
    truncated, partial, cut, intact = (run.rep(CELL_A, 0), run.rep(CELL_A, 1),
                                       run.rep(CELL_B, 0), run.rep(CELL_B, 1))
    done = truncated.file("done")
    done.write_bytes(done.read_bytes()[:40])
    partial.file("done").unlink()  # a repetition folder without its marker
    raw = cut.file("proc-after/softirqs")
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    (intact.path / "notes.txt").write_text("left by someone\n")
    (run.path / "stray.bin").write_bytes(b"\x00\x01")
    kept = intact.file("done").read_bytes()

    analyzed = subprocess.run(invoke_argv("analyze", "--run", str(run.path)), cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
    assert analyzed.returncode == 0 and "Traceback" not in analyzed.stderr, analyzed.stderr
    import pandas as pd

    tidy = pd.read_parquet(run.path / "analysis" / "tidy.parquet")
    status = tidy[tidy["metric"] == "rep.status"].set_index(["cell_id", "repetition"])
    assert status.loc[(CELL_A, 0), "status"] == "failed"
    assert "unreadable" in status.loc[(CELL_A, 0), "note"]
    assert status.loc[(CELL_A, 1), "status"] == "incomplete"
    assert status.loc[(CELL_B, 0), "status"] == "failed"
    assert "proc-after/softirqs has" in status.loc[(CELL_B, 0), "note"]
    assert status.loc[(CELL_B, 1), "status"] == "ok"
    damaged = tidy[tidy["cell_id"].eq(CELL_A) & tidy["repetition"].isin([0, 1])
                   | tidy["cell_id"].eq(CELL_B) & tidy["repetition"].eq(0)]
    assert damaged["value"].isna().all()  # no number, let alone a zero, from damaged ones
    report = subprocess.run(invoke_argv("report", "--run", str(run.path)), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr

    resumed = subprocess.run(invoke_argv("run-matrix", "--no-report", "--resume",
                                         str(run.path)),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 of 4 repetitions already done" in resumed.stderr
    assert f"{CELL_A} rep 0: done but damaged, redoing it" in resumed.stderr
    assert f"{CELL_B} rep 0: done but damaged, redoing it" in resumed.stderr
    assert intact.file("done").read_bytes() == kept  # the intact one was not redone
    assert (intact.path / "notes.txt").is_file()
    check_done(run)
