"""The cache model inside a matrix run: the receiver's plugin and each window's counters.

The plugin appends one snapshot block per marker hit to a CSV on the host for the
whole life of the receiver; a repetition's file holds the blocks of its own
window (`nbmark begin 1` ... `nbmark end 1`), raw, so analysis subtracts them
like perf's counters.

Attribution: the plugin also replaces two small tables at each window's end
(per-instruction counters and c2c records, numbered by window); they are copied
into the repetition with the name of the receiver's kernel symbol table, which
is read once per boot from its /proc/kallsyms and kept in `<run>/symbols/`.
"""

from __future__ import annotations

import base64
import binascii
import gzip
from pathlib import Path
from typing import Any

from testbed.build.cachemodel_plugin import RECOMMENDED_TCG_THREADS, build_plugin
from testbed.errors import GuestError, NetbedError
from testbed.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from testbed.formats.cachemodel import (
    C2C_FILE,
    SITES_FILE,
    STORED_SUFFIX,
    read_c2c,
    read_sites,
    read_snapshots,
)
from testbed.formats.symbols import (
    KALLSYMS_COMMAND,
    SYMBOLS_DIR,
    SYMBOLS_REF,
    compress_table,
    parse_kallsyms,
)
from testbed.progress import Log
from testbed.run.folder import RepDir
from testbed.settings import Settings
from testbed.shell import Shell
from testbed.vm.cachemodel import cachemodel_plugin_spec
from testbed.vm.qemu import PluginSpec
from testbed.vocabulary import TcgThreads

CSV_NAME = "cachemodel-receiver.csv"


def receiver_plugins(settings: Settings, workdir: Path,
                     log: Log) -> tuple[tuple[PluginSpec, ...], TcgThreads]:
    """The receiver's `-plugin` and the TCG threading the model needs for exact counts."""
    plugin = build_plugin(settings, log)
    spec = cachemodel_plugin_spec(plugin, workdir / CSV_NAME, sites_csv=workdir / SITES_FILE,
                                  c2c_csv=workdir / C2C_FILE)
    return (spec,), RECOMMENDED_TCG_THREADS


def record_kernel_symbols(rx: Shell, run_dir: Path) -> dict[str, Any]:
    """Read the receiver's text symbols (as root: real addresses, with KASLR and
    modules), keep them once per distinct table in `<run>/symbols/`, and return the
    reference each repetition of this boot records."""
    armoured = rx.run(f"{KALLSYMS_COMMAND} | gzip -c | base64 -w 0").stdout
    try:
        data = base64.b64decode(armoured.strip(), validate=True)
    except binascii.Error as exc:
        raise GuestError(f"the receiver's /proc/kallsyms came back garbled: {exc}") from exc
    text = gzip.decompress(data).decode()
    table = parse_kallsyms(text, "receiver /proc/kallsyms")
    if not len(table):
        raise GuestError("the receiver's /proc/kallsyms lists no text symbols",
                         hint="is the kernel built with CONFIG_KALLSYMS?")
    name, blob = compress_table(text)
    path = run_dir / SYMBOLS_DIR / name
    if not path.is_file():
        atomic_write_bytes(path, blob)
    return {"kernel": f"{SYMBOLS_DIR}/{name}", "kernel_source": "/proc/kallsyms of the receiver",
            "kernel_symbols": len(table), "user": None,
            "user_note": "user code is labelled by address range (the plugin cannot tell "
                         "which process ran)"}


def closes_before(text: str) -> int:
    """How many windows had closed when the last window's end block was written (pure):
    the number the plugin gives that window's attribution tables."""
    df = read_snapshots(text)
    firsts = df.groupby("snapshot")["marker"].first()
    begins = [s for s, m in firsts.items() if str(m).startswith("begin")]
    if not begins:
        return 0
    ends = [s for s, m in firsts.items() if s > begins[-1] and str(m).startswith("end")]
    last = ends[0] if ends else None
    return sum(1 for s, m in firsts.items() if str(m).startswith("end")
               and (last is None or s <= last))


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


def collect_window(workdir: Path, rep: RepDir, symbols: dict[str, Any] | None = None) -> None:
    """The repetition's window out of the CSV the receiver's plugin writes in `workdir`,
    and its attribution tables when the plugin wrote them."""
    csv = workdir / CSV_NAME
    if not csv.exists():
        raise NetbedError(f"the cache-model plugin wrote no CSV ({csv})")
    text = csv.read_text()
    atomic_write_text(rep.file("cachemodel.csv"), window_blocks(text))
    sites = workdir / SITES_FILE
    if not sites.exists():
        return
    want = closes_before(text)
    for name, reader in ((SITES_FILE, read_sites), (C2C_FILE, read_c2c)):
        table = (workdir / name).read_text()
        got = set(reader(table, name)["window"])
        if got and got != {want}:
            raise NetbedError(f"{name} holds window(s) {sorted(got)}, the measured one is "
                              f"{want}", hint="the plugin writes it at the window's end; "
                                              "the cell is retried")
        atomic_write_bytes(rep.file(name + STORED_SUFFIX),
                           gzip.compress(table.encode(), compresslevel=6, mtime=0))
    if symbols is not None:
        atomic_write_json(rep.file(SYMBOLS_REF), symbols)
