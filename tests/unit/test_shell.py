"""testbed.shell: the host shell behind the Shell protocol (real subprocesses, fast)."""

from __future__ import annotations

import pytest

from testbed.errors import CommandError, CommandTimeout, MissingDependency
from testbed.shell import HostShell, Result

pytestmark = pytest.mark.process  # compiles C, starts processes or opens sockets


def test_argv_runs_without_a_shell_and_captures_both_streams():
    res = HostShell().run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert res == Result("sh -c 'echo out; echo err >&2; exit 3'", 3, "out\n", "err\n")
    assert not res.ok and res.output == "out\nerr\n"


def test_a_string_is_a_shell_command_line():
    assert HostShell().run("echo $((1 + 2)) | tr 3 x").stdout == "x\n"


def test_check_raises_with_the_command_its_status_and_output():
    with pytest.raises(CommandError) as err:
        HostShell().run(["sh", "-c", "echo broken >&2; exit 7"], hint="fix it")
    assert err.value.returncode == 7 and "broken" in err.value.output
    assert "fix: fix it" in str(err.value)


def test_timeout_kills_and_raises_with_the_limit():
    with pytest.raises(CommandTimeout) as err:
        HostShell().run(["sleep", "5"], timeout=0.2)
    assert err.value.seconds == 0.2 and err.value.returncode is None


def test_missing_program_is_a_missing_dependency():
    with pytest.raises(MissingDependency, match="netbed-no-such-tool"):
        HostShell().run(["netbed-no-such-tool"], hint="apt-get install it")


def test_input_cwd_and_env(tmp_path):
    shell = HostShell(cwd=tmp_path, env={"NETBED_X": "42"})
    res = shell.run("cat; pwd; echo $NETBED_X", input="in\n")
    assert res.stdout.splitlines() == ["in", str(tmp_path), "42"]


def test_stdin_is_closed_without_input():
    assert HostShell().run(["cat"], timeout=5).stdout == ""

