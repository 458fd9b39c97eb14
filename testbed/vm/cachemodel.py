"""Guests with the cache model attached: the `-plugin` spec, and micro guests.

Micro guests are a tiny initramfs (busybox, the guest tools, a script) booted under
TCG with the plugin: what the model's validation tests and its benchmark run,
apart from the full guest image.
"""


from __future__ import annotations

import hashlib
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from testbed.build.cachemodel_plugin import (
    RECOMMENDED_TCG_THREADS,
    ModelParams,
    build_plugin,
    run_command,
)
from testbed.build.kernels import get_kernel
from testbed.build.newc import CpioEntry, encode_newc
from testbed.errors import CommandError, ConfigError, GuestError, MissingDependency
from testbed.formats.cachemodel import MODES, read_snapshots, window
from testbed.progress import Log
from testbed.settings import REPO_ROOT, Settings
from testbed.shell import HostShell
from testbed.vm.process import free_port
from testbed.vm.qemu import DirectBoot, PluginSpec, direct_boot_argv
from testbed.vocabulary import TcgThreads


def cachemodel_plugin_spec(plugin_path: Path, out_csv: Path, **model_params: int | bool
                           ) -> PluginSpec:
    """The `-plugin` for one guest; `model_params` are ModelParams fields."""
    known = {f.name for f in fields(ModelParams)}
    unknown = sorted(set(model_params) - known)
    if unknown:
        raise ConfigError(f"cachemodel: unknown parameter(s) {', '.join(unknown)}",
                          hint=f"known: {', '.join(sorted(known))}")
    # Names are checked above; each value's type (int, or bool for dma) is the field's,
    # which a **kwargs annotation cannot say per name.
    params = ModelParams(**model_params).validate()  # type: ignore[arg-type]
    for what, path in (("plugin", plugin_path), ("output", out_csv)):
        if "," in str(path):
            raise ConfigError(f"cachemodel: {what} path {path} contains a comma",
                              hint="QEMU's -plugin option splits on commas: use another "
                                   "directory (results_dir / cache_dir)")
    return PluginSpec(Path(plugin_path), (("out", str(out_csv)), *params.plugin_args()))



# ---------------------------------------------------------------- micro guests
# A tiny initramfs (busybox + the guest tools + a script) booted under TCG with the
# plugin: what the validation tests and the benchmark run before, and apart from,
# the full guest image. The tools are the same images/tools/*.c the image installs.
TOOLS_DIR = REPO_ROOT / "images" / "tools"
GUEST_TOOLS = ("nbmark", "nbbench_stream", "nbbench_pingpong")
BUSYBOX = Path("/bin/busybox")
MICRO_DONE = "NBMICRO-DONE"


@dataclass(frozen=True)
class MicroRun:
    """One micro-guest boot: its console text, QEMU's host wall and CPU time."""

    console: str
    wall_s: float
    csv: Path | None
    cpu_s: float = 0.0  # QEMU's user + system CPU time: less sensitive to a busy host



def build_guest_tools(settings: Settings, log: Log = print) -> dict[str, Path]:
    """Static binaries of the guest tools, cached by source hash."""
    out: dict[str, Path] = {}
    for name in GUEST_TOOLS:
        src = TOOLS_DIR / f"{name}.c"
        key = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        binary = settings.cache_dir / "cachemodel" / "tools" / f"{name}-{key}"
        if not binary.is_file():
            log(f"compiling guest tool {name}")
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(binary.name + f".{os.getpid()}")
            run_command(["gcc", "-static", "-O2", "-pthread", "-o", str(tmp), str(src)],
                 hint="static builds need libc6-dev")
            os.replace(tmp, binary)
        out[name] = binary
    return out


def micro_init(script: str) -> str:
    """The /init of a micro guest: run `script`, say done, power off (pure)."""
    return ("#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin:/usr/local/bin\n"
            "mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n"
            f"{script.rstrip()}\necho {MICRO_DONE}\npoweroff -f\n")


def build_micro_initrd(settings: Settings, script: str, tools: dict[str, Path]) -> Path:
    if not BUSYBOX.is_file():
        raise MissingDependency(f"{BUSYBOX} not found", hint="apt-get install busybox-static")
    entries = [CpioEntry.directory(d) for d in ("bin", "dev", "proc", "sys", "usr", "usr/local",
                                                "usr/local/bin", "tmp")]
    entries += [CpioEntry.char_device("dev/console", 5, 1),
                CpioEntry.file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
                CpioEntry.file("init", micro_init(script).encode(), 0o755)]
    entries += [CpioEntry.file(f"usr/local/bin/{n}", p.read_bytes(), 0o755)
                for n, p in sorted(tools.items())]
    data = encode_newc(entries)
    path = (settings.cache_dir / "cachemodel" / "initrd"
            / f"micro-{hashlib.sha256(data).hexdigest()[:16]}.cpio")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


MICRO_APPEND = "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"


def micro_argv(qemu: str, kernel: Path, initrd: Path, cpus: int, tcg_threads: TcgThreads,
               plugins: Sequence[PluginSpec] = (), memory_mb: int = 512,
               devices: Sequence[str] = ()) -> list[str]:
    """QEMU command line of a micro guest: TCG, serial on stdout, only `devices` (pure)."""
    return direct_boot_argv(DirectBoot(
        name="micro", kernel=kernel, initrd=initrd, append=MICRO_APPEND, cpus=cpus,
        memory_mb=memory_mb, accel="tcg", tcg_threads=tcg_threads, console=None,
        devices=tuple(devices), plugins=tuple(plugins)), qemu)


def run_micro(argv: list[str], csv: Path | None = None, timeout_s: float = 900.0) -> MicroRun:
    """Boot, wait for power-off, return the console; raise if the guest did not finish."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    res = HostShell().run(argv, timeout=timeout_s, check=False,
                          hint=f"the micro guest ran over {timeout_s:.0f} s")
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    console = res.output
    if res.exit_code != 0 or MICRO_DONE not in console:
        raise CommandError(argv, res.exit_code, console,
                           hint="the micro guest did not finish its script (see output)")
    return MicroRun(console, wall, csv, cpu)


def micro_kernel(settings: Settings, log: Log = print) -> Path:
    """Debian's kernel, as the lead's image uses it (extracted once into the cache)."""
    return get_kernel("distro", settings, log).bzimage


def run_with_model(settings: Settings, script: str, workdir: Path, *, cpus: int = 2,
                   tcg_threads: TcgThreads = RECOMMENDED_TCG_THREADS, plugin: bool = True,
                   log: Log = print, **model_params: int | bool) -> MicroRun:
    """Run `script` in a micro guest, with the cache model unless plugin=False."""
    tools = build_guest_tools(settings, log)
    initrd = build_micro_initrd(settings, script, tools)
    kernel = micro_kernel(settings, log)
    csv = None
    plugins: list[PluginSpec] = []
    if plugin:
        workdir.mkdir(parents=True, exist_ok=True)
        csv = workdir / "cachemodel.csv"
        csv.unlink(missing_ok=True)
        plugins.append(cachemodel_plugin_spec(build_plugin(settings, log), csv, **model_params))
    return run_micro(micro_argv(settings.qemu_binary, kernel, initrd, cpus, tcg_threads, plugins),
                     csv)


E1000_KO = "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"
DMA_SCRIPT = f"""\
insmod /usr/lib/modules/$(uname -r)/{E1000_KO}
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
nbmark begin 60
echo NB-LISTEN
nc -l -p 5001 > /dev/null
nbmark end 60
"""


def run_receive_with_model(settings: Settings, workdir: Path, mbytes: int, dma: bool = True,
                           log: Log = print) -> dict[str, dict[str, int]]:
    """Boot an e1000 micro guest, send it `mbytes` MiB over TCP from the host (user-mode
    networking, hostfwd on 127.0.0.1), the whole receive in region 60; return the
    region's totals per mode. Used to measure what device (DMA) writes do to counts."""
    kernel = get_kernel("distro", settings, log)
    tools = build_guest_tools(settings, log)
    initrd = build_micro_initrd(settings, DMA_SCRIPT, tools)
    workdir.mkdir(parents=True, exist_ok=True)
    both = workdir / "initrd-e1000.cpio"
    assert kernel.modules_cpio is not None
    both.write_bytes(initrd.read_bytes() + kernel.modules_cpio.read_bytes())
    csv = workdir / f"dma-{'on' if dma else 'off'}.csv"
    csv.unlink(missing_ok=True)
    spec = cachemodel_plugin_spec(build_plugin(settings, log), csv, dma=dma)
    port = free_port()
    argv = micro_argv(settings.qemu_binary, kernel.bzimage, both, 2, "single", [spec],
                      devices=["-netdev", f"user,id=n0,restrict=on,"
                               f"hostfwd=tcp:127.0.0.1:{port}-:5001",
                               "-device", "e1000,netdev=n0"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    out: list[str] = []
    listening = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            out.append(line)
            if "NB-LISTEN" in line:
                listening.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if not listening.wait(600):
            raise GuestError("the e1000 micro guest never started listening:\n"
                             + "".join(out[-20:]))
        time.sleep(3)  # nc starts listening after the echo
        chunk = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
            for _ in range(mbytes):
                s.sendall(chunk)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t.join(5)
    (workdir / f"console-dma-{'on' if dma else 'off'}.log").write_text("".join(out))
    if MICRO_DONE not in "".join(out):
        raise GuestError("the e1000 micro guest did not finish:\n" + "".join(out[-20:]))
    df = read_snapshots(csv.read_text())
    return {mode: window(df, "begin:60", "end:60", mode) for mode in MODES}
