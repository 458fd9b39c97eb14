"""Rules every test tier keeps: honest markers, and no silent skips in CI.

1. A test without one of the markers in HOST_MARKERS is pure logic (tier `unit`): while
   it sets up and runs, starting a process or opening a socket raises
   PureTestDidEffects. Mark such a test `process` (or `integration` if it boots a
   guest): the marker is then true by construction, not by review.
2. With CI=true a skipped test fails, unless its reason matches ALLOWED_SKIPS: a
   missing tool in CI means `invoke test` did not set up what its tier needs, and a
   skip would hide that. The README ("Tests") lists the same skips with their reasons;
   tests/unit/test_docs_paths.py checks that it does.
"""

from __future__ import annotations

import _posixsubprocess
import os
import re
import socket
import subprocess
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest

# Markers that allow a test to start processes or open sockets on this host.
HOST_MARKERS = ("process", "integration", "slow", "browser")


@dataclass(frozen=True)
class AllowedSkip:
    """A skip that stays a skip under CI=true; `label` is its row in the README's table
    (which says why it is acceptable)."""

    pattern: str  # regex searched in the skip's reason
    label: str


ALLOWED_SKIPS = (
    AllowedSkip(r"the (stock|patched) kernel is not built",
                "the stock or patched kernel is not built"),
    AllowedSkip(r"QEMU 10\.0 \(backport\) could not be downloaded",
                "QEMU 10.0 (backport) could not be downloaded"),
    AllowedSkip(r"counters auto under KVM", "counters auto under KVM"),
    AllowedSkip(r"needs two host CPUs", "needs two host CPUs"),
)


class PureTestDidEffects(AssertionError):
    """A test of the `unit` tier (no host marker) started a process or opened a socket."""


def allowed_skip(reason: str) -> bool:
    return any(re.search(skip.pattern, reason) for skip in ALLOWED_SKIPS)


def _refuse(what: str, nodeid: str) -> Callable[..., Any]:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise PureTestDidEffects(
            f"{nodeid} {what}, but carries none of the markers {', '.join(HOST_MARKERS)}: "
            "mark it `@pytest.mark.process` (it then runs in tier `local`, not `unit`)")
    return refuse


@contextmanager
def no_effects(nodeid: str) -> Iterator[None]:
    """Processes and sockets refused for the duration (threads and files are fine)."""
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(
            subprocess.Popen, "_execute_child", _refuse("starts a process", nodeid)))
        # what subprocess and multiprocessing's helpers (resource tracker, forkserver) use
        stack.enter_context(mock.patch.object(
            _posixsubprocess, "fork_exec", _refuse("starts a process", nodeid)))
        for name in ("fork", "system", "posix_spawn", "posix_spawnp"):
            if hasattr(os, name):
                stack.enter_context(mock.patch.object(
                    os, name, _refuse(f"calls os.{name}", nodeid)))
        stack.enter_context(mock.patch.object(
            socket.socket, "__init__", _refuse("opens a socket", nodeid)))
        yield


def _is_pure(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(m) for m in HOST_MARKERS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if not _is_pure(item):
        return (yield)
    with no_effects(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    if not _is_pure(item):
        return (yield)
    with no_effects(item.nodeid):
        return (yield)


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    if (os.environ.get("CI") == "true" and report.skipped
            and not hasattr(report, "wasxfail")):
        reason = skip_reason(report)
        if not allowed_skip(reason):
            report.outcome = "failed"
            report.longrepr = (
                f"CI=true and this test skipped: {reason}\n"
                "In CI a skip is a failure unless tests/conftest.py ALLOWED_SKIPS (and the "
                "README, \"Tests\") lists it: install what the test needs in "
                "`invoke test`'s setup (testbed/build/sysdeps.py tier_packages) instead.")
    return report


@pytest.fixture(autouse=True)
def _private_host_lock(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that boot no guest take a host lock of this session's own: with the real one
    (testbed.run.hostlock) a fake run-matrix waited behind whatever real run held it (a
    unit run hung 14 min behind a measuring run). Integration tests measure, so they keep
    the real lock and wait like any run; NETBED_HOST_LOCK set outside wins."""
    if os.environ.get("NETBED_HOST_LOCK") or request.node.get_closest_marker("integration"):
        return
    monkeypatch.setenv("NETBED_HOST_LOCK",
                       str(tmp_path_factory.getbasetemp() / "host-measure.lock"))
