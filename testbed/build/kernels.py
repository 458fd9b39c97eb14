"""Kernel names -> bootable kernel artifacts.

`distro` is Debian's prebuilt kernel (extracted from its .deb, never installed on
the host; its NIC drivers are modules, packed as an extra initramfs archive);
`stock` and `patched` are built from one source and one config by
`testbed.build.kernel_build` and have the NIC drivers built in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import NetbedError
from testbed.settings import Settings

KERNEL_NAMES = ("distro", "stock", "patched")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel and what a result needs to say about it."""

    name: str
    bzimage: Path
    release: str
    # Extra initramfs (newc cpio) with the modules this kernel needs, or None when
    # the drivers are built in. Appended after the rootfs archive.
    modules_cpio: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)



def check_kernel_name(name: str) -> None:
    if name not in KERNEL_NAMES:
        raise NetbedError(f"unknown kernel {name!r}",
                          hint=f"use one of: {', '.join(KERNEL_NAMES)}")


def get_kernel(name: str, settings: Settings, log: Log = print) -> Kernel:
    """Return the named kernel, building or extracting it first when it is not cached."""
    check_kernel_name(name)
    if name == "distro":
        from testbed.build.distro_kernel import ensure_distro_kernel

        return ensure_distro_kernel(settings, log)
    from testbed.build.kernel_build import ensure_built

    return ensure_built(name, settings, log)
