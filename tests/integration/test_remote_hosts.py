"""`invoke run-hosts` against an sshd this test starts on 127.0.0.1 with its own keys.

Two "hosts" are the same sshd (each assignment gets its own remote folder and
shipped checkout); a third entry points at a closed port, so one host fails while
the merge still holds everything the others ran. Hosts run one at a time and
share this checkout's cache (INVOKE_NETBED_CACHE_DIR) to keep a 2-core machine
from building a second guest image.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.experiment.load import load_experiment
from testbed.experiment.matrix import expand
from testbed.files import read_json
from testbed.run.folder import RunDir
from testbed.settings import REPO_ROOT, Settings

from .conftest import TINY_CONFIG

pytestmark = pytest.mark.integration

SSHD = "/usr/sbin/sshd"
CONFIG = TINY_CONFIG.format(name="hoststest")
# The interrupt test's run: its first window lasts this long, so once that cell has
# started the run is certainly still going when the signal comes (no race with the clock).
LONG_WINDOW_S = 600
LONG_CONFIG = CONFIG.replace("duration: 2\n", f"duration: {LONG_WINDOW_S}\n")
assert LONG_CONFIG != CONFIG


def hosts_argv(config: Path, hosts: str, key: Path, remote_root: Path,
               parallel: int | None = None) -> list[str]:
    """The one place that spells the multi-host command line.

    """
    argv = [sys.executable, "-m", "invoke", "run-hosts", "--config", str(config),
            "--no-report", "--hosts", hosts, "--key", str(key),
            "--remote-dir", str(remote_root), "--python", sys.executable,
            "--cache-dir", str(Settings().cache_dir)]
    if parallel is not None:
        argv += ["--parallel", str(parallel)]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Sshd:
    port: int
    key: Path
    user: str


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"sshd did not listen on {port}: {log.read_text()}")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A private sshd: own host key, own client key, listening on 127.0.0.1 only."""
    if not os.path.exists(SSHD):
        pytest.skip("sshd missing: apt-get install -y openssh-server")
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"netbed-{name}",
                        "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation dir as root
    port = free_port()
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    log = d / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        _wait_listening(port, proc, log)
        yield Sshd(port, d / "client_key", getpass.getuser())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_hosts_run_shards_pull_back_and_merge_and_a_dead_host_fails_the_run(sshd, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to ship the checkout")
    config = tmp_path / "hoststest.yaml"
    config.write_text(CONFIG)
    results = tmp_path / "results"
    remote_root = tmp_path / "remote"
    dead = free_port()  # nothing listens here
    hosts = (f"{sshd.user}@127.0.0.1:{sshd.port},{sshd.user}@127.0.0.1:{sshd.port},"
             f"{sshd.user}@127.0.0.1:{dead}")
    argv = hosts_argv(config, hosts, sshd.key, remote_root, parallel=1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()  # what gets shipped (read before others commit)
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "INVOKE_NETBED_RESULTS_DIR": str(results)})
    print(f"run-hosts of 2 cells on 2 live + 1 dead host: {time.monotonic() - started:.0f} s")
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 1, out  # the dead host fails the run ...
    assert f"127.0.0.1:{dead} (shard 3/3): FAILED" in out, out
    # ... and the live hosts' progress streamed back with their labels
    assert f"[1-127.0.0.1-{sshd.port}] " in out and f"[2-127.0.0.1-{sshd.port}] " in out

    merged = list(results.glob("*-merged"))
    assert len(merged) == 1, out
    run = RunDir(merged[0])
    cells = expand(load_experiment(config))
    assert {(r.cell_id, r.repetition) for r in run.reps() if r.is_done} == \
        {(c.cell_id, 0) for c in cells}, out
    assert {c["cell_id"] for c in read_json(run.cells_file)} == {c.cell_id for c in cells}
    shards = read_json(run.path / "shards.json")
    assert len(shards) == 2 and all("-shard" in s["run"] for s in shards)
    # the shipped commit is what the remote runs recorded (a clone, not an archive)
    for s in shards:
        assert s["versions"]["netbed_commit"] == head
    # scratch space stays on the hosts; each assignment had its own folder there
    assert not list(results.glob("*-hosts/*/*/.work"))
    assert len(list(remote_root.glob("*/*-127.0.0.1-*/src/tasks.py"))) == 2


def test_interrupt_stops_the_remote_run_and_its_guests(sshd, tmp_path):
    """Ctrl-C locally must not leave a run-matrix (or QEMU) running on a host.

    The signal is sent once the remote run has begun its first repetition (its
    offloads.txt is written just before the window opens) of a cell whose window lasts
    LONG_WINDOW_S: from then on the run cannot finish before the signal arrives.
    """
    config = tmp_path / "hoststest.yaml"
    config.write_text(LONG_CONFIG)
    remote_root = tmp_path / "remote"
    log = tmp_path / "out.log"
    argv = hosts_argv(config, f"{sshd.user}@127.0.0.1:{sshd.port}", sshd.key, remote_root)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ,
                                     "INVOKE_NETBED_RESULTS_DIR": str(tmp_path / "results")},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not list(remote_root.glob("*/*/results/*/cells/*/rep-*/offloads.txt")):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        (pid_file,) = remote_root.glob("*/*/run.pid")
        remote_pid = int(pid_file.read_text())
        assert Path(f"/proc/{remote_pid}").exists()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130, log.read_text()
        print(f"local exit {time.monotonic() - sent:.1f} s after SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "asking the hosts' runs to stop" in text, text
    assert not Path(f"/proc/{remote_pid}").exists(), text
    leftover = subprocess.run(["pgrep", "-f", f"qemu-system.*{remote_root}"],
                              capture_output=True, text=True).stdout.split()
    assert leftover == [], text
    # the interrupted repetition is not marked done: a resume would redo it
    assert not list(remote_root.glob("*/*/results/*/cells/*/rep-*/done")), text
