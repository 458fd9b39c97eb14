"""Fabric connection to a booted guest: a `Shell` (run), plus put and get.

A key pair is generated per run (0600) and its public half passed on the kernel
command line; the guest's host key is known from the image, so we verify it
instead of prompting or trusting blindly. Guest commands are wrapped in
`timeout N` because Fabric's own timeout closes the channel but leaves the
remote command running.
"""

from __future__ import annotations

import base64
import logging
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit

from testbed.errors import CommandError, GuestError
from testbed.shell import HostShell, Result

WATCHDOG_GRACE_S = 30
# paramiko logs every refused connection while sshd starts as a traceback on stderr;
# our own errors say what failed, so keep its logger quiet below CRITICAL.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public_b64: str  # the base64 blob alone, for the kernel command line


def make_keypair(directory: Path) -> KeyPair:
    """A fresh ed25519 key for this run (ssh-keygen writes the private key 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "id_ed25519"
    if not private.exists():
        HostShell().run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "netbed-run",
                         "-f", str(private)], hint="apt-get install openssh-client")
    private.chmod(0o600)
    pub = private.with_suffix(".pub").read_text().split()
    return KeyPair(private, pub[1])


def wrap_timeout(command: str, seconds: float) -> str:
    """Make the guest itself stop the command (pure)."""
    return f"timeout -k 5 {int(seconds)} sh -c {shlex.quote(command)}"


class Guest:
    """SSH access to one guest through its 127.0.0.1 port forward; a `testbed.shell.Shell`.

    `run` raises GuestError when the guest hangs (the command outlives its timeout)
    or the SSH session drops, and CommandError for a non-zero status with `check`.
    """

    def __init__(self, name: str, port: int, key: KeyPair, host_key_pub: str,
                 command_timeout: float = 600.0) -> None:
        self.name = name
        self.port = port
        self.key = key
        self.command_timeout = command_timeout
        self.conn = Connection(
            "127.0.0.1", user="root", port=port, connect_timeout=10,
            connect_kwargs={"key_filename": str(key.private), "look_for_keys": False,
                            "allow_agent": False, "banner_timeout": 30, "auth_timeout": 30},
        )
        kind, blob = host_key_pub.split()[:2]
        self.conn.client.get_host_keys().add(f"[127.0.0.1]:{port}", kind,
                                             paramiko.Ed25519Key(data=base64.b64decode(blob)))
        self.conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())

    def wait_ssh(self, timeout: float) -> float:
        """Retry until SSH answers a trivial command; returns the seconds it took."""
        start = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - start < timeout:
            try:
                self.conn.open()
                self.conn.run("true", hide=True, timeout=20, in_stream=False)
                return time.monotonic() - start
            except Exception as exc:  # paramiko raises many types while sshd starts
                last = exc
                self.conn.close()
                time.sleep(0.5)
        raise GuestError(f"guest {self.name}: SSH did not answer within {timeout:.0f} s: {last}")

    def run(self, command: str, timeout: float | None = None, check: bool = True,
            pty: bool = False) -> Result:
        limit = timeout or self.command_timeout
        wrapped = wrap_timeout(command, limit)
        # Fabric's timeout starts only once the channel is open, and opening one to a
        # guest whose vCPUs are stuck waits forever (QEMU's user-mode network keeps the
        # TCP connection alive). A watchdog closes the connection instead.
        aborted = threading.Event()

        def abort() -> None:
            aborted.set()
            self.conn.close()

        watchdog = threading.Timer(limit + WATCHDOG_GRACE_S, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            res = self.conn.run(wrapped, hide=True, warn=True, timeout=limit + 15, pty=pty,
                                in_stream=False)
        except CommandTimedOut as exc:
            raise GuestError(f"guest {self.name}: command timed out after {limit:.0f} s: "
                             f"{command}") from exc
        except UnexpectedExit as exc:  # only with warn=False; kept for safety
            res = exc.result
        except (OSError, paramiko.SSHException, EOFError) as exc:
            if aborted.is_set():
                raise GuestError(f"guest {self.name}: command timed out after {limit:.0f} s "
                                 f"(guest unresponsive): {command}") from exc
            raise GuestError(f"guest {self.name}: SSH dropped while running "
                             f"{command!r}: {exc}") from exc
        finally:
            watchdog.cancel()
        result = Result(command, res.exited, res.stdout, res.stderr)
        if check and not result.ok:
            if res.exited == 124:
                raise GuestError(f"guest {self.name}: command timed out after {limit:.0f} s: "
                                 f"{command}")
            raise CommandError(f"[{self.name}] {command}", res.exited,
                               res.stdout + res.stderr)
        return result

    def put(self, local: Path, remote: str) -> None:
        self.conn.put(str(local), remote)

    def get(self, remote: str, local: Path) -> None:
        """Per-guest local paths: all guests are 127.0.0.1, so Fabric's {host}/ would collide."""
        local.parent.mkdir(parents=True, exist_ok=True)
        self.conn.get(remote, str(local))

    def close(self) -> None:
        self.conn.close()

    def ssh_argv(self, command: str | None = None) -> list[str]:
        """OpenSSH command line for interactive use (a terminal needs the real ssh)."""
        argv = ["ssh", "-i", str(self.key.private), "-p", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "root@127.0.0.1"]
        if command is not None:
            argv.append(command)
        return argv
