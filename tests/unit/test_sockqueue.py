"""The socket queue samples: nbsample's queue file on a real host socket, the parser, the
window's reduction and the tidy rows (never zeros for what is missing)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.errors import NetbedError
from testbed.formats import sockqueue
from testbed.run.window import window_script
from testbed.settings import IMAGES_DIR
from tests.unit.test_window import experiment
from tests.waits import poll_until

LOCAL, PEER = "198.18.0.1:12866", "198.18.0.2:40000"
CONTROL = ("198.18.0.1:12865", "198.18.0.2:39999")
TCPINFO = (f"local={CONTROL[0]} peer={CONTROL[1]} bytes_acked=10 bytes_received=900 "
           "bytes_sent=0 segs_in=5 segs_out=5 data_segs_in=3 data_segs_out=3\n"
           f"local={LOCAL} peer={PEER} bytes_acked=1 bytes_received=90000000 bytes_sent=0 "
           "segs_in=70000 segs_out=30000 data_segs_in=69000 data_segs_out=0\n")
STAMPS = ("units-before-start 1000\nunits-before 2000\n"
          "units-after-start 9000\nunits-after 10000\n")


def queue_text(rows: list[tuple[int, int, int, str, str]], source: str = "sock_diag") -> str:
    head = (f"# sockqueue source={source}\n# socket 0 local={CONTROL[0]} peer={CONTROL[1]}\n"
            f"# socket 1 local={LOCAL} peer={PEER}\n")
    return head + "".join(f"{t} {i} {q} {m} {b}\n" for t, i, q, m, b in rows)


def test_only_the_data_connections_samples_inside_the_window_count() -> None:
    rows = [(1000, 1, 999 * 1024, "1", "131072"),  # before the window's opening read
            (3000, 0, 777 * 1024, "1", "131072"),  # the control connection
            *[(3000 + k * 500, 1, k * 1024, "2048", "131072") for k in range(11)],
            (11000, 1, 999 * 1024, "1", "131072")]  # after the closing read
    queue = sockqueue.parse_sockqueue(queue_text(rows))
    stats = sockqueue.reduce_window(queue, (1500, 9500), (LOCAL, PEER))
    assert stats.samples == 11
    assert stats.p50_kb == 5.0 and stats.p95_kb == pytest.approx(9.5)
    assert stats.rcvbuf_kb == 128 and stats.rcvbuf_bytes == (131072,)


def test_quantiles_interpolate_like_numpy() -> None:
    assert sockqueue.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert sockqueue.quantile([0, 10], 0.95) == pytest.approx(9.5)
    assert sockqueue.quantile([7], 0.95) == 7
    assert math.isnan(sockqueue.quantile([], 0.5))


def test_rows_name_their_source_and_the_buffer() -> None:
    rows = {r.metric: r for r in sockqueue.queue_rows(
        queue_text([(5000, 1, 2048, "4096", "131072"), (6000, 1, 4096, "8192", "262144")]),
        STAMPS, TCPINFO)}
    assert rows["socket.queue_kb.p50"].value == 3.0
    assert rows["socket.queue_kb.p50"].source == "sock_diag"
    assert rows["socket.queue_samples"].value == 2
    assert rows["socket.rcvbuf_kb"].value == 256  # the largest, autotuning grew it
    assert "131072, 262144" in rows["socket.rcvbuf_kb"].note


def test_the_proc_fallback_takes_the_buffer_from_netperf() -> None:
    text = queue_text([(5000, 1, 65536, "-", "-")], source="proc (sock_diag: No such file "
                      "or directory)")
    rows = {r.metric: r for r in sockqueue.queue_rows(text, STAMPS, TCPINFO, 131072.0)}
    assert rows["socket.queue_kb.p95"].value == 64 and rows["socket.queue_kb.p95"].source \
        == "proc"
    assert "No such file" in rows["socket.queue_kb.p95"].note
    assert rows["socket.rcvbuf_kb"].value == 128 and rows["socket.rcvbuf_kb"].source == "netperf"
    none = {r.metric: r for r in sockqueue.queue_rows(text, STAMPS, TCPINFO, None)}
    assert none["socket.rcvbuf_kb"].status == "not-supported"
    assert math.isnan(none["socket.rcvbuf_kb"].value)


@pytest.mark.parametrize(("text", "stamps", "status"), [
    (None, STAMPS, "not-supported"),  # an older image: no queue file
    ("garbage\n", STAMPS, "error"),
    (queue_text([(5000, 1, 1, "-", "-")]), None, "error"),  # no window edges
    (queue_text([(99999, 1, 1, "-", "-")]), STAMPS, "error"),  # nothing inside
    (queue_text([(5000, 0, 1, "-", "-")]), STAMPS, "error"),  # the data connection unseen
])
def test_missing_or_broken_input_is_never_a_zero(text: str | None, stamps: str | None,
                                                 status: str) -> None:
    rows = sockqueue.queue_rows(text, stamps, TCPINFO)
    assert {r.metric for r in rows} == set(sockqueue.METRICS)
    for r in rows:
        assert math.isnan(r.value) and r.status in (status, "not-supported"), r
        assert r.note


def test_parser_names_the_bad_line() -> None:
    with pytest.raises(NetbedError, match="line 2"):
        sockqueue.parse_sockqueue("# sockqueue source=sock_diag\n12 0 1 2 3\n")


def test_the_window_samples_the_queue_into_its_folder() -> None:
    script = window_script(experiment(), pmu=False, cachemodel=False, iface="eth1")
    assert "nbsample 3 0.05 /tmp/netbed/win/sockqueue.txt" in script


@pytest.mark.process
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_nbsample_samples_a_real_sockets_queue(tmp_path: Path) -> None:
    """A reader (named netserver, child of a netserver) that reads slowly from a loopback
    connection with a 64 KiB SO_RCVBUF: its queue is seen, and its buffer as set."""
    binary = tmp_path / "nbsample"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(binary),
                    str(IMAGES_DIR / "tools" / "nbsample.c")], check=True)
    fake = tmp_path / "netserver"
    os.symlink(os.path.realpath(sys.executable), fake)
    child = tmp_path / "reader.py"
    child.write_text(
        "import socket, threading, time\n"
        "srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)\n"
        "srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()\n"
        "def send():\n"
        "    while True:\n"
        "        try: cli.sendall(b'x' * 65536)\n"
        "        except OSError: return\n"
        "threading.Thread(target=send, daemon=True).start()\n"
        "open(__file__ + '.ready', 'w').close()\n"
        "while True:\n"
        "    conn.recv(4096); time.sleep(0.01)\n")
    parent = subprocess.Popen([str(fake), "-c", "import subprocess, sys, time; "
                               f"p = subprocess.Popen([{str(fake)!r}, {str(child)!r}]); "
                               "time.sleep(60)"])
    try:
        poll_until(Path(f"{child}.ready").exists, "the reader's connection")
        queue_file = tmp_path / sockqueue.RAW
        out = subprocess.run([str(binary), "1", "0.05", str(queue_file)], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()
    queue = sockqueue.parse_sockqueue(queue_file.read_text())
    assert queue.source in ("sock_diag", "proc") and len(queue.sockets) == 2
    assert len(queue.samples) >= 4  # 20 asked per socket; a loaded host delivers fewer
    assert max(s.rqueue for s in queue.samples) > 0  # the slow reader's side queues
    if queue.source == "sock_diag":
        assert {s.rcvbuf for s in queue.samples if s.rqueue} == {131072}  # 2 x 64 KiB
        assert all(s.rmem is not None for s in queue.samples)
    a, b = queue.sockets.values()
    assert (a[0], a[1]) == (b[1], b[0])  # the connection's two ends


CAPTURED = Path(__file__).resolve().parent.parent / "fixtures" / "raw" / "guest-rcvbuf"


def captured_rows(folder: str) -> dict[str, sockqueue.Row]:
    d = CAPTURED / folder
    rsr_end = float(next(line.split("=", 1)[1] for line in (d / "netperf.txt").read_text()
                         .splitlines() if line.startswith("RSR_SIZE_END=")))
    return {r.metric: r for r in sockqueue.queue_rows(
        (d / sockqueue.RAW).read_text(), (d / "stamps.txt").read_text(),
        (d / "tcpinfo-after.txt").read_text(), rsr_end)}


def test_captured_guest_samples_parse_and_reduce() -> None:
    queue = sockqueue.parse_sockqueue((CAPTURED / "distro-64K" / sockqueue.RAW).read_text())
    assert queue.source == "proc" and "sock_diag" in queue.note
    assert len(queue.sockets) == 2  # the data connection and netserver's control one
    assert all(s.rmem is None and s.rcvbuf is None for s in queue.samples)
    shallow, deep = captured_rows("distro-64K"), captured_rows("distro-auto")
    for rows in (shallow, deep):
        assert all(r.status == "ok" for r in rows.values()), rows
        assert rows["socket.queue_samples"].value >= 10
    # 64K: SO_RCVBUF 131072, a ~64 KiB window: the queue never passes it
    assert shallow["socket.rcvbuf_kb"].value == 128
    assert shallow["socket.rcvbuf_kb"].source == "netperf"
    assert shallow["socket.queue_kb.p95"].value <= 64
    # autotuned: the buffer grew to MiBs and the queue went past the capped one's
    assert deep["socket.rcvbuf_kb"].value > 1024
    assert deep["socket.queue_kb.p95"].value > shallow["socket.queue_kb.p95"].value


def test_captured_sock_diag_samples_carry_the_buffer_the_kernel_set() -> None:
    """Stock netbed kernel (sock_diag built in): every sample has sk_rcvbuf and rmem_alloc,
    and the buffer is the level doubled for 64K and 1M (rmem_max raised), autotuned to
    MiBs otherwise; the queues order by level."""
    rows = {level: captured_rows(f"stock-{level}") for level in
            ("64K-plain", "1M-model", "auto-plain")}
    for level, got in rows.items():
        assert all(r.status == "ok" and r.source == "sock_diag" for r in got.values()), level
    queue = sockqueue.parse_sockqueue((CAPTURED / "stock-1M-model" / sockqueue.RAW).read_text())
    assert queue.source == "sock_diag" and queue.note == ""
    assert all(s.rmem is not None and s.rcvbuf is not None for s in queue.samples)
    assert rows["64K-plain"]["socket.rcvbuf_kb"].value == 128
    assert rows["1M-model"]["socket.rcvbuf_kb"].value == 2048
    assert rows["auto-plain"]["socket.rcvbuf_kb"].value > 2048
    p95 = {level: got["socket.queue_kb.p95"].value for level, got in rows.items()}
    assert p95["64K-plain"] <= 64 < p95["1M-model"] <= 1024 * 2
