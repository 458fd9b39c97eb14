"""Exceptions that carry enough context for a user to act on them.

Every error a user can cause names what was wrong (file, line, key, command)
and how to fix it; tasks turn these into `invoke.Exit` messages.
"""

from __future__ import annotations


class NetbedError(Exception):
    """Base class: a problem the user can fix; `hint` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(NetbedError):
    """Bad experiment or policy YAML; the message starts with file:line:col."""


class CommandError(NetbedError):
    """A host or guest command failed; carries the command and its output."""

    def __init__(
        self,
        command: str | list[str],
        returncode: int | None,
        output: str = "",
        hint: str | None = None,
    ) -> None:
        self.command = command if isinstance(command, str) else " ".join(command)
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-20:])
        msg = f"command failed (exit {returncode}): {self.command}"
        if tail:
            msg += f"\n--- last output ---\n{tail}"
        super().__init__(msg, hint)


class CommandTimeout(CommandError):
    """A host command ran longer than its timeout and was killed."""

    def __init__(self, command: str, seconds: float, output: str = "",
                 hint: str | None = None) -> None:
        self.seconds = seconds
        super().__init__(command, None, output,
                         hint=hint or f"it was stopped after {seconds:.0f} s")


class GuestError(NetbedError):
    """A guest did not boot, hung, or dropped SSH; `console_log` points at its serial log."""

    def __init__(self, message: str, console_log: str | None = None,
                 hint: str | None = None) -> None:
        self.console_log = console_log
        if console_log:
            message = f"{message} (console log: {console_log})"
        super().__init__(message, hint)


class MissingDependency(NetbedError):
    """A host tool or package is missing and we cannot install it (e.g. not root)."""
