"""The effect seam: run a command somewhere and get its status and output.

Code that drives commands (the matrix loop, one repetition, builds) takes a
`Shell` rather than calling `subprocess` or Fabric itself, so its retries,
resume and error paths are unit-tested with a fake shell. Two shells are real:
`HostShell` here (subprocess on this machine) and `testbed.vm.guest.Guest`
(SSH into a guest).

Processes that live on with their own lifecycle are not commands and keep their
subprocess.Popen where they are managed: QEMU (`testbed.vm.process`, and the
streaming e1000 micro guest), a kernel build streaming into its log, the
interactive ssh and pytest of `invoke shell` / `invoke test`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from testbed.errors import CommandError, CommandTimeout, MissingDependency

# A shell command line (str, run by sh -c) or an argv (run directly).
Command = str | Sequence[str]


@dataclass(frozen=True)
class Result:
    """What a finished command left: its status and its output."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Shell(Protocol):
    """Somewhere commands run. `check=True` raises CommandError on a non-zero status;
    a command that outlives `timeout` seconds raises (CommandTimeout on the host,
    GuestError in a guest) and is stopped."""

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        ...


def command_text(command: Command) -> str:
    return command if isinstance(command, str) else shlex.join(command)


class HostShell:
    """Commands on this machine, through subprocess.

    `env` entries are added to the inherited environment; `hint` goes into the
    CommandError a failure raises (say how to fix it).
    """

    def __init__(self, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.cwd = cwd
        self.env = dict(env or {})

    def run(self, command: Command, timeout: float | None = None, check: bool = True, *,
            cwd: Path | None = None, input: str | None = None,
            hint: str | None = None) -> Result:
        argv: str | list[str] = command if isinstance(command, str) else list(command)
        text = command_text(command)
        env = {**os.environ, **self.env} if self.env else None
        try:
            proc = subprocess.run(argv, shell=isinstance(argv, str), cwd=cwd or self.cwd,
                                  env=env, input=input, capture_output=True, text=True,
                                  errors="replace", timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise MissingDependency(f"{exc.filename or text} is not installed",
                                    hint=hint or "install it (invoke doctor shows what "
                                                 "netbed needs)") from exc
        except subprocess.TimeoutExpired as exc:  # run() has killed the child already
            out = _text(exc.stdout) + _text(exc.stderr)
            raise CommandTimeout(text, timeout or 0.0, out, hint=hint) from exc
        result = Result(text, proc.returncode, proc.stdout, proc.stderr)
        if check and not result.ok:
            raise CommandError(text, result.exit_code, result.output, hint=hint)
        return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
