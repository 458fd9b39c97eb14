"""What the in-guest tracing costs: window throughput with and without it. Prints; never asserts.

    python -m benchmarks.tracing [--rounds N] [--nic e1000] [--policy default]
        [--workload TCP_STREAM] [--duration 5]

One boot (receiver + sender); each round runs one repetition without the trace
and one with it (order alternating, so host drift hits both alike), through the
runner's own code, and reads `window.throughput` (or `window.transaction_rate`
for TCP_RR) from the collated repetition. Run it under the guest lock:
`flock /tmp/netbed-guests.lock python -m benchmarks.tracing`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd

from analysis.collate import collate_rep
from testbed.experiment.config import experiment_from_dict
from testbed.experiment.matrix import expand
from testbed.experiment.policies import load_policies
from testbed.run.folder import RunDir
from testbed.run.repetition import discover, run_repetition
from testbed.settings import Settings
from testbed.vm.topology import boot, prepare_assets


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
    with tempfile.TemporaryDirectory(prefix="netbed-bench-") as tmp_s:
        tmp = Path(tmp_s)
        assets = prepare_assets(settings, args.kernel, tmp / "assets")
        with boot(assets, settings, tmp / "guests", cpus=2, nic=args.nic,  # type: ignore[arg-type]
                  with_sender=True, log=lambda m: None) as topo:
            state = discover(topo)
            for i in range(args.rounds):
                for tracing in ((False, True) if i % 2 == 0 else (True, False)):
                    run = RunDir(tmp / f"r{i}-{int(tracing)}")
                    rep = run.start_rep(cell.cell_id, 1)
                    run_repetition(topo, state, exp, cell,
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
    off, on = statistics.median(got[False]), statistics.median(got[True])
    print(f"{args.kernel}/{args.nic}/{args.policy}/{args.workload}, {args.duration} s windows, "
          f"{args.rounds} rounds, {assets.accel.upper()}: median {rate} without tracing "
          f"{off:.1f}, with {on:.1f}: tracing costs {100 * (1 - on / off):+.1f}%")


if __name__ == "__main__":
    main()
