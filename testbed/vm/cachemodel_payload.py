"""A micro guest that receives a TCP stream on e1000 with the payload path counted.

A known pattern for the cache model's payload records (cachemodel/plugin/payload.c):
the NIC's interrupt on vCPU 0, so e1000's checksum (GRO, NAPI) runs there, and the
reader (`nc`) pinned to vCPU 0 (pin-same) or 1 (pin-cross), with the socket's receive
queue capped (`tcp_rmem`) so the copy follows the checksum closely. The guest prints
its kernel symbols first; the host turns them into the plugin's pass ranges and only
then lets the guest open the region (a first connection is the go-ahead), so the
plugin reads them at `begin`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.build.cachemodel_plugin import build_plugin
from testbed.build.kernels import get_kernel
from testbed.build.qemu_backport import resolve_qemu
from testbed.errors import GuestError
from testbed.formats import payloadpath
from testbed.formats.cachemodel import MODES, SITES_FILE, read_snapshots, window
from testbed.formats.symbols import parse_kallsyms
from testbed.progress import Log
from testbed.settings import Settings
from testbed.vm.cachemodel import (
    E1000_KO,
    KALLSYMS_DUMP,
    KALLSYMS_END,
    MICRO_DONE,
    build_guest_tools,
    build_micro_initrd,
    cachemodel_plugin_spec,
    console_kallsyms,
    micro_argv,
    proc_cpu_seconds,
)
from testbed.vm.process import free_port

REGION = 61
DATA_PORT, GO_PORT = 5001, 5002


def payload_script(reader_cpu: int, rmem_bytes: int) -> str:
    """The guest's script: e1000 up, IRQ on vCPU 0, the reader on `reader_cpu` (pure)."""
    return f"""\
insmod /usr/lib/modules/$(uname -r)/{E1000_KO}
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
echo "4096 {rmem_bytes} {rmem_bytes}" > /proc/sys/net/ipv4/tcp_rmem
for irq in $(grep -E 'eth0|e1000' /proc/interrupts | cut -d: -f1); do
  echo 1 > /proc/irq/$irq/smp_affinity
done
{KALLSYMS_DUMP.rstrip()}
taskset {1 << reader_cpu} nc -l -p {DATA_PORT} > /dev/null &
echo NB-READY
nc -l -p {GO_PORT} > /dev/null
nbmark begin {REGION}
echo NB-BEGUN
wait
nbmark end {REGION}
echo NB-ENDED
"""


@dataclass(frozen=True)
class PayloadRun:
    path: payloadpath.PayloadPath | None  # None: run without the payload path
    counts: dict[str, dict[str, int]]  # the region's model totals per mode
    console: str
    region_cpu_s: float  # QEMU's CPU seconds from the region's begin to its end


def run_payload_receive(settings: Settings, workdir: Path, *, reader_cpu: int, mbytes: int,
                        rmem_bytes: int, log: Log = print, plugin_path: Path | None = None,
                        payload: bool = True) -> PayloadRun:
    """Boot the micro guest, send it `mbytes` MiB from the host (user-mode networking,
    hostfwd on 127.0.0.1) inside one region, return the region's payload statistics.
    `plugin_path` replaces the tree's build; `payload=False` leaves the payload path's
    arguments out (a build from before it)."""
    kernel = get_kernel("distro", settings, log)
    tools = build_guest_tools(settings, log)
    initrd = build_micro_initrd(settings, payload_script(reader_cpu, rmem_bytes), tools)
    workdir.mkdir(parents=True, exist_ok=True)
    both = workdir / "initrd-e1000.cpio"
    assert kernel.modules_cpio is not None
    both.write_bytes(initrd.read_bytes() + kernel.modules_cpio.read_bytes())
    csv, passes = workdir / "cachemodel.csv", workdir / payloadpath.PASSES_FILE
    payload_csv = workdir / payloadpath.RAW
    for f in (csv, passes, payload_csv):
        f.unlink(missing_ok=True)
    spec = cachemodel_plugin_spec(plugin_path or build_plugin(settings, log), csv,
                                  sites_csv=workdir / SITES_FILE,
                                  payload_csv=payload_csv if payload else None,
                                  passes_file=passes if payload else None)
    data_port, go_port = free_port(), free_port()
    argv = micro_argv(resolve_qemu(settings, log), kernel.bzimage, both, 2, "single", [spec],
                      devices=["-netdev", f"user,id=n0,restrict=on,"
                               f"hostfwd=tcp:127.0.0.1:{data_port}-:{DATA_PORT},"
                               f"hostfwd=tcp:127.0.0.1:{go_port}-:{GO_PORT}",
                               "-device", "e1000,netdev=n0"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    out: list[str] = []
    ready, begun = threading.Event(), threading.Event()
    cpu_s: list[float] = []

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            out.append(line)
            if "NB-READY" in line:
                ready.set()
            if "NB-BEGUN" in line or "NB-ENDED" in line:
                cpu_s.append(proc_cpu_seconds(proc.pid))
                begun.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if not ready.wait(600):
            raise GuestError("the payload micro guest never got ready:\n" + "".join(out[-20:]))
        table = parse_kallsyms(console_kallsyms("".join(out)), "micro guest console")
        passes.write_text(payloadpath.format_passes(payloadpath.pass_ranges(table)))
        time.sleep(1)  # the listeners start after the echo
        with socket.create_connection(("127.0.0.1", go_port), timeout=600):
            pass
        if not begun.wait(600):
            raise GuestError("the payload micro guest never opened its region:\n"
                             + "".join(out[-20:]))
        chunk = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", data_port), timeout=600) as s:
            for _ in range(mbytes):
                s.sendall(chunk)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t.join(5)
    console = "".join(out)
    (workdir / "console.log").write_text(console)
    if MICRO_DONE not in console or KALLSYMS_END not in console:
        raise GuestError("the payload micro guest did not finish:\n" + "".join(out[-20:]))
    df = read_snapshots(csv.read_text())
    counts = {mode: window(df, f"begin:{REGION}", f"end:{REGION}", mode) for mode in MODES}
    path = payloadpath.parse(payload_csv.read_text(), str(payload_csv)) if payload else None
    return PayloadRun(path, counts, console, cpu_s[-1] - cpu_s[0])
