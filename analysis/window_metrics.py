"""The measured window's own figures: work done (units), alignment, locality from the trace.

Pure functions from a repetition's raw texts to tidy rows (`Row`), used by
analysis.collate. Units come from the receiver, read at the window's edges: payload
bytes and transactions as testbed.formats.windowrates defines them (the stopping
rule's definition too), frames from the data NIC's statistics. Co-location
and wake-up placement come from the kernel's tracepoints (testbed.formats.trace).
A figure that a repetition cannot give is a `not-supported` row with the reason,
never a zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from testbed.errors import NetbedError
from testbed.formats import nicstats, stamps, tcpinfo, trace
from testbed.formats import windowrates as wr

RATE_MISMATCH = 0.25  # window vs netperf rate: flagged beyond this relative difference
SKEW_LIMIT_MS = 50.0


class Row(NamedTuple):
    metric: str
    value: float
    unit: str
    status: str = "ok"
    note: str = ""
    cpu: str = "all"
    source: str = "window"


@dataclass(frozen=True)
class Units:
    """Work done inside the window (None where the repetition cannot say)."""

    seconds: float
    kbytes: float | None
    packets: float | None
    transactions: float | None


def _missing(metrics: tuple[str, ...], units: tuple[str, ...], why: str,
             source: str = "window", status: str = "not-supported") -> list[Row]:
    return [Row(m, math.nan, u, status, why, source=source)
            for m, u in zip(metrics, units, strict=True)]


WINDOW_METRICS = ("window.seconds", "window.kbytes", "window.packets", "window.throughput")
WINDOW_UNITS = ("s", "KB", "frames", "10^6bits/s")
RR_METRICS = ("window.transactions", "window.transaction_rate")
RR_UNITS = ("trans", "trans/s")


def window_rows(texts: dict[str, str | None], workload: str, request_size: int | None,
                ) -> tuple[list[Row], Units | None]:
    """Rows for the window's length, units and alignment, from the raw texts
    (keys: stamps.RAW, tcpinfo.RAW_BEFORE/AFTER, nicstats.RAW_BEFORE/AFTER)."""
    rr = wr.is_rr(workload)
    names = WINDOW_METRICS + (RR_METRICS if rr else ())
    unit_names = WINDOW_UNITS + (RR_UNITS if rr else ())
    stamp_text = texts.get(stamps.RAW)
    if stamp_text is None:
        return _missing(names, unit_names, "no window stamps: a run made before netbed "
                                           "counted work inside the window"), None
    try:
        align = stamps.alignment(stamps.parse_stamps(stamp_text))
    except NetbedError as exc:
        return _missing(names, unit_names, str(exc), status="error"), None
    rows = [Row("window.seconds", align.seconds, "s"),
            Row("window.skew", align.skew_ms, "ms",
                note=f"worst: {align.worst}; " + ", ".join(
                    f"{k} {v:.1f} ms" for k, v in sorted(align.offsets_ms.items()))
                + ("" if align.skew_ms <= SKEW_LIMIT_MS else
                   f"; over the {SKEW_LIMIT_MS:g} ms goal"))]
    kbytes = transactions = packets = None
    before, after = texts.get(tcpinfo.RAW_BEFORE), texts.get(tcpinfo.RAW_AFTER)
    if before is None or after is None:
        rows += _missing(("window.kbytes", wr.THROUGHPUT), ("KB", wr.THROUGHPUT_UNIT),
                         "no ss -tin snapshots of the data connection")
    else:
        try:
            work = wr.payload(before, after, workload, request_size)
            kbytes, transactions = work.kbytes, work.transactions
            rates = wr.rates(work, align.seconds, workload)
            rows += [Row("window.kbytes", kbytes, "KB", note=work.note),
                     Row(wr.THROUGHPUT, rates[wr.THROUGHPUT], wr.THROUGHPUT_UNIT,
                         note=work.note)]
            if rr and transactions is not None:
                rows += [Row("window.transactions", transactions, "trans",
                             note=work.transactions_note),
                         Row(wr.TRANSACTION_RATE, rates[wr.TRANSACTION_RATE],
                             wr.TRANSACTION_RATE_UNIT)]
            elif rr:
                rows += _missing(RR_METRICS, RR_UNITS, "request size unknown")
        except NetbedError as exc:
            rows += _missing(("window.kbytes", wr.THROUGHPUT) + (RR_METRICS if rr else ()),
                             ("KB", wr.THROUGHPUT_UNIT) + (RR_UNITS if rr else ()), str(exc),
                             status="error")
    nb, na = texts.get(nicstats.RAW_BEFORE), texts.get(nicstats.RAW_AFTER)
    if nb is None or na is None:
        rows += _missing(("window.packets",), ("frames",), "no data-NIC statistics")
    else:
        try:
            nd = nicstats.nicstats_delta(nb, na)
            packets = float(nd["rx_packets"])
            rows.append(Row("window.packets", packets, "frames",
                            note="data NIC rx_packets (frames, before GRO)"))
        except NetbedError as exc:
            rows += _missing(("window.packets",), ("frames",), str(exc), status="error")
    return rows, Units(align.seconds, kbytes, packets, transactions)


def rate_rows(units: Units | None, netperf_rate: float | None, workload: str) -> list[Row]:
    """window rate / netperf's rate, flagged in the note beyond RATE_MISMATCH."""
    if units is None or netperf_rate is None or not netperf_rate > 0:
        return []
    rr = wr.is_rr(workload)
    if rr and units.transactions is not None:
        window_rate = wr.transaction_rate(units.transactions, units.seconds)
    elif not rr and units.kbytes is not None:
        window_rate = wr.throughput(units.kbytes, units.seconds)
    else:
        return []
    ratio = window_rate / netperf_rate
    note = (f"window and netperf rates differ by {abs(ratio - 1):.0%}"
            if abs(ratio - 1) > RATE_MISMATCH else "")
    return [Row("window.netperf_ratio", ratio, "ratio", note=note, source="derived")]


MIGRATION_METRICS = ("sched.reader_migrations", "sched.reader_migrations.per_s")
MIGRATION_UNITS = ("migrations", "1/s")
LOCALITY_METRICS = ("locality.processing_on_reader_cpu", "locality.irq_on_reader_cpu",
                    "wakeups.count", "wakeups.on_waker_cpu", "wakeups.from_softirq",
                    *MIGRATION_METRICS)
LOCALITY_UNITS = ("fraction", "fraction", "wake-ups", "fraction", "fraction",
                  *MIGRATION_UNITS)


def migration_rows(loc: trace.Locality, events_text: str | None, seconds: float | None,
                   lost_note: str) -> list[Row]:
    """The reader's moves to another CPU (sched_migrate_task) in the trace window, and
    per second of the window (the trace is on between the same edges). A trace that
    did not arm the event (runs before it) gives not-supported rows, never zero."""
    if events_text is None or trace.MIGRATE_EVENT not in events_text.split():
        return _missing(MIGRATION_METRICS, MIGRATION_UNITS,
                        f"{trace.MIGRATE_EVENT} not traced in this repetition "
                        "(a run made before migrations were traced)", source="trace")
    note = f"sched_migrate_task of reader pid {loc.reader_pids}{lost_note}"
    rows = [Row("sched.reader_migrations", float(loc.migrations), "migrations", note=note,
                source="trace")]
    if seconds is None or not seconds > 0:
        rows.append(Row("sched.reader_migrations.per_s", math.nan, "1/s", "not-supported",
                        "no window length in this repetition", source="trace"))
    else:
        rows.append(Row("sched.reader_migrations.per_s", loc.migrations / seconds, "1/s",
                        note=f"{loc.migrations} in {seconds:.3f} s window{lost_note}",
                        source="trace"))
    return rows


def trace_rows(trace_gz: bytes | None, stats_text: str, unsupported: str | None,
               iface: str | None, pid: int | None, events_text: str | None = None,
               seconds: float | None = None) -> list[Row]:
    """Locality, wake-up and migration rows from the raw trace, or not-supported rows
    saying why. `events_text` is the armed-events file; `seconds` the window length."""
    if unsupported is not None:
        return _missing(LOCALITY_METRICS, LOCALITY_UNITS,
                        "no trace: " + (unsupported.strip() or "tracing unsupported"),
                        source="trace")
    if trace_gz is None:
        return _missing(LOCALITY_METRICS, LOCALITY_UNITS,
                        "no trace in this repetition (a run made before tracing)",
                        source="trace")
    try:
        lines = trace.read_trace_gz(trace_gz)
    except NetbedError as exc:
        return _missing(LOCALITY_METRICS, LOCALITY_UNITS, str(exc), source="trace",
                        status="error")
    loc = trace.reduce_trace(trace.parse_trace(lines), iface, pid)
    lost = trace.lost_events(lines, stats_text)
    lost_note = f"; {lost} events lost to a full buffer" if lost else ""

    def share(metric: str, value: float | None, basis: str) -> Row:
        if value is None:
            return Row(metric, math.nan, "fraction", "not-supported",
                       f"no {basis} in the trace{lost_note}", source="trace")
        return Row(metric, value, "fraction", note=basis + lost_note, source="trace")

    unattributed = (f", {loc.processed_unattributed} bytes before the reader's first switch "
                    "left out" if loc.processed_unattributed else "")
    return [
        share("locality.processing_on_reader_cpu", loc.processing_on_reader_cpu,
              f"{loc.skbs} netif_receive_skb, {loc.processed_bytes} bytes{unattributed}"),
        share("locality.irq_on_reader_cpu", loc.irq_on_reader_cpu,
              f"napi_poll work {loc.napi_work} packets"),
        Row("wakeups.count", float(loc.wakeups), "wake-ups",
            note=f"{loc.wakings} sched_waking, {loc.wakings_while_awake} of a reader still "
                 f"awake (not counted){lost_note}", source="trace"),
        share("wakeups.on_waker_cpu", loc.on_waker_cpu, f"{loc.wakeups} wake-ups"),
        share("wakeups.from_softirq", loc.from_softirq, f"{loc.wakeups} wake-ups"),
        *migration_rows(loc, events_text, seconds, lost_note),
    ]
