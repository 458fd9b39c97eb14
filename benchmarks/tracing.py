"""What the in-guest tracing costs: window throughput with and without it. Prints; never asserts.

    python -m benchmarks.tracing [--rounds N] [--nic e1000] [--policy default]
        [--workload TCP_STREAM] [--duration 5]

One boot (receiver + sender); each round runs one repetition without the trace
and one with it (order alternating, so host drift hits both alike), through the
runner's own code, and reads `window.throughput` (or `window.transaction_rate`
for TCP_RR) from the collated repetition. Then, to choose the tracer by its cost,
plain netperf runs (netperf's own rate; the same events and filters) with no
tracing, with tracefs (what the window uses), and with `perf record -a` writing the
same events to a file. It holds netbed's host lock (testbed.run.hostlock) while its
guests run: it waits for a measuring run on this host, and a run waits for it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd

from analysis.collate import collate_rep
from testbed.experiment.load import experiment_from_dict
from testbed.experiment.matrix import expand
from testbed.experiment.policies import load_policies
from testbed.formats import trace
from testbed.run import hostlock
from testbed.run.folder import RunDir
from testbed.run.repetition import discover, run_repetition
from testbed.settings import Settings
from testbed.vm.topology import Topology, boot, prepare_assets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nic", default="e1000")
    ap.add_argument("--kernel", default="distro")
    ap.add_argument("--policy", default="default")
    ap.add_argument("--workload", default="TCP_STREAM")
    ap.add_argument("--duration", type=int, default=5)
    args = ap.parse_args(argv)
    rate = "window.transaction_rate" if args.workload == "TCP_RR" else "window.throughput"
    exp = experiment_from_dict(
        {"name": "tracing", "axes": {"kernel": [args.kernel], "nic": [args.nic], "cpus": [2],
                                     "policy": [args.policy], "workload": [args.workload],
                                     "gro": ["on"]},
         "repetitions": 1, "duration": args.duration, "warmup": 1}, load_policies())
    cell = expand(exp)[0]
    settings = Settings()
    got: dict[bool, list[float]] = {False: [], True: []}
    with hostlock.held("benchmarks.tracing"), \
            tempfile.TemporaryDirectory(prefix="netbed-bench-") as tmp_s:
        tmp = Path(tmp_s)
        assets = prepare_assets(settings, args.kernel, tmp / "assets")
        with boot(assets, settings, tmp / "guests", cpus=2, nic=args.nic,
                  with_sender=True, log=lambda m: None) as topo:
            rx, tx = topo.receiver.ssh, topo.sender_shell
            state = discover(rx, topo.receiver.spec.data_mac)
            for i in range(args.rounds):
                for tracing in ((False, True) if i % 2 == 0 else (True, False)):
                    run = RunDir(tmp / f"r{i}-{int(tracing)}")
                    rep = run.start_rep(cell.cell_id, 1)
                    run_repetition(rx, tx, state, exp, cell,
                                   exp.policies.resolve(args.policy, 2), rep, pmu=False,
                                   tracing=tracing)
                    run.mark_done(rep, {})
                    df = pd.DataFrame(collate_rep(rep)[0])
                    value = float(df[(df.metric == rate) & (df.cpu == "all")]["value"].iloc[0])
                    size = (rep.path / "trace.txt.gz").stat().st_size if tracing else 0
                    got[tracing].append(value)
                    print(f"round {i + 1}: tracing {'on ' if tracing else 'off'} "
                          f"{rate} = {value:.1f}" + (f" (trace {size / 1e6:.2f} MB gz)"
                                                     if tracing else ""), flush=True)
            tracers = compare_tracers(topo, state.nic.iface, args.rounds, args.duration)
    off, on = statistics.median(got[False]), statistics.median(got[True])
    print(f"{args.kernel}/{args.nic}/{args.policy}/{args.workload}, {args.duration} s windows, "
          f"{args.rounds} rounds, {assets.accel.upper()}: median {rate} without tracing "
          f"{off:.1f}, with {on:.1f}: tracing costs {100 * (1 - on / off):+.1f}%")
    # each round's pair ran back to back: their ratio cancels drift between rounds
    ratios = sorted(a / b for a, b in zip(got[True], got[False], strict=True) if b > 0)
    if ratios:
        print(f"paired rounds, with/without: median {statistics.median(ratios):.2f}x "
              f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}x, n={len(ratios)}); "
              f"host load average now {Path('/proc/loadavg').read_text().split()[0]}")
    base = statistics.median(tracers["none"])
    for mode, values in tracers.items():
        med = statistics.median(values)
        print(f"netperf {args.workload} {args.duration} s, {mode:>11}: median {med:.1f} "
              f"({', '.join(f'{v:.1f}' for v in values)}), {100 * (1 - med / base):+.1f}% "
              "vs none")


PERF_EVENTS = ("net:netif_receive_skb", "napi:napi_poll", "sched:sched_waking",
               "sched:sched_wakeup", "sched:sched_switch")


def compare_tracers(topo: Topology, iface: str, rounds: int, seconds: int,
                    ) -> dict[str, list[float]]:
    """netperf's rate with no tracer, tracefs, and perf record (same events and filters)."""
    rx, tx = topo.receiver.ssh, topo.sender_shell
    filters = trace._filters(iface)
    perf_args = " ".join(f"-e {ev} --filter {filters[ev.replace(':', '/')]}"
                         for ev in PERF_EVENTS)
    setup = trace.setup_command(iface, "/tmp/nbbench")
    starts = {
        "none": "true",
        "tracefs": f"mkdir -p /tmp/nbbench && {{ {setup}\n}} && "
                   f"echo 1 > {trace.TRACEFS}/tracing_on",
        "perf-record": f"nohup perf record -q -a -m 2048 -o /tmp/nbbench.data {perf_args} "
                       f"> /tmp/nbbench.log 2>&1 & sleep 2",
    }
    stops = {
        "none": "true",
        "tracefs": f"echo 0 > {trace.TRACEFS}/tracing_on; echo 0 > {trace.TRACEFS}/events/enable;"
                   f" echo > {trace.TRACEFS}/trace",
        "perf-record": "pkill -INT -x perf; sleep 2; ls -l /tmp/nbbench.data; rm -f "
                       "/tmp/nbbench.data",
    }
    out: dict[str, list[float]] = {m: [] for m in starts}
    cmd = f"netperf -P 0 -H 198.18.0.1 -t TCP_STREAM -l {seconds} -- -m 16384 -k THROUGHPUT"
    for i in range(rounds):
        for mode in (list(starts) if i % 2 == 0 else list(reversed(starts))):
            rx.run(starts[mode], timeout=120)
            res = tx.run(cmd, timeout=seconds + 60)
            stopped = rx.run(stops[mode], timeout=120, check=False).stdout.strip()
            value = float(res.stdout.strip().partition("=")[2])
            out[mode].append(value)
            print(f"round {i + 1}: {mode:>11} netperf {value:.1f}"
                  + (f" ({stopped.split()[4]} bytes recorded)" if mode == "perf-record"
                     and stopped else ""), flush=True)
    return out


if __name__ == "__main__":
    main()
