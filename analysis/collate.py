"""Raw run directory -> one tidy table (one row per rep x metric x CPU).

Every number the report shows comes from this table, so it keeps what a reader
needs to trust it: the source tool, the unit and a status. A repetition that
failed or never finished shows up as a `rep.status` row with that status (and
the reason in `note`), never as zeros; a counter the CPU could not count stays
`not-supported` with a NaN value; a raw file that will not parse gives `error`
rows for that source while the rest of the repetition is still used.

Each finished repetition also says whether it ran under the cache-model plugin
(`rep.instrumented`, 1 or 0; from `done`'s `plugin`, or for runs from before plain
repetitions inferred from a cachemodel.csv). Under the plugin the guest runs at the
model's speed and is not traced, so `by_kind` is the view the statistics use: in a
run with both kinds, cache.* and socket.* (the queue depth beside the cache counts it
explains) from the instrumented repetitions and everything else
(rates, latency, locality, software counters) from the plain ones.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.window_metrics import Units, rate_rows, trace_rows, window_rows
from testbed.errors import NetbedError
from testbed.formats import (
    cachemodel,
    netperf,
    nicstats,
    payloadpath,
    perfstat,
    procfs,
    reader,
    record,
    sockqueue,
    stamps,
    tcpinfo,
    trace,
)
from testbed.formats.readback import RAW as READBACK_RAW
from testbed.run.folder import DONE, RepDir, RunDir
from testbed.vocabulary import TABLE_AXES as AXES

ID_COLUMNS = ("run_id", "cell_id", "repetition", *AXES)
TIDY_COLUMNS = (*ID_COLUMNS, "metric", "cpu", "value", "unit", "source", "status", "note")

# Counters normalised per KB moved (STREAM/MAERTS) or per transaction (RR).
PER_UNIT_METRICS = (
    "perf.context-switches",
    "perf.cpu-migrations",
    "perf.cycles",
    "perf.instructions",
    "perf.cache-references",
    "perf.cache-misses",
    "perf.L1-dcache-loads",
    "perf.L1-dcache-load-misses",
    "perf.LLC-loads",
    "perf.LLC-load-misses",
    "stat.ctxt",
    "softirq.NET_RX",
    "irq.nic",
)
CACHE_PER_UNIT_PREFIX = "cache."
# Measured in the same windows as the cache counts they explain: the socket's queue
# depth (the copy's lag) differs 2-4x between model and plain windows at `auto`
# (the model's guest drains slower), so the answer's figure plots the cache-model
# repetitions' own queue against their own misses.
WITH_CACHE_PREFIXES = (CACHE_PER_UNIT_PREFIX, "socket.")
# Counters that are per-packet costs: also divided by the data NIC's frames.
PER_PACKET_METRICS = ("irq.nic", "softirq.NET_RX", "perf.context-switches", "stat.ctxt",
                      "cache.device_writes")
CACHE_LINE = 64
PARALLEL_MIN_REPS = 64
INSTRUMENTED = "rep.instrumented"  # 1: under the cache-model plugin; 0: plain


@dataclass
class _Rows:
    """Accumulates tidy rows for one repetition (ids are added at the end)."""

    rows: list[dict[str, Any]]

    def add(self, metric: str, cpu: str, value: float, unit: str, source: str,
            status: str = "ok", note: str = "") -> None:
        if status == "ok" and (value is None or (isinstance(value, float) and math.isnan(value))):
            status = "not-supported"
        self.rows.append({"metric": metric, "cpu": str(cpu), "value": value, "unit": unit,
                          "source": source, "status": status, "note": note})

    def add_frame(self, df: pd.DataFrame, prefix: str, unit: str, source: str,
                  with_total: bool = True) -> None:
        """Per-CPU rows plus an "all" row (sum) per metric, unless the frame has one."""
        totals: dict[str, list[float]] = {}
        has_all: set[str] = set()
        for metric, cpu, value in zip(df["metric"], df["cpu"], df["value"], strict=True):
            self.add(f"{prefix}{metric}", cpu, float(value), unit, source)
            totals.setdefault(metric, []).append(float(value))
            if cpu == "all":
                has_all.add(metric)
        for metric, values in totals.items():
            if with_total and metric not in has_all:
                ok = [v for v in values if not math.isnan(v)]
                self.add(f"{prefix}{metric}", "all", sum(ok) if ok else math.nan, unit, source)


def cell_axes(cell: dict[str, Any]) -> dict[str, Any]:
    """The axis values of a cell.json (or cells.json entry), flattened."""
    wl = cell.get("workload") or {}
    if isinstance(wl, str):  # Cell.flat(): workload name and message_size side by side
        wl = {"name": wl, "message_size": cell.get("message_size")}
    gro = cell.get("gro")
    return {
        "kernel": cell.get("kernel"),
        "nic": cell.get("nic"),
        "cpus": cell.get("cpus"),
        "policy": cell.get("policy"),
        "workload": wl.get("name"),
        "message_size": wl.get("message_size"),
        "gro": ("on" if gro else "off") if isinstance(gro, bool) else gro,
        "rcvbuf": cell.get("rcvbuf") or "auto",  # runs from before the axis: autotuned
    }


def _load_cells_index(run: RunDir) -> dict[str, dict[str, Any]]:
    if not run.cells_file.is_file():
        return {}
    try:
        cells = json.loads(run.cells_file.read_text())
    except json.JSONDecodeError as exc:
        raise NetbedError(f"{run.cells_file}:{exc.lineno}: not valid JSON: {exc.msg}",
                          hint="the runner writes it atomically; rerun or restore it") from exc
    return {c["cell_id"]: c for c in cells if isinstance(c, dict) and "cell_id" in c}


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collate_rep(rep: RepDir) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one repetition (without ids) and facts for the report (nic irq method...)."""
    out = _Rows([])
    facts: dict[str, Any] = {}
    if rep.is_failed and not rep.is_done:
        info = _read_json_or_none(rep.file(record.FAILED)) or {}
        out.add("rep.status", "all", math.nan, "", "runner", "failed",
                str(info.get("reason", "failed (no reason recorded)")))
        return out.rows, facts
    if not rep.is_done:
        out.add("rep.status", "all", math.nan, "", "runner", "incomplete",
                "no done/failed marker: interrupted or still running")
        return out.rows, facts
    damage = rep.damage()
    if damage is not None:  # its numbers cannot be trusted; resume redoes it
        out.add("rep.status", "all", math.nan, "", "runner", "failed",
                f"run folder damaged: {damage}")
        return out.rows, facts
    out.add("rep.status", "all", 1.0, "", "runner")
    _collate_instrumented(rep, out)
    cell = _read_json_or_none(rep.file(record.CELL)) or {}
    workload = str((cell.get("workload") or {}).get("name", "")).upper()
    request_size = (cell.get("workload") or {}).get("message_size")
    netperf_rate = _collate_netperf(rep, out, workload)
    netrx = _collate_proc(rep, out, facts)
    cpus = None if netrx is None else [c for c in netrx["cpu"] if c != "all"]
    _collate_reader(rep, out, cpus)
    _collate_perf(rep, out)
    _collate_cachemodel(rep, out)
    for r in payloadpath.read_rows(rep.path):  # cache.payload_*: testbed/formats/payloadpath.py
        out.add(r.metric, "all", r.value, r.unit, "cachemodel", r.status, r.note)
    units = _collate_window(rep, out, workload, request_size, netperf_rate)
    _collate_trace(rep, out, None if units is None else units.seconds)
    _collate_socket_queue(rep, out)
    _derive_per_unit(out, units, workload)
    _derive_coverage(out, units, workload)
    return out.rows, facts


def _collate_instrumented(rep: RepDir, out: _Rows) -> None:
    """Whether the window ran under the cache-model plugin: `done` says so since plain
    repetitions exist; before that, a repetition with cachemodel.csv did."""
    done = _read_json_or_none(rep.path / DONE) or {}
    plugin = done.get("plugin") if isinstance(done, dict) else None
    if isinstance(plugin, bool):
        out.add(INSTRUMENTED, "all", float(plugin), "", "runner",
                note="done: plugin " + ("on" if plugin else "off (plain)"))
    else:
        has = rep.file(cachemodel.RAW).is_file()
        out.add(INSTRUMENTED, "all", float(has), "", "runner",
                note="inferred: cachemodel.csv " + ("present" if has else "absent"))


def _rep_keys(rows: pd.DataFrame) -> set[tuple[str, str, int]]:
    return set(zip(rows["run_id"].astype(str), rows["cell_id"].astype(str),
                   rows["repetition"].astype(int), strict=True))


def instrumented_reps(tidy: pd.DataFrame) -> set[tuple[str, str, int]]:
    """(run, cell, repetition) of the repetitions that ran under the cache-model plugin:
    by their `rep.instrumented` row, or (a tidy table from before it) by cache-model rows."""
    marks = tidy[tidy["metric"] == INSTRUMENTED]
    found = _rep_keys(marks[marks["value"] == 1])
    known = _rep_keys(marks)
    cm = tidy[tidy["source"] == "cachemodel"]
    return found | {k for k in _rep_keys(cm) if k not in known}


def plain_reps(tidy: pd.DataFrame) -> set[tuple[str, str, int]]:
    """Finished repetitions that ran without the plugin (every one, in a run without it)."""
    done = tidy[(tidy["metric"] == "rep.status") & (tidy["status"] == "ok")]
    return _rep_keys(done) - instrumented_reps(tidy)


def is_cache_metric(metric: str) -> bool:
    """Numbers of the cache model (and their per-unit forms): valid under the plugin."""
    return metric.startswith(CACHE_PER_UNIT_PREFIX)


def by_kind(tidy: pd.DataFrame) -> pd.DataFrame:
    """The rows the statistics should use: in a run with both instrumented and plain
    repetitions, instrumented ones keep only cache.* and socket.* (and rep.*) rows and
    plain ones everything else; a run with one kind only is returned as it is."""
    inst = instrumented_reps(tidy)
    if not inst or not plain_reps(tidy):
        return tidy
    keys = pd.Series(list(zip(tidy["run_id"].astype(str), tidy["cell_id"].astype(str),
                              tidy["repetition"].astype("Int64").fillna(-1).astype(int),
                              strict=True)), index=tidy.index)
    under = keys.isin(inst)
    metric = tidy["metric"].astype(str)
    cache = metric.str.startswith(WITH_CACHE_PREFIXES)
    rep_rows = metric.str.startswith("rep.")
    keep = rep_rows | (under & cache) | (~under & ~cache)
    return tidy[keep]


def _error(out: _Rows, metric: str, source: str, exc: Exception | str) -> None:
    out.add(metric, "all", math.nan, "", source, "error", str(exc).splitlines()[0][:300])


def _collate_netperf(rep: RepDir, out: _Rows, workload: str) -> float | None:
    """netperf's own rows, all named `netperf.*`: they cover netperf's whole run
    (lead, window, tail), not the window, so nothing is divided by them.
    Returns netperf's rate (10^6bits/s, or trans/s for RR) to compare with the window's."""
    path = rep.file(netperf.RAW)
    try:
        res = netperf.parse_netperf(path.read_text())
    except (OSError, NetbedError) as exc:
        _error(out, "netperf.throughput", "netperf", exc)
        return None
    units = res.throughput_units
    thr = res.get("THROUGHPUT")
    out.add("netperf.throughput", "all", thr if thr is not None else math.nan, units,
            "netperf")
    simple = {
        "ELAPSED_TIME": ("elapsed", "s"),
        "TRANSACTION_RATE": ("transaction_rate", "trans/s"),
        "RT_LATENCY": ("latency_rt", "us"),
        "MEAN_LATENCY": ("latency_mean", "us"),
        "MIN_LATENCY": ("latency_min", "us"),
        "P50_LATENCY": ("latency_p50", "us"),
        "P90_LATENCY": ("latency_p90", "us"),
        "P99_LATENCY": ("latency_p99", "us"),
        "MAX_LATENCY": ("latency_max", "us"),
        "STDDEV_LATENCY": ("latency_stddev", "us"),
        "LOCAL_TRANSPORT_RETRANS": ("retrans_sender", "segments"),
        "REMOTE_TRANSPORT_RETRANS": ("retrans_receiver", "segments"),
    }
    for key, (metric, unit) in simple.items():
        if key in res.values:
            out.add(f"netperf.{metric}", "all", res.values[key], unit, "netperf")
    # netperf prints -1 where it could not measure CPU utilisation: not a zero.
    for key, metric in (("LOCAL_CPU_UTIL", "cpu_util_sender"),
                        ("REMOTE_CPU_UTIL", "cpu_util_receiver")):
        if key in res.values:
            v = res.values[key]
            out.add(f"netperf.{metric}", "all", v if v >= 0 else math.nan, "%", "netperf",
                    "ok" if v >= 0 else "not-supported")
    elapsed = res.get("ELAPSED_TIME")
    if thr is None or not elapsed or not units:
        return None
    try:
        kind, factor = netperf.netperf_units_factor(units)
    except NetbedError as exc:
        _error(out, "netperf.kbytes", "derived", exc)
        return None
    if kind == "trans" or workload == "TCP_RR":
        rate = thr if kind == "trans" else res.values.get("TRANSACTION_RATE", math.nan)
        out.add("netperf.transactions", "all", rate * elapsed, "trans", "derived")
        return rate
    out.add("netperf.kbytes", "all", thr * factor * elapsed / 1024, "KB", "derived")
    return thr * factor * 8 / 1e6


def _collate_proc(rep: RepDir, out: _Rows, facts: dict[str, Any]) -> pd.DataFrame | None:
    """Deltas of the /proc snapshots; returns the per-CPU NET_RX delta (for locality)."""
    netrx = None
    for name in procfs.PROC_FILES:
        before, after = rep.path / procfs.BEFORE_DIR / name, rep.path / procfs.AFTER_DIR / name
        try:
            d = procfs.parse_proc_pair(name, before.read_text(), after.read_text())
        except (OSError, NetbedError, ValueError) as exc:
            _error(out, f"proc.{name}", "proc", exc)
            continue
        if name == "softirqs":
            out.add_frame(d, "softirq.", "count", "proc")
            netrx = d[d["metric"] == "NET_RX"]
        elif name == "softnet_stat":
            out.add_frame(d, "softnet.", "count", "proc")
        elif name == "snmp":
            out.add_frame(d, "snmp.", "count", "proc")
        elif name == "stat":
            ticks = d[d["metric"].str.startswith("cpu_")]
            out.add_frame(ticks, "stat.", "ticks", "proc")
            out.add_frame(d[~d["metric"].str.startswith("cpu_")], "stat.", "count", "proc")
        elif name == "interrupts":
            readback = _read_json_or_none(rep.file(READBACK_RAW)) or {}
            irqs, how = procfs.select_nic_irqs(d, readback_irqs(readback))
            facts["nic_irqs"] = irqs
            facts["nic_irq_method"] = how
            nic = d[d["irq"].isin(irqs)].groupby("cpu", sort=False)["value"].sum()
            if nic.empty:
                out.add("irq.nic", "all", math.nan, "count", "proc", "not-supported",
                        "no NIC interrupt line found (" + how + ")")
            else:
                frame = pd.DataFrame({"metric": "nic", "cpu": nic.index, "value": nic.values})
                out.add_frame(frame, "irq.", "count", "proc")
                _add_shares(out, "share.nic_irq", frame)
    if netrx is not None:
        _add_shares(out, "share.netrx", netrx)
    return netrx


def readback_irqs(readback: dict[str, Any]) -> list[str] | None:
    """The data NIC's IRQ numbers as read back (testbed.formats.readback.Readback.as_dict keys
    them in `irq_affinity`); None when the read-back does not say."""
    if isinstance(readback.get("irqs"), list):
        return [str(i) for i in readback["irqs"]]
    aff = readback.get("irq_affinity")
    if isinstance(aff, dict) and aff:
        return [str(i) for i in aff]
    return None


def _add_shares(out: _Rows, metric: str, frame: pd.DataFrame) -> None:
    per_cpu = frame[frame["cpu"] != "all"]
    total = per_cpu["value"].sum()
    for cpu, value in zip(per_cpu["cpu"], per_cpu["value"], strict=True):
        if total > 0:
            out.add(metric, cpu, float(value) / total, "fraction", "derived")
        else:
            out.add(metric, cpu, math.nan, "fraction", "derived", "not-supported",
                    "no events in the window")


def _collate_reader(rep: RepDir, out: _Rows, cpus: list[str] | None,
                    ) -> reader.ReaderSamples | None:
    # The sampler stays as a cross-check of the trace's reader placement.
    """Reader samples per CPU and their shares; CPUs the reader was never seen on
    (the online CPUs are those of /proc/softirqs) get an explicit share of 0."""
    path = rep.file(reader.RAW)
    if not path.is_file():
        return None
    try:
        samples = reader.parse_reader_samples(path.read_text())
    except NetbedError as exc:
        _error(out, "reader.samples", "proc", exc)
        return None
    for cpu, n in sorted(samples.counts.items()):
        out.add("reader.samples", cpu, float(n), "samples", "proc")
    note = (f"{samples.ignored} non-sample line(s), e.g. {samples.first_ignored!r}"
            if samples.ignored else "")
    out.add("reader.samples", "all", float(samples.total), "samples", "proc", note=note)
    shares = samples.shares()
    if shares:
        for cpu in sorted(set(shares) | set(cpus or ()), key=int):
            out.add("share.reader", cpu, shares.get(cpu, 0.0), "fraction", "derived")
    return samples


def _collate_perf(rep: RepDir, out: _Rows) -> None:
    path = rep.file(perfstat.RAW)
    kept_out = rep.file(perfstat.RAW_UNSUPPORTED)
    if not path.is_file() and kept_out.is_file():
        # perf did not count in this window (cache-model windows): say so, never zero
        why = kept_out.read_text().strip() or "perf did not count in this window"
        for event in perfstat.SOFTWARE_EVENTS:
            out.add(f"perf.{event}", "all", math.nan,
                    "msec" if event.endswith("clock") else "count", "perf",
                    "not-supported", note=why)
        return
    if not path.is_file():
        return
    try:
        df = perfstat.parse_perf_stat(path.read_text())
    except NetbedError as exc:
        _error(out, "perf", "perf", exc)
        return
    events: dict[str, list[tuple[str, float, str, str]]] = {}
    for event, cpu, value, unit, status in zip(df["metric"], df["cpu"], df["value"],
                                               df["unit"], df["status"], strict=True):
        events.setdefault(event, []).append((cpu, float(value), unit or "count", status))
    for event, rows in events.items():
        unit = rows[0][2]
        for cpu, value, _, status in rows:
            out.add(f"perf.{event}", cpu, value, unit, "perf", status)
        bad = [status for _, _, _, status in rows if status != "ok"]
        if bad:
            out.add(f"perf.{event}", "all", math.nan, unit, "perf", bad[0])
        else:
            out.add(f"perf.{event}", "all", sum(v for _, v, _, _ in rows), unit, "perf")


def _collate_cachemodel(rep: RepDir, out: _Rows) -> None:
    path = rep.file(cachemodel.RAW)
    if not path.is_file():
        return
    try:
        df = cachemodel.measured_window(path.read_text())
    except (NetbedError, ValueError, pd.errors.ParserError) as exc:
        _error(out, "cache", "cachemodel", exc)
        return
    for (mode, event), g in df.groupby(["mode", "event"], sort=False):
        for cpu, value in zip(g["vcpu"], g["value"], strict=True):
            out.add(f"cache.{mode}.{event}", cpu, float(value), "count", "cachemodel")
    both = df.groupby(["event", "vcpu"], sort=False)["value"].sum().reset_index()
    for event, g in both.groupby("event", sort=False):
        for cpu, value in zip(g["vcpu"], g["value"], strict=True):
            out.add(f"cache.{event}", cpu, float(value), "count", "cachemodel")
        out.add(f"cache.{event}", "all", float(g["value"].sum()), "count", "cachemodel")


def _collate_window(rep: RepDir, out: _Rows, workload: str, request_size: Any,
                    netperf_rate: float | None) -> Units | None:
    texts: dict[str, str | None] = {}
    for name in (stamps.RAW, tcpinfo.RAW_BEFORE, tcpinfo.RAW_AFTER, nicstats.RAW_BEFORE,
                 nicstats.RAW_AFTER):
        path = rep.file(name)
        texts[name] = path.read_text() if path.is_file() else None
    size = int(request_size) if isinstance(request_size, int | float) else None
    rows, units = window_rows(texts, workload, size)
    rows += rate_rows(units, netperf_rate, workload)
    for r in rows:
        out.add(r.metric, r.cpu, r.value, r.unit, r.source, r.status, r.note)
    return units


def _collate_socket_queue(rep: RepDir, out: _Rows) -> None:
    """socket.queue_kb.p50/.p95 and socket.rcvbuf_kb (testbed.formats.sockqueue)."""
    def text(name: str) -> str | None:
        path = rep.file(name)
        return path.read_text() if path.is_file() else None

    try:
        rsr_end = netperf.parse_netperf(text(netperf.RAW) or "").get("RSR_SIZE_END")
    except NetbedError:
        rsr_end = None
    for r in sockqueue.queue_rows(text(sockqueue.RAW), text(stamps.RAW),
                                  text(tcpinfo.RAW_AFTER), rsr_end):
        out.add(r.metric, "all", r.value, r.unit, r.source, r.status, r.note)


def _collate_trace(rep: RepDir, out: _Rows, seconds: float | None) -> None:
    unsupported = rep.file(trace.RAW_UNSUPPORTED)
    events = rep.file(trace.RAW_EVENTS)
    gz, stats = rep.file(trace.RAW_TRACE), rep.file(trace.RAW_STATS)
    readback = _read_json_or_none(rep.file(READBACK_RAW)) or {}
    pid_file = rep.file(reader.RAW_PID)
    pid_text = pid_file.read_text().strip() if pid_file.is_file() else ""
    rows = trace_rows(
        gz.read_bytes() if gz.is_file() else None,
        stats.read_text() if stats.is_file() else "",
        unsupported.read_text() if unsupported.is_file() else None,
        readback.get("iface") if isinstance(readback.get("iface"), str) else None,
        int(pid_text) if pid_text.isdigit() else None,
        events.read_text() if events.is_file() else None, seconds)
    for r in rows:
        out.add(r.metric, r.cpu, r.value, r.unit, r.source, r.status, r.note)


def _derive_per_unit(out: _Rows, units: Units | None, workload: str) -> None:
    """Counters per unit of work done in the same window: per KB of payload
    (STREAM/MAERTS) or per transaction (RR), and per data-NIC frame for the
    per-packet costs. Without window units (runs made before them) the ratios are
    not-supported rows: netperf's totals cover a longer run and are never used."""
    rr = workload == "TCP_RR"
    suffix, unit = (".per_trans", "1/trans") if rr else (".per_kb", "1/KB")
    amount = None if units is None else (units.transactions if rr else units.kbytes)
    packets = None if units is None else units.packets
    new = []
    for row in out.rows:
        if row["cpu"] != "all":
            continue
        m = row["metric"]
        # the model's counts only: a share it reports (a fraction) per KB means nothing
        if m in PER_UNIT_METRICS or (m.startswith(CACHE_PER_UNIT_PREFIX) and m.count(".") == 1
                                     and row["unit"] == "count"):
            new.append((m + suffix, unit, row, amount))
            if m in PER_PACKET_METRICS:
                new.append((m + ".per_packet", "1/frame", row, packets))
    for metric, u, row, base in new:
        if base is None or not base > 0:
            why = ("no window units in this repetition" if units is None
                   else "no work counted in the window")
            out.add(metric, "all", math.nan, u, "derived", "not-supported", why)
        elif row["status"] != "ok":
            out.add(metric, "all", math.nan, u, "derived", row["status"], row["note"])
        else:
            out.add(metric, "all", row["value"] / base, u, "derived")


def _derive_coverage(out: _Rows, units: Units | None, workload: str) -> None:
    """cache.device_write_coverage: device writes the cache model noticed per payload
    line received (window.kbytes x 1024 / 64). Only bulk receive (TCP_STREAM) says
    something: in MAERTS the measured guest sends (no payload arrives by DMA) and in
    RR the payload is a few bytes against descriptors and headers."""
    dw = [r for r in out.rows if r["metric"] == "cache.device_writes" and r["cpu"] == "all"]
    if not dw:
        return
    if workload.upper() != "TCP_STREAM":
        out.add("cache.device_write_coverage", "all", math.nan, "fraction", "derived",
                "not-supported", f"{workload or 'unknown workload'}: only bulk receive "
                "(TCP_STREAM) has payload lines arriving by DMA to compare with")
        return
    if units is None or not units.kbytes:
        out.add("cache.device_write_coverage", "all", math.nan, "fraction", "derived",
                "not-supported", "no window payload bytes to compare with")
        return
    lines = units.kbytes * 1024 / CACHE_LINE
    out.add("cache.device_write_coverage", "all", dw[0]["value"] / lines, "fraction",
            "derived", dw[0]["status"], f"of {lines:.0f} payload lines")


def collate_run(run_dir: Path) -> pd.DataFrame:
    """Every repetition of a run (finished, failed or incomplete) as one tidy table."""
    return collate_run_with_facts(run_dir)[0]


def collate_run_with_facts(run_dir: Path, workers: int | None = None,
                           ) -> tuple[pd.DataFrame, dict[tuple[str, int], Any]]:
    """Tidy table plus per-repetition facts (which IRQ lines were the NIC's, and how).

    `workers` > 1 parses repetitions in that many processes; None chooses by
    run size (PARALLEL_MIN_REPS).
    """
    run = RunDir(Path(run_dir))
    if not run.path.is_dir():
        raise NetbedError(f"run directory {run.path} does not exist",
                          hint="pass a folder under results/ (see `ls results`)")
    index = _load_cells_index(run)
    reps = list(run.reps())
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(reps) >= PARALLEL_MIN_REPS else 1
    if workers > 1:
        # Parsing is per-repetition and independent: spread it over processes
        # (a full matrix has thousands of repetitions of small pandas work).
        # "spawn", not fork: the caller (run-matrix) may hold threads (SSH, progress).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(collate_rep, reps, chunksize=16))
    else:
        results = [collate_rep(rep) for rep in reps]
    rows: list[dict[str, Any]] = []
    facts: dict[tuple[str, int], Any] = {}
    for rep, (rep_rows, rep_facts) in zip(reps, results, strict=True):
        cell = _read_json_or_none(rep.file(record.CELL)) or index.get(rep.cell_id, {})
        ids = {"run_id": run.run_id, "cell_id": rep.cell_id, "repetition": rep.repetition,
               **cell_axes(cell)}
        facts[(rep.cell_id, rep.repetition)] = rep_facts
        rows.extend({**ids, **r} for r in rep_rows)
    df = pd.DataFrame(rows, columns=list(TIDY_COLUMNS))
    return _typed(df), facts


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Stable dtypes so Parquet and CSV round-trip and merged runs concatenate."""
    df = df.copy()
    for col in ("run_id", "cell_id", "kernel", "nic", "policy", "workload", "gro", "metric",
                "cpu", "unit", "source", "status", "note"):
        df[col] = df[col].astype("string")
    for col in ("repetition", "cpus", "message_size"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype("float64")
    return df


@dataclass(frozen=True)
class TablePaths:
    parquet: Path
    csv: Path


def analysis_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "analysis"


def write_tables(run_dir: Path, tidy: pd.DataFrame | None = None) -> TablePaths:
    """Write `<run>/analysis/tidy.parquet` and `tidy.csv` (atomically, via rename)."""
    from testbed.files import atomic_write_text

    tidy = collate_run(run_dir) if tidy is None else tidy
    out = analysis_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq = out / "tidy.parquet"
    tmp = out / ".tidy.parquet.tmp"
    tidy.to_parquet(tmp, index=False)
    tmp.replace(pq)
    csv = out / "tidy.csv"
    atomic_write_text(csv, tidy.to_csv(index=False))
    return TablePaths(pq, csv)


def read_tidy(path: Path) -> pd.DataFrame:
    return _typed(pd.read_parquet(path))


def cell_label(row: pd.Series | dict[str, Any], axes: Iterable[str] = AXES) -> str:
    """A short human label of a cell: kernel/nic/Ncpu/policy/WORKLOAD-size/gro."""
    parts = []
    for a in axes:
        v = row.get(a)  # an axis a table lacks (rcvbuf before the axis) is left out
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            continue
        if a == "cpus":
            parts.append(f"{v}cpu")
        elif a == "gro":
            parts.append(f"gro-{v}")
        elif a == "rcvbuf":  # autotuned, as every run before the axis: no part
            if v != "auto":
                parts.append(f"rcvbuf-{v}")
        else:
            parts.append(str(v))
    return "/".join(parts)
