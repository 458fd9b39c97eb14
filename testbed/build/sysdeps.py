"""Debian packages netbed needs on the host, installed by netbed itself.

Tasks call `ensure_packages(...)` before work that needs a tool, so a newcomer's
first `invoke shell` or `invoke run-matrix` sets itself up. Without root we stop
with the exact `apt-get install` line to run, rather than half-working.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterable

from testbed.errors import MissingDependency
from testbed.shell import HostShell

# What each capability needs: package -> a command (or file) that proves it is there.
QEMU_PACKAGES = {"qemu-system-x86": "qemu-system-x86_64", "qemu-utils": "qemu-img"}
IMAGE_PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "cpio": "cpio",
    "kmod": "depmod",
    "openssh-client": "ssh-keygen",
    "gcc": "gcc",
    "libc6-dev": "/usr/lib/x86_64-linux-gnu/libc.a",
    "debian-archive-keyring": "/usr/share/keyrings/debian-archive-keyring.gpg",
    "dpkg-dev": "dpkg-deb",
}
NETWORK_PACKAGES = {"iproute2": "ip"}
GUEST_PACKAGES = {**QEMU_PACKAGES, **IMAGE_PACKAGES, **NETWORK_PACKAGES}

Log = Callable[[str], None]

# apt takes its lists lock without waiting: builds running side by side in one process
# (testbed.build.beside) take turns here instead.
_APT = threading.Lock()


def _present(probe: str) -> bool:
    return os.path.exists(probe) if probe.startswith("/") else shutil.which(probe) is not None


def missing_packages(packages: dict[str, str]) -> list[str]:
    """Packages whose probe command/file is absent (pure apart from PATH/file checks)."""
    return sorted(pkg for pkg, probe in packages.items() if not _present(probe))


def apt_install_command(packages: Iterable[str]) -> list[str]:
    return ["apt-get", "install", "-y", "-q", "--no-install-recommends", *sorted(packages)]


def apt_command(*args: str) -> list[str]:
    """apt-get that waits for the dpkg lock instead of failing when another apt runs."""
    return ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args]


def ensure_packages(packages: dict[str, str], log: Log = print) -> None:
    """Install what is missing with apt, saying what; without root, explain and stop."""
    if not missing_packages(packages):
        return
    with _APT:
        _install(missing_packages(packages), log)


def _install(missing: list[str], log: Log) -> None:
    if not missing:
        return
    line = " ".join(apt_install_command(missing))
    if os.geteuid() != 0:
        raise MissingDependency(
            f"netbed needs Debian packages that are not installed: {', '.join(missing)}",
            hint=f"run as root: apt-get update && {line}",
        )
    log(f"installing Debian packages netbed needs: {', '.join(missing)}")
    apt = HostShell(env={"DEBIAN_FRONTEND": "noninteractive"})
    for cmd in (apt_command("update", "-q"), apt_command(*apt_install_command(missing)[1:])):
        apt.run(cmd, hint="check that the Debian mirror is reachable")


# What each test tier runs that no build or boot installs on first use: the tools the
# tests call themselves (package -> probe). `invoke test --tier T` installs
# tier_packages(T) before pytest starts, so on a fresh machine its tests run instead of
# skipping (and with CI=true a skip for a missing tool fails: tests/conftest.py).
LOCAL_TEST_PACKAGES = {
    "gcc": "gcc",  # guest tools and the cache model compiled on the host
    "libc6-dev": "/usr/lib/x86_64-linux-gnu/libc.a",
    "dash": "dash",  # the guest's /bin/sh runs the guest scripts' tests
    "procps": "pgrep",
    "mawk": "awk",
    "strace": "strace",  # nbsnap's system calls (test_nbsnap)
    "shellcheck": "shellcheck",  # actionlint checks the workflows' run: scripts with it
}
GUEST_TEST_PACKAGES = {
    **GUEST_PACKAGES,
    "busybox-static": "/bin/busybox",  # micro guests (cache model, kernel boot)
    "openssh-server": "/usr/sbin/sshd",  # run-hosts against this host (test_remote_hosts)
    "git": "git",  # run-hosts ships the checkout
    "ca-certificates": "/etc/ssl/certs/ca-certificates.crt",
    "chromium": "chromium",  # the report in a headless browser (marker browser)
}
TEST_TIERS = ("unit", "local", "default", "full")


def tier_packages(tier: str) -> dict[str, str]:
    """Packages a tier's tests call directly; `unit` is pure logic and needs none.
    (The full tier also builds kernels and the plugin: those builds install their own.)"""
    if tier not in TEST_TIERS:
        raise ValueError(f"unknown test tier {tier!r}; use {', '.join(TEST_TIERS)}")
    if tier == "unit":
        return {}
    if tier == "local":
        return dict(LOCAL_TEST_PACKAGES)
    return {**LOCAL_TEST_PACKAGES, **GUEST_TEST_PACKAGES}
