"""A stand-in for qemu-system-x86_64 in the interrupt scenarios (run by the real QemuProcess).

It reads the parts of QEMU's argv that netbed's teardown depends on:
- `-chardev file,...,path=LOG`: prints the readiness line there (unless told not to);
- `-netdev user,...,hostfwd=tcp:127.0.0.1:PORT-:22`: listens there and keeps every
  connection open without a word, like a guest running a long command, so a reader
  on it blocks until this process dies;
- `-qmp unix:PATH,...`: a minimal QMP (greeting, qmp_capabilities, quit), or, when
  told `stuck-qmp`, accepts and never greets, like a QEMU whose main loop hangs.

FAKE_QEMU_MODE (comma-separated: no-ready, stuck-qmp) and FAKE_QEMU_MARKERS (a folder
for `qemu-started-<name>` and `qmp-connected-<name>` files) come from the environment.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path


def option(argv: list[str], flag: str, pattern: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == flag and (m := re.search(pattern, argv[i + 1])):
            return m.group(1)
    return None


def marker(name: str) -> None:
    folder = os.environ.get("FAKE_QEMU_MARKERS")
    if folder:
        Path(folder, name).touch()


def serve_ssh(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    held = []
    while True:
        conn, _ = srv.accept()
        held.append(conn)  # never answered, never closed: closed by our death


def qmp_session(conn: socket.socket, name: str, stuck: bool) -> None:
    marker(f"qmp-connected-{name}")
    if stuck:
        time.sleep(3600)
        return
    greeting = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                    "package": "fake"}, "capabilities": []}}
    conn.sendall(json.dumps(greeting).encode() + b"\r\n")
    decoder = json.JSONDecoder()
    buf = ""
    while data := conn.recv(4096):  # QMP clients need not end a command with a newline
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            reply: dict[str, object] = {"return": {}}
            if "id" in msg:
                reply["id"] = msg["id"]
            conn.sendall(json.dumps(reply).encode() + b"\r\n")
            if msg.get("execute") == "quit":
                os._exit(0)


def serve_qmp(path: str, name: str, stuck: bool) -> None:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=qmp_session, args=(conn, name, stuck), daemon=True).start()


def main(argv: list[str]) -> None:
    mode = set(os.environ.get("FAKE_QEMU_MODE", "").split(","))
    name = option(argv, "-name", r"^(\S+)$") or "guest"
    console = option(argv, "-chardev", r"path=([^,]+)")
    port = option(argv, "-netdev", r"hostfwd=tcp:127\.0\.0\.1:(\d+)-")
    qmp = option(argv, "-qmp", r"^unix:([^,]+)")
    if port:
        threading.Thread(target=serve_ssh, args=(int(port),), daemon=True).start()
    if qmp:
        threading.Thread(target=serve_qmp, args=(qmp, name, "stuck-qmp" in mode),
                         daemon=True).start()
    marker(f"qemu-started-{name}")
    if console and "no-ready" not in mode:
        time.sleep(0.2)
        with open(console, "a") as log:
            log.write(f"NETBED-READY {name}\n")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
