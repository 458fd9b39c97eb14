"""/proc counters: snapshot command, raw files and parsers, and their deltas.

Raw files: `proc-before/<name>` and `proc-after/<name>` for softirqs, interrupts,
softnet_stat, snmp and stat, copied as the kernel printed them. Parsers return tidy
frames (`metric`, `cpu` as a string or "all", `value`); `delta(before, after)`
subtracts two snapshots of the same file.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable

import pandas as pd

from testbed.errors import NetbedError
from testbed.formats.readback import cpu_header, interrupt_lines

# --------------------------------------------------------------------------- /proc


def parse_softirqs(text: str) -> pd.DataFrame:
    """/proc/softirqs -> rows (metric=softirq name e.g. NET_RX, cpu, value)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise NetbedError("/proc/softirqs snapshot is empty")
    cpus = cpu_header(lines[0], "/proc/softirqs")
    rows = []
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        counts = rest.split()
        for cpu, count in zip(cpus, counts, strict=False):
            rows.append({"metric": name.strip(), "cpu": cpu, "value": float(count)})
    return pd.DataFrame(rows, columns=["metric", "cpu", "value"])


def parse_interrupts(text: str) -> pd.DataFrame:
    """/proc/interrupts -> rows (irq, name, desc, cpu, value), from `interrupt_lines`.

    `irq` is the number or the mnemonic (LOC, RES, ...); `name` the device
    names (the actions, e.g. "eth0" or "virtio1-input.0", comma-joined when
    shared); `desc` the whole tail.
    """
    if not text.strip():
        raise NetbedError("/proc/interrupts snapshot is empty")
    cpus = cpu_header(next(ln for ln in text.splitlines() if ln.strip()), "/proc/interrupts")
    rows = [{"irq": ln.irq, "name": ln.name, "desc": ln.desc, "cpu": cpu, "value": float(count)}
            for ln in interrupt_lines(text)
            for cpu, count in zip(cpus, ln.counts, strict=False)]
    return pd.DataFrame(rows, columns=["irq", "name", "desc", "cpu", "value"])


# Column meanings of /proc/net/softnet_stat (Linux 6.1 prints 13, newer 15);
# columns 3-8 are unused, 11 is a gauge, 12 the CPU id. Only counters are kept.
SOFTNET_COLUMNS = {
    0: "processed",
    1: "dropped",
    2: "time_squeeze",
    9: "received_rps",
    10: "flow_limit",
}


def parse_softnet_stat(text: str) -> pd.DataFrame:
    """/proc/net/softnet_stat (hex, one row per online CPU) -> rows (metric, cpu, value).

    The CPU is column 12 where the kernel prints it (offline CPUs have no row,
    so the row index is only a fallback for old kernels).
    """
    rows = []
    for index, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        cols = [int(x, 16) for x in line.split()]
        cpu = str(cols[12]) if len(cols) > 12 else str(index)
        for col, name in SOFTNET_COLUMNS.items():
            if col < len(cols):
                rows.append({"metric": name, "cpu": cpu, "value": float(cols[col])})
    return pd.DataFrame(rows, columns=["metric", "cpu", "value"])


# /proc/net/snmp fields that are settings or gauges, not event counters.
SNMP_NOT_COUNTERS = frozenset(
    {"Ip.Forwarding", "Ip.DefaultTTL", "Tcp.RtoAlgorithm", "Tcp.RtoMin", "Tcp.RtoMax",
     "Tcp.MaxConn", "Tcp.CurrEstab"}
)


def parse_snmp(text: str) -> pd.DataFrame:
    """/proc/net/snmp header/value line pairs -> rows (metric "Tcp.RetransSegs", cpu "all")."""
    rows = []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = head.partition(":")
        proto2, _, values = vals.partition(":")
        if proto != proto2:
            raise NetbedError(f"/proc/net/snmp: header {proto!r} followed by {proto2!r}")
        for name, value in zip(names.split(), values.split(), strict=True):
            metric = f"{proto}.{name}"
            if metric not in SNMP_NOT_COUNTERS:
                rows.append({"metric": metric, "cpu": "all", "value": float(value)})
    return pd.DataFrame(rows, columns=["metric", "cpu", "value"])


STAT_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
                   "guest", "guest_nice")


def parse_proc_stat(text: str) -> pd.DataFrame:
    """/proc/stat -> per-CPU times in USER_HZ ticks ("cpu_softirq" ...) plus ctxt, intr."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        key = parts[0]
        if key.startswith("cpu"):
            cpu = key[3:] or "all"
            for fname, value in zip(STAT_CPU_FIELDS, parts[1:], strict=False):
                rows.append({"metric": f"cpu_{fname}", "cpu": cpu, "value": float(value),
                             "unit": "ticks"})
        elif key in ("ctxt", "intr", "processes", "softirq") and len(parts) > 1:
            rows.append({"metric": key, "cpu": "all", "value": float(parts[1]), "unit": ""})
    return pd.DataFrame(rows, columns=["metric", "cpu", "value", "unit"])


PROC_FILES = ("softirqs", "interrupts", "softnet_stat", "snmp", "stat")
BEFORE_DIR, AFTER_DIR = "proc-before", "proc-after"  # <dir>/<name> in a repetition
FILES = tuple(f"{d}/{n}" for d in (BEFORE_DIR, AFTER_DIR) for n in PROC_FILES)
PROC_PATHS = {
    "softirqs": "/proc/softirqs",
    "interrupts": "/proc/interrupts",
    "softnet_stat": "/proc/net/softnet_stat",
    "snmp": "/proc/net/snmp",
    "stat": "/proc/stat",
}
PROC_PARSERS = {
    "softirqs": parse_softirqs,
    "interrupts": parse_interrupts,
    "softnet_stat": parse_softnet_stat,
    "snmp": parse_snmp,
    "stat": parse_proc_stat,
}


def proc_snapshot_command(dest_dir: str) -> str:
    """Copy the /proc files into dest_dir in one go (cat is enough: they are small)."""
    parts = [f"mkdir -p {shlex.quote(dest_dir)}"]
    for name in PROC_FILES:
        parts.append(f"cat {PROC_PATHS[name]} > {shlex.quote(dest_dir + '/' + name)}")
    return " && ".join(parts)



def delta(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """after - before for two snapshots parsed by the same parser.

    Rows are matched on every non-value column; a row present in only one
    snapshot (a CPU or IRQ that appeared) gets NaN, and counters that went
    backwards (wrapped 32-bit softnet counters) are corrected modulo 2**32 only
    for softnet-style hex counters, otherwise left negative to be visible.
    """
    keys = [c for c in before.columns if c not in ("value", "running_pct")]
    if list(after.columns) != list(before.columns):
        raise NetbedError("delta(): snapshots have different columns",
                          hint="parse both with the same parser")
    # Plain dicts, not DataFrame.merge: these frames are small and a run has
    # thousands of them, where merge's fixed cost dominated collation time.
    b = dict(zip(zip(*(before[k] for k in keys), strict=True), before["value"], strict=True))
    a = dict(zip(zip(*(after[k] for k in keys), strict=True), after["value"], strict=True))
    order = list(b) + [k for k in a if k not in b]
    rows = [(*k, a.get(k, math.nan) - b.get(k, math.nan)) for k in order]
    return pd.DataFrame(rows, columns=[*keys, "value"])


def parse_proc_pair(name: str, before_text: str, after_text: str) -> pd.DataFrame:
    parser = PROC_PARSERS[name]
    d = delta(parser(before_text), parser(after_text))
    if name == "softnet_stat":
        neg = d["value"] < 0
        d.loc[neg, "value"] = d.loc[neg, "value"] + 2**32
    return d


# --------------------------------------------------------------------------- NIC IRQs

NET_IRQ_NAME_RE = re.compile(r"^(eth\d+|en[a-z0-9]+|virtio\d+-(input|output)\.\d+|"
                             r"virtio\d+-(rx|tx)|.*-TxRx-\d+)$")


def select_nic_irqs(irq_delta: pd.DataFrame, irqs: Iterable[str | int] | None = None,
                    ) -> tuple[list[str], str]:
    """Which /proc/interrupts lines belong to the data NIC, and how that was decided.

    Read-back IRQ numbers win (an explicit empty list means "none"). Otherwise
    the network-named lines are grouped by device (virtioN / ethN) and the
    device whose IRQs fired most during the window is taken: the management NIC
    stays quiet while measuring.
    """
    if irqs is not None:
        wanted = [str(i) for i in irqs]
        return [i for i in wanted if i in set(irq_delta["irq"])], "readback"
    names = irq_delta.drop_duplicates("irq")[["irq", "name"]]
    net = names[names["name"].map(lambda n: any(NET_IRQ_NAME_RE.match(p.strip())
                                                  for p in str(n).split(",")))]
    if net.empty:
        return [], "none-found"
    totals = irq_delta[irq_delta["irq"].isin(net["irq"])].groupby("irq")["value"].sum()
    device = net.set_index("irq")["name"].map(lambda n: re.split(r"[-.]", n)[0])
    by_device = totals.groupby(device).sum()
    best = str(by_device.idxmax())
    chosen = [i for i in net["irq"] if device[i] == best]
    return chosen, f"busiest-net-device:{best}"
