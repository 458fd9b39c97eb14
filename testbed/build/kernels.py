"""Kernel names -> bootable kernel artifacts.

`distro` is Debian's prebuilt kernel (extracted from its .deb, never installed on
the host; its NIC drivers are modules, packed as an extra initramfs archive);
`stock` and `patched` are built from one source and one config by
`testbed.build.kernel_build` and have the NIC drivers built in.
"""

from __future__ import annotations

from testbed.build.distro_kernel import ensure_distro_kernel
from testbed.build.kernel import Kernel
from testbed.build.kernel_build import ensure_built
from testbed.errors import NetbedError
from testbed.progress import Log
from testbed.settings import Settings
from testbed.vocabulary import KERNEL_NAMES

__all__ = ["KERNEL_NAMES", "check_kernel_name", "get_kernel"]


def check_kernel_name(name: str) -> None:
    if name not in KERNEL_NAMES:
        raise NetbedError(f"unknown kernel {name!r}",
                          hint=f"use one of: {', '.join(KERNEL_NAMES)}")


def get_kernel(name: str, settings: Settings, log: Log = print) -> Kernel:
    """Return the named kernel, building or extracting it first when it is not cached."""
    check_kernel_name(name)
    if name == "distro":
        return ensure_distro_kernel(settings, log)
    return ensure_built(name, settings, log)
