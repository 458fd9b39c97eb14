"""A bootable kernel artifact and what a result needs to say about it.

Its own module so the dispatcher (`kernels`) and the two producers
(`distro_kernel`, `kernel_build`) share the type without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
