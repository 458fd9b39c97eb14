"""images/tools/nbsnap.c on the host: the edge reads against a real local TCP connection.

nbsnap borrows the reader's sockets at `reader` and keeps them, so a units read is a
getsockopt per socket (cheap inside a cache-model region); these tests check that
the kept sockets still give fresh counts, that every file of a line is written when
the line is done, and that the formats are the ones testbed.formats parses.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.formats.stamps import alignment, parse_stamps
from testbed.settings import REPO_ROOT
from tests.waits import wait_acked

pytestmark = pytest.mark.process  # compiles C, starts processes or opens sockets


@pytest.fixture(scope="module")
def nbsnap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("nbsnap") / "nbsnap"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(REPO_ROOT / "images" / "tools" / "nbsnap.c")], check=True)
    return out


@pytest.fixture
def connection() -> Iterator[tuple[int, socket.socket]]:
    """(reader pid, sending socket): a child process that accepts and reads forever."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    address = srv.getsockname()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the reader
        conn, _ = srv.accept()
        while conn.recv(65536):
            pass
        os._exit(0)
    srv.close()
    try:
        cli = socket.create_connection(address, timeout=10)
    except OSError:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    try:
        yield pid, cli
    finally:
        cli.close()
        os.waitpid(pid, 0)


def received(text: str) -> int:
    fields = dict(kv.split("=", 1) for kv in text.split())
    return int(fields["bytes_received"])


def test_units_read_kept_sockets_and_write_when_the_line_is_done(nbsnap, connection,
                                                                 tmp_path):
    pid, cli = connection
    cli.sendall(b"x" * 1000)
    wait_acked(cli)
    proc = subprocess.Popen([str(nbsnap), str(tmp_path), "lo", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def cmd(line: str) -> str:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        if cmd(f"reader {pid}") != "ok" or cmd("units probe") != "ok":
            pytest.skip("nbsnap cannot borrow the reader's sockets here (pidfd_getfd "
                        "needs Linux 5.6 and ptrace rights over the reader)")
        assert cmd("stamp a; units before; proc before") == "ok"
        assert received((tmp_path / "tcpinfo-before.txt").read_text()) == 1000
        cli.sendall(b"y" * 5000)
        wait_acked(cli)
        assert cmd("proc after; units after; stamp z") == "ok"
        assert cmd("quit") == "ok quit"
    finally:
        proc.wait(timeout=10)
    after = (tmp_path / "tcpinfo-after.txt").read_text()
    assert len(after.splitlines()) == 1 and received(after) == 6000  # the kept socket
    assert "rx_bytes" in (tmp_path / "nicstats-after.txt").read_text()
    assert (tmp_path / "proc-after" / "softirqs").read_text().strip()
    stamps = parse_stamps((tmp_path / "stamps.txt").read_text())
    order = ["a", "units-before-start", "units-before-sockets", "units-before",
             "proc-before-start", "proc-before", "proc-after-start", "proc-after",
             "units-after-start", "units-after-sockets", "units-after", "z"]
    assert [stamps[k] for k in order] == sorted(stamps[k] for k in order)


def test_the_reader_is_stopped_for_the_socket_reads_and_continued(nbsnap, connection,
                                                                 tmp_path):
    """The reader holds the socket lock through every recv and the lock is not fair, so
    `units` stops the reader (SIGSTOP) while it reads tcp_info and continues it right
    after. Seen in nbsnap's system calls (strace): stop, getsockopt(TCP_INFO) of the
    borrowed socket, continue, in that order; the reader is not left stopped and still
    reads. (Uncontended, the stop is usually cancelled by the continue before the
    reader acts on it, so the reader's own state cannot show it.)"""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    pid, cli = connection
    cli.sendall(b"x" * 100)
    wait_acked(cli)
    calls = tmp_path / "calls.txt"
    proc = subprocess.run(["strace", "-qq", "-o", str(calls), "-e", "trace=kill,getsockopt",
                           str(nbsnap), str(tmp_path), "lo", "0"], text=True, timeout=30,
                          input=f"reader {pid}\nunits probe\nquit\n", capture_output=True)
    if proc.stdout.splitlines()[:2] != ["ok", "ok"]:
        pytest.skip("nbsnap cannot borrow the reader's sockets here (pidfd_getfd "
                    "needs Linux 5.6 and ptrace rights over the reader)")
    lines = calls.read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if f"kill({pid}, SIGSTOP)" in line)
    done = [line.split("(", 1)[0] for line in lines[start:]]
    assert done[0] == "kill" and "getsockopt" in done and done[-1] == "kill", lines[start:]
    assert f"kill({pid}, SIGCONT)" in lines[start + len(done) - 1]
    assert all("TCP_INFO" in line for line in lines[start + 1:start + len(done) - 1])
    assert received((tmp_path / "tcpinfo-probe.txt").read_text()) == 100
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state != "T"
    cli.sendall(b"y" * 100)  # the reader still reads (teardown waits for it to end)


def test_perf_is_enabled_and_disabled_in_the_line_of_the_edge(nbsnap, tmp_path):
    """`perf enable|disable` talks to perf stat's control FIFOs itself (a stand-in answers
    as perf does: "ack\\n" and the tag's NUL), bracketed by perf-begin/-end stamps."""
    ctl, ack = tmp_path / "perf.ctl", tmp_path / "perf.ack"
    os.mkfifo(ctl)
    os.mkfifo(ack)
    seen: list[str] = []

    def fake_perf() -> None:
        with open(ctl, "rb", buffering=0) as c, open(ack, "wb", buffering=0) as a:
            for raw in iter(c.readline, b""):
                seen.append(raw.decode().strip())
                a.write(b"ack\n\0")
                if len(seen) == 2:
                    return

    perf = threading.Thread(target=fake_perf, daemon=True)
    perf.start()
    out = tmp_path / "win"
    out.mkdir()
    proc = subprocess.run([str(nbsnap), str(out), "lo", "0"], text=True, timeout=30,
                          input=(f"perfctl {ctl} {ack}\nperf enable; stamp inside\n"
                                 "stamp inside2; perf disable\nperf sideways\nquit\n"),
                          capture_output=True)
    perf.join(10)
    answers = proc.stdout.splitlines()
    assert answers[:3] == ["ok", "ok", "ok"]
    assert answers[3].startswith("error perf sideways: unknown command")
    assert seen == ["enable", "disable"]
    stamps = parse_stamps((out / "stamps.txt").read_text())
    order = ["perf-begin-start", "perf-begin", "inside", "inside2", "perf-end-start",
             "perf-end"]
    assert [stamps[k] for k in order] == sorted(stamps[k] for k in order)


def test_mark_accepts_arm_begin_end_stamped_and_refuses_junk(nbsnap, tmp_path):
    """`mark arm` (the cache model armed ahead of the window) is stamped like the other
    markers; its stamps are no source's edge, so the window's alignment ignores them.
    On the host the marker is a plain NOP."""
    proc = subprocess.run([str(nbsnap), str(tmp_path), "lo", "0"], text=True, timeout=30,
                          input=("mark arm\nstamp units-before\nmark begin\nmark end\n"
                                 "stamp units-after\nmark armed\nmark\nquit\n"),
                          capture_output=True)
    answers = proc.stdout.splitlines()
    assert answers[:5] == ["ok"] * 5, proc.stdout + proc.stderr
    assert answers[5] == "error mark armed: unknown command"
    assert answers[6] == "error mark: unknown command"
    stamps = parse_stamps((tmp_path / "stamps.txt").read_text())
    order = ["mark-arm-start", "mark-arm", "units-before", "mark-begin-start", "mark-begin",
             "mark-end-start", "mark-end", "units-after"]
    assert [stamps[k] for k in order] == sorted(stamps[k] for k in order)
    assert not any("armed" in k for k in stamps)
    with_arm = alignment(stamps)
    without = alignment({k: v for k, v in stamps.items() if not k.startswith("mark-arm")})
    assert with_arm == without and "cachemodel" in with_arm.offsets_ms


def test_perf_without_its_fifos_is_an_error_not_a_hang(nbsnap, tmp_path):
    proc = subprocess.run([str(nbsnap), str(tmp_path), "lo", "0"], text=True, timeout=30,
                          input="perf enable\nquit\n", capture_output=True)
    assert proc.stdout.splitlines()[0].startswith("error perf enable: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO for another process needs root")
def test_perfctl_makes_perf_and_only_perf_sched_fifo(nbsnap, tmp_path):
    """`perfctl CTL ACK PID` raises perf stat to SCHED_FIFO (its edges waited behind the
    reader under the cache model), and leaves a process that is not perf alone."""
    sleeper = shutil.which("sleep")
    assert sleeper is not None
    named_perf = tmp_path / "perf"
    shutil.copy(sleeper, named_perf)
    for fifo in ("perf.ctl", "perf.ack"):
        os.mkfifo(tmp_path / fifo)
    perf = subprocess.Popen([str(named_perf), "60"])
    other = subprocess.Popen([sleeper, "60"])
    try:
        for pid in (perf.pid, other.pid):
            out = tmp_path / f"win-{pid}"
            out.mkdir()
            proc = subprocess.run([str(nbsnap), str(out), "lo", "0"], text=True, timeout=30,
                                  input=f"perfctl {tmp_path}/perf.ctl {tmp_path}/perf.ack "
                                        f"{pid}\nquit\n", capture_output=True)
            assert proc.stdout.splitlines()[0] == "ok", proc.stdout + proc.stderr
        assert os.sched_getscheduler(perf.pid) == os.SCHED_FIFO
        assert os.sched_getparam(perf.pid).sched_priority == 9  # below nbsnap's 10
        assert os.sched_getscheduler(other.pid) == os.SCHED_OTHER
        assert "perf-fifo" in parse_stamps((tmp_path / f"win-{perf.pid}" / "stamps.txt")
                                           .read_text())
        assert not (tmp_path / f"win-{other.pid}" / "stamps.txt").is_file() or "perf-fifo" \
            not in (tmp_path / f"win-{other.pid}" / "stamps.txt").read_text()
    finally:
        for p in (perf, other):
            p.kill()
            p.wait()
