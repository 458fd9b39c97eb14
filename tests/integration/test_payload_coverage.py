"""The cache model notices the payload's device writes only when the payload does not repeat.

netperf's default payload repeats "netperf\\0" every 8 bytes; e1000 receives
1448-byte segments at a fixed offset into buffers cut from recycled pages, so the
new bytes of a buffer equal what an earlier packet left there and the model (which
notices a device write by a change of a line's bytes) sees almost none of them:
measured 0.09 of the payload lines on the stock kernel. With a random fill file and a
wide send ring the stream repeats every 4 MiB: 1.01. Debian's kernel zeroes freshly
allocated pages (init_on_alloc), so there even the default payload is seen (1.16).
virtio on the stock kernel: 0.009 with the default payload, 0.84 with the fill
(cachemodel/README.md says why it stays below 1).
One boot with the cache-model plugin on the receiver per case, two repetitions
(default payload, then the random fill) through the runner's code. `slow`: the model
runs the receiver at a fraction of plain TCG speed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import pytest

from analysis.collate import collate_rep
from testbed.experiment.load import experiment_from_dict
from testbed.experiment.matrix import expand
from testbed.experiment.policies import load_policies
from testbed.run.cachemodel_window import collect_window, receiver_plugins
from testbed.run.folder import RunDir
from testbed.run.repetition import discover, run_repetition
from testbed.settings import Settings
from testbed.vm.topology import boot, prepare_assets

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.mark.parametrize(("kernel", "nic"), [("stock", "e1000"), ("distro", "e1000"),
                                            ("stock", "virtio")])
def test_device_write_coverage_needs_a_non_repeating_payload(kernel: str, nic: str) -> None:
    """With the random fill e1000 reaches 90% on every kernel. netperf's default payload is
    missed where freshly allocated pages are not zeroed (the stock kernel); Debian's kernel
    zeroes them (init_on_alloc), so every device write changes bytes there. virtio's figures
    are printed and explained in cachemodel/README.md."""
    settings = Settings()
    if kernel != "distro" and not any((settings.cache_dir / "kernels").glob(f"{kernel}-*")):
        pytest.skip(f"the {kernel} kernel is not built (invoke build-kernel)")
    exp = experiment_from_dict(
        {"name": "coverage", "axes": {"kernel": [kernel], "nic": [nic], "cpus": [2],
                                      "policy": ["pin-irq"], "workload": ["TCP_STREAM"],
                                      "gro": ["on"]},
         "repetitions": 1, "duration": 3, "warmup": 1, "counters": ["cachemodel"]},
        load_policies())
    cell = expand(exp)[0]
    got: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory(prefix="netbed-cov-") as tmp_s:
        tmp = Path(tmp_s)
        assets = prepare_assets(settings, kernel, tmp / "assets")
        plugins, threads = receiver_plugins(settings, tmp / "guests", print)
        with boot(assets, settings, tmp / "guests", cpus=2, nic=nic,  # type: ignore[arg-type]
                  with_sender=True,
                  receiver_plugins=plugins, receiver_tcg_threads=threads) as topo:
            state = discover(topo.receiver.ssh, topo.receiver.spec.data_mac)
            for kind in ("netperf-default", "random-fill"):
                run = RunDir(tmp / kind)
                rep = run.start_rep(cell.cell_id, 1)
                run_repetition(topo.receiver.ssh, topo.sender_shell, state, exp, cell,
                               exp.policies.resolve("pin-irq", 2), rep, pmu=False,
                               payload_kind=kind)
                collect_window(topo.receiver.spec.workdir, rep)
                run.mark_done(rep, {})
                df = pd.DataFrame(collate_rep(rep)[0])
                got[kind] = df[df["cpu"] == "all"].set_index("metric")
    for kind, df in got.items():
        print(kernel, nic, kind, {m: (round(float(df.loc[m, "value"]), 3), df.loc[m, "note"])
                     for m in ("cache.device_write_coverage", "cache.device_writes",
                               "window.kbytes", "window.netperf_ratio")})
    default = got["netperf-default"].loc["cache.device_write_coverage", "value"]
    fill = got["random-fill"].loc["cache.device_write_coverage", "value"]
    assert got["random-fill"].loc["locality.processing_on_reader_cpu", "status"] == \
        "not-supported"  # tracing is kept out of cache-model windows, and says so
    # measured: stock e1000 0.09 -> 1.01, 0.11 -> 0.94 (16 MiB period); distro e1000 1.16 ->
    # 1.09; stock virtio 0.009 -> 0.84, 0.008 -> 0.51 (cachemodel/README.md)
    if nic == "e1000":
        assert fill >= 0.9
    else:
        # below 1 and variable: the model keeps a line's digest only while it is cached
        assert fill > 10 * default
    if kernel == "stock":
        assert default < 0.5
