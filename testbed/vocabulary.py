"""The words netbed's layers share: kernel, NIC, workload and counter names, the axes.

Defined once here, as Literal types with their tuples derived from them, so a
config validator, the QEMU argv builder, the runner and the analysis cannot drift
apart. Adding a NIC model means adding it here (and its device properties in
`testbed.vm.qemu`).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from testbed.errors import ConfigError

# Kernel names are open: `distro` (Debian's packaged kernel) and the variants of a
# kernels file (configs/kernels.yaml; testbed.experiment.kernelfile), so the type is
# text of a fixed form and membership is checked against the file.
KernelName = str
DISTRO_KERNEL = "distro"
MAX_KERNEL_NAME = 32         # part of every cell id, and so of a folder name
_KERNEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
NicName = Literal["e1000", "virtio", "virtio-nocsum", "virtio-notso"]
WorkloadName = Literal["TCP_STREAM", "TCP_MAERTS", "TCP_RR"]
CounterName = Literal["auto", "software", "hardware", "cachemodel"]
OrderName = Literal["sequential", "interleaved", "random"]
Accel = Literal["kvm", "tcg"]
AccelSetting = Literal["auto", "kvm", "tcg"]
TcgThreads = Literal["multi", "single"]

# Where netbed's commands keep their files on the sender and the receiver: a guest's
# /tmp, or the native sender's per-boot directory bound there (testbed.vm.netns).
GUEST_DIR = "/tmp/netbed"

NIC_NAMES: tuple[NicName, ...] = get_args(NicName)
WORKLOAD_NAMES: tuple[WorkloadName, ...] = get_args(WorkloadName)
COUNTER_NAMES: tuple[CounterName, ...] = get_args(CounterName)
TCG_THREADS: tuple[TcgThreads, ...] = get_args(TcgThreads)

# The axes of an experiment matrix, in the order cell ids and tables use.
# `rcvbuf` (the copy-lag axis, docs/copy-lag.md) comes last: a cell id gets a part
# for it only when it is not `auto`.
AXES: tuple[str, ...] = ("kernel", "nic", "cpus", "policy", "workload", "gro", "rcvbuf")
# The same axes as columns of analysis tables: the workload splits into its name and
# its message size (`Cell.flat()`).
TABLE_AXES: tuple[str, ...] = ("kernel", "nic", "cpus", "policy", "workload", "message_size",
                               "gro", "rcvbuf")


def kernel_name_problem(name: str) -> str | None:
    """Why `name` cannot be a kernel name, or None (its form only, not whether it exists)."""
    if not _KERNEL_NAME_RE.match(name) or len(name) > MAX_KERNEL_NAME:
        return (f"kernel name {name[:40]!r} must be lowercase letters, digits, '.' and '-', "
                f"starting with a letter or digit, at most {MAX_KERNEL_NAME} (it becomes "
                "part of cell ids and folder names)")
    return None


def nic_name(text: str) -> NicName:
    """A NIC name typed on a command line, checked against the vocabulary."""
    for name in NIC_NAMES:
        if name == text:
            return name
    raise ConfigError(f"unknown NIC {text!r}", hint=f"use one of {', '.join(NIC_NAMES)}")
