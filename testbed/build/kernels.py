"""Kernel names -> bootable kernel artifacts.

`distro` is Debian's prebuilt kernel (extracted from its .deb, never installed on
the host; its NIC drivers are modules, packed as an extra initramfs archive); every
other name is a variant of a kernels file (configs/kernels.yaml by default), built
by `testbed.build.kernel_build` with the NIC drivers built in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from testbed.build.distro_kernel import ensure_distro_kernel
from testbed.build.kernel import Kernel
from testbed.build.kernel_build import ensure_built, find_built
from testbed.build.kernel_source import known_source
from testbed.experiment.kernelfile import KernelSet, Variant, load_kernels
from testbed.progress import Log
from testbed.settings import Settings
from testbed.vocabulary import DISTRO_KERNEL

__all__ = ["build_order", "check_kernel_name", "get_kernel", "variant_statuses"]


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


@dataclass(frozen=True)
class VariantStatus:
    """One line of `invoke doctor`: a variant and whether its kernel is in the cache."""

    name: str
    base: str
    patches: int
    built: bool | None        # None: the source is not here yet, so the key is unknown
    release: str = ""
    path: str = ""

    def text(self) -> str:
        state = ("source not fetched yet" if self.built is None else
                 f"built {self.release}" if self.built else "not built")
        return (f"{self.name:<14} {self.base:<12} {self.patches} patch"
                f"{'es' if self.patches != 1 else ''}  {state}")


def variant_statuses(settings: Settings, kernels: KernelSet | None = None
                     ) -> list[VariantStatus]:
    """Every variant of the file, built or not (nothing is installed or fetched)."""
    kset = kernels or load_kernels()
    out = []
    for v in kset.variants.values():
        source = known_source(v.base, settings)
        kernel = find_built(v, source, settings) if source is not None else None
        out.append(VariantStatus(v.name, v.base.name, len(v.patches),
                                 None if source is None else kernel is not None,
                                 kernel.release if kernel else "",
                                 str(kernel.bzimage) if kernel else ""))
    return out


def build_order(names: Sequence[str], kernels: KernelSet) -> list[Variant]:
    """The variants to build for `names` (`all`: every one), each base's unpatched ones
    first, so the patched ones start from a compiled tree."""
    chosen = list(kernels.variants.values()) if list(names) == ["all"] else [
        kernels.variant(n) for n in names]
    return sorted(chosen, key=lambda v: bool(v.patches))
