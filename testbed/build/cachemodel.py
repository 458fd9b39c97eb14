"""The cache-model TCG plugin: build it, configure it for a guest, read its CSV.

The plugin (cachemodel/plugin/*.c) is compiled on the host against the
`qemu-plugin.h` of the QEMU that will load it. Debian ships that header in no
binary package, so it is taken from the Debian *source* package of the installed
QEMU version, fetched with apt's own source download pointed at a sources list
of ours (explicit `-o` options; the system's apt configuration is not touched),
with any Debian patch that touches the header applied. Header and plugin live in
`<cache_dir>/cachemodel/`, keyed by QEMU version and source hash; nothing of it
is committed.

The plugin counts only inside regions of interest marked in the guest with
`nbmark` (images/tools/nbmark.c). It is memory-safe under multi-threaded TCG (one
lock around the model), but its callbacks then follow host scheduling rather than
guest memory order, so accurate and repeatable counts need
`-accel tcg,thread=single`: see REQUIRES_SINGLE_THREAD_TCG. Design, limits and
measurements: cachemodel/README.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from io import StringIO
from pathlib import Path

import pandas as pd

from testbed.errors import CommandError, ConfigError, GuestError, MissingDependency, NetbedError
from testbed.settings import REPO_ROOT, Settings
from testbed.vm.qemu import PluginSpec

Log = Callable[[str], None]

PLUGIN_DIR = REPO_ROOT / "cachemodel" / "plugin"
PLUGIN_SOURCES = ("plugin.c", "model.c", "model.h")
PLUGIN_NAME = "libnetbed_cache.so"
HEADER_PATH = "include/qemu/qemu-plugin.h"

# Memory-safe under MTTCG (one lock), but callbacks then follow host timing, not guest
# memory order: c2c transfers came out 0.2-19% low. Accurate and repeatable counts need
# `-accel tcg,thread=single` (cost measured by benchmarks/cachemodel.py, see README).
REQUIRES_SINGLE_THREAD_TCG = True
RECOMMENDED_TCG_THREADS = "single"

EVENTS = (
    "loads", "stores", "l1d_misses", "l2_misses", "llc_misses", "c2c_transfers",
    "invalidations_sent", "invalidations_received", "instructions", "device_writes",
)
MODES = ("kernel", "user")
CSV_COLUMNS = ("vcpu", "mode", "event", "value", "marker")

# Marker instruction: nopl disp32(%rax) = 0f 1f 80 <disp32 little endian>, with
# disp32 = MAGIC << 24 | kind << 20 | id. Mirrors nbmark.c and plugin.c.
MARKER_MAGIC = 0x4E
MARKER_KINDS = {"begin": 1, "end": 2, "snapshot": 3}
MAX_MARKER_ID = (1 << 20) - 1

# Packages the build needs: package -> probe (see testbed.build.sysdeps).
BUILD_PACKAGES = {
    "gcc": "gcc",
    "pkg-config": "pkg-config",
    "libglib2.0-dev": "/usr/include/glib-2.0/glib.h",
    "dpkg-dev": "dpkg-source",
    "patch": "patch",
    "xz-utils": "xz",
}


# ---------------------------------------------------------------- markers (pure)
def marker_displacement(kind: str, marker_id: int) -> int:
    """The disp32 of the marker NOP for `kind` and `marker_id`."""
    if kind not in MARKER_KINDS:
        raise NetbedError(f"unknown marker kind {kind!r}", hint=f"use one of {list(MARKER_KINDS)}")
    if not 0 <= marker_id <= MAX_MARKER_ID:
        raise NetbedError(f"marker id {marker_id} out of range",
                          hint=f"use 0..{MAX_MARKER_ID}")
    return MARKER_MAGIC << 24 | MARKER_KINDS[kind] << 20 | marker_id


def marker_bytes(kind: str, marker_id: int) -> bytes:
    """The 7 instruction bytes nbmark executes."""
    return b"\x0f\x1f\x80" + marker_displacement(kind, marker_id).to_bytes(4, "little")


def nbmark_command(kind: str, marker_id: int) -> str:
    """Guest shell command for a marker (validated here so a bad id fails on the host)."""
    marker_displacement(kind, marker_id)
    return f"nbmark {kind} {marker_id}"


# ---------------------------------------------------------------- model parameters
def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclass(frozen=True)
class ModelParams:
    """Cache geometry (bytes / ways). Defaults: a modern x86 core and a mid-size LLC."""

    l1d_size: int = 32 << 10
    l1d_assoc: int = 8
    l2_size: int = 1 << 20  # 0: no private L2 (then l2_misses == l1d_misses)
    l2_assoc: int = 16
    llc_size: int = 8 << 20
    llc_assoc: int = 16
    line: int = 64
    cold: bool = True  # empty the caches when counting starts (stale state is arbitrary)
    dma: bool = True  # notice lines changed by devices (DMA) on the next load
    ddio: bool = True  # device writes land in the LLC (Intel DDIO) rather than bypass it

    def validate(self) -> ModelParams:
        """Same checks as model_config_error() in model.c, with a fix in the message."""
        if not _is_pow2(self.line) or self.line < 8:
            raise ConfigError(f"cachemodel: line={self.line} is not a power of two >= 8",
                              hint="use line=64 (x86)")
        levels = [("l1d", self.l1d_size, self.l1d_assoc), ("llc", self.llc_size, self.llc_assoc)]
        if self.l2_size:
            levels.insert(1, ("l2", self.l2_size, self.l2_assoc))
        for name, size, ways in levels:
            sets, rest = divmod(size, self.line * ways) if ways > 0 else (0, 1)
            if ways < 1 or rest or not _is_pow2(sets):
                raise ConfigError(
                    f"cachemodel: {name}_size={size} with {name}_assoc={ways} and "
                    f"line={self.line} does not give a power-of-two number of sets",
                    hint=f"choose {name}_size = 2^k * line * {name}_assoc, "
                         f"e.g. {name}_size={64 * self.line * max(ways, 1)}",
                )
        return self

    def plugin_args(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (f.name, ("on" if v else "off") if isinstance(v := getattr(self, f.name), bool)
             else str(v))
            for f in fields(self)
        )


def cachemodel_plugin_spec(plugin_path: Path, out_csv: Path, **model_params: int | bool
                           ) -> PluginSpec:
    """The `-plugin` for one guest; `model_params` are ModelParams fields."""
    known = {f.name for f in fields(ModelParams)}
    unknown = sorted(set(model_params) - known)
    if unknown:
        raise ConfigError(f"cachemodel: unknown parameter(s) {', '.join(unknown)}",
                          hint=f"known: {', '.join(sorted(known))}")
    params = ModelParams(**model_params).validate()  # type: ignore[arg-type]
    for what, path in (("plugin", plugin_path), ("output", out_csv)):
        if "," in str(path):
            raise ConfigError(f"cachemodel: {what} path {path} contains a comma",
                              hint="QEMU's -plugin option splits on commas: use another "
                                   "directory (results_dir / cache_dir)")
    return PluginSpec(Path(plugin_path), (("out", str(out_csv)), *params.plugin_args()))


# ---------------------------------------------------------------- build (pure parts)
def deb_src_sources(mirror: str, suite: str) -> str:
    """A one-line-style sources list with deb-src for suite, -updates and -security."""
    base = mirror.rstrip("/")
    security = base + "-security" if base.endswith("/debian") else base
    return (f"deb-src {base} {suite} main\n"
            f"deb-src {base} {suite}-updates main\n"
            f"deb-src {security} {suite}-security main\n")


def apt_source_options(state: Path, sources_list: Path) -> list[str]:
    """apt options that use only our sources list and our own state/cache directories."""
    return [
        "-o", f"Dir::Etc::SourceList={sources_list}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'apt'}",
        "-o", "APT::Get::List-Cleanup=0",
        "-o", "DPkg::Lock::Timeout=600",
    ]


def patch_section(patch_text: str, path: str) -> str | None:
    """The part of a (git or plain) unified diff that changes `path`, or None."""
    chunks = re.split(r"(?m)^(?=diff |--- )", patch_text)
    out: list[str] = []
    i = 0
    while i < len(chunks):
        chunk = chunks[i]
        if chunk.startswith("diff "):
            # a git header chunk is followed by its own '--- ' chunk
            body = chunk + (chunks[i + 1] if i + 1 < len(chunks)
                            and chunks[i + 1].startswith("--- ") else "")
            i += 2 if body != chunk else 1
        else:
            body = chunk
            i += 1
        m = re.search(r"(?m)^\+\+\+ (\S+)", body)
        if m and m.group(1).split("/", 1)[-1] == path:
            out.append(body)
    return "".join(out) or None


def plugin_key(sources: dict[str, bytes], header: bytes, qemu_version: str, cflags: str) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    h.update(header + b"\0" + qemu_version.encode() + b"\0" + cflags.encode())
    return h.hexdigest()[:16]


def compile_command(sources: Sequence[Path], include_dirs: Sequence[Path], glib_cflags: str,
                    glib_libs: str, out: Path) -> list[str]:
    c_files = [str(s) for s in sources if s.suffix == ".c"]
    return ["gcc", "-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
            "-fPIC", "-shared", *(f"-I{d}" for d in include_dirs), *glib_cflags.split(),
            "-o", str(out), *c_files, *glib_libs.split()]


# ---------------------------------------------------------------- build (effects)
def _run(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stdout + proc.stderr, hint=hint)
    return proc.stdout


def installed_qemu_source() -> tuple[str, str]:
    """(source package, source version) of the installed qemu-system-x86."""
    try:
        out = _run(["dpkg-query", "-W", "-f=${source:Package} ${source:Version}",
                    "qemu-system-x86"])
    except CommandError as exc:
        raise MissingDependency("qemu-system-x86 is not installed (dpkg-query found no package)",
                                hint="apt-get install qemu-system-x86") from exc
    package, version = out.split()
    return package, version


def fetch_plugin_header(settings: Settings, log: Log = print) -> Path:
    """Directory holding the installed QEMU's qemu-plugin.h (fetched once, then cached)."""
    package, version = installed_qemu_source()
    dest = settings.cache_dir / "cachemodel" / f"header-{package}-{version.replace(':', '_')}"
    if (dest / "done").is_file():
        return dest
    log(f"fetching {HEADER_PATH} from Debian source package {package}={version} (once)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".header-") as tmp_s:
        tmp = Path(tmp_s)
        sources_list = tmp / "sources.list"
        sources_list.write_text(deb_src_sources(settings.debian_mirror, settings.debian_suite))
        for sub in ("lists/partial", "apt/archives/partial", "dl"):
            (tmp / sub).mkdir(parents=True)
        opts = apt_source_options(tmp, sources_list)
        hint = ("the Debian mirror must carry this exact source version; check "
                "`apt-cache policy qemu-system-x86` and settings.debian_mirror")
        _run(["apt-get", *opts, "-q", "update"], hint=hint)
        _run(["apt-get", *opts, "-q", "source", "--download-only", f"{package}={version}"],
             cwd=tmp / "dl", hint=hint)
        origs = sorted((tmp / "dl").glob("*.orig.tar.*"))
        debs = sorted((tmp / "dl").glob("*.debian.tar.*"))
        if not origs or not debs:
            raise NetbedError(f"apt-get source left no orig/debian tarballs in {tmp / 'dl'}",
                              hint="a non-3.0 (quilt) source package is not supported")
        _run(["tar", "-xf", str(origs[0]), "--wildcards", f"*/{HEADER_PATH}"], cwd=tmp)
        header = next(tmp.glob(f"*/{HEADER_PATH}"))
        tree = Path(str(header)[: -len(HEADER_PATH)])
        _run(["tar", "-xf", str(debs[0]), "debian/patches"], cwd=tmp)
        applied = _apply_header_patches(tmp / "debian" / "patches", tree)
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(header, out / "qemu-plugin.h")
        (out / "source.txt").write_text(
            f"{package} {version}\npatches applied to the header: {applied or 'none'}\n")
        (out / "done").write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return dest


def _apply_header_patches(patches: Path, tree: Path) -> list[str]:
    series = patches / "series"
    applied = []
    if not series.is_file():
        return applied
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip().split(" ")[0]
        if not name or not (patches / name).is_file():
            continue
        section = patch_section((patches / name).read_text(errors="replace"), HEADER_PATH)
        if section:
            proc = subprocess.run(["patch", "-p1", "--forward", "--batch"], cwd=tree,
                                  input=section, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CommandError(f"patch -p1 < {name} ({HEADER_PATH} only)", proc.returncode,
                                   proc.stdout + proc.stderr)
            applied.append(name)
    return applied


def build_plugin(settings: Settings, log: Log = print, force: bool = False) -> Path:
    """Compile the plugin (once per source hash and QEMU version); returns the .so path."""
    from testbed.build.sysdeps import ensure_packages

    ensure_packages(BUILD_PACKAGES, log)
    header_dir = fetch_plugin_header(settings, log)
    sources = {n: (PLUGIN_DIR / n).read_bytes() for n in PLUGIN_SOURCES}
    cflags = _run(["pkg-config", "--cflags", "glib-2.0"]).strip()
    libs = _run(["pkg-config", "--libs", "glib-2.0"]).strip()
    _, version = installed_qemu_source()
    key = plugin_key(sources, (header_dir / "qemu-plugin.h").read_bytes(), version, cflags)
    dest = settings.cache_dir / "cachemodel" / f"plugin-{key}"
    so = dest / PLUGIN_NAME
    if so.is_file() and not force:
        return so
    log(f"compiling the cache-model plugin into {so}")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{PLUGIN_NAME}.{os.getpid()}"
    _run(compile_command([PLUGIN_DIR / n for n in PLUGIN_SOURCES], [header_dir, PLUGIN_DIR],
                         cflags, libs, tmp),
         hint="the plugin must compile cleanly against the installed QEMU's header")
    os.replace(tmp, so)
    return so


# ---------------------------------------------------------------- CSV
def read_snapshots(text: str) -> pd.DataFrame:
    """The plugin's CSV with a `snapshot` column numbering the marker hits in order.

    A snapshot is one block of rows written at one marker hit; the same marker
    may be hit more than once, so blocks are told apart by position, not name.
    """
    df = pd.read_csv(StringIO(text), dtype={"vcpu": int, "mode": str, "event": str,
                                            "value": "int64", "marker": str})
    if tuple(df.columns) != CSV_COLUMNS:
        raise NetbedError(f"cache-model CSV has columns {list(df.columns)}",
                          hint=f"expected {','.join(CSV_COLUMNS)} (plugin/CSV mismatch?)")
    starts = (df["vcpu"] == df["vcpu"].iloc[0]) & (df["mode"] == df["mode"].iloc[0]) & (
        df["event"] == df["event"].iloc[0]) if len(df) else df["vcpu"] == 0
    df["snapshot"] = starts.cumsum() - 1
    return df


def window(df: pd.DataFrame, first: str, last: str, mode: str | None = None,
           vcpu: int | None = None) -> dict[str, int]:
    """Event totals between the first hit of marker `first` and the last hit of `last`."""
    snaps = df.groupby("snapshot")["marker"].first()
    a, b = snaps[snaps == first], snaps[snaps == last]
    if a.empty or b.empty:
        raise NetbedError(f"cache-model CSV lacks marker {first if a.empty else last!r}",
                          hint=f"markers present: {sorted(set(snaps))}")
    sel = df
    if mode is not None:
        sel = sel[sel["mode"] == mode]
    if vcpu is not None:
        sel = sel[sel["vcpu"] == vcpu]
    tot = sel.groupby(["snapshot", "event"])["value"].sum()
    return {ev: int(tot[(b.index[-1], ev)] - tot[(a.index[0], ev)]) for ev in EVENTS
            if (b.index[-1], ev) in tot.index}


def params_dict(params: ModelParams) -> dict[str, int | bool]:
    """The parameters as plain data, e.g. for versions.json."""
    return asdict(params)


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

    def bench_lines(self, prefix: str = "nbbench_") -> list[dict[str, str]]:
        """`key=value` fields of the benchmark lines the tools print."""
        out = []
        for line in self.console.splitlines():
            line = line.strip()
            if line.startswith(prefix):
                name, *kv = line.split()
                out.append({"tool": name, **dict(x.split("=", 1) for x in kv if "=" in x)})
        return out


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
            _run(["gcc", "-static", "-O2", "-pthread", "-o", str(tmp), str(src)],
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
    from testbed.build.newc import CpioEntry, encode_newc

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


def micro_argv(qemu: str, kernel: Path, initrd: Path, cpus: int, tcg_threads: str,
               plugins: Sequence[PluginSpec] = (), memory_mb: int = 512) -> list[str]:
    """QEMU command line of a micro guest: TCG, serial on stdout, no devices (pure)."""
    argv = [qemu, "-machine", "q35", "-accel", f"tcg,thread={tcg_threads}", "-cpu", "max",
            "-smp", str(cpus), "-m", str(memory_mb), "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"]
    for p in plugins:
        argv += ["-plugin", p.render()]
    return argv


def run_micro(argv: list[str], csv: Path | None = None, timeout_s: float = 900.0) -> MicroRun:
    """Boot, wait for power-off, return the console; raise if the guest did not finish."""
    import resource
    import time

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:  # run() has killed QEMU already
        out = (exc.stdout or b"").decode(errors="replace")
        raise CommandError(argv, None, out,
                           hint=f"the micro guest ran over {timeout_s:.0f} s") from exc
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    console = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0 or MICRO_DONE not in console:
        raise CommandError(argv, proc.returncode, console,
                           hint="the micro guest did not finish its script (see output)")
    return MicroRun(console, wall, csv, cpu)


def micro_kernel(settings: Settings, log: Log = print) -> Path:
    """Debian's kernel, as the lead's image uses it (extracted once into the cache)."""
    from testbed.build.kernels import get_kernel

    return get_kernel("distro", settings, log).bzimage


def run_with_model(settings: Settings, script: str, workdir: Path, *, cpus: int = 2,
                   tcg_threads: str = RECOMMENDED_TCG_THREADS, plugin: bool = True,
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
    import socket
    import threading
    import time

    from testbed.build.kernels import get_kernel
    from testbed.vm.qemu import free_port

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
    argv = micro_argv(settings.qemu_binary, kernel.bzimage, both, 2, "single", [spec])
    argv += ["-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:5001",
             "-device", "e1000,netdev=n0"]
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
