"""A run's report: `<run>/analysis/report.html` (self-contained) and `report.md`.

The HTML embeds its figures as base64 data URIs and carries no scripts or
external links, so it can be mailed or archived as one file and opened offline.
Both formats say where the numbers came from (provenance) before anyone trusts
them: kernel and patch hashes, accelerator, QEMU version, whether hardware
counters were real, the NIC offloads read back from the guest, and every
repetition that failed or never finished.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collate import (
    analysis_dir,
    by_kind,
    cell_label,
    instrumented_reps,
    plain_reps,
)
from analysis.compare import KEY_METRICS, Comparison, fmt_number, format_table
from analysis.repeatability import insert_after_key_table, report_parts, with_cv
from analysis.symbols import report_sections as cachemodel_sections
from testbed.files import atomic_write_text
from testbed.formats import offloads, perfstat, record
from testbed.formats.readback import RAW as READBACK_RAW
from testbed.run.folder import RunDir
from testbed.vocabulary import TABLE_AXES as AXES

OFFLOAD_KEYS = ("rx-checksumming", "tx-checksumming", "generic-receive-offload",
                "tcp-segmentation-offload")


@dataclass
class Provenance:
    """What a reader needs to know before trusting the numbers."""

    run_id: str
    versions: dict[str, Any]
    host: dict[str, Any]
    experiment_yaml: str
    pmu: str
    offloads: pd.DataFrame
    readback: dict[str, Any]
    nic_irqs: dict[str, str]
    failures: pd.DataFrame
    not_started: list[str] = field(default_factory=list)
    reader_note: str = ""


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def pmu_verdict(tidy: pd.DataFrame) -> str:
    """Were hardware counters real? Judged from perf's own statuses in this run."""
    hw = tidy[tidy["metric"].isin([f"perf.{e}" for e in perfstat.HARDWARE_EVENTS]) &
              (tidy["cpu"] == "all")]
    has_cache = (tidy["source"] == "cachemodel").any()
    cache = " Cache figures come from the cache model (source=cachemodel)." if has_cache else ""
    if hw.empty:
        return "Hardware counters were not requested (no PMU expected)." + cache
    counts = hw["status"].value_counts().to_dict()
    if counts.get("ok", 0) == len(hw):
        return "Hardware counters counted in every repetition (PMU valid)." + cache
    if counts.get("ok", 0) == 0:
        return ("Hardware counters were NOT counted (" +
                ", ".join(f"{k}: {v}" for k, v in counts.items()) +
                "): no usable PMU in the guest; perf hardware figures are absent, not zero." +
                cache)
    return ("Hardware counters were only partly counted (" +
            ", ".join(f"{k}: {v}" for k, v in counts.items()) + "): treat them with care." + cache)


def offload_facts(path: Path) -> dict[str, Any]:
    """Who verified RX checksums, from offloads.txt.

    The runner stores testbed.formats.offloads.OFFLOAD_SCRIPT's output (driver, virtio
    feature bits, then `ethtool -k`): its verdict `rx_checksum_offload` reads the
    negotiated virtio bits, because virtio's ethtool says "on [fixed]" even when
    the guest verifies checksums itself. Plain `ethtool -k` text is read too.
    """
    if not path.is_file():
        return {"rx_checksum_offload": "n/a", **{k: "n/a" for k in OFFLOAD_KEYS}}
    text = path.read_text()
    if "--- ethtool -k" in text:
        state = offloads.parse_offloads(text)
        return {"driver": state.driver, "rx_checksum_offload": state.rx_checksum_offload,
                **{k: state.ethtool.get(k, "n/a") for k in OFFLOAD_KEYS}}
    feats = offloads.parse_ethtool_features(text)
    return {"rx_checksum_offload": "n/a (ethtool only)",
            **{k: feats.get(k, "n/a") for k in OFFLOAD_KEYS}}


def gather_provenance(run_dir: Path, tidy: pd.DataFrame,
                      facts: dict[tuple[str, int], Any]) -> Provenance:
    run = RunDir(Path(run_dir))
    offload_rows, readback, nic_irqs = [], {}, {}
    for rep in run.reps():
        if not rep.is_complete or rep.cell_id in readback:
            continue
        rb = _json(rep.file(READBACK_RAW))
        cell = _json(rep.file(record.CELL))
        offload_rows.append({"cell": rep.cell_id, "nic": cell.get("nic", ""),
                             **offload_facts(rep.file(offloads.RAW))})
        readback[rep.cell_id] = rb
        f = facts.get((rep.cell_id, rep.repetition), {})
        if f:
            nic_irqs[rep.cell_id] = (f"{f.get('nic_irq_method')}: "
                                     f"{', '.join(f.get('nic_irqs', [])) or 'none'}")
    reps = tidy[tidy["metric"] == "rep.status"]
    failures = reps[reps["status"] != "ok"][["cell_id", "repetition", "status", "note"]]
    cells = _json(run.cells_file) if run.cells_file.is_file() else []
    present = set(tidy["cell_id"].dropna())
    not_started = [c["cell_id"] for c in cells if isinstance(c, dict)
                   and c.get("cell_id") not in present]
    exp = run.experiment_file.read_text() if run.experiment_file.is_file() else ""
    return Provenance(run.run_id, _json(run.versions_file), _json(run.host_file), exp,
                      pmu_verdict(tidy), pd.DataFrame(offload_rows), readback, nic_irqs,
                      failures.reset_index(drop=True), not_started, reader_verdict(tidy))


def reader_verdict(tidy: pd.DataFrame) -> str:
    """How much the reader-location figures can be trusted: samples per repetition."""
    n = tidy[(tidy["metric"] == "reader.samples") & (tidy["cpu"] == "all") &
             (tidy["status"] == "ok")]["value"]
    if n.empty:
        return "No reader samples in this run: reader-location figures are absent."
    text = (f"Reader location from {int(n.min())}-{int(n.max())} samples per repetition "
            f"(median {n.median():g}).")
    if n.median() < 10:
        text += (" That is few (a busy TCG guest starves the sampler): read reader shares "
                 "as rough, and prefer more repetitions.")
    return text


# One sentence per metric the report leads with: what it counts, from where, over what.
METRIC_EXPLANATIONS: dict[str, str] = {
    "window.seconds": "Length of the measured window, between the two reads of the units "
                      "(guest monotonic clock).",
    "window.kbytes": "Payload KB the data connection moved inside the window, from its own "
                     "tcp_info (bytes_received; bytes_acked for MAERTS), no headers.",
    "window.packets": "Frames the data NIC received inside the window (sysfs rx_packets, "
                      "counted before GRO merges them).",
    "window.throughput": "Payload rate inside the window (10^6bits/s): window.kbytes over "
                         "window.seconds.",
    "window.transactions": "Request/response transactions inside the window: request bytes "
                           "received over the request size.",
    "window.transaction_rate": "window.transactions over window.seconds.",
    "window.skew": "Worst distance (ms) between the units' reads and the edges of any other "
                   "source (perf stat, /proc snapshots, trace, cache-model markers).",
    "window.netperf_ratio": "Window rate over netperf's own rate; netperf's covers its whole "
                            "run (lead, window and tail), so they differ when the window is "
                            "slower or faster than the rest (the cache model slows it).",
    "netperf.throughput": "netperf's own result over its whole run (longer than the window): "
                          "never used to normalise counters.",
    "netperf.transaction_rate": "netperf's own transaction rate over its whole run.",
    "locality.processing_on_reader_cpu": "Share of received bytes (netif_receive_skb, after "
                                         "RPS/RFS, weighted by len) processed on the CPU where "
                                         "the reader was running or last ran at that moment.",
    "locality.irq_on_reader_cpu": "Share of packets polled from the data NIC (napi_poll, "
                                  "weighted by work) on the reader's CPU at that moment.",
    "wakeups.count": "Wake-ups of the sleeping reader in the trace window (sched_waking "
                     "followed by sched_wakeup; wakings of a reader still awake not counted).",
    "wakeups.on_waker_cpu": "Share of those wake-ups that placed the reader "
                            "(sched_wakeup.target_cpu) on the CPU that woke it.",
    "wakeups.from_softirq": "Share of those wake-ups raised in softirq context (the "
                            "receive path's data-ready callback).",
    "cache.device_write_coverage": "Device writes the cache model noticed per payload line "
                                   "received (window.kbytes x 1024 / 64); near 1 when the "
                                   "payload does not repeat.",
    "socket.queue_kb.p50 / socket.queue_kb.p95": "Payload KB received in order and not yet "
        "copied by the reader (the copy's lag), sampled every 50 ms inside the window through "
        "sock_diag, which never takes the socket lock; median and 95th percentile.",
    "socket.rcvbuf_kb": "The largest receive buffer (sk_rcvbuf) the measured socket had in "
                        "the window: the rcvbuf level doubled by Linux, or the autotuned peak.",
    "cache.payload_copy_from.*": "Where the copy to user space first read each device-written "
        "payload line: own (the copying vCPU's private caches), peer (another vCPU's private "
        "cache), llc, memory; shares of the copy reads, summing to 1 (cache model).",
    "cache.payload_lag_kb.p50 / cache.payload_lag_kb.p95": "Device-written KB the cache model "
        "noticed between a line's checksum read and its copy: how far the copy lagged.",
    "cache.payload_checksum_cpu_is_copy_cpu": "Share of copied payload lines whose checksum "
        "read ran on the vCPU that copied them.",
    "cache.payload_copy_reads": "Copy reads of device-written lines the payload shares rest on.",
    "share.netrx / share.nic_irq / share.reader": "Per-CPU shares of NET_RX softirqs, NIC "
                                                  "interrupts and reader samples (marginals, "
                                                  "not co-location).",
    "*.per_kb / *.per_trans / *.per_packet": "A counter of the window divided by the "
                                             "window's own payload KB, transactions or "
                                             "data-NIC frames.",
}


def explanations(tidy: pd.DataFrame) -> pd.DataFrame:
    """One sentence per key metric; those this run lacks say "not available"."""
    present = set(tidy["metric"].dropna())
    ok = set(tidy[tidy["status"] == "ok"]["metric"].dropna())
    rows = []
    for name, text in METRIC_EXPLANATIONS.items():
        pattern = "*" in name or "/" in name
        state = "" if pattern or name in ok else (
            " (not available in this run)" if name in present else " (not in this run)")
        rows.append({"metric": name, "meaning": text + state})
    return pd.DataFrame(rows)


def kinds_verdict(tidy: pd.DataFrame) -> str:
    """Which repetitions ran under the cache-model plugin, and which numbers the tables
    take from which kind (collate.by_kind)."""
    inst, plain = instrumented_reps(tidy), plain_reps(tidy)
    if not inst:
        return (f"All {len(plain)} finished repetitions ran without the cache-model plugin: "
                "every number comes from them.")
    per_cell = pd.Series([c for _, c, _ in plain]).value_counts()
    if not plain:
        return (f"All {len(inst)} finished repetitions ran under the cache-model plugin: "
                "their throughput, rates and latency time the model as much as the guest "
                "(the answer takes no such effects from them), and they were not traced "
                "(no locality or wake-up rows).")
    n = (f"{per_cell.min()}" if per_cell.min() == per_cell.max()
         else f"{per_cell.min()}-{per_cell.max()}")
    one = (" One plain repetition per cell gives no interval or spread for those numbers."
           if per_cell.max() == 1 else "")
    return (f"{len(inst)} repetitions ran under the cache-model plugin (instrumented) and "
            f"{len(plain)} without it (plain: {n} per cell, traced). The tables and figures "
            "take cache.* figures and the socket's queue depth (socket.*, measured beside them) "
            "from the instrumented repetitions only and everything else "
            "(throughput, transaction rate, latency, locality, wake-ups, software counters) "
            f"from the plain ones only; n in each row counts the kind it comes from.{one}")


def window_checks(tidy: pd.DataFrame) -> pd.DataFrame:
    """Repetitions whose window rate and netperf's differ by more than 25%, or whose
    sources lie more than 50 ms from the units' reads: visible, not hidden."""
    from analysis.window_metrics import RATE_MISMATCH, SKEW_LIMIT_MS

    all_ = tidy[(tidy["cpu"] == "all") & (tidy["status"] == "ok")]
    ratio = all_[all_["metric"] == "window.netperf_ratio"]
    skew = all_[all_["metric"] == "window.skew"]
    rows = []
    for _, r in ratio[(ratio["value"] - 1).abs() > RATE_MISMATCH].iterrows():
        rows.append({"cell": r["cell_id"], "repetition": r["repetition"],
                     "check": "window vs netperf rate", "value": f"{r['value']:.2f}x",
                     "note": r["note"]})
    for _, r in skew[skew["value"] > SKEW_LIMIT_MS].iterrows():
        rows.append({"cell": r["cell_id"], "repetition": r["repetition"],
                     "check": "window skew", "value": f"{r['value']:.0f} ms", "note": r["note"]})
    return pd.DataFrame(rows)


def window_verdict(tidy: pd.DataFrame) -> str:
    all_ = tidy[(tidy["cpu"] == "all") & (tidy["status"] == "ok")]
    ratio = all_[all_["metric"] == "window.netperf_ratio"]["value"]
    skew = all_[all_["metric"] == "window.skew"]["value"]
    if ratio.empty and skew.empty:
        return ("This run has no window units (made before they existed): per-KB and "
                "per-transaction figures are not available, and netperf's own totals are "
                "not used in their place.")
    text = ""
    if not skew.empty:
        text += (f"Window sources lie {skew.median():.1f} ms (median; max {skew.max():.1f} ms) "
                 "from the units' reads. ")
    if not ratio.empty:
        text += (f"Window rate / netperf rate: median {ratio.median():.2f} "
                 f"(range {ratio.min():.2f}-{ratio.max():.2f}, {len(ratio)} repetitions).")
    return text


def key_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Wide table: one row per cell, key metrics as "median [q1, q3] (n)" strings."""
    if summary.empty:
        return pd.DataFrame()
    s = summary[(summary["cpu"] == "all") & summary["metric"].isin(KEY_METRICS)].copy()
    if s.empty:
        return pd.DataFrame()
    s["cell"] = s.apply(cell_label, axis=1)
    n = fmt_number
    s["text"] = s.apply(lambda r: f"{n(r['median'])} [{n(r['q1'])}, {n(r['q3'])}]"
                        f" n={r['n']}" + (f" (+{r['n_failed']} failed/incomplete)"
                                          if r["n_failed"] else ""),
                        axis=1)
    wide = s.pivot_table(index="cell", columns="metric", values="text", aggfunc="first")
    return wide[[m for m in KEY_METRICS if m in wide.columns]]


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.wide{overflow-x:auto}
.bad{color:#a00}.note{color:#555}
"""


def _table_html(df: pd.DataFrame, index: bool = False) -> str:
    if df.empty:
        return "<p class='note'>(none)</p>"
    table = df.to_html(index=index, escape=True, na_rep="n/a", border=0)
    return f"<div class='wide'>{table}</div>"


def _img_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


def _kv_table(d: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([{"key": k, "value": v if isinstance(v, str) else json.dumps(v)}
                         for k, v in d.items()])


def _kernels(versions: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, meta in (versions.get("kernels") or {}).items():
        meta = meta if isinstance(meta, dict) else {"value": meta}
        rows.append({"kernel": name, **{k: (v if isinstance(v, str | int | float) else
                                            json.dumps(v)) for k, v in meta.items()}})
    return pd.DataFrame(rows)


def _sections(prov: Provenance, baseline_cmp: Comparison, run_cmp: Comparison | None,
              keys: pd.DataFrame, tidy: pd.DataFrame | None = None,
              ) -> list[tuple[str, str, Any]]:
    """Report body as (title, kind, payload) so HTML and Markdown say the same things."""
    n_failed = int((prov.failures["status"] == "failed").sum())
    n_incomplete = int((prov.failures["status"] != "failed").sum())
    status = (f"{n_failed} failed and {n_incomplete} incomplete repetition(s); "
              f"{len(prov.not_started)} cell(s) of cells.json not started.")
    out: list[tuple[str, str, Any]] = [("Status", "text", status)]
    if tidy is not None:
        out.append(("Repetitions with and without the cache-model plugin", "text",
                    kinds_verdict(tidy)))
    out.append(("Against the baseline", "pre", format_table(baseline_cmp)))
    if run_cmp is not None:
        out.append(("Against the other run", "pre", format_table(run_cmp)))
    out.append(("Key metrics per cell (median [q1, q3] n)", "table-index", keys))
    if tidy is not None:
        out.append(("The measured window", "text", window_verdict(tidy)))
        out.append(("Repetitions to read with care (window vs netperf > 25%, skew > 50 ms)",
                    "table", window_checks(tidy)))
    out.append(("Figures", "figures", None))
    if tidy is not None:
        out.append(("What the metrics mean", "table", explanations(tidy)))
    out.append(("Failures", "table", prov.failures))
    if prov.not_started:
        out.append(("Cells not started", "pre", "\n".join(prov.not_started)))
    out.append(("Provenance: versions", "table", _kv_table(
        {k: v for k, v in prov.versions.items() if k != "kernels"})))
    out.append(("Provenance: kernels", "table", _kernels(prov.versions)))
    out.append(("Provenance: counters", "text", prov.pmu))
    out.append(("Provenance: reader location", "text", prov.reader_note))
    out.append(("Provenance: host", "table", _kv_table(prov.host)))
    out.append(("Provenance: offloads read back (ethtool -k)", "table", prov.offloads))
    out.append(("Provenance: NIC interrupt lines", "table", pd.DataFrame(
        [{"cell": c, "irqs": v} for c, v in prov.nic_irqs.items()])))
    out.append(("Provenance: policy state read back", "pre",
                json.dumps(prov.readback, indent=1, sort_keys=True)))
    out.append(("Experiment as run", "pre", prov.experiment_yaml or "(experiment.yaml missing)"))
    return out


def render_html(prov: Provenance, sections: list[tuple[str, str, Any]],
                figures: list[Path]) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>netbed report {html.escape(prov.run_id)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>netbed report: {html.escape(prov.run_id)}</h1>"]
    for title, kind, payload in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "text":
            parts.append(f"<p>{html.escape(str(payload))}</p>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(str(payload))}</pre>")
        elif kind in ("table", "table-index"):
            parts.append(_table_html(payload, index=kind == "table-index"))
        elif kind == "figures":
            parts += [_img_html(p) for p in figures] or ["<p class='note'>(no figures)</p>"]
        elif kind == "figure":  # one figure of a section (analysis.answer)
            parts.append(_img_html(payload))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_table(df: pd.DataFrame, index: bool = False) -> str:
    if df.empty:
        return "(none)\n"
    d = df.reset_index() if index else df
    cols = [str(c) for c in d.columns]

    def cell(v: Any) -> str:
        s = "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def render_md(prov: Provenance, sections: list[tuple[str, str, Any]], figures: list[Path],
              base: Path) -> str:
    parts = [f"# netbed report: {prov.run_id}\n"]
    for title, kind, payload in sections:
        parts.append(f"## {title}\n")
        if kind == "text":
            parts.append(f"{payload}\n")
        elif kind == "pre":
            parts.append("```\n" + str(payload).rstrip("\n") + "\n```\n")
        elif kind in ("table", "table-index"):
            parts.append(_md_table(payload, index=kind == "table-index"))
        elif kind == "figures":
            parts += [f"![{p.stem}]({p.relative_to(base).as_posix()})\n" for p in figures]
        elif kind == "figure":  # one figure of a section (analysis.answer)
            parts.append(f"![{payload.stem}]({payload.relative_to(base).as_posix()})\n")
    return "\n".join(parts)


@dataclass(frozen=True)
class ReportPaths:
    html: Path
    md: Path
    figures: list[Path]
    claims: Path | None = None  # the claims table as text (analysis.pipeline)


def build_report(run_dir: Path, tidy: pd.DataFrame, facts: dict[tuple[str, int], Any],
                 summary: pd.DataFrame, baseline_cmp: Comparison, run_cmp: Comparison | None,
                 figures: list[Path], lead: list[tuple[str, str, Any]] | None = None,
                 cachemodel: list[tuple[str, str, Any]] | None = None) -> ReportPaths:
    """`lead`: sections that open the report, before anything else (analysis.answer);
    `cachemodel`: the attribution's sections (analysis.symbols.report_sections), read
    here unless given."""
    out = analysis_dir(run_dir)
    prov = gather_provenance(run_dir, tidy, facts)
    view = by_kind(tidy)  # each number from the repetitions that measure it truly
    keys = with_cv(key_summary(summary), view)  # h-repeat (#11): CV, drift
    extra, drift_figures = report_parts(run_dir, view, out / "plots")
    sections = [*(lead or []), *insert_after_key_table(
        _sections(prov, baseline_cmp, run_cmp, keys, tidy), extra)]
    figures = [*figures, *drift_figures]
    # cache-model attribution (analysis/symbols.py), right after the figures
    at = next((i + 1 for i, s in enumerate(sections) if s[1] == "figures"), len(sections))
    sections[at:at] = cachemodel_sections(run_dir) if cachemodel is None else cachemodel
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(prov, sections, figures))
    atomic_write_text(md_path, render_md(prov, sections, figures, out))
    lead_figures = [p for _, kind, p in lead or [] if kind == "figure"]
    return ReportPaths(html_path, md_path, [*lead_figures, *figures])


__all__ = ["AXES", "ReportPaths", "build_report", "gather_provenance", "pmu_verdict"]
