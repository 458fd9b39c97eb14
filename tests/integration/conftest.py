"""Shared fixtures for tests that boot real guests (under TCG here, KVM where usable)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.settings import Settings
from testbed.vm.topology import Assets, prepare_assets

# A two-cell experiment small enough for integration tests (2 s windows, one boot).
TINY_CONFIG = """\
name: {name}
axes:
  kernel: [distro]
  nic: [e1000]
  cpus: [2]
  policy: [default, pin-same]
  workload: [TCP_STREAM]
  gro: [on]
repetitions: 1
duration: 2
warmup: 0
order: sequential
retries: 1
plain_repetitions: 0  # plugin-less repetitions: tests/integration/test_plain_repetitions.py
"""


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def assets(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Packages, image and Debian kernel (built once, cached across sessions)."""
    return prepare_assets(settings, "distro", tmp_path_factory.mktemp("assets"))


def our_qemu_pids(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{marker}"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def links_named(fragment: str) -> list[str]:
    out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if fragment in line]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path / "guests"
