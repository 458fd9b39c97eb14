"""Kernel names -> bootable kernel artifacts.

`distro` is Debian's prebuilt kernel (extracted from its .deb, never installed on
the host; its NIC drivers are modules, packed as an extra initramfs archive); every
other name is a variant of a kernels file (configs/kernels.yaml by default), built
by `testbed.build.kernel_build` with the NIC drivers built in.
"""

from __future__ import annotations

from testbed.build.distro_kernel import ensure_distro_kernel
from testbed.build.kernel import Kernel
from testbed.build.kernel_build import ensure_built
from testbed.experiment.kernelfile import KernelSet, load_kernels
from testbed.progress import Log
from testbed.settings import Settings
from testbed.vocabulary import DISTRO_KERNEL

__all__ = ["check_kernel_name", "get_kernel"]


def check_kernel_name(name: str, kernels: KernelSet | None = None) -> None:
    """`distro` or a variant of the kernels file, else a ConfigError naming the file."""
    if name != DISTRO_KERNEL:
        (kernels or load_kernels()).variant(name)


def get_kernel(name: str, settings: Settings, log: Log = print,
               kernels: KernelSet | None = None) -> Kernel:
    """Return the named kernel, building or extracting it first when it is not cached."""
    if name == DISTRO_KERNEL:
        return ensure_distro_kernel(settings, log)
    return ensure_built(name, settings, log, kernels)
