"""The cache model inside a matrix run: the receiver's plugin and each window's counters.

The plugin appends one snapshot block per marker hit to a CSV on the host for the
whole life of the receiver; a repetition's file holds the blocks of its own
window (`nbmark begin 1` ... `nbmark end 1`), raw, so analysis subtracts them
like perf's counters.
"""

from __future__ import annotations

from pathlib import Path

from testbed.build.cachemodel_plugin import RECOMMENDED_TCG_THREADS, build_plugin
from testbed.errors import NetbedError
from testbed.files import atomic_write_text
from testbed.formats.cachemodel import read_snapshots
from testbed.progress import Log
from testbed.run.folder import RepDir
from testbed.settings import Settings
from testbed.vm.cachemodel import cachemodel_plugin_spec
from testbed.vm.qemu import PluginSpec
from testbed.vocabulary import TcgThreads

CSV_NAME = "cachemodel-receiver.csv"


def receiver_plugins(settings: Settings, workdir: Path,
                     log: Log) -> tuple[tuple[PluginSpec, ...], TcgThreads]:
    """The receiver's `-plugin` and the TCG threading the model needs for exact counts."""
    plugin = build_plugin(settings, log)
    return (cachemodel_plugin_spec(plugin, workdir / CSV_NAME),), RECOMMENDED_TCG_THREADS


def window_blocks(text: str) -> str:
    """CSV text of the last begin block and the end block after it (pure)."""
    df = read_snapshots(text)
    firsts = df.groupby("snapshot")["marker"].first()
    begins = [s for s, m in firsts.items() if str(m).startswith("begin")]
    if not begins:
        raise NetbedError("the cache model saw no begin marker in the measured window",
                          hint="is nbmark in the guest image? (images/tools/nbmark.c)")
    start = begins[-1]
    ends = [s for s, m in firsts.items() if s > start and str(m).startswith("end")]
    if not ends:
        raise NetbedError("the cache model saw no end marker after the window's begin")
    keep = df[df["snapshot"].isin([start, ends[0]])].drop(columns="snapshot")
    return str(keep.to_csv(index=False))


def collect_window(workdir: Path, rep: RepDir) -> None:
    """The repetition's window out of the CSV the receiver's plugin writes in `workdir`."""
    csv = workdir / CSV_NAME
    if not csv.exists():
        raise NetbedError(f"the cache-model plugin wrote no CSV ({csv})")
    atomic_write_text(rep.file("cachemodel.csv"), window_blocks(csv.read_text()))
