"""The receive-path read-back: guest commands that print NIC, IRQ and steering state, and
their parsers (pure).

Three scripts run in the receiver: `nic_info_command` finds the data NIC by its
MAC, `readback_commands` prints the state a policy controls as `key=value` lines
(plus the raw `ethtool -k` table, each line prefixed `ethtool: `), and
`reader_affinity_command` prints where netserver's data process may run.
`parse_readback` turns their output into a `Readback`; comparing it with a
policy is `testbed.experiment.nicstate.diff_readback`. The CPU list and mask
spellings the kernel uses (smp_affinity_list, rps_cpus) are here too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import NetbedError
from testbed.formats.offloads import parse_ethtool_features

ABSENT = "<absent>"
RAW = "readback.json"  # policy state read back from the receiver
RAW_AFFINITY = "reader-affinity.txt"  # the reader's CPU affinity as read back
FILES = (RAW, RAW_AFFINITY)
SYSCTL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
ETHTOOL_PREFIX = "ethtool: "


def sysctl_path(key: str) -> str:
    """net.core.rps_sock_flow_entries -> /proc/sys/net/core/rps_sock_flow_entries."""
    return "/proc/sys/" + key.replace(".", "/")


# ---------------------------------------------------------------- CPU lists and masks

def fmt_cpulist(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5', the format of smp_affinity_list."""
    xs = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5); '' -> ()."""
    out: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out |= set(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return tuple(sorted(out))


def cpu_mask(cpus: Iterable[int]) -> str:
    """CPUs -> the hex mask rps_cpus takes; 32-bit groups joined by ',' like the kernel."""
    value = 0
    for c in cpus:
        value |= 1 << c
    text = f"{value:x}"
    if len(text) <= 8:
        return text
    text = text.zfill((len(text) + 7) // 8 * 8)
    return ",".join(text[i:i + 8] for i in range(0, len(text), 8))


def parse_mask(text: str) -> tuple[int, ...]:
    """'00000000,00000003' or '3' -> (0, 1)."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)


# ---------------------------------------------------------------- read-back

def readback_commands(iface: str, irqs: Sequence[int], sysctl_keys: Iterable[str] = (
        "net.core.rps_sock_flow_entries",)) -> str:
    """One POSIX sh script whose output `parse_readback` understands.

    Reads every rx queue of `iface` (not only the ones a policy was applied to),
    the IRQs' requested and effective affinity, the given sysctls (`<absent>`
    when the kernel lacks one) and the `ethtool -k` table as printed.
    Pass `resolved.sysctl_keys` to read what a policy set.
    """
    if not IFACE_RE.match(iface):
        raise NetbedError(f"bad interface name {iface!r}")
    lines = [f'echo "iface={iface}"']
    for irq in irqs:
        for knob in ("smp_affinity_list", "effective_affinity_list"):
            p = f"/proc/irq/{int(irq)}/{knob}"
            lines.append(f'if [ -r {p} ]; then echo "irq.{int(irq)}.{knob}=$(cat {p})"; '
                         f'else echo "irq.{int(irq)}.{knob}={ABSENT}"; fi')
    lines.append(
        f"for q in /sys/class/net/{iface}/queues/rx-*; do [ -e \"$q\" ] || continue; "
        'n=${q##*/}; for f in rps_cpus rps_flow_cnt; do '
        f'if [ -r "$q/$f" ]; then echo "queue.$n.$f=$(cat "$q/$f")"; '
        f'else echo "queue.$n.$f={ABSENT}"; fi; done; done')
    for k in dict.fromkeys(sysctl_keys):
        if not SYSCTL_RE.match(k):
            raise NetbedError(f"bad sysctl name {k!r}")
        p = sysctl_path(k)
        lines.append(f'if [ -e {p} ]; then echo "sysctl.{k}=$(cat {p})"; '
                     f'else echo "sysctl.{k}={ABSENT}"; fi')
    lines.append(f"ethtool -k {iface} 2>/dev/null | sed 's/^/{ETHTOOL_PREFIX}/'")
    return "\n".join(lines) + "\n"


def reader_affinity_command() -> str:
    """Shell script printing `reader.<pid>=<cpulist>`: the allowed CPUs of netserver's data
    process (the newest child of the netserver daemon, as the reader sampler picks it).

    Run it while netperf runs (after warmup): the data process exists only then.
    Its output can be appended to the read-back text; `diff_readback` then checks
    that a pinned reader is pinned where the policy said.
    """
    return ('d=$(pgrep -o -x netserver) && p=$(pgrep -n -x -P "$d" netserver) && '
            'echo "reader.$p=$(sed -n \'s/^Cpus_allowed_list:[[:space:]]*//p\' /proc/$p/status)"'
            ' || echo "reader.none=' + ABSENT + '"\n')


@dataclass(frozen=True)
class Readback:
    """What the guest reported; None / ABSENT mark knobs that could not be read."""

    iface: str | None = None
    irq_affinity: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    irq_effective: dict[int, tuple[int, ...] | None] = field(default_factory=dict)
    rps_cpus: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    rps_flow_cnt: dict[str, int | None] = field(default_factory=dict)
    sysctls: dict[str, str | None] = field(default_factory=dict)  # None: not on this kernel
    offloads: dict[str, str] = field(default_factory=dict)  # `ethtool -k`: "on [fixed]"
    unparsed: tuple[str, ...] = ()
    # netserver data process pid -> allowed CPUs; empty when not read, {-1: None} when
    # reader_affinity_command found no data process
    reader_affinity: dict[int, tuple[int, ...] | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for readback.json."""
        def cl(v: tuple[int, ...] | None) -> str | None:
            return None if v is None else fmt_cpulist(v)
        return {
            "iface": self.iface,
            "irq_affinity": {str(k): cl(v) for k, v in self.irq_affinity.items()},
            "irq_effective": {str(k): cl(v) for k, v in self.irq_effective.items()},
            "rps_cpus": {k: None if v is None else cpu_mask(v) for k, v in self.rps_cpus.items()},
            "rps_flow_cnt": dict(self.rps_flow_cnt),
            "sysctls": dict(self.sysctls),
            "offloads": dict(self.offloads),
            "reader_affinity": {str(k): cl(v) for k, v in self.reader_affinity.items()},
            "unparsed": list(self.unparsed),
        }


def parse_readback(text: str) -> Readback:
    """Parse the output of `readback_commands`; lines it does not know are kept, not dropped."""
    iface: str | None = None
    aff: dict[int, tuple[int, ...] | None] = {}
    eff: dict[int, tuple[int, ...] | None] = {}
    rps: dict[str, tuple[int, ...] | None] = {}
    flow: dict[str, int | None] = {}
    sysctls: dict[str, str | None] = {}
    ethtool: list[str] = []
    reader: dict[int, tuple[int, ...] | None] = {}
    unparsed: list[str] = []
    for raw in text.splitlines():
        if raw.startswith(ETHTOOL_PREFIX):
            ethtool.append(raw.removeprefix(ETHTOOL_PREFIX))
            continue
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        absent = value == ABSENT
        try:
            if not sep:
                raise ValueError
            if key == "iface":
                iface = value
            elif key.startswith("irq."):
                _, num, knob = key.split(".", 2)
                target = {"smp_affinity_list": aff, "effective_affinity_list": eff}[knob]
                target[int(num)] = None if absent else parse_cpulist(value)
            elif key.startswith("queue."):
                _, queue, knob = key.split(".", 2)
                if knob == "rps_cpus":
                    rps[queue] = None if absent else parse_mask(value)
                elif knob == "rps_flow_cnt":
                    flow[queue] = None if absent else int(value)
                else:
                    raise ValueError
            elif key.startswith("sysctl."):
                sysctls[key.removeprefix("sysctl.")] = None if absent else " ".join(value.split())
            elif key.startswith("reader."):
                pid = key.removeprefix("reader.")
                reader[-1 if pid == "none" else int(pid)] = None if absent else parse_cpulist(value)
            else:
                raise ValueError
        except (ValueError, KeyError):
            unparsed.append(raw)
    offloads = parse_ethtool_features("\n".join(ethtool))
    return Readback(iface, aff, eff, rps, flow, sysctls, offloads, tuple(unparsed), reader)


# ---------------------------------------------------------------- which NIC, which IRQs

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class NicInfo:
    """The data NIC as the guest sees it.

    Interface names are not stable: with the distro kernel an e1000 data NIC
    came up as eth0 and the virtio management NIC as eth1 (module load order),
    so the data NIC is found by its MAC address, never by name.
    """

    iface: str
    device: str   # basename of /sys/class/net/<iface>/device: "virtio2" or "0000:00:03.0"
    driver: str   # "e1000", "virtio_net"

    @property
    def irq_names(self) -> list[str]:
        """Names for `find_nic_irqs`: e1000 names its IRQ after the interface, virtio-net
        after the virtio device (virtio2-input.0, virtio2-output.0, virtio2-config)."""
        return [self.iface, self.device] if self.device.startswith("virtio") else [self.iface]


def nic_info_command(mac: str) -> str:
    """Shell script printing iface=/device=/driver= lines for the NIC with this MAC."""
    mac = mac.lower()
    if not _MAC_RE.match(mac):
        raise NetbedError(f"bad MAC address {mac!r}")
    return ('for d in /sys/class/net/*; do '
            f'[ "$(cat "$d/address" 2>/dev/null)" = "{mac}" ] || continue; '
            'echo "iface=${d##*/}"; '
            'echo "device=$(basename "$(readlink -f "$d/device")")"; '
            'echo "driver=$(basename "$(readlink -f "$d/device/driver")")"; done\n')


def parse_nic_info(text: str, mac: str = "") -> NicInfo:
    """Output of `nic_info_command` -> NicInfo; a NetbedError when the MAC was not found."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep:
            found.setdefault(key, []).append(value.strip())
    ifaces = found.get("iface", [])
    if len(ifaces) != 1:
        what = "no interface" if not ifaces else f"{len(ifaces)} interfaces ({', '.join(ifaces)})"
        raise NetbedError(f"{what} with MAC {mac or '?'} in the guest",
                          hint="check the guest's data NIC (ip -o link) and the MAC qemu gave it")
    return NicInfo(ifaces[0], (found.get("device") or [""])[0], (found.get("driver") or [""])[0])


# ---------------------------------------------------------------- /proc/interrupts

def cpu_header(line: str, what: str) -> list[str]:
    """The CPU numbers of a 'CPU0 CPU1 ...' header (/proc/interrupts, /proc/softirqs)."""
    cpus = line.split()
    if not cpus or not all(re.fullmatch(r"CPU\d+", c) for c in cpus):
        raise NetbedError(f"{what}: first line should list CPU0 CPU1 ..., got {line[:80]!r}")
    return [c[3:] for c in cpus]


# The token between the chip and the device names: "11-fasteoi", "49152-edge" (x86,
# current kernels); older or other architectures print a bare number and Edge/Level.
_HWIRQ_RE = re.compile(r"^(\d+(-\S+)?|-\S+|Edge|Level|edge|level)$")


@dataclass(frozen=True)
class IrqLine:
    """One line of /proc/interrupts, as `interrupt_lines` (the one parser of that format,
    also behind testbed.formats.procfs.parse_interrupts) reads it."""

    irq: str                    # the number ("11") or the mnemonic ("LOC", "NMI")
    counts: tuple[int, ...]     # per CPU, in header order (ERR/MIS print one count)
    desc: str                   # everything after the counts
    chip: str = ""              # numbered lines: the interrupt chip ("IO-APIC", "PCI-MSI")
    actions: tuple[str, ...] = ()  # numbered lines: the handlers ("eth0", "virtio1-input.0")

    @property
    def number(self) -> int | None:
        return int(self.irq) if self.irq.isascii() and self.irq.isdigit() else None

    @property
    def name(self) -> str:
        """The device names as printed (comma-joined when shared), else the description."""
        return ", ".join(self.actions) if self.actions else self.desc


def interrupt_lines(text: str) -> list[IrqLine]:
    """/proc/interrupts -> one IrqLine per line after the CPU header; [] for an empty text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return []
    ncpu = len(cpu_header(lines[0], "/proc/interrupts"))
    out: list[IrqLine] = []
    for line in lines[1:]:
        label, sep, rest = line.partition(":")
        if not sep:
            continue
        tokens = rest.split()
        counts: list[int] = []
        while tokens and len(counts) < ncpu and tokens[0].isascii() and tokens[0].isdigit():
            counts.append(int(tokens.pop(0)))
        irq = label.strip()
        chip = ""
        actions: tuple[str, ...] = ()
        if irq.isascii() and irq.isdigit() and tokens:
            chip = tokens[0]
            i = 1
            while i < len(tokens) - 1 and _HWIRQ_RE.match(tokens[i]):
                i += 1
            actions = tuple(a.strip() for a in " ".join(tokens[i:]).split(",") if a.strip())
        out.append(IrqLine(irq, tuple(counts), " ".join(tokens), chip, actions))
    return out


def parse_interrupts(text: str) -> list[IrqLine]:
    """The numbered IRQ lines of /proc/interrupts (NMI, LOC, ... are skipped)."""
    return [ln for ln in interrupt_lines(text) if ln.number is not None]


def _action_matches(action: str, name: str) -> bool:
    return action == name or action.startswith((name + "-", name + "."))


def find_nic_irqs(proc_interrupts: str, names: list[str]) -> list[int]:
    """IRQ numbers with an action named after one of `names`.

    A name matches the action itself or its per-queue variants: "eth1" matches
    "eth1" and "eth1-rx-0" (not "eth10"); "virtio1" matches "virtio1-input.0",
    "virtio1-output.0" and "virtio1-config"; "virtio1-input" only the input queues.
    """
    return sorted({int(ln.irq) for ln in parse_interrupts(proc_interrupts)
                   if any(_action_matches(a, n) for a in ln.actions for n in names)})


def shared_irqs(proc_interrupts: str, irqs: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """Those of `irqs` whose line has more than one action (pinning them moves others too)."""
    wanted = set(irqs)
    return {int(ln.irq): ln.actions for ln in parse_interrupts(proc_interrupts)
            if int(ln.irq) in wanted and len(ln.actions) > 1}
