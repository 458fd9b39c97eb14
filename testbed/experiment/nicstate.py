"""The guest's receive-path state: which NIC and IRQs, reading the state back, comparing.

Pure: commands are returned as shell text, outputs are parsed from strings
(tests use /proc/interrupts and read-backs captured from real guests). The
policy side (what state is wanted, and the commands that set it) is in
testbed.experiment.policies, which re-exports everything here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from testbed.errors import NetbedError

if TYPE_CHECKING:
    from testbed.experiment.policies import ResolvedPolicy

ABSENT = "<absent>"
SYSCTL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")


def sysctl_path(key: str) -> str:
    """net.core.rps_sock_flow_entries -> /proc/sys/net/core/rps_sock_flow_entries."""
    return "/proc/sys/" + key.replace(".", "/")


# ---------------------------------------------------------------- CPU list helpers

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
    """One POSIX sh script printing `key=value` lines that `parse_readback` understands.

    Reads every rx queue of `iface` (not only the ones a policy was applied to),
    the IRQs' requested and effective affinity, the given sysctls (`<absent>`
    when the kernel lacks one) and all `ethtool -k` offloads.
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
    lines.append(
        f"ethtool -k {iface} 2>/dev/null | while IFS=' \t:' read -r k v rest; do "
        'case "$k" in Features*|"") continue;; esac; '
        'echo "offload.$k=$v${rest:+ $rest}"; done')
    return "\n".join(lines) + "\n"


def reader_affinity_command() -> str:
    """Shell script printing `reader.<pid>=<cpulist>`: the allowed CPUs of netserver's data
    process (the newest child of the netserver daemon, as measure's sampler picks it).

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
    offloads: dict[str, str] = field(default_factory=dict)
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
    offloads: dict[str, str] = {}
    reader: dict[int, tuple[int, ...] | None] = {}
    unparsed: list[str] = []
    for raw in text.splitlines():
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
            elif key.startswith("offload."):
                offloads[key.removeprefix("offload.")] = value
            elif key.startswith("reader."):
                pid = key.removeprefix("reader.")
                reader[-1 if pid == "none" else int(pid)] = None if absent else parse_cpulist(value)
            else:
                raise ValueError
        except (ValueError, KeyError):
            unparsed.append(raw)
    return Readback(iface, aff, eff, rps, flow, sysctls, offloads, tuple(unparsed), reader)


def diff_readback(resolved: ResolvedPolicy, readback: Readback, *,
                  gro: bool | None = None) -> list[str]:
    """Differences between what `resolved` asked for and what the guest reports.

    Empty when they match. Each entry names the knob, what was wanted and what
    the guest has, so a failed cell says exactly what went wrong.
    """
    out: list[str] = []
    want_aff = fmt_cpulist(resolved.irq_cpus)
    if not readback.irq_affinity:
        out.append("irq affinity: no NIC IRQ was read back (did find_nic_irqs find the NIC?)")
    for irq, got in sorted(readback.irq_affinity.items()):
        if got is None:
            out.append(f"irq {irq} smp_affinity_list: wanted {want_aff}, got <unreadable>")
        elif got != resolved.irq_cpus:
            out.append(f"irq {irq} smp_affinity_list: wanted {want_aff}, got {fmt_cpulist(got)}")
    if not readback.rps_cpus:
        out.append("rps_cpus: no rx queue was read back (wrong interface name?)")
    want_mask = resolved.rps_mask
    for q, got_cpus in sorted(readback.rps_cpus.items()):
        if got_cpus is None or got_cpus != resolved.rps_cpus:
            shown = "<unreadable>" if got_cpus is None else cpu_mask(got_cpus)
            out.append(f"{q} rps_cpus: wanted {want_mask}, got {shown}")
    for q, got_cnt in sorted(readback.rps_flow_cnt.items()):
        if got_cnt != resolved.rps_flow_cnt:
            shown = "<unreadable>" if got_cnt is None else str(got_cnt)
            out.append(f"{q} rps_flow_cnt: wanted {resolved.rps_flow_cnt}, got {shown}")
    wanted = {"net.core.rps_sock_flow_entries": str(resolved.rps_sock_flow_entries),
              **resolved.sysctls}
    for k, v in wanted.items():
        got_v = readback.sysctls.get(k, "<not read back>")
        if got_v is None:
            out.append(f"sysctl {k}: wanted {v}, got {ABSENT} (this kernel does not have it)")
        elif " ".join(str(got_v).split()) != " ".join(v.split()):
            out.append(f"sysctl {k}: wanted {v}, got {got_v}")
    for k, v in resolved.sysctls_if_present.items():
        got_v = readback.sysctls.get(k, "<not read back>")
        if got_v is not None and " ".join(str(got_v).split()) != " ".join(v.split()):
            out.append(f"sysctl {k}: wanted {v}, got {got_v}")
    if resolved.reader_cpu is not None and readback.reader_affinity:
        for pid, cpus in sorted(readback.reader_affinity.items()):
            if pid == -1 or cpus is None:
                out.append(f"reader affinity: wanted {resolved.reader_cpu}, got no netserver "
                           "data process")
            elif cpus != (resolved.reader_cpu,):
                out.append(f"reader affinity (netserver pid {pid}): wanted "
                           f"{resolved.reader_cpu}, got {fmt_cpulist(cpus)}")
    if gro is not None:
        want = "on" if gro else "off"
        got_gro = readback.offloads.get("generic-receive-offload", "<not read back>")
        if got_gro.split(" ")[0] != want:
            out.append(f"generic-receive-offload: wanted {want}, got {got_gro}")
    return out


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

@dataclass(frozen=True)
class IrqLine:
    """One numbered line of /proc/interrupts."""

    irq: int
    counts: tuple[int, ...]
    chip: str
    actions: tuple[str, ...]


_HWIRQ_RE = re.compile(r"^(\d+(-\S+)?|-\S+|Edge|Level|edge|level)$")


def parse_interrupts(text: str) -> list[IrqLine]:
    """Numbered IRQ lines of /proc/interrupts (NMI, LOC, ... are skipped)."""
    lines = text.splitlines()
    if not lines:
        return []
    ncpu = len(re.findall(r"CPU\d+", lines[0]))
    out: list[IrqLine] = []
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        tokens = rest.split()
        counts = tokens[:ncpu]
        if len(counts) < ncpu or not all(c.isdigit() for c in counts):
            continue
        tail = tokens[ncpu:]
        chip = tail[0] if tail else ""
        i = 1
        while i < len(tail) - 1 and _HWIRQ_RE.match(tail[i]):
            i += 1
        actions = tuple(a.strip() for a in " ".join(tail[i:]).split(",") if a.strip())
        out.append(IrqLine(int(head), tuple(int(c) for c in counts), chip, actions))
    return out


def _action_matches(action: str, name: str) -> bool:
    return action == name or action.startswith((name + "-", name + "."))


def find_nic_irqs(proc_interrupts: str, names: list[str]) -> list[int]:
    """IRQ numbers with an action named after one of `names`.

    A name matches the action itself or its per-queue variants: "eth1" matches
    "eth1" and "eth1-rx-0" (not "eth10"); "virtio1" matches "virtio1-input.0",
    "virtio1-output.0" and "virtio1-config"; "virtio1-input" only the input queues.
    """
    return sorted({ln.irq for ln in parse_interrupts(proc_interrupts)
                   if any(_action_matches(a, n) for a in ln.actions for n in names)})


def shared_irqs(proc_interrupts: str, irqs: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """Those of `irqs` whose line has more than one action (pinning them moves others too)."""
    wanted = set(irqs)
    return {ln.irq: ln.actions for ln in parse_interrupts(proc_interrupts)
            if ln.irq in wanted and len(ln.actions) > 1}
