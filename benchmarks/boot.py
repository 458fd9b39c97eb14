"""Boot-to-SSH-ready time per kernel and NIC (median of several boots). Prints; never asserts.

Goal for later: 3 s or less under TCG with our own kernel.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from testbed.settings import Settings
from testbed.vm.topology import boot, prepare_assets
from testbed.vocabulary import nic_name


def run_boot_benchmark(settings: Settings, kernel: str, nic: str, cpus: int, boots: int,
                       log: Callable[[str], None] = print) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="netbed-bench-") as tmp_s:
        tmp = Path(tmp_s)
        assets = prepare_assets(settings, kernel, tmp, log)
        ready, total = [], []
        for i in range(boots):
            with boot(assets, settings, tmp / f"boot{i}", cpus=cpus, nic=nic_name(nic),
                      with_sender=False, log=lambda m: None) as topo:
                r = topo.receiver
                ready.append(r.boot_seconds)
                total.append(r.boot_seconds + r.ssh_seconds)
            log(f"boot {i + 1}/{boots}: console ready {ready[-1]:.1f} s, "
                f"SSH ready {total[-1]:.1f} s")
    result = {"median_console_ready_s": statistics.median(ready),
              "median_ssh_ready_s": statistics.median(total)}
    print(f"boot-to-SSH-ready ({kernel} kernel, {nic}, {cpus} vCPUs, "
          f"{assets.accel.upper()}, {boots} boots): median {result['median_ssh_ready_s']:.1f} s "
          f"(console ready {result['median_console_ready_s']:.1f} s; goal <= 3 s)")
    return result
