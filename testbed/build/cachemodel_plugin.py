"""The cache-model TCG plugin: its parameters, and building it for the installed QEMU.

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
`-accel tcg,thread=single`: see RECOMMENDED_TCG_THREADS. Design, limits and
measurements: cachemodel/README.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from testbed import files as publish
from testbed.build.qemu_backport import (
    BACKPORT_SUITE,
    BACKPORT_VERSION,
    QemuInstall,
    known_qemu,
    resolve_qemu,
)
from testbed.build.sysdeps import ensure_packages
from testbed.errors import CommandError, ConfigError, MissingDependency
from testbed.formats import symbols
from testbed.progress import Log
from testbed.settings import REPO_ROOT, Settings
from testbed.shell import HostShell
from testbed.vocabulary import TcgThreads

PLUGIN_DIR = REPO_ROOT / "cachemodel" / "plugin"
PLUGIN_SOURCES = ("plugin.c", "model.c", "model.h", "payload.c", "payload.h")
PLUGIN_NAME = "libnetbed_cache.so"
HEADER_PATH = "include/qemu/qemu-plugin.h"

# Memory-safe under MTTCG (one lock), but callbacks then follow host timing, not guest
# memory order: c2c transfers came out 0.2-19% low. Accurate and repeatable counts need
# `-accel tcg,thread=single` (cost measured by benchmarks/cachemodel.py; cachemodel/README.md).
RECOMMENDED_TCG_THREADS: TcgThreads = "single"


# Packages the build needs: package -> probe (see testbed.build.sysdeps).
BUILD_PACKAGES = {
    "gcc": "gcc",
    "pkg-config": "pkg-config",
    "libglib2.0-dev": "/usr/include/glib-2.0/glib.h",
    "dpkg-dev": "dpkg-source",
    "patch": "patch",
    "xz-utils": "xz",
}



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
    # attribution: user pcs from here up share one site per granule block (randomized
    # user code otherwise grew the sites without bound; testbed.formats.symbols)
    user_exact: int = symbols.USER_EXACT_BELOW
    user_granule: int = symbols.USER_GRANULE  # 0: every user pc its own site

    def validate(self) -> ModelParams:
        """Same checks as model_config_error() in model.c, with a fix in the message."""
        if self.user_granule and not _is_pow2(self.user_granule):
            raise ConfigError(f"cachemodel: user_granule={self.user_granule} is not a power "
                              "of two", hint=f"use {symbols.USER_GRANULE} (1 TiB), or 0")
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



# ---------------------------------------------------------------- build (pure parts)
def deb_src_sources(mirror: str, suite: str) -> str:
    """A one-line-style sources list with deb-src for suite, -updates and -security."""
    return deb_src_lines(mirror, (suite, f"{suite}-updates", f"{suite}-security"))


def deb_src_lines(mirror: str, suites: Sequence[str]) -> str:
    """deb-src lines for `suites` (a -security suite lives under <mirror>-security)."""
    base = mirror.rstrip("/")
    security = base + "-security" if base.endswith("/debian") else base
    return "".join(f"deb-src {security if s.endswith('-security') else base} {s} main\n"
                   for s in suites)


def apt_source_options(state: Path, sources_list: Path) -> list[str]:
    """apt options that use only our sources list and our own state/cache directories."""
    return [
        "-o", f"Dir::Etc::SourceList={sources_list}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'apt'}",
        "-o", "APT::Get::List-Cleanup=0",
        "-o", "DPkg::Lock::Timeout=600",
        "-o", "APT::Sandbox::User=root",
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


# The plugin's per-access path calls into model.c (the fast path for a repeated line, the
# instruction count): -flto inlines them, which -fPIC allows only for symbols no other
# object can interpose, hence -fvisibility=hidden (QEMU_PLUGIN_EXPORT marks what QEMU
# needs). Part of the build key.
PLUGIN_CFLAGS = ("-O2", "-flto", "-fvisibility=hidden", "-g", "-std=gnu11", "-Wall", "-Wextra",
                 "-Wno-unused-parameter", "-fPIC", "-shared")


def plugin_key(sources: dict[str, bytes], header: bytes, qemu_version: str, cflags: str) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    h.update(header + b"\0" + qemu_version.encode() + b"\0" + cflags.encode())
    return h.hexdigest()[:16]


def compile_command(sources: Sequence[Path], include_dirs: Sequence[Path], glib_cflags: str,
                    glib_libs: str, out: Path) -> list[str]:
    c_files = [str(s) for s in sources if s.suffix == ".c"]
    return ["gcc", *PLUGIN_CFLAGS, *(f"-I{d}" for d in include_dirs), *glib_cflags.split(),
            "-o", str(out), *c_files, *glib_libs.split()]


# ---------------------------------------------------------------- build (effects)
def run_command(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
    shell = HostShell(cwd=cwd, env={"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    return shell.run(cmd, hint=hint).stdout


def installed_qemu_source() -> tuple[str, str]:
    """(source package, source version) of the installed qemu-system-x86."""
    try:
        out = run_command(["dpkg-query", "-W", "-f=${source:Package} ${source:Version}",
                    "qemu-system-x86"])
    except CommandError as exc:
        raise MissingDependency("qemu-system-x86 is not installed (dpkg-query found no package)",
                                hint="apt-get install qemu-system-x86") from exc
    package, version = out.split()
    return package, version


@dataclass(frozen=True)
class QemuSource:
    """The Debian source package whose qemu-plugin.h a plugin build uses, and the
    suites whose deb-src carry it."""

    package: str
    version: str
    suites: tuple[str, ...]


def qemu_source(settings: Settings, qemu: QemuInstall | None = None) -> QemuSource:
    """The source of the QEMU that will load the plugin: `qemu` when given (the one the
    run resolved: the system's after a fallback from the backport), else the one the
    `qemu` setting selects as far as known without a download."""
    if qemu is None:
        qemu = known_qemu(settings)
    kind = qemu.kind if qemu is not None else settings.qemu
    if kind == "backport":
        return QemuSource("qemu", BACKPORT_VERSION, (BACKPORT_SUITE,))
    package, version = installed_qemu_source()
    s = settings.debian_suite
    return QemuSource(package, version, (s, f"{s}-updates", f"{s}-security"))


def header_dir(settings: Settings, source: QemuSource) -> Path:
    return (settings.cache_dir / "cachemodel"
            / f"header-{source.package}-{source.version.replace(':', '_')}")


_API = re.compile(r"(?m)^#define QEMU_PLUGIN_VERSION (\d+)")


def plugin_api_version(header_text: str) -> int | None:
    """The plugin API version a qemu-plugin.h declares (7.2: 1; 10.0: 4). QEMU 10 loads
    only plugins built for API >= 2, and plugin.c picks its code paths by it."""
    m = _API.search(header_text)
    return int(m.group(1)) if m else None


def cached_plugin_api(settings: Settings, source: QemuSource) -> int | None:
    """The API version from the cached header of `source`, None if not fetched yet."""
    h = header_dir(settings, source) / "qemu-plugin.h"
    return plugin_api_version(h.read_text(errors="replace")) if h.is_file() else None


def fetch_plugin_header(settings: Settings, log: Log = print,
                        source: QemuSource | None = None) -> Path:
    """Directory holding the selected QEMU's qemu-plugin.h (fetched once, then cached)."""
    source = source or qemu_source(settings)
    package, version = source.package, source.version
    dest = header_dir(settings, source)
    if _complete(dest):
        return dest
    with publish.building(dest):
        if not _complete(dest):
            publish.sweep_leftovers(dest, f"the plugin header of {package} {version}", log)
            _fetch_header(settings, source, dest, log)
    return dest


def _complete(dest: Path) -> bool:
    return (dest / "done").is_file()


def _fetch_header(settings: Settings, source: QemuSource, dest: Path, log: Log) -> None:
    package, version = source.package, source.version
    log(f"fetching {HEADER_PATH} from Debian source package {package}={version} (once)")
    with publish.work_dir(dest) as tmp:
        sources_list = tmp / "sources.list"
        sources_list.write_text(deb_src_lines(settings.debian_mirror, source.suites))
        for sub in ("lists/partial", "apt/archives/partial", "dl"):
            (tmp / sub).mkdir(parents=True)
        opts = apt_source_options(tmp, sources_list)
        hint = ("the Debian mirror must carry this exact source version; check "
                "`apt-cache policy qemu-system-x86` and settings.debian_mirror")
        run_command(["apt-get", *opts, "-q", "update"], hint=hint)
        # The debian.tar (patches) may be missing from a mirror that has the orig
        # tarball: then the header is taken unpatched, and source.txt says so.
        got = HostShell(cwd=tmp / "dl", env={"LC_ALL": "C"}).run(
            ["apt-get", *opts, "-q", "source", "--download-only", f"{package}={version}"],
            check=False)
        origs = sorted((tmp / "dl").glob("*.orig.tar.*"))
        debs = sorted((tmp / "dl").glob("*.debian.tar.*"))
        if not origs:
            raise CommandError(f"apt-get source --download-only {package}={version}",
                               got.exit_code, got.output, hint=hint)
        run_command(["tar", "-xf", str(origs[0]), "--wildcards", f"*/{HEADER_PATH}"], cwd=tmp)
        header = next(tmp.glob(f"*/{HEADER_PATH}"))
        tree = Path(str(header)[: -len(HEADER_PATH)])
        if debs:
            run_command(["tar", "-xf", str(debs[0]), "debian/patches"], cwd=tmp)
            applied = _apply_header_patches(tmp / "debian" / "patches", tree)
            patches = ", ".join(applied) or "none"
        else:
            patches = ("NOT CHECKED: the mirror gave no debian.tar "
                       f"(apt-get source: {got.output.strip().splitlines()[-1:]})")
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(header, out / "qemu-plugin.h")
        (out / "source.txt").write_text(
            f"{package} {version}\npatches applied to the header: {patches}\n")
        (out / "done").write_text("ok\n")
        publish.publish_dir(out, dest, _complete)


def _apply_header_patches(patches: Path, tree: Path) -> list[str]:
    series = patches / "series"
    applied: list[str] = []
    if not series.is_file():
        return applied
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip().split(" ")[0]
        if not name or not (patches / name).is_file():
            continue
        section = patch_section((patches / name).read_text(errors="replace"), HEADER_PATH)
        if section:
            res = HostShell(cwd=tree).run(["patch", "-p1", "--forward", "--batch"],
                                          input=section, check=False)
            if not res.ok:
                raise CommandError(f"patch -p1 < {name} ({HEADER_PATH} only)", res.exit_code,
                                   res.output)
            applied.append(name)
    return applied


def build_plugin(settings: Settings, log: Log = print, force: bool = False) -> Path:
    """Compile the plugin for the QEMU the `qemu` setting selects, or the system's after
    a fallback (once per source hash and QEMU version); returns the .so path."""
    ensure_packages(BUILD_PACKAGES, log)
    source = qemu_source(settings, resolve_qemu(settings, log))
    headers = fetch_plugin_header(settings, log, source)
    sources = {n: (PLUGIN_DIR / n).read_bytes() for n in PLUGIN_SOURCES}
    cflags = run_command(["pkg-config", "--cflags", "glib-2.0"]).strip()
    libs = run_command(["pkg-config", "--libs", "glib-2.0"]).strip()
    key = plugin_key(sources, (headers / "qemu-plugin.h").read_bytes(), source.version,
                     " ".join((*PLUGIN_CFLAGS, cflags)))
    dest = settings.cache_dir / "cachemodel" / f"plugin-{key}"
    so = dest / PLUGIN_NAME
    if so.is_file() and not force:
        return so
    dest.mkdir(parents=True, exist_ok=True)
    with publish.building(so):
        if so.is_file() and not force:
            return so
        publish.sweep_leftovers(so, f"the cache-model plugin {dest.name}", log)
        log(f"compiling the cache-model plugin into {so}")
        # (a .so is a file: os.replace swaps it in whole; a QEMU that loaded the old one
        # keeps its inode, one starting now loads the new one)
        tmp = dest / f"{publish.work_prefix(so)}{os.getpid()}"
        run_command(compile_command([PLUGIN_DIR / n for n in PLUGIN_SOURCES],
                                    [headers, PLUGIN_DIR], cflags, libs, tmp),
                    hint=f"the plugin must compile cleanly against {source.package} "
                         f"{source.version}'s header")
        os.replace(tmp, so)
    return so


