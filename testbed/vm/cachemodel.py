"""Guests with the cache model attached: the `-plugin` spec, and micro guests.

Micro guests are a tiny initramfs (busybox, the guest tools, a script) booted under
TCG with the plugin: what the model's validation tests and its benchmark run,
apart from the full guest image.
"""


from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
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
from testbed.build.qemu_backport import resolve_qemu
from testbed.errors import CommandError, ConfigError, GuestError, MissingDependency
from testbed.formats import payloadpath
from testbed.formats.cachemodel import C2C_FILE, MODES, SITES_FILE, read_snapshots, window
from testbed.formats.symbols import (
    KALLSYMS_COMMAND,
    SymbolTable,
    decompress_table,
    merge,
    parse_kallsyms,
    parse_nm,
)
from testbed.progress import Log
from testbed.settings import REPO_ROOT, Settings
from testbed.vm.process import free_port
from testbed.vm.qemu import DirectBoot, PluginSpec, Qemu, direct_boot_argv
from testbed.vocabulary import TcgThreads


def send_random_mib(port: int, mbytes: int) -> None:
    """Send `mbytes` MiB of random bytes (nothing a digest could mistake for a repeat) to
    a micro guest's forwarded port on loopback."""
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=600) as s:
        for _ in range(mbytes):
            s.sendall(chunk)


def cachemodel_plugin_spec(plugin_path: Path, out_csv: Path, *, sites_csv: Path | None = None,
                           c2c_csv: Path | None = None, payload_csv: Path | None = None,
                           passes_file: Path | None = None, **model_params: int | bool
                           ) -> PluginSpec:
    """The `-plugin` for one guest; `model_params` are ModelParams fields.

    `sites_csv` turns attribution on: per-instruction counters of each window, and
    with `c2c_csv` the c2c line records (cachemodel/README.md, Attribution).
    `payload_csv` gets each window's payload path statistics, whose passes are the
    address ranges in `passes_file` (read at a window's begin when it changed; the host
    writes it: testbed.formats.payloadpath)."""
    if c2c_csv is not None and sites_csv is None:
        raise ConfigError("cachemodel: a c2c table needs the sites table too",
                          hint="pass sites_csv as well")
    if payload_csv is not None and sites_csv is None:
        raise ConfigError("cachemodel: the payload path needs the sites table too (its "
                          "passes are instruction sites)", hint="pass sites_csv as well")
    known = {f.name for f in fields(ModelParams)}
    unknown = sorted(set(model_params) - known)
    if unknown:
        raise ConfigError(f"cachemodel: unknown parameter(s) {', '.join(unknown)}",
                          hint=f"known: {', '.join(sorted(known))}")
    # Names are checked above; each value's type (int, or bool for dma) is the field's,
    # which a **kwargs annotation cannot say per name.
    params = ModelParams(**model_params).validate()  # type: ignore[arg-type]
    extra = tuple((k, str(v)) for k, v in (("sites", sites_csv), ("c2c", c2c_csv),
                                           ("payload", payload_csv), ("passes", passes_file))
                  if v is not None)
    for what, path in (("plugin", plugin_path), ("output", out_csv), *extra):
        if "," in str(path):
            raise ConfigError(f"cachemodel: {what} path {path} contains a comma",
                              hint="QEMU's -plugin option splits on commas: use another "
                                   "directory (results_dir / cache_dir)")
    # guest_ram: on QEMU 10.0 the plugin reads line contents from guest RAM mapped
    # itself (testbed.vm.qemu.direct_boot_argv adds the memfd and the size)
    return PluginSpec(Path(plugin_path),
                      (("out", str(out_csv)), *extra, *params.plugin_args()),
                      guest_ram_arg="guest_ram")



# ---------------------------------------------------------------- micro guests
# A tiny initramfs (busybox + the guest tools + a script) booted under TCG with the
# plugin: what the validation tests and the benchmark run before, and apart from,
# the full guest image. The tools are the same images/tools/*.c the image installs.
TOOLS_DIR = REPO_ROOT / "images" / "tools"
GUEST_TOOLS = ("nbmark", "nbbench_stream", "nbbench_pingpong")
# Micro-guest-only tools (not in the image): known code for the attribution test.
MICRO_TOOLS_DIR = REPO_ROOT / "cachemodel" / "guest"
MICRO_TOOLS = ("nbbench_attrib",)
# Each micro tool is linked static, non-PIE, at its own address, so a user address
# names one tool's function unambiguously (testbed.formats.symbols).
TOOL_BASE, TOOL_STRIDE = 0x10000000, 0x1000000
BUSYBOX = Path("/bin/busybox")
MICRO_DONE = "NBMICRO-DONE"


@dataclass(frozen=True)
class MicroRun:
    """One micro-guest boot: its console text, QEMU's host wall and CPU time."""

    console: str
    wall_s: float
    csv: Path | None
    cpu_s: float = 0.0  # QEMU's user + system CPU time: less sensitive to a busy host
    sites: Path | None = None  # attribution tables (attribution=True)
    c2c: Path | None = None
    marks: tuple[float, ...] = ()  # QEMU CPU seconds at each CPU_MARK console line

    def marked_cpu_s(self) -> float:
        """QEMU CPU seconds between the first two CPU_MARK lines."""
        if len(self.marks) < 2:
            raise GuestError(f"the micro guest printed {len(self.marks)} {CPU_MARK} line(s)",
                             hint=f"echo {CPU_MARK} before and after the workload")
        return self.marks[1] - self.marks[0]



def tool_compile_command(src: Path, out: Path, index: int) -> list[str]:
    """gcc command of micro tool number `index`: static, non-PIE, at its own base (pure)."""
    base = TOOL_BASE + index * TOOL_STRIDE
    return ["gcc", "-static", "-no-pie", "-O2", "-pthread", f"-Wl,-Ttext-segment={base:#x}",
            "-o", str(out), str(src)]


def guest_tool_sources() -> dict[str, Path]:
    return {**{n: TOOLS_DIR / f"{n}.c" for n in GUEST_TOOLS},
            **{n: MICRO_TOOLS_DIR / f"{n}.c" for n in MICRO_TOOLS}}


def build_guest_tools(settings: Settings, log: Log = print) -> dict[str, Path]:
    """Static binaries of the guest tools, cached by source hash and link command."""
    out: dict[str, Path] = {}
    for index, (name, src) in enumerate(guest_tool_sources().items()):
        probe = tool_compile_command(src, Path("OUT"), index)
        key = hashlib.sha256(src.read_bytes() + " ".join(probe).encode()).hexdigest()[:16]
        binary = settings.cache_dir / "cachemodel" / "tools" / f"{name}-{key}"
        if not binary.is_file():
            log(f"compiling guest tool {name}")
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(binary.name + f".{os.getpid()}")
            run_command(tool_compile_command(src, tmp, index),
                        hint="static builds need libc6-dev")
            os.replace(tmp, binary)
        out[name] = binary
    return out


def tool_symbols(tools: dict[str, Path]) -> SymbolTable:
    """Function symbols of the micro tools (`nm -S`), named `<tool>:<function>`."""
    return merge(parse_nm(run_command(["nm", "-S", "--defined-only", str(path)]), name,
                          source=str(path)) for name, path in sorted(tools.items()))


# The micro guest prints its kernel's text symbols on the console between these lines
# (gzip + base64: a few seconds of serial output), so attribution can resolve them.
KALLSYMS_BEGIN, KALLSYMS_END = "NBKALLSYMS-BEGIN", "NBKALLSYMS-END"
KALLSYMS_DUMP = (f"echo {KALLSYMS_BEGIN}; {KALLSYMS_COMMAND} | gzip -c | base64; "
                 f"echo {KALLSYMS_END}\n")


def console_kallsyms(console: str) -> str:
    """The kallsyms text a micro guest printed with KALLSYMS_DUMP (pure)."""
    try:
        body = console.split(KALLSYMS_BEGIN, 1)[1].split(KALLSYMS_END, 1)[0]
    except IndexError as exc:
        raise GuestError("the micro guest printed no kernel symbols",
                         hint="put KALLSYMS_DUMP in its script") from exc
    b64 = "".join(line.strip() for line in body.splitlines())
    return decompress_table(base64.b64decode(b64), "micro guest console")


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


def micro_argv(qemu: Qemu, kernel: Path, initrd: Path, cpus: int, tcg_threads: TcgThreads,
               plugins: Sequence[PluginSpec] = (), memory_mb: int = 512,
               devices: Sequence[str] = ()) -> list[str]:
    """QEMU command line of a micro guest: TCG, serial on stdout, only `devices` (pure)."""
    return direct_boot_argv(DirectBoot(
        name="micro", kernel=kernel, initrd=initrd, append=MICRO_APPEND, cpus=cpus,
        memory_mb=memory_mb, accel="tcg", tcg_threads=tcg_threads, console=None,
        devices=tuple(devices), plugins=tuple(plugins)), qemu)


CPU_MARK = "NBCPU-MARK"  # a console line: the host notes QEMU's CPU time right then


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def follow_console(proc: subprocess.Popen[bytes],
                   on_line: Callable[[str], None]) -> tuple[list[str], threading.Thread]:
    """Collect a micro guest's console lines as they come (the list grows while the guest
    runs), calling `on_line` on each, so the caller can wait on the guest's markers."""
    out: list[str] = []

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            out.append(line)
            on_line(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return out, t


def run_micro(argv: list[str], csv: Path | None = None, timeout_s: float = 900.0) -> MicroRun:
    """Boot, wait for power-off, return the console; raise if the guest did not finish.

    Each console line CPU_MARK makes the host note QEMU's CPU time then (MicroRun.marks):
    a workload's cost on a shared host, which wall or guest time is not."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    out: list[str] = []
    marks: list[float] = []
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if CPU_MARK in line:
                marks.append(proc_cpu_seconds(proc.pid))
            out.append(line)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    console = "".join(out)
    if code != 0 or MICRO_DONE not in console:
        raise CommandError(argv, code, console, hint=micro_failure_hint(wall, timeout_s))
    return MicroRun(console, wall, csv, cpu, marks=tuple(marks))


def micro_failure_hint(wall_s: float, timeout_s: float) -> str:
    """Why a micro guest failed: QEMU refusing its arguments (a plugin that does not load)
    ends at once, which "did not finish within 900 s" misdescribed."""
    if wall_s >= timeout_s:
        return f"the micro guest did not finish its script within {timeout_s:.0f} s (see output)"
    return (f"QEMU stopped after {wall_s:.0f} s before the script's end: see its output above "
            "(e.g. a plugin QEMU could not load, or a guest command that failed)")


def micro_kernel(settings: Settings, log: Log = print) -> Path:
    """Debian's kernel, as the lead's image uses it (extracted once into the cache)."""
    return get_kernel("distro", settings, log).bzimage


def run_with_model(settings: Settings, script: str, workdir: Path, *, cpus: int = 2,
                   tcg_threads: TcgThreads = RECOMMENDED_TCG_THREADS, plugin: bool = True,
                   attribution: bool = False, log: Log = print,
                   plugin_path: Path | None = None, **model_params: int | bool) -> MicroRun:
    """Run `script` in a micro guest, with the cache model unless plugin=False;
    `attribution` also writes the per-instruction and c2c tables of the last window;
    `plugin_path` replaces the plugin built from the tree (e.g. an older build)."""
    tools = build_guest_tools(settings, log)
    initrd = build_micro_initrd(settings, script, tools)
    kernel = micro_kernel(settings, log)
    csv = sites = c2c = None
    plugins: list[PluginSpec] = []
    if plugin:
        workdir.mkdir(parents=True, exist_ok=True)
        csv = workdir / "cachemodel.csv"
        if attribution:
            sites, c2c = workdir / SITES_FILE, workdir / C2C_FILE
        for f in (csv, sites, c2c):
            if f is not None:
                f.unlink(missing_ok=True)
        so = plugin_path or build_plugin(settings, log)
        plugins.append(cachemodel_plugin_spec(so, csv, sites_csv=sites, c2c_csv=c2c,
                                              payload_csv=None, passes_file=None,
                                              **model_params))
    run = run_micro(micro_argv(resolve_qemu(settings, log), kernel, initrd, cpus, tcg_threads,
                               plugins), csv)
    return dataclasses.replace(run, sites=sites, c2c=c2c)


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
    argv = micro_argv(resolve_qemu(settings, log), kernel.bzimage, both, 2, "single", [spec],
                      devices=["-netdev", f"user,id=n0,restrict=on,"
                               f"hostfwd=tcp:127.0.0.1:{port}-:5001",
                               "-device", "e1000,netdev=n0"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    listening = threading.Event()

    def on_line(line: str) -> None:
        if "NB-LISTEN" in line:
            listening.set()

    out, t = follow_console(proc, on_line)
    try:
        if not listening.wait(600):
            raise GuestError("the e1000 micro guest never started listening:\n"
                             + "".join(out[-20:]))
        time.sleep(3)  # nc starts listening after the echo
        send_random_mib(port, mbytes)
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


# ---------------------------------------------------------------- payload path micro guest
# A known pattern for the payload records (cachemodel/plugin/payload.c): e1000 receives a
# TCP stream from the host, its interrupt and so the checksum (GRO, in NAPI) on vCPU 0,
# the reader (`nc`) pinned to vCPU 0 (pin-same) or 1 (pin-cross), the socket's receive
# queue capped (`tcp_rmem`) so the copy follows the checksum closely. The guest prints
# its kernel symbols first; the host turns them into the plugin's pass ranges and only
# then lets the guest open the region (a first connection is the go-ahead), so the
# plugin reads them at `begin`.
PAYLOAD_REGION = 61
PAYLOAD_DATA_PORT, PAYLOAD_GO_PORT = 5001, 5002


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
taskset {1 << reader_cpu} nc -l -p {PAYLOAD_DATA_PORT} > /dev/null &
echo NB-READY
nc -l -p {PAYLOAD_GO_PORT} > /dev/null
nbmark begin {PAYLOAD_REGION}
echo NB-BEGUN
wait
nbmark end {PAYLOAD_REGION}
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
                               f"hostfwd=tcp:127.0.0.1:{data_port}-:{PAYLOAD_DATA_PORT},"
                               f"hostfwd=tcp:127.0.0.1:{go_port}-:{PAYLOAD_GO_PORT}",
                               "-device", "e1000,netdev=n0"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    ready, begun = threading.Event(), threading.Event()
    cpu_s: list[float] = []

    def on_line(line: str) -> None:
        if "NB-READY" in line:
            ready.set()
        if "NB-BEGUN" in line or "NB-ENDED" in line:
            cpu_s.append(proc_cpu_seconds(proc.pid))
            begun.set()

    out, t = follow_console(proc, on_line)
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
        send_random_mib(data_port, mbytes)
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
    first, last = f"begin:{PAYLOAD_REGION}", f"end:{PAYLOAD_REGION}"
    counts = {mode: window(df, first, last, mode) for mode in MODES}
    path = payloadpath.parse(payload_csv.read_text(), str(payload_csv)) if payload else None
    return PayloadRun(path, counts, console, cpu_s[-1] - cpu_s[0])
