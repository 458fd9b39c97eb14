"""Measurement commands (pure strings) and parsers of the tools' raw output (pure).

Nothing here runs anything: the runner sends the command strings to a guest and
stores the output verbatim, and `analysis/` feeds the stored text back through
the parsers. Keeping both halves in one module keeps a command and the parser
of its output next to each other, so a change of selectors or separators cannot
silently break the other half.

Counter parsers return tidy DataFrames with columns `metric`, `cpu` (the CPU
number as a string, or "all"), `value` (float) and, where a tool says so, `unit`
and `status` ("ok", "not-supported", "not-counted"); `delta(before, after)`
subtracts two snapshots of the same file.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from testbed.errors import NetbedError

# --------------------------------------------------------------------------- netperf

WORKLOADS = ("TCP_STREAM", "TCP_MAERTS", "TCP_RR")

# Omni output selectors asked of every test. Unknown selectors would make netperf
# fail, so this list only names selectors netperf 2.7 documents.
NETPERF_SELECTORS: tuple[str, ...] = (
    "THROUGHPUT",
    "THROUGHPUT_UNITS",
    "ELAPSED_TIME",
    "PROTOCOL",
    "DIRECTION",
    "LOCAL_CPU_UTIL",
    "REMOTE_CPU_UTIL",
    "LOCAL_CPU_BIND",
    "REMOTE_CPU_BIND",
    "LOCAL_TRANSPORT_RETRANS",
    "REMOTE_TRANSPORT_RETRANS",
    "TRANSPORT_MSS",
    "LOCAL_SEND_SIZE",
    "LOCAL_RECV_SIZE",
    "REMOTE_SEND_SIZE",
    "REMOTE_RECV_SIZE",
)
# Request/response adds the transaction rate and the latency distribution; the
# percentiles need the global `-j` flag (netperf keeps a histogram only then).
NETPERF_RR_SELECTORS: tuple[str, ...] = (
    "TRANSACTION_RATE",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "RT_LATENCY",
    "MEAN_LATENCY",
    "MIN_LATENCY",
    "P50_LATENCY",
    "P90_LATENCY",
    "P99_LATENCY",
    "MAX_LATENCY",
    "STDDEV_LATENCY",
)


class WorkloadLike(Protocol):
    """What the command builder needs of a workload (testbed.experiment.config's model has it)."""

    name: str
    message_size: int


def netperf_command(
    host: str,
    workload: WorkloadLike,
    duration: float,
    remote_cpu: int | None,
    local_cpu: int | None = None,
    timeout_margin: float = 30,
) -> str:
    """The netperf client command run on the SENDER VM against netserver on the receiver.

    `-T local,remote` binds netserver's data process on the receiver (the reader
    whose location the policies control); `-c -C` asks both sides for CPU
    utilisation; the classic test names run as omni "migrated" tests, which
    accept `-k` output selectors and print KEY=VALUE lines. The whole command is
    wrapped in `timeout` because Fabric's timeout closes the channel but leaves
    the remote process running.
    """
    name = workload.name.upper()
    if name not in WORKLOADS:
        raise NetbedError(
            f"unknown netperf workload {workload.name!r}",
            hint=f"use one of: {', '.join(WORKLOADS)}",
        )
    size = int(workload.message_size)
    if size <= 0:
        raise NetbedError(
            f"workload {name}: message_size must be a positive byte count, got {size}",
            hint="set message_size to e.g. 16384 (STREAM/MAERTS) or 1 (RR)",
        )
    seconds = _whole_seconds(duration)
    selectors = list(NETPERF_SELECTORS)
    glob = ["netperf", "-P", "0", "-H", host, "-t", name, "-l", str(seconds), "-c", "-C"]
    if name == "TCP_RR":
        glob.append("-j")
        selectors += NETPERF_RR_SELECTORS
    if remote_cpu is not None or local_cpu is not None:
        local = "" if local_cpu is None else str(int(local_cpu))
        remote = "" if remote_cpu is None else str(int(remote_cpu))
        glob += ["-T", f"{local},{remote}"]
    if name == "TCP_STREAM":
        test = ["-m", str(size)]
    elif name == "TCP_MAERTS":
        # In MAERTS the remote (netserver) sends; "local,remote" sets both sizes so
        # the receiver's send size is the one asked for whichever side netperf uses.
        test = ["-m", f"{size},{size}"]
    else:
        test = ["-r", f"{size},{size}"]
    test += ["-k", ",".join(selectors)]
    limit = seconds + max(1, math.ceil(timeout_margin))
    argv = ["timeout", "-k", "5", str(limit), *glob, "--", *test]
    return shlex.join(argv)


def _whole_seconds(duration: float) -> int:
    """netperf's `-l` takes whole seconds; reject what it would silently truncate."""
    if duration <= 0 or not math.isfinite(duration):
        raise NetbedError(
            f"netperf duration must be a positive number of seconds, got {duration}",
            hint="set duration to e.g. 5",
        )
    seconds = round(duration)
    if abs(seconds - duration) > 1e-9:
        raise NetbedError(
            f"netperf duration {duration} is not a whole number of seconds",
            hint=f"netperf -l takes integers: use {max(1, seconds)}",
        )
    return int(seconds)


@dataclass(frozen=True)
class NetperfResult:
    """netperf's KEY=VALUE output: the raw strings plus the numeric ones as floats."""

    raw: dict[str, str]
    values: dict[str, float]

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    @property
    def throughput_units(self) -> str:
        return self.raw.get("THROUGHPUT_UNITS", "")


_UNIT_RE = re.compile(r"^10\^(\d+)(bits|bytes)/s$")


def parse_netperf(text: str) -> NetperfResult:
    """Parse keyval output; banner and warning lines (no '=') are ignored.

    netperf prints -1 or 0 for things it could not measure (e.g. CPU utilisation
    without a method): those are kept as printed, the reader decides.
    """
    raw: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raw[key] = value.strip()
    if "THROUGHPUT" not in raw:
        raise NetbedError(
            "netperf output has no THROUGHPUT=... line",
            hint="the test probably failed; look at netperf.txt and the guest's console log",
        )
    values: dict[str, float] = {}
    for key, value in raw.items():
        try:
            values[key] = float(value)
        except ValueError:
            continue
    return NetperfResult(raw, values)


def netperf_units_factor(units: str) -> tuple[str, float]:
    """Map THROUGHPUT_UNITS to ("bytes", bytes per unit-second) or ("trans", 1.0).

    Used to turn THROUGHPUT x ELAPSED_TIME into bytes moved or transactions done.
    """
    u = units.strip()
    if u.lower().startswith("trans"):
        return "trans", 1.0
    m = _UNIT_RE.match(u)
    if not m:
        raise NetbedError(
            f"unknown netperf THROUGHPUT_UNITS {units!r}",
            hint="expected 10^N bits/s, 10^N bytes/s or Trans/s",
        )
    scale = 10.0 ** int(m.group(1))
    return "bytes", scale / 8 if m.group(2) == "bits" else scale


# --------------------------------------------------------------------------- perf stat

PERF_SEPARATOR = ";"
SOFTWARE_EVENTS: tuple[str, ...] = (
    "task-clock",
    "context-switches",
    "cpu-migrations",
    "page-faults",
    "cpu-clock",
)
HARDWARE_EVENTS: tuple[str, ...] = (
    "cycles",
    "instructions",
    "cache-references",
    "cache-misses",
    "L1-dcache-loads",
    "L1-dcache-load-misses",
    "LLC-loads",
    "LLC-load-misses",
)


def perf_events(pmu: bool) -> list[str]:
    """Software events always; hardware cache events only where a PMU counts them."""
    return [*SOFTWARE_EVENTS, *(HARDWARE_EVENTS if pmu else ())]


def perf_stat_command(
    duration: float,
    events: Sequence[str],
    sep: str = PERF_SEPARATOR,
    output: str | None = None,
    timeout_margin: float = 30,
) -> str:
    """`perf stat -a -A -x<sep>` over a `sleep` of the measured window.

    perf writes its table to stderr; with `output` it writes to that file instead
    (`-o`), which keeps it apart from perf's own warnings.
    """
    if not events:
        raise NetbedError("perf_stat_command needs at least one event", hint="use perf_events()")
    for ev in events:
        if sep in ev:
            raise NetbedError(f"perf event {ev!r} contains the separator {sep!r}",
                              hint="choose another separator")
    if len(sep) != 1 or sep in ",:-/" or sep.isalnum():
        raise NetbedError(
            f"perf stat separator {sep!r} may appear in event names or values",
            hint="use ';'",
        )
    if duration <= 0:
        raise NetbedError(f"perf stat duration must be positive, got {duration}", hint="e.g. 5")
    argv = ["perf", "stat", "-a", "-A", f"-x{sep}"]
    if output:
        argv += ["-o", output]
    argv += ["-e", ",".join(events), "--", "sleep", f"{duration:g}"]
    limit = math.ceil(duration) + max(1, math.ceil(timeout_margin))
    return shlex.join(["timeout", "-k", "5", str(limit), *argv])


_PERF_STATUS = {"<not supported>": "not-supported", "<not counted>": "not-counted"}


def parse_perf_stat(text: str, sep: str = PERF_SEPARATOR) -> pd.DataFrame:
    """Parse `perf stat -a -A -x<sep>` rows: "CPU0;123;unit;event;runtime;pct;...".

    `<not supported>` and `<not counted>` stay visible (value NaN plus status),
    never zero: a missing counter must not read as "no cache misses". Rows for
    the same event and CPU (perf repeats them with cgroups) are summed.
    """
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(sep)
        if len(parts) < 4 or not re.fullmatch(r"CPU\d+", parts[0]):
            # perf's comments ("# started on ...") and summary lines without -A
            continue
        cpu = parts[0][3:]
        raw_value, unit, event = parts[1].strip(), parts[2].strip(), parts[3].strip()
        status = _PERF_STATUS.get(raw_value, "ok")
        value = math.nan
        if status == "ok":
            try:
                value = float(raw_value)
            except ValueError as exc:
                raise NetbedError(
                    f"perf stat line {lineno}: value {raw_value!r} is not a number",
                    hint="the file should come from `perf stat -x;` (see perf_stat_command)",
                ) from exc
        pct = _float_or_nan(parts[5]) if len(parts) > 5 else math.nan
        rows.append(
            {"metric": event, "cpu": cpu, "value": value, "unit": unit, "status": status,
             "running_pct": pct}
        )
    df = pd.DataFrame(rows, columns=["metric", "cpu", "value", "unit", "status", "running_pct"])
    if df.empty or not df.duplicated(["metric", "cpu"]).any():
        return df
    return (
        df.groupby(["metric", "cpu"], sort=False, as_index=False)
        .agg(value=("value", lambda s: s.sum(min_count=1)), unit=("unit", "first"),
             status=("status", "first"), running_pct=("running_pct", "min"))
    )


def _float_or_nan(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


# --------------------------------------------------------------------------- /proc


def _cpu_header(line: str, what: str) -> list[str]:
    cpus = line.split()
    if not cpus or not all(re.fullmatch(r"CPU\d+", c) for c in cpus):
        raise NetbedError(f"{what}: first line should list CPU0 CPU1 ..., got {line!r}")
    return [c[3:] for c in cpus]


def parse_softirqs(text: str) -> pd.DataFrame:
    """/proc/softirqs -> rows (metric=softirq name e.g. NET_RX, cpu, value)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise NetbedError("/proc/softirqs snapshot is empty")
    cpus = _cpu_header(lines[0], "/proc/softirqs")
    rows = []
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        counts = rest.split()
        for cpu, count in zip(cpus, counts, strict=False):
            rows.append({"metric": name.strip(), "cpu": cpu, "value": float(count)})
    return pd.DataFrame(rows, columns=["metric", "cpu", "value"])


_HWIRQ_RE = re.compile(r"^\d+-[A-Za-z]+$")


def parse_interrupts(text: str) -> pd.DataFrame:
    """/proc/interrupts -> rows (irq, name, desc, cpu, value).

    `irq` is the number or the mnemonic (LOC, RES, ...); `name` the device
    names (the actions, e.g. "eth0" or "virtio1-input.0", comma-joined when
    shared), found after the "<hwirq>-<type>" token; `desc` the whole tail.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise NetbedError("/proc/interrupts snapshot is empty")
    cpus = _cpu_header(lines[0], "/proc/interrupts")
    rows = []
    for line in lines[1:]:
        irq, _, rest = line.partition(":")
        tokens = rest.split()
        counts: list[str] = []
        while tokens and len(counts) < len(cpus) and tokens[0].isdigit():
            counts.append(tokens.pop(0))
        desc = " ".join(tokens)
        name = desc
        for i, tok in enumerate(tokens):
            if _HWIRQ_RE.match(tok):
                name = " ".join(tokens[i + 1 :])
                break
        for cpu, count in zip(cpus, counts, strict=False):
            rows.append({"irq": irq.strip(), "name": name, "desc": desc, "cpu": cpu,
                         "value": float(count)})
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


def receiver_window_script(out_dir: str, duration: float, events: Sequence[str],
                           interval: float = 0.1, sep: str = PERF_SEPARATOR) -> str:
    """The receiver's side of one measured window, as one shell script.

    /proc snapshots before, then `perf stat` and the reader sampler side by side
    for `duration` seconds, then /proc snapshots after; files land in `out_dir`
    with the names of the run layout (proc-before/, perf-stat.csv,
    reader-cpus.txt, proc-after/). Start it just before netperf starts on the
    sender with a `duration` that covers netperf's run; it exits with perf's
    status. Stderr of perf and the sampler go to perf.err and reader.err.
    """
    d = shlex.quote(out_dir)
    lines = [
        f"mkdir -p {d}",
        proc_snapshot_command(f"{out_dir}/proc-before"),
        f"{reader_sampler_command(duration, interval)} > {d}/reader-cpus.txt "
        f"2> {d}/reader.err & sampler=$!",
        f"{perf_stat_command(duration, events, sep, output=f'{out_dir}/perf-stat.csv')} "
        f"2> {d}/perf.err; status=$?",
        'wait "$sampler"',
        proc_snapshot_command(f"{out_dir}/proc-after"),
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


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


# --------------------------------------------------------------------------- reader location


def reader_sampler_command(duration: float, interval: float = 0.1) -> str:
    """A bash loop sampling the CPU (field 39 of /proc/<pid>/stat) of netserver's
    data process, the newest child of the netserver daemon, into "<t> <cpu>" lines.

    `t` is /proc/uptime (seconds, guest clock; the window is counted in
    centiseconds because shells have no floats). Every round is fork-free: the
    pause is `read -t` on a FIFO nobody writes (no `sleep` process) and pgrep
    runs only until the data process is found. Under TCG with netperf saturating
    both vCPUs, a loop that forked `sleep` and pgrep each round got one sample
    per second instead of ten. Samples before the data process exists are
    skipped; "# pid N" lines record which process was sampled. Needs bash,
    pgrep (procps) and mkfifo/mktemp (coreutils): no awk.
    """
    if duration <= 0 or interval <= 0:
        raise NetbedError("reader sampler needs positive duration and interval")
    script = f"""\
f=$(mktemp -u) && mkfifo "$f" && exec 9<>"$f" && rm -f "$f" || exit 1
cs() {{ read -r up _ < /proc/uptime; now=$(( ${{up%.*}} * 100 + 1${{up#*.}} - 100 )); }}
findpid() {{ d=$(pgrep -o -x netserver) && pid=$(pgrep -n -x -P "$d" netserver) || pid=; }}
cs; end=$(( now + {round(duration * 100)} )); pid=; last=
while :; do
  cs
  [ "$now" -ge "$end" ] && break
  if [ -z "$pid" ] || ! read -r s < /proc/"$pid"/stat; then
    findpid
    [ -n "$pid" ] && read -r s < /proc/"$pid"/stat || pid=
  fi 2>/dev/null
  if [ -n "$pid" ]; then
    [ "$pid" != "$last" ] && echo "# pid $pid" && last=$pid
    s=${{s##*) }}
    set -- $s
    echo "$up ${{37}}"
  fi
  read -r -t {interval:g} -u 9 _
done"""
    fallback = f"bash -c {shlex.quote(script)}"
    # nbsample (images/tools/nbsample.c, in every guest image) prints the same lines
    # without forking, so it keeps the asked rate where this loop manages 2-8 Hz.
    return (f"if command -v nbsample >/dev/null 2>&1; then "
            f"nbsample {duration:g} {interval:g}; else {fallback}; fi")


@dataclass(frozen=True)
class ReaderSamples:
    """Where the reader ran: samples per CPU and their share.

    `ignored` counts lines that are not samples (the runner may capture the
    sampler's stderr into the same file); `first_ignored` shows one of them.
    """

    counts: dict[str, int]
    pids: list[int] = field(default_factory=list)
    ignored: int = 0
    first_ignored: str = ""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def shares(self) -> dict[str, float]:
        total = self.total
        return {cpu: n / total for cpu, n in sorted(self.counts.items())} if total else {}


_SAMPLE_RE = re.compile(r"^\d+(\.\d+)?\s+(\d+)$")


def parse_reader_samples(text: str) -> ReaderSamples:
    """"<seconds> <cpu>" lines and "# pid N" markers; anything else is counted, not fatal."""
    counts: dict[str, int] = {}
    pids: list[int] = []
    ignored, first = 0, ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = re.match(r"#\s*pid\s+(\d+)", line)
            if m:
                pids.append(int(m.group(1)))
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            ignored += 1
            first = first or line[:200]
            continue
        counts[m.group(2)] = counts.get(m.group(2), 0) + 1
    return ReaderSamples(counts, pids, ignored, first)


def reader_shares_frame(samples: ReaderSamples) -> pd.DataFrame:
    shares = samples.shares()
    return pd.DataFrame(
        {"cpu": list(shares), "value": list(shares.values()),
         "samples": [samples.counts[c] for c in shares]}
    )


# --------------------------------------------------------------------------- ethtool


def parse_ethtool_features(text: str) -> dict[str, str]:
    """`ethtool -k` -> {"rx-checksumming": "on [fixed]", ...}."""
    feats: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line or line.startswith("Features for"):
            continue
        key, _, value = line.partition(":")
        feats[key.strip()] = value.strip()
    return feats


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
