"""testbed.run.hostlock: one measuring run per host; the kernel frees the lock of a dead
run; a second run waits naming the first, or with --no-wait exits 2 with the same words;
analyze, report, doctor and --dry-run never take it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testbed.run import hostlock
from testbed.run.hostlock import HostBusy, acquire, current_holder, parse_holder

pytestmark = pytest.mark.process  # holders are child processes; the tasks run as invoke

REPO = Path(__file__).resolve().parents[2]
FIXTURE_RUN = REPO / "tests/fixtures/runs/20261125T100000Z-hostloop"

HOLD = """
import sys, time
from pathlib import Path
from testbed.run import hostlock
lock = hostlock.acquire(sys.argv[2], path=Path(sys.argv[1]), log=lambda m: None)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
"""


def holder_process(path: Path, run: str, seconds: float = 600) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), run, str(seconds)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_file_says_who_holds_it_and_is_emptied_on_release(tmp_path):
    path = tmp_path / "measure.lock"
    lock = acquire("20261207T000000Z-x", path=path, log=lambda m: None)
    data = json.loads(path.read_text())
    assert data["run"] == "20261207T000000Z-x" and data["pid"] == os.getpid()
    lock.rename("20261207T000001Z-y")
    assert current_holder(path).run == "20261207T000001Z-y"
    lock.release()
    assert path.read_text() == "" and current_holder(path) is None


def test_no_wait_refuses_with_the_holders_run_id_and_pid(tmp_path):
    path = tmp_path / "measure.lock"
    proc = holder_process(path, "20261207T010203Z-first")
    try:
        with pytest.raises(HostBusy) as err:
            acquire("second", wait=False, path=path, log=lambda m: None)
        text = str(err.value)
        assert "run 20261207T010203Z-first" in text and f"pid {proc.pid}" in text
        assert str(path) in text
        assert json.loads(path.read_text())["run"] == "20261207T010203Z-first"  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    path = tmp_path / "measure.lock"
    proc = holder_process(path, "doomed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = acquire("next", wait=False, path=path, log=lambda m: None)  # no HostBusy
    assert json.loads(path.read_text())["run"] == "next"
    lock.release()


def test_a_second_run_waits_saying_for_whom_then_starts(tmp_path):
    path = tmp_path / "measure.lock"
    proc = holder_process(path, "20261207T010203Z-first", seconds=600)
    lines: list[str] = []
    got: list[hostlock.HostLock] = []
    waiter = threading.Thread(target=lambda: got.append(
        acquire("second", path=path, log=lines.append)))
    waiter.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines and "run 20261207T010203Z-first" in lines[0] and f"pid {proc.pid}" in lines[0]
    assert "waiting for it to finish" in lines[0] and not got  # still waiting
    proc.kill()  # the first run ends (here: dies)
    proc.wait()
    waiter.join(30)
    assert got and json.loads(path.read_text())["run"] == "second"
    got[0].release()


def test_parse_holder_names_nobody_for_an_empty_or_foreign_file():
    assert parse_holder("").pid is None and "not recorded" in parse_holder("").run
    assert parse_holder("garbage").describe().startswith("run (not recorded yet)")
    h = parse_holder('{"run": "r1", "pid": 7, "since": "t"}')
    assert h.describe() == "run r1 (pid 7, since t)"


def test_an_unwritable_lock_folder_falls_back_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(hostlock.ENV_VAR, raising=False)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setattr(hostlock, "PRIMARY_DIR", blocked / "netbed")
    monkeypatch.setattr(hostlock.tempfile, "gettempdir", lambda: str(tmp_path))
    lines: list[str] = []
    path = hostlock.lock_path(lines.append)
    assert path == tmp_path / "netbed-host-lock" / hostlock.LOCK_NAME
    assert lines and "cannot use" in lines[0] and hostlock.ENV_VAR in lines[0]


def invoke(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tasks_no_wait_exits_2_and_the_readers_never_wait(tmp_path):
    path = tmp_path / "measure.lock"
    env = {**os.environ, "PYTHONPATH": str(REPO), hostlock.ENV_VAR: str(path),
           "INVOKE_NETBED_RESULTS_DIR": str(tmp_path / "results")}
    proc = holder_process(path, "20261207T010203Z-first")
    try:
        out = invoke("run-matrix", "--no-wait", env=env)
        assert out.returncode == hostlock.BUSY_EXIT, out.stderr
        assert "run 20261207T010203Z-first" in out.stderr and f"pid {proc.pid}" in out.stderr
        assert not (tmp_path / "results").exists()  # refused before anything was made
        assert invoke("run-matrix", "--dry-run", env=env).returncode == 0
        run = tmp_path / "run"
        subprocess.run(["cp", "-r", str(FIXTURE_RUN), str(run)], check=True)
        assert invoke("analyze", "--run", str(run), env=env).returncode == 0
        assert invoke("doctor", "--no-probe", env=env).returncode == 0
    finally:
        proc.kill()
        proc.wait()


def test_tests_without_guests_never_wait_on_the_real_host_lock():
    """tests/conftest.py gives them a lock of the session's own (a fake run-matrix once
    waited 14 min behind a real measuring run)."""
    assert hostlock.lock_path() != hostlock.PRIMARY_DIR / hostlock.LOCK_NAME
