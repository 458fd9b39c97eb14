"""The tier rules of tests/conftest.py: pure tests stay pure, CI does not skip silently."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.build.sysdeps import TEST_TIERS, tier_packages
from testbed.settings import REPO_ROOT
from tests.conftest import PureTestDidEffects, allowed_skip, no_effects


@pytest.mark.parametrize("effect", [
    lambda: subprocess.run(["true"], check=False),
    lambda: socket.socket(),
    lambda: os.system("true"),
    lambda: os.fork(),
    lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
])
def test_a_pure_test_cannot_start_a_process_or_open_a_socket(effect):
    with no_effects("t"), pytest.raises(PureTestDidEffects, match="mark it"):
        effect()


@pytest.mark.parametrize(("reason", "allowed"), [
    ("the patched kernel is not built (invoke build-kernel --variant patched)", True),
    ("the stock kernel is not built (invoke build-kernel)", True),
    ("QEMU 10.0 (backport) could not be downloaded: apt-get exit 100: E: x", True),
    ("counters auto under KVM counts without the cache model: no plain reps", True),
    ("disjoint placement needs two host CPUs", True),
    ("gcc is not installed", False),
    ("strace is not installed", False),
    ("chromium not installed (apt-get install -y chromium)", False),
    ("tap data plane needs root", False),
])
def test_ci_allows_only_the_listed_skips(reason, allowed):
    assert allowed_skip(reason) is allowed


def test_every_tier_but_unit_installs_what_its_tests_call():
    assert tier_packages("unit") == {}
    assert {"gcc", "strace", "shellcheck"} <= tier_packages("local").keys()
    assert {"chromium", "openssh-server", "busybox-static", "qemu-system-x86"} \
        <= tier_packages("default").keys() == tier_packages("full").keys()
    assert TEST_TIERS == ("unit", "local", "default", "full")
    with pytest.raises(ValueError, match="unknown test tier"):
        tier_packages("fast")


@pytest.mark.process
@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 failed, 1 skipped"),
                                             ("", "2 skipped")])
def test_with_ci_true_an_unlisted_skip_fails(tmp_path: Path, ci: str, outcome: str):
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_tool():\n    pytest.skip('gcc is not installed')\n"
        "@pytest.mark.skipif(True, reason='disjoint placement needs two host CPUs')\n"
        "def test_cpus():\n    pass\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert outcome in out.stdout, out.stdout + out.stderr
    if ci:
        assert "CI=true and this test skipped: gcc is not installed" in out.stdout


@pytest.mark.parametrize(("tier", "marker", "packages"), [
    ("unit", "not process and not integration and not slow and not browser", set()),
    ("local", "not integration and not slow and not browser", {"gcc", "strace"}),
    ("default", "not slow", {"chromium", "openssh-server"}),
    ("full", None, {"chromium", "linux-source-6.1", "bc"}),
])
def test_invoke_test_sets_up_its_tier_then_runs_its_markers(monkeypatch, tier, marker,
                                                            packages):
    import invoke

    import tasks
    from testbed.build import sysdeps

    asked: list[dict[str, str]] = []
    ran: list[list[str]] = []
    monkeypatch.setattr(sysdeps, "ensure_packages", lambda pkgs, log: asked.append(pkgs))
    monkeypatch.setattr(tasks.subprocess, "call", lambda cmd, cwd: ran.append(cmd) or 0)
    tasks.test.body(invoke.Context(), tier=tier, args="-q")
    assert packages <= asked[0].keys() and (tier != "unit" or asked[0] == {})
    assert ran[0][1:3] == ["-m", "pytest"]
    assert ran[0][3:] == (["-m", marker, "-q"] if marker else ["-q"])
