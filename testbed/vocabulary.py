"""The words netbed's layers share: kernel, NIC, workload and counter names, the axes.

Defined once here, as Literal types with their tuples derived from them, so a
config validator, the QEMU argv builder, the runner and the analysis cannot drift
apart. Adding a NIC model means adding it here (and its device properties in
`testbed.vm.qemu`).
"""

from __future__ import annotations

from typing import Literal, get_args

from testbed.errors import ConfigError

KernelName = Literal["distro", "stock", "patched", "affine-copy"]
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

KERNEL_NAMES: tuple[KernelName, ...] = get_args(KernelName)
NIC_NAMES: tuple[NicName, ...] = get_args(NicName)
WORKLOAD_NAMES: tuple[WorkloadName, ...] = get_args(WorkloadName)
COUNTER_NAMES: tuple[CounterName, ...] = get_args(CounterName)
TCG_THREADS: tuple[TcgThreads, ...] = get_args(TcgThreads)

# The axes of an experiment matrix, in the order cell ids and tables use.
AXES: tuple[str, ...] = ("kernel", "nic", "cpus", "policy", "workload", "gro")
# The same axes as columns of analysis tables: the workload splits into its name and
# its message size (`Cell.flat()`).
TABLE_AXES: tuple[str, ...] = ("kernel", "nic", "cpus", "policy", "workload", "message_size",
                               "gro")


def nic_name(text: str) -> NicName:
    """A NIC name typed on a command line, checked against the vocabulary."""
    for name in NIC_NAMES:
        if name == text:
            return name
    raise ConfigError(f"unknown NIC {text!r}", hint=f"use one of {', '.join(NIC_NAMES)}")
