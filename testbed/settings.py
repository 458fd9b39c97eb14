"""Where netbed keeps things, and the defaults `invoke.yaml` may override.

Tasks read settings from invoke's config (namespace `netbed`), so `invoke.yaml`
and `INVOKE_NETBED_*` variables override these; library code takes a Settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

from testbed.errors import ConfigError
from testbed.vocabulary import AccelSetting, KernelName, kernel_name_problem

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO_ROOT / "images"
CONFIGS_DIR = REPO_ROOT / "configs"


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = field(default_factory=lambda: REPO_ROOT / ".cache")
    results_dir: Path = field(default_factory=lambda: REPO_ROOT / "results")
    qemu_binary: str = "qemu-system-x86_64"
    # Which QEMU starts guests: `backport` (Debian's bookworm-backports QEMU 10.0, unpacked
    # into the cache on first use; a cache-model run is faster on it: cachemodel/README.md)
    # or `system` (qemu_binary, the host's apt-installed 7.2). When the backport cannot be
    # downloaded the run says so in one line and uses the system QEMU
    # (testbed.build.qemu_backport.resolve_qemu; recorded in host.json and versions.json).
    qemu: str = "backport"
    default_kernel: KernelName = "distro"
    accel: AccelSetting = "auto"
    guest_memory_mb: int = 1024
    boot_timeout_s: float = 180.0
    ssh_timeout_s: float = 60.0
    command_timeout_s: float = 600.0
    debian_mirror: str = "http://deb.debian.org/debian"
    debian_suite: str = "bookworm"
    # How the guests' QEMU processes use the host CPUs (testbed.vm.placement).
    host_placement: str = "shared"
    # What sends the test traffic: `netns` (netperf as a host process in a network
    # namespace on the data-plane bridge; testbed.vm.netns) or `guest` (a second QEMU
    # guest). netns needs the tap data plane (root); without it the sender is a guest.
    # netns is the default from the measurements in docs/measurement.md (#11): a second QEMU on the
    # host CPUs halved the receiver's throughput and spread the model's counts more.
    sender: str = "netns"
    # QEMU -icount under TCG ("" off; e.g. "shift=auto", "shift=7"): guest time follows
    # the instructions executed, not the host clock (#11). Forces one TCG thread per guest.
    tcg_icount: str = ""

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> Settings:
        """Build from invoke's `netbed` config section, ignoring unknown keys invoke adds."""
        data = dict(data or {})
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data and data[f.name] is not None:
                value = data[f.name]
                if f.name.endswith("_dir"):
                    value = Path(value).expanduser()
                    if not value.is_absolute():
                        value = REPO_ROOT / value
                kwargs[f.name] = type(getattr(cls(), f.name))(value)
        for name, allowed in CHOICES.items():
            if name in kwargs and kwargs[name] not in allowed:
                raise ConfigError(f"netbed setting {name}: {kwargs[name]!r} is not allowed",
                                  hint=f"use one of {', '.join(allowed)} (invoke.yaml, "
                                       f"~/.invoke.yaml or INVOKE_NETBED_{name.upper()})")
        # membership (distro or a variant of the kernels file) is checked where the
        # kernel is used (testbed.build.kernels), which knows the file
        if "default_kernel" in kwargs and (problem := kernel_name_problem(
                kwargs["default_kernel"])):
            raise ConfigError(f"netbed setting default_kernel: {problem}",
                              hint="use distro or a variant of configs/kernels.yaml (invoke.yaml, "
                                   "~/.invoke.yaml or INVOKE_NETBED_DEFAULT_KERNEL)")
        icount = str(kwargs.get("tcg_icount", ""))
        if icount and not ICOUNT_RE.fullmatch(icount):
            raise ConfigError(f"netbed setting tcg_icount: {icount!r} is not allowed",
                              hint="use '' (off), shift=auto or shift=N (0-10), optionally "
                                   "with ,sleep=on|off or ,align=on|off (QEMU's -icount)")
        return cls(**kwargs)

    def as_invoke_config(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
                for f in fields(self)}


ICOUNT_RE = re.compile(r"shift=(auto|[0-9]|10)(,sleep=(on|off))?(,align=(on|off))?")

# Settings with a fixed set of values, checked when read from invoke's config.
CHOICES: dict[str, tuple[str, ...]] = {"accel": get_args(AccelSetting),
                                       "host_placement": ("shared", "disjoint"),
                                       "qemu": ("system", "backport"),
                                       "sender": ("guest", "netns")}
