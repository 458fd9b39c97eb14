"""testbed.vm.guest: what the guest connection runs (pure parts; SSH itself is integration)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from testbed.shell import HostShell
from testbed.vm.guest import Guest, KeyPair, make_keypair, wrap_timeout

pytestmark = pytest.mark.process  # compiles C, starts processes or opens sockets


def test_the_guest_stops_a_command_itself_and_keeps_its_quoting():
    wrapped = wrap_timeout("echo 'a b' | wc -w; exit 3", 12.7)
    assert shlex.split(wrapped)[:5] == ["timeout", "-k", "5", "12", "sh"]
    res = HostShell().run(wrapped, check=False)  # the same words run on this host
    assert (res.exit_code, res.stdout.strip()) == (3, "2")


def test_interactive_ssh_uses_only_the_run_key(tmp_path: Path):
    key = make_keypair(tmp_path)
    assert key.private.stat().st_mode & 0o777 == 0o600 and key.public_b64.startswith("AAAA")
    argv = Guest.ssh_argv(_guest_stub(key), "nproc")
    assert argv[:3] == ["ssh", "-i", str(key.private)] and argv[-1] == "nproc"
    assert "IdentitiesOnly=yes" in argv and argv[argv.index("-p") + 1] == "2222"


def _guest_stub(key: KeyPair) -> Guest:
    guest = Guest.__new__(Guest)  # no connection: ssh_argv needs only the port and key
    guest.key, guest.port = key, 2222
    return guest
