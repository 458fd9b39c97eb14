"""Each policy against its NIC's own default: the answer's details, below the claims.

analysis.answer opens the report with the seed's claims (analysis.claims, pin-cross vs
pin-same). This module keeps the wider view underneath it: does processing the data
and running the reader on one CPU pay against the NIC's `default` placement, does
waking the reader on the softirq's CPU (the patch) help, and does locality matter
more when the NIC does no checksum offload, for every policy the run has?

Each figure is a ratio of geometric means (policy over that NIC's own default, same
kernel, vCPUs, workload and GRO) with a 95% Welch t interval on logs; shares are
differences in percentage points. The method, its reasons (why not a bootstrap at
n = 3) and the verdict words are analysis/stats.py's, the same as the comparison
tables'.

The interaction divides the policy effect on e1000 by the same effect on the
offloading NIC (virtio-notso when the run has it: checksum offload only, MSS-sized
frames like e1000; else virtio). "Locality matters more without checksum offload"
is *supported* when the interval says the e1000 effect is larger in magnitude,
*contradicted* when it says the opposite, and *not detectable* when it includes 1.

Throughput and transaction rate under the cache model measure the plugin's speed as
much as the guest's, and cache-model windows are not traced: rate, latency, locality
and wake-up effects are taken only from the plain repetitions (booted without the
plugin; `analysis.collate.instrumented_reps` tells them apart), cache counters only
from the instrumented ones (from every repetition in a run without the plugin, e.g.
hardware events under KVM). When a run has no plain repetitions, the answer says it
has no throughput effects. Locality and wake-up placement are shares (0 to 1, often
exactly 0 or 1), so they are compared as differences in percentage points with a
Welch t interval on the values themselves, not as ratios. Every sentence says its n;
one repetition on a side gives a point estimate and says it has no interval. No
figure whose interval includes no change is worded as an effect.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.collate import instrumented_reps
from analysis.stats import (
    METHOD_TEXT,
    Difference,
    Ratio,
    diff_contrast,
    interaction_verdict,
    log_contrast,
)
from testbed.vocabulary import TABLE_AXES as AXES

DEFAULT_POLICY = "default"
CHECKSUM_NIC = "e1000"
# The offloading NIC the interaction compares e1000 with, most specific first.
OFFLOAD_NICS = ("virtio-notso", "virtio")

# What each answer row reads, by preference: the window metrics (one measured window
# for the counters and the work) where the run has them, else what collate gives today.
# kind: "rate" (plain repetitions), "latency" (RR only, plain), "cache" (instrumented),
# "share" (plain; a fraction compared as a difference, see SHARES).
METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("rate", "throughput", "bulk", ("window.throughput", "netperf.throughput", "throughput")),
    ("rate", "transaction rate", "rr",
     ("window.transaction_rate", "netperf.transaction_rate", "transaction_rate")),
    ("latency", "latency p50", "rr", ("netperf.latency_p50", "latency_p50")),
    ("latency", "latency p99", "rr", ("netperf.latency_p99", "latency_p99")),
    ("cache", "c2c transfers per KB", "any",
     ("cache.c2c_transfers.per_window_kb", "cache.c2c_transfers.per_kb",
      "cache.c2c_transfers.per_trans")),
    ("cache", "private-cache misses per KB", "any",
     ("cache.l2_misses.per_window_kb", "cache.l2_misses.per_kb", "cache.l2_misses.per_trans",
      "perf.L1-dcache-load-misses.per_kb")),
    ("cache", "LLC misses per KB", "any",
     ("cache.llc_misses.per_window_kb", "cache.llc_misses.per_kb",
      "cache.llc_misses.per_trans", "perf.LLC-load-misses.per_kb")),
)
# Where the receive path ran (tracepoints; plain repetitions only): label, metric.
SHARES: tuple[tuple[str, str], ...] = (
    ("processing on the reader's CPU", "locality.processing_on_reader_cpu"),
    ("wake-ups placed on the waking CPU", "wakeups.on_waker_cpu"),
)
PLAIN_KINDS = ("rate", "latency", "share")
GROUP_AXES = tuple(a for a in AXES if a not in ("policy",))


@dataclass
class Answer:
    """The section's rows, sentences and notes; empty tables when nothing applies."""

    effects: pd.DataFrame
    interactions: pd.DataFrame
    patch: pd.DataFrame
    sentences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figure: Path | None = None
    locality: pd.DataFrame = field(default_factory=pd.DataFrame)


def _workload_kind(workload: str) -> str:
    return "rr" if str(workload).upper().endswith("_RR") else "bulk"




def _values(tidy: pd.DataFrame) -> pd.DataFrame:
    ok = tidy[(tidy["status"] == "ok") & (tidy["cpu"] == "all") & tidy["value"].notna()]
    return ok.assign(**{a: ok[a].astype(str) for a in AXES})


def choose_metrics(tidy: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(kind, label, workload kind, metric): for each METRICS row and each workload kind
    (bulk, rr) the run has, the first name with values in that kind's cells. A bulk
    cell's cache counters come per KB, an RR cell's per transaction, as collate gives."""
    # only measured values count: an old run has window.* rows, but as not-supported
    ok = tidy[(tidy["status"] == "ok") & tidy["value"].notna()]
    kinds = ok["workload"].dropna().astype(str).map(_workload_kind)
    present = {wk: set(ok.loc[kinds == wk, "metric"].dropna().unique())
               for wk in ("bulk", "rr")}
    out = []
    for kind, label, wk, names in METRICS:
        for this in ("bulk", "rr") if wk == "any" else (wk,):
            name = next((n for n in names if n in present[this]), None)
            if name is None:
                continue
            shown = label
            if name.endswith(".per_trans"):
                shown = label.replace(" per KB", " per transaction")
            out.append((kind, shown, this, name))
    return out


def _samples(vals: pd.DataFrame, metric: str, plugin: set[tuple[str, str, int]],
             plain: bool) -> dict[tuple[str, ...], list[float]]:
    """Values per cell: `plain` takes only repetitions without the plugin; otherwise
    (cache counters) only those under it, when the run has any."""
    m = vals[vals["metric"] == metric]
    out: dict[tuple[str, ...], list[float]] = {}
    for row in m.itertuples(index=False):
        rec = row._asdict()
        under = (str(rec["run_id"]), str(rec["cell_id"]), int(rec["repetition"])) in plugin
        if under if plain else (plugin and not under):
            continue
        key = tuple(str(rec[a]) for a in AXES)
        out.setdefault(key, []).append(float(rec["value"]))
    return out


def _key(axes: dict[str, str]) -> tuple[str, ...]:
    return tuple(axes[a] for a in AXES)


def build_answer(tidy: pd.DataFrame) -> Answer:
    """Effects vs each NIC's default, the checksum interaction and the patch (pure)."""
    vals = _values(tidy)
    plugin = instrumented_reps(tidy)
    notes = []
    chosen = choose_metrics(tidy)
    effects, inter, patch = [], [], []
    rate_reps_exist = False
    for kind, label, wk, metric in chosen:
        plain = kind in PLAIN_KINDS
        samples = _samples(vals, metric, plugin, plain)
        if plain and samples:
            rate_reps_exist = True
        for key, new in sorted(samples.items()):
            axes = dict(zip(AXES, key, strict=True))
            if _workload_kind(axes["workload"]) != wk:
                continue
            if axes["policy"] != DEFAULT_POLICY:
                base = samples.get(_key({**axes, "policy": DEFAULT_POLICY}))
                if base:
                    r = log_contrast([new, base], [1, -1])
                    effects.append({**axes, "metric": label, "source": metric,
                                    "repetitions": _kind_word(plain, plugin),
                                    "n_policy": len(new), "n_default": len(base),
                                    "ratio": r.ratio, "ci_lo": r.lo, "ci_hi": r.hi,
                                    "detected": r.detected})
                    if axes["nic"] == CHECKSUM_NIC:
                        inter += _interactions(samples, axes, new, base, label, metric)
            elif axes["kernel"] == "patched":
                stock = samples.get(_key({**axes, "kernel": "stock"}))
                if stock:
                    r = log_contrast([new, stock], [1, -1])
                    patch.append({**axes, "contrast": "patched-default / stock-default",
                                  "metric": label, "n": "/".join(map(str, r.n)),
                                  "ratio": r.ratio, "ci_lo": r.lo, "ci_hi": r.hi,
                                  "detected": r.detected})
    locality = _locality(vals, plugin)
    n_plain = len(_finished(tidy) - plugin)
    if not any(k == "rate" for k, *_ in chosen) or not rate_reps_exist:
        notes.append("No throughput or transaction-rate effects: every repetition ran under "
                     "the cache-model plugin, whose own speed such rates would measure (they "
                     "are taken only from repetitions without the plugin).")
    elif plugin:
        notes.append(f"Throughput, transaction-rate, latency, locality and wake-up effects "
                     f"come only from the {n_plain} plain repetitions (booted without the "
                     f"cache-model plugin); cache counters only from the {len(plugin)} "
                     "instrumented ones. Each row's n counts its own kind.")
    if not any(k == "cache" for k, *_ in chosen):
        notes.append("No cache counters in this run (no cache model, no hardware PMU): "
                     "cache effects cannot be stated.")
    if locality.empty and plugin and not n_plain:
        notes.append("No locality or wake-up placement: cache-model windows are not traced "
                     "(the tracer's own memory accesses would be counted) and this run has "
                     "no plain repetitions.")
    eff = pd.DataFrame(effects)
    ans = Answer(eff, pd.DataFrame(inter), pd.DataFrame(patch), notes=notes,
                 locality=locality)
    ans.sentences = _sentences(ans)
    return ans


def _finished(tidy: pd.DataFrame) -> set[tuple[str, str, int]]:
    done = tidy[(tidy["metric"] == "rep.status") & (tidy["status"] == "ok")]
    return set(zip(done["run_id"].astype(str), done["cell_id"].astype(str),
                   done["repetition"].astype(int), strict=True))


def _kind_word(plain: bool, plugin: set[tuple[str, str, int]]) -> str:
    if not plugin:
        return "all"
    return "plain" if plain else "instrumented"


def _locality(vals: pd.DataFrame, plugin: set[tuple[str, str, int]]) -> pd.DataFrame:
    """Each policy's share against its NIC's default, in percentage points (plain reps)."""
    rows = []
    for label, metric in SHARES:
        samples = _samples(vals, metric, plugin, plain=True)
        for key, new in sorted(samples.items()):
            axes = dict(zip(AXES, key, strict=True))
            if axes["policy"] == DEFAULT_POLICY:
                continue
            base = samples.get(_key({**axes, "policy": DEFAULT_POLICY}))
            if not base:
                continue
            d = diff_contrast(new, base)
            rows.append({**axes, "metric": label, "source": metric,
                         "repetitions": _kind_word(True, plugin),
                         "n_policy": d.n[0], "n_default": d.n[1], "policy_share": d.new_mean,
                         "default_share": d.base_mean, "diff": d.diff, "ci_lo": d.lo,
                         "ci_hi": d.hi, "detected": d.detected})
    return pd.DataFrame(rows)


def _interactions(samples: dict[tuple[str, ...], list[float]], axes: dict[str, str],
                  new: list[float], base: list[float], label: str, metric: str,
                  ) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for other in OFFLOAD_NICS:
        o_new = samples.get(_key({**axes, "nic": other}))
        o_base = samples.get(_key({**axes, "nic": other, "policy": DEFAULT_POLICY}))
        if not o_new or not o_base:
            continue
        r = log_contrast([new, base, o_new, o_base], [1, -1, -1, 1])
        e = log_contrast([new, base], [1, -1])
        out.append({**{a: axes[a] for a in AXES if a != "nic"}, "contrast": f"e1000 / {other}",
                    "metric": label, "source": metric, "n": "/".join(map(str, r.n)),
                    "ratio": r.ratio, "ci_lo": r.lo, "ci_hi": r.hi,
                    "verdict": interaction_verdict(r, e)})
    return out


def _n_text(n_new: int, n_base: int, kind: str) -> str:
    """"n = 3 vs 3" with the kind of repetitions, and why one repetition gives no CI."""
    what = {"plain": " plain repetitions (no plugin)",
            "instrumented": " instrumented repetitions (cache model)"}.get(kind, "")
    text = f"n = {n_new} vs {n_base}{what}"
    if min(n_new, n_base) < 2:
        text += "; one repetition on a side gives no interval"
    return text


def _n_joined(n: str) -> str:
    """"n = 3/3/1/1" for a contrast of several cells, saying when a side is one repetition."""
    ones = "1" in str(n).split("/")
    return f"n = {n}" + ("; one repetition on a side gives no interval" if ones else "")


def _fmt(ratio: float, lo: float, hi: float) -> str:
    return Ratio(ratio, lo, hi, ()).pct()


def _where(row: pd.Series) -> str:
    parts = [f"{row['kernel']} kernel", str(row["workload"])]
    return ", ".join(parts)


def _sentences(ans: Answer) -> list[str]:
    out = []
    eff = ans.effects
    if eff.empty:
        out.append("No policy could be compared with its NIC's default in this run (each "
                   "needs a `default` cell with the same kernel, vCPUs, workload and GRO).")
    else:
        for _, r in eff.iterrows():
            n = _n_text(r["n_policy"], r["n_default"], r.get("repetitions", "all"))
            change = _fmt(r["ratio"], r["ci_lo"], r["ci_hi"])
            if min(r["n_policy"], r["n_default"]) < 2 and not math.isnan(r["ratio"]):
                out.append(f"{r['nic']} ({_where(r)}): {r['policy']} vs default, "
                           f"{r['metric']}: {change}, a point estimate with no interval, so "
                           f"no effect can be claimed ({n}).")
            elif r["detected"]:
                word = "higher" if r["ratio"] > 1 else "lower"
                out.append(f"{r['nic']} ({_where(r)}): {r['policy']} has {word} {r['metric']} "
                           f"than default: {change} ({n}).")
            else:
                out.append(f"{r['nic']} ({_where(r)}): {r['policy']} vs default, "
                           f"{r['metric']}: no change detected, {change} ({n}).")
    for _, r in ans.locality.iterrows():
        n = _n_text(r["n_policy"], r["n_default"], r["repetitions"])
        d = Difference(r["diff"], r["ci_lo"], r["ci_hi"], (r["n_policy"], r["n_default"]),
                       r["policy_share"], r["default_share"])
        shares = (f"{r['policy_share'] * 100:.0f}% vs {r['default_share'] * 100:.0f}% for "
                  f"default")
        if math.isnan(d.lo):
            verdict = "a point estimate with no interval, so no effect can be claimed"
        elif d.detected:
            verdict = "a change"
        else:
            verdict = "no change detected"
        out.append(f"{r['nic']} ({_where(r)}): {r['policy']}, {r['metric']}: {shares}, "
                   f"{d.pp()}: {verdict} ({n}).")
    for _, r in ans.interactions.iterrows():
        verdict = r["verdict"]
        claim = {"supported": "locality matters more without checksum offload: supported",
                 "contradicted": "locality matters more without checksum offload: "
                                 "contradicted (the effect is larger with offload)"}.get(
            verdict, "whether locality matters more without checksum offload is not "
                     "detectable")
        out.append(f"{r['policy']} ({r['kernel']} kernel, {r['workload']}), {r['metric']}: "
                   f"effect on {r['contrast']} = "
                   f"{_fmt(r['ratio'], r['ci_lo'], r['ci_hi'])} ({_n_joined(r['n'])}); "
                   f"{claim}.")
    wl = eff[(eff["policy"] == "wake-local")] if not eff.empty else eff
    if wl.empty:
        out.append("The patch: no wake-local cell in this run.")
    else:
        seen = wl[wl["detected"]]
        out.append(f"The patch (wake-local vs default on the patched kernel): a change is "
                   f"detected in {len(seen)} of {len(wl)} comparisons"
                   + (f" ({'; '.join(f'{r.nic} {r.metric}' for r in seen.itertuples())})"
                      if len(seen) else "") + "; each is stated above with its CI and n.")
    for _, r in ans.patch.iterrows():
        change = _fmt(r["ratio"], r["ci_lo"], r["ci_hi"])
        what = "differs from" if r["detected"] else "is not detectably different from"
        out.append(f"The patch switched off ({r['nic']}, {r['workload']}, {r['metric']}): "
                   f"patched-default {what} stock-default, {change} ({_n_joined(r['n'])}).")
    return out


def _span(*columns: pd.Series) -> str:
    values = [int(v) for c in columns for v in c]
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo} to {hi}"


def headline(ans: Answer) -> str:
    """The section's opening sentence: the interaction verdicts, then what was detected."""
    parts = []
    i = ans.interactions
    if i.empty:
        parts.append("Whether locality matters more without checksum offload cannot be "
                     "answered from this run (it needs e1000 and virtio or virtio-notso "
                     "cells with `default` and the same policy).")
    else:
        counts = i["verdict"].value_counts()
        parts.append("Locality matters more without checksum offload: " + ", ".join(
            f"{k} in {v} of {len(i)} comparisons" for k, v in counts.items()) + ".")
    e = ans.effects
    if not e.empty:
        parts.append(f"Against their NIC's own default, {int(e['detected'].sum())} of "
                     f"{len(e)} policy comparisons show a change whose 95% CI excludes "
                     f"no change (n = {_span(e['n_policy'], e['n_default'])} repetitions "
                     "per cell).")
    return " ".join(parts)


def effects_table(ans: Answer) -> pd.DataFrame:
    """The effects as the report shows them: one row per NIC, kernel, policy and metric."""
    if ans.effects.empty:
        return ans.effects
    e = ans.effects
    return pd.DataFrame({
        "kernel": e["kernel"], "nic": e["nic"], "workload": e["workload"],
        "policy": e["policy"], "metric": e["metric"],
        "vs default, 95% CI": [_fmt(a, b, c) for a, b, c in
                               zip(e["ratio"], e["ci_lo"], e["ci_hi"], strict=True)],
        "n policy/default": [f"{a}/{b}" for a, b in
                             zip(e["n_policy"], e["n_default"], strict=True)],
        "repetitions": e.get("repetitions", "all"),
        "source": e["source"]})


def locality_table(ans: Answer) -> pd.DataFrame:
    """Where the receive path ran, per policy against its NIC's default (plain reps)."""
    lo = ans.locality
    if lo.empty:
        return lo
    return pd.DataFrame({
        "kernel": lo["kernel"], "nic": lo["nic"], "workload": lo["workload"],
        "policy": lo["policy"], "metric": lo["metric"],
        "policy / default": [f"{a * 100:.0f}% / {b * 100:.0f}%" for a, b in
                             zip(lo["policy_share"], lo["default_share"], strict=True)],
        "difference, 95% CI": [Difference(d, a, b, (0, 0), math.nan, math.nan).pp()
                               for d, a, b in zip(lo["diff"], lo["ci_lo"], lo["ci_hi"],
                                                  strict=True)],
        "n policy/default": [f"{a}/{b}" for a, b in
                             zip(lo["n_policy"], lo["n_default"], strict=True)],
        "repetitions": lo["repetitions"], "source": lo["source"]})


def interactions_table(ans: Answer) -> pd.DataFrame:
    i = ans.interactions
    if i.empty:
        return i
    return pd.DataFrame({
        "kernel": i["kernel"], "workload": i["workload"], "policy": i["policy"],
        "metric": i["metric"], "contrast": i["contrast"],
        "ratio of effects, 95% CI": [_fmt(a, b, c) for a, b, c in
                                     zip(i["ratio"], i["ci_lo"], i["ci_hi"], strict=True)],
        "n": i["n"], "verdict": i["verdict"]})


METHOD_NOTE = METHOD_TEXT


def detail_sections(ans: Answer) -> list[tuple[str, str, object]]:
    """(title, kind, payload) rows for analysis.report, in the order they are read."""
    out: list[tuple[str, str, object]] = [
        ("Details: policies against their NIC's default", "text", headline(ans)),
        ("Details: in sentences", "pre",
         "\n".join(textwrap.fill(s, 100, subsequent_indent="    ") for s in ans.sentences)),
        ("Details: policy vs its NIC's default", "table", effects_table(ans)),
        ("Details: e1000 effect / offloading NIC effect (interaction)", "table",
         interactions_table(ans)),
        ("Details: where the receive path ran (policy vs its NIC's default)", "table",
         locality_table(ans)),
        ("Details: how to read them", "text", " ".join([METHOD_NOTE, *ans.notes])),
    ]
    if ans.figure is not None:
        out.append(("Details: policies against default, figure", "figure", ans.figure))
    return out


def detail_report_sections(tidy: pd.DataFrame, plots_dir: Path, cache_note: str,
                           ) -> list[tuple[str, str, object]]:
    """The details for a run: every policy against its NIC's default, with a figure."""
    ans = build_answer(tidy)
    if cache_note:
        ans.notes.append(cache_note)
    ans.figure = plot_answer(ans, plots_dir)
    return detail_sections(ans)


def plot_answer(ans: Answer, out_dir: Path) -> Path | None:
    """One panel per NIC: each policy's ratio to default with CI whiskers, per metric."""
    e = ans.effects
    if e.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    nics = list(dict.fromkeys(e["nic"]))
    labels = list(dict.fromkeys(e["metric"]))
    fig, axs = plt.subplots(1, len(nics), figsize=(4.2 * len(nics), 3.6), squeeze=False,
                            sharey=True)
    for ax, nic in zip(axs[0], nics, strict=True):
        d = e[e["nic"] == nic]
        policies = list(dict.fromkeys(d["policy"]))
        width = 0.8 / max(len(labels), 1)
        for j, label in enumerate(labels):
            m = d[d["metric"] == label].groupby("policy")[["ratio", "ci_lo", "ci_hi"]].first()
            xs, ys, lo, hi = [], [], [], []
            for i, p in enumerate(policies):
                if p in m.index and not math.isnan(m.loc[p, "ratio"]):
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(m.loc[p, "ratio"])
                    lo.append(m.loc[p, "ratio"] - (m.loc[p, "ci_lo"]
                                                   if not math.isnan(m.loc[p, "ci_lo"])
                                                   else m.loc[p, "ratio"]))
                    hi.append((m.loc[p, "ci_hi"] if not math.isnan(m.loc[p, "ci_hi"])
                               else m.loc[p, "ratio"]) - m.loc[p, "ratio"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(policies)), policies, rotation=30)
        ax.set_title(nic)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axs[0][0].set_ylabel("policy / default (95% CI)")
    axs[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "policy-effects.png"
    tmp = path.with_name(".policy-effects.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
