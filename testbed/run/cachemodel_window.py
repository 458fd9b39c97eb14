"""The cache model inside a matrix run: the receiver's plugin and each window's counters.

The plugin appends one snapshot block per marker hit to a CSV on the host for the
whole life of the receiver; a repetition's file holds the blocks of its own
window (`nbmark begin 1` ... `nbmark end 1`), raw, so analysis subtracts them
like perf's counters.

Attribution: the plugin also replaces two small tables after each window's end
(per-instruction counters and c2c records, numbered by window); they are copied
into the repetition with the name of the receiver's kernel symbol table, which
is read once per boot from its /proc/kallsyms and kept in `<run>/symbols/`. A
writer thread in the plugin writes them while the guest runs on, so the host
waits (bounded) until the plugin says the measured window's tables are complete.

Each boot opens and closes one throw-away region before its first window
(`arm_model`): the first region arms the plugin and flushes QEMU's code cache,
which would otherwise happen inside the first measured window.

Payload path: the plugin also writes each window's payload statistics
(testbed.formats.payloadpath); the functions of its passes (checksum, copy) are address
ranges the host writes next to the plugin's files from the same kallsyms, before the
first window opens.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.build.cachemodel_plugin import RECOMMENDED_TCG_THREADS, build_plugin
from testbed.errors import GuestError, NetbedError
from testbed.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from testbed.formats import payloadpath
from testbed.formats.cachemodel import (
    C2C_FILE,
    SITES_FILE,
    STORED_SUFFIX,
    TABLES_WINDOW_FILE,
    parse_tables_window,
    read_c2c,
    read_sites,
    read_snapshots,
    window_edges,
)
from testbed.formats.cachemodel import (
    RAW as CACHEMODEL_RAW,
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
# The throw-away region's id (the measured window's markers use 1: images/tools/nbsnap.c).
ARMING_REGION = 0
# How long the host waits for the plugin's writer thread to finish a window's tables
# (it took 40-370 ms on the vCPU thread before it had a thread of its own).
TABLES_WAIT_S = 60.0
TABLES_POLL_S = 0.05


def receiver_plugins(settings: Settings, workdir: Path,
                     log: Log) -> tuple[tuple[PluginSpec, ...], TcgThreads]:
    """The receiver's `-plugin` and the TCG threading the model needs for exact counts."""
    plugin = build_plugin(settings, log)
    spec = cachemodel_plugin_spec(plugin, workdir / CSV_NAME, sites_csv=workdir / SITES_FILE,
                                  c2c_csv=workdir / C2C_FILE,
                                  payload_csv=workdir / payloadpath.RAW,
                                  passes_file=workdir / payloadpath.PASSES_FILE)
    return (spec,), RECOMMENDED_TCG_THREADS


def record_kernel_symbols(rx: Shell, run_dir: Path, workdir: Path | None = None
                          ) -> dict[str, Any]:
    """Read the receiver's text symbols (as root: real addresses, with KASLR and
    modules), keep them once per distinct table in `<run>/symbols/`, and return the
    reference each repetition of this boot records. With `workdir` (the plugin's), also
    write the payload passes' address ranges there (payloadpath.PASSES_FILE), which the
    plugin reads at the next window's begin."""
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
    if workdir is not None:
        atomic_write_text(workdir / payloadpath.PASSES_FILE,
                          payloadpath.format_passes(payloadpath.pass_ranges(table)))
    name, blob = compress_table(text)
    path = run_dir / SYMBOLS_DIR / name
    if not path.is_file():
        atomic_write_bytes(path, blob)
    return {"kernel": f"{SYMBOLS_DIR}/{name}", "kernel_source": "/proc/kallsyms of the receiver",
            "kernel_symbols": len(table), "user": None,
            "user_note": "user code is labelled by address range (the plugin cannot tell "
                         "which process ran)"}


def arm_model(rx: Shell) -> None:
    """Open and close one region in the receiver right after boot, so no measured
    window is the one that arms the plugin: the first `begin` makes QEMU flush its
    code cache and retranslate everything with memory callbacks, which slowed the
    first window of each boot (the model's edges 225-547 ms from the units, against
    13-180 ms in later windows). The region's end block and tables take window
    number 1 in the plugin; `closes_before` counts it like any other, and
    `window_blocks` keeps only the measured window's blocks. (On QEMU 10.0 the plugin
    disarms after every window, and each model window arms it again itself, ahead of
    its `begin`: testbed.run.window.)"""
    rx.run(f"nbmark begin {ARMING_REGION} && nbmark end {ARMING_REGION}")


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
    """CSV text of the measured window's two blocks (testbed.formats.cachemodel.
    window_edges: the last begin block and the end block after it; pure)."""
    df = read_snapshots(text)
    edges = window_edges(df)
    if edges is None:
        if not df["marker"].astype(str).str.startswith("begin:").any():
            raise NetbedError("the cache model saw no begin marker in the measured window",
                              hint="is nbmark in the guest image? (images/tools/nbmark.c)")
        raise NetbedError("the cache model saw no end marker after the window's begin")
    keep = df[df["snapshot"].isin(edges)].drop(columns="snapshot")
    return str(keep.to_csv(index=False))


def wait_for_tables(path: Path, want: int, timeout_s: float = TABLES_WAIT_S, *,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> int:
    """Wait until the plugin's window-number file (TABLES_WINDOW_FILE) says window
    `want`'s tables are complete, or a later window's; return the number it holds.
    The plugin writes the tables on a thread of its own after the window's end, so
    the host may get here first."""
    deadline = clock() + timeout_s
    while True:
        got = parse_tables_window(path.read_text(), str(path)) if path.exists() else None
        if got is not None and got >= want:
            return got
        if clock() >= deadline:
            last = "none" if got is None else f"window {got}"
            raise NetbedError(f"the cache-model plugin did not finish the attribution tables "
                              f"of window {want} within {timeout_s:g} s (last finished: "
                              f"{last}; {path})",
                              hint="its writer thread failed or QEMU stalled: see the "
                                   "receiver's QEMU log; the cell is retried")
        sleep(TABLES_POLL_S)


def collect_window(workdir: Path, rep: RepDir, symbols: dict[str, Any] | None = None,
                   tables_wait_s: float = TABLES_WAIT_S) -> None:
    """The repetition's window out of the CSV the receiver's plugin writes in `workdir`,
    and its attribution tables when the plugin writes them (waiting for them up to
    `tables_wait_s`)."""
    csv = workdir / CSV_NAME
    if not csv.exists():
        raise NetbedError(f"the cache-model plugin wrote no CSV ({csv})")
    text = csv.read_text()
    atomic_write_text(rep.file(CACHEMODEL_RAW), window_blocks(text))
    want = closes_before(text)
    sites, done = workdir / SITES_FILE, workdir / TABLES_WINDOW_FILE
    if not sites.exists() and not done.exists():
        return  # the plugin runs without attribution
    if done.exists():  # the plugin writes it from its start when it has tables to write
        wait_for_tables(done, want, tables_wait_s)
    for name, reader in ((SITES_FILE, read_sites), (C2C_FILE, read_c2c)):
        table = (workdir / name).read_text()
        got = set(reader(table, name)["window"])
        if got and got != {want}:
            raise NetbedError(f"{name} holds window(s) {sorted(got)}, the measured one is "
                              f"{want}", hint="the plugin writes it at the window's end; "
                                              "the cell is retried")
        atomic_write_bytes(rep.file(name + STORED_SUFFIX),
                           gzip.compress(table.encode(), compresslevel=6, mtime=0))
    payload = workdir / payloadpath.RAW
    if payload.exists():
        text = payload.read_text()
        number = payloadpath.parse(text, str(payload)).window
        if number != want:
            raise NetbedError(f"{payload} holds window {number}, the measured one is {want}",
                              hint="the plugin writes it at the window's end; the cell is "
                                   "retried")
        atomic_write_text(rep.file(payloadpath.RAW), text)
    if symbols is not None:
        atomic_write_json(rep.file(SYMBOLS_REF), symbols)
