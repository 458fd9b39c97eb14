"""Waits for tests: poll a condition until a deadline, instead of sleeping a fixed time.

A fixed sleep is either too short on a busy machine (the test fails for nothing) or
too long everywhere (the suite crawls); a poll returns as soon as the condition holds
and fails with what it waited for once the generous deadline has passed.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Callable

DEADLINE_S = 30.0  # generous: only a broken condition takes this long


def poll_until(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S,
               every_s: float = 0.01) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"waited {deadline_s:g} s for {what}")
        time.sleep(every_s)


def unacked_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", out)[0])


def wait_acked(sock: socket.socket) -> None:
    """Until the peer's kernel has acknowledged everything sent: the data is in its
    receive queue and counted in its tcp_info."""
    poll_until(lambda: unacked_bytes(sock) == 0, "the peer to acknowledge the data")


def wait_child(pid: int, name: str, what: str) -> None:
    """Until process `pid` has a child that runs `name` (pgrep -x -P: after its exec)."""
    poll_until(lambda: subprocess.run(["pgrep", "-x", "-P", str(pid), name],
                                      capture_output=True).returncode == 0, what)
