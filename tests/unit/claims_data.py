"""Synthetic tidy tables for the claims (analysis.claims), drawn in the open with stated
effects: they test the statistics and the wording, not the testbed.

Each cell has N repetitions under the cache model (private misses per KB, where the
copy's reads were served, the socket queue) and PLAIN plain ones (throughput, wake-up
placement, processing on the reader's CPU, the socket queue).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.collate import TIDY_COLUMNS

N = 3      # instrumented repetitions per cell (configs/quick.yaml)
PLAIN = 1  # plain repetitions per cell
SIGMA = 0.05

# misses/KB per (nic, rcvbuf, policy): a planted locality effect on e1000 at 64K only
MISSES = {("e1000", "64K", "pin-same"): 20.0, ("e1000", "64K", "pin-cross"): 40.0,
          ("virtio", "64K", "pin-same"): 18.0, ("virtio", "64K", "pin-cross"): 19.0,
          ("e1000", "auto", "pin-same"): 39.0, ("e1000", "auto", "pin-cross"): 39.0,
          ("virtio", "auto", "pin-same"): 18.5, ("virtio", "auto", "pin-cross"): 18.5}
QUEUE_KB = {"64K": 40.0, "auto": 2500.0}
# copy reads served from own/peer/llc/memory
COPY_FROM = {("e1000", "64K", "pin-same"): (0.7, 0.05, 0.2, 0.05),
             ("e1000", "64K", "pin-cross"): (0.05, 0.3, 0.5, 0.15),
             ("virtio", "64K", "pin-same"): (0.02, 0.0, 0.6, 0.38),
             ("virtio", "64K", "pin-cross"): (0.02, 0.0, 0.6, 0.38)}


def draw(rng: np.random.Generator, median: float, n: int, sigma: float = SIGMA) -> list[float]:
    return list(median * np.exp(rng.normal(0, sigma, n)))


def _ids(nic: str, policy: str, rcvbuf: str | None, workload: str, rep: int,
         kernel: str = "patched") -> dict[str, object]:
    cell = f"{kernel}-{nic}-2cpu-{policy}-{workload}-gro_on" + (
        f"-rcvbuf_{rcvbuf}" if rcvbuf not in (None, "auto") else "")
    ids: dict[str, object] = {
        "run_id": "synth", "cell_id": cell, "repetition": rep, "kernel": kernel, "nic": nic,
        "cpus": 2, "policy": policy, "workload": workload,
        "message_size": 16384 if workload == "TCP_STREAM" else 1, "gro": "on",
        "cpu": "all", "status": "ok", "note": ""}
    if rcvbuf is not None:
        ids["rcvbuf"] = rcvbuf
    return ids


def locality_run(rng: np.random.Generator, misses: dict[tuple[str, str, str], float] = MISSES,
                 sigma: float = SIGMA, payload: bool = True, queue: bool = True,
                 rcvbuf_column: bool = True, wake: bool = True) -> pd.DataFrame:
    """pin-same / pin-cross cells per NIC and rcvbuf level (and wake-local / default RR
    cells on the patched kernel when `wake`)."""
    rows: list[dict[str, object]] = []

    def add(ids: dict[str, object], metric: str, value: float, unit: str, source: str) -> None:
        rows.append({**ids, "metric": metric, "value": value, "unit": unit, "source": source})

    for (nic, level, policy), m in misses.items():
        for rep in range(N + PLAIN):
            under = rep < N
            ids = _ids(nic, policy, level if rcvbuf_column else None, "TCP_STREAM", rep)
            add(ids, "rep.status", 1.0, "", "runner")
            add(ids, "rep.instrumented", float(under), "", "runner")
            if queue:
                add(ids, "socket.queue_kb.p50", draw(rng, QUEUE_KB[level], 1)[0], "KB",
                    "sockqueue")
            if under:
                add(ids, "cache.l2_misses.per_kb", draw(rng, m, 1, sigma)[0], "1/KB", "derived")
                shares = COPY_FROM.get((nic, level, policy))
                if payload and shares:
                    add(ids, "cache.payload_lag_kb.p50", draw(rng, QUEUE_KB[level], 1)[0],
                        "KB", "cachemodel")
                    noisy = np.clip(np.array(shares) + rng.normal(0, 0.02, 4), 0, None)
                    for key, v in zip(("own", "peer", "llc", "memory"), noisy / noisy.sum(),
                                      strict=True):
                        add(ids, f"cache.payload_copy_from.{key}", float(v), "fraction",
                            "cachemodel")
            else:
                add(ids, "window.throughput", draw(rng, 900.0, 1)[0], "10^6bits/s", "window")
    if wake:
        for nic in ("e1000", "virtio"):
            for policy, placed, rate, miss in (("default", 0.4, 1000.0, 300.0),
                                               ("wake-local", 0.95, 1100.0, 240.0)):
                for rep in range(N + PLAIN):
                    under = rep < N
                    ids = _ids(nic, policy, "auto" if rcvbuf_column else None, "TCP_RR", rep)
                    add(ids, "rep.status", 1.0, "", "runner")
                    add(ids, "rep.instrumented", float(under), "", "runner")
                    if under:
                        add(ids, "cache.l2_misses.per_trans", draw(rng, miss, 1)[0], "1/trans",
                            "derived")
                    else:
                        add(ids, "window.transaction_rate", draw(rng, rate, 1)[0], "trans/s",
                            "window")
                        add(ids, "wakeups.on_waker_cpu", placed, "fraction", "trace")
    columns = [*TIDY_COLUMNS, *(() if "rcvbuf" in TIDY_COLUMNS else ("rcvbuf",))]
    df = pd.DataFrame(rows, columns=columns)
    # a run from before the copy-lag axis has no such column at all
    return df if rcvbuf_column else df.drop(columns="rcvbuf")
