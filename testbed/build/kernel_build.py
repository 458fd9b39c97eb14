"""Build the `stock` and `patched` guest kernels from one source and one config.

A fair stock-vs-patched comparison needs both kernels to differ only by the patch:
same Debian source package, same config fragment (merged onto `allnoconfig`), same
compiler. So the cache key of a build is exactly those inputs (plus the patch
hashes for `patched`), and `metadata.json` records them for every result.

Cache layout under `<cache_dir>/kernels/`:

    tree-<stock-key>/     extracted source + configured stock build tree (its objects
                          are what the patched build starts from)
    stock-<key>/          bzImage, config, metadata.json   (an artifact dir exists
    patched-<key>/        bzImage, config, metadata.json    only when complete)
    tmp/                  work in progress (renamed into place when complete) and the
                          last patched tree (removed by the next build)
    <cache_dir>/ccache/   ccache for all kernel compiles

The patched build copies the stock tree (`cp -a --reflink=auto`, mtimes kept) and
applies the patches, so make recompiles only what the patch touches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed.build.kernel import Kernel
from testbed.build.sysdeps import ensure_packages
from testbed.errors import CommandError, ConfigError, NetbedError
from testbed.files import atomic_write_json
from testbed.settings import IMAGES_DIR, Settings
from testbed.shell import HostShell

Log = Callable[[str], None]

VARIANTS = ("stock", "patched", "affine-copy")
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = IMAGES_DIR / "kernel" / "netbed.config"
PATCHES_DIR = IMAGES_DIR / "patches"
BASE_CONFIG = "allnoconfig"
# Appended to CONFIG_LOCALVERSION ("-netbed") so `uname -r` tells the variants apart.
LOCALVERSION = {"stock": "", "patched": "-wakelocal", "affine-copy": "-affinecopy"}
# The patches of each patched variant: a glob in images/patches/, applied in name order.
# `patched` keeps the wake-local patch alone (its cache key is unchanged); `affine-copy`
# is the seed's second proposal on the stock source (docs/affine-copy.md).
VARIANT_PATCHES = {"patched": "0001-*.patch", "affine-copy": "0002-*.patch"}
# Bump when the recipe (commands, base config, layout) changes: old caches are not reused.
RECIPE_VERSION = 1
PROGRESS_EVERY_S = 30.0

# Debian package -> a command or file that proves it is installed.
BUILD_PACKAGES = {
    SOURCE_PACKAGE: str(SOURCE_TARBALL),
    "build-essential": "make",
    "bc": "bc",
    "bison": "bison",
    "flex": "flex",
    "libelf-dev": "/usr/include/gelf.h",
    "libssl-dev": "/usr/include/openssl/ssl.h",
    "ccache": "ccache",
    "xz-utils": "xz",
    "patch": "patch",
}

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


# ---------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class ConfigLine:
    """One requested option of the fragment, with where it came from (for errors)."""

    name: str
    value: str  # "y", "m", a number, a quoted string, or "n" for "is not set"
    line: int


def parse_config(text: str, source: str = "<config>") -> dict[str, ConfigLine]:
    """Parse a Kconfig fragment or .config; anything unrecognised is an error naming the line."""
    out: dict[str, ConfigLine] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if m := _SET.match(line):
            name, value = m.group(1), m.group(2)
        elif m := _UNSET.match(line):
            name, value = m.group(1), "n"
        elif line.startswith("#"):
            continue
        else:
            raise ConfigError(
                f"{source}:{no}: not a Kconfig line: {line!r}",
                hint="write CONFIG_NAME=value or '# CONFIG_NAME is not set'",
            )
        if name in out:
            raise ConfigError(
                f"{source}:{no}: {name} set twice (first at line {out[name].line})",
                hint="keep one of the two lines",
            )
        out[name] = ConfigLine(name, value, no)
    return out


def config_mismatches(
    requested: dict[str, ConfigLine], merged: dict[str, ConfigLine]
) -> list[tuple[ConfigLine, str]]:
    """Requested options that Kconfig dropped or changed: (request, value it ended up with)."""
    bad = []
    for req in requested.values():
        got = merged[req.name].value if req.name in merged else "n"
        if got != req.value:
            bad.append((req, got))
    return bad


@dataclass(frozen=True)
class KernelFacts:
    """Scheduler-relevant facts read from the final .config (recorded with every result)."""

    preemption: str
    hz: int
    nr_cpus: int
    timer: str


def kernel_facts(config: dict[str, ConfigLine]) -> KernelFacts:
    def on(name: str) -> bool:
        return name in config and config[name].value == "y"

    preemption = next(
        (m for m in ("PREEMPT_NONE", "PREEMPT_VOLUNTARY", "PREEMPT", "PREEMPT_RT")
         if on(f"CONFIG_{m}")),
        "unknown",
    )
    timer = next(
        (m for m in ("NO_HZ_FULL", "NO_HZ_IDLE", "HZ_PERIODIC") if on(f"CONFIG_{m}")), "unknown"
    )
    # a full .config has CONFIG_HZ; a fragment only the choice (CONFIG_HZ_250=y)
    hz = int(config["CONFIG_HZ"].value) if "CONFIG_HZ" in config else next(
        (int(m.group(1)) for name in config if (m := re.fullmatch(r"CONFIG_HZ_(\d+)", name))
         and on(name)), 0)
    nr = int(config["CONFIG_NR_CPUS"].value) if "CONFIG_NR_CPUS" in config else 1
    return KernelFacts(preemption=preemption, hz=hz, nr_cpus=nr, timer=timer)


@dataclass(frozen=True)
class PatchInfo:
    """What a `git format-patch` file says about itself."""

    path: Path
    author: str
    subject: str
    files: tuple[str, ...]
    has_diffstat: bool
    sha256: str


def parse_patch(path: Path, text: str | None = None) -> PatchInfo:
    """Read the mail header, subject and touched files of a format-patch file."""
    text = path.read_text() if text is None else text
    author = subject = ""
    header, _, body = text.partition("\n\n")
    lines = header.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("From: "):
            author = line[6:].strip()
        elif line.startswith("Subject: "):
            subject = line[9:].strip()
            # RFC 2822 folded continuation lines
            for cont in lines[i + 1:]:
                if not cont.startswith((" ", "\t")):
                    break
                subject += " " + cont.strip()
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", subject)
    files = tuple(dict.fromkeys(
        m.group(1) for m in re.finditer(r"^diff --git a/(\S+) b/\S+$", body, re.M)))
    has_diffstat = bool(re.search(r"^ \d+ files? changed", body, re.M))
    return PatchInfo(path, author, subject, files, has_diffstat,
                     hashlib.sha256(text.encode()).hexdigest())


def patch_paths(patches_dir: Path = PATCHES_DIR, variant: str = "patched") -> list[Path]:
    """The patches of a patched variant, in the order `git am` would apply them."""
    return sorted(patches_dir.glob(VARIANT_PATCHES[variant]))


@dataclass(frozen=True)
class BuildInputs:
    """Everything that decides a build's output; the cache key hashes exactly this."""

    variant: str
    source_version: str
    fragment_sha256: str
    compiler: str
    patches: tuple[tuple[str, str], ...] = ()  # (file name, sha256), patched only
    recipe: int = RECIPE_VERSION
    base_config: str = BASE_CONFIG

    def key(self) -> str:
        data = asdict(self)
        data.pop("variant")
        if self.variant == "stock":
            data.pop("patches")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def stock(self) -> BuildInputs:
        """The stock build this one starts from (itself for stock)."""
        return BuildInputs("stock", self.source_version, self.fragment_sha256, self.compiler,
                           (), self.recipe, self.base_config)


def make_argv(variant: str, jobs: int, target: str = "bzImage") -> list[str]:
    """The make command for a build (nice: the machine is shared)."""
    return ["nice", "-n", "10", "make", f"-j{jobs}", "CC=ccache gcc",
            f"LOCALVERSION={LOCALVERSION[variant]}", "KBUILD_BUILD_USER=netbed",
            "KBUILD_BUILD_HOST=netbed", target]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- effects


def _output(cmd: list[str]) -> str:
    return HostShell().run(cmd, hint=f"apt-get install {' '.join(sorted(BUILD_PACKAGES))}"
                           ).stdout


def source_version() -> str:
    """The exact Debian version of the kernel source package, e.g. '6.1.192-2'."""
    return _output(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE]).strip()


def compiler_version() -> str:
    return _output(["gcc", "--version"]).splitlines()[0].strip()


def current_inputs(variant: str, patches_dir: Path = PATCHES_DIR,
                   fragment: Path = FRAGMENT) -> BuildInputs:
    """The inputs of a build of `variant` on this host, now."""
    if variant not in VARIANTS:
        raise NetbedError(f"unknown kernel variant {variant!r}",
                          hint=f"use one of: {', '.join(VARIANTS)}")
    patches: tuple[tuple[str, str], ...] = ()
    if variant != "stock":
        paths = patch_paths(patches_dir, variant)
        if not paths:
            raise NetbedError(f"no {VARIANT_PATCHES[variant]} file in {patches_dir}",
                              hint="restore images/patches/ from git")
        patches = tuple((p.name, sha256_file(p)) for p in paths)
    return BuildInputs(variant, source_version(), sha256_file(fragment), compiler_version(),
                       patches)


class _Progress:
    """Runs one command with output to a log file; prints a line every PROGRESS_EVERY_S."""

    def __init__(self, log: Log, label: str, logfile: Path) -> None:
        self.log, self.label, self.logfile = log, label, logfile
        # user+sys CPU of everything run (make waits for its compilers, so their time
        # is included): on a shared machine it says what the build costs, wall time not
        self.cpu_seconds = 0.0

    def run(self, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            self._run(cmd, cwd, env)
        finally:
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.cpu_seconds += (after.ru_utime - before.ru_utime
                                 + after.ru_stime - before.ru_stime)

    def _run(self, cmd: list[str], cwd: Path, env: dict[str, str] | None) -> None:
        with self.logfile.open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            start = last = time.monotonic()
            # own process group, so an interrupt stops make and every compiler it started
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                while proc.poll() is None:
                    time.sleep(1.0)
                    if time.monotonic() - last >= PROGRESS_EVERY_S:
                        last = time.monotonic()
                        self.log(f"  {self.label}: {last - start:.0f} s, at: {self._tail(1)}")
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
        if proc.returncode != 0:
            raise CommandError(cmd, proc.returncode, self._tail(30),
                               hint=f"full log: {self.logfile}")

    def _tail(self, n: int) -> str:
        with self.logfile.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return "\n".join(lines[-n:]).strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One kernel build at a time per cache (a second caller waits, then finds it built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class _Build:
    settings: Settings
    log: Log
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def root(self) -> Path:
        return self.settings.cache_dir / "kernels"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def env(self) -> dict[str, str]:
        ccache = self.settings.cache_dir / "ccache"
        ccache.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "CCACHE_DIR": str(ccache), "LC_ALL": "C"}

    def artifact_dir(self, inputs: BuildInputs) -> Path:
        return self.root / f"{inputs.variant}-{inputs.key()}"

    def tree_dir(self, inputs: BuildInputs) -> Path:
        return self.root / f"tree-{inputs.stock().key()}"

    def load(self, inputs: BuildInputs) -> Kernel | None:
        art = self.artifact_dir(inputs)
        meta_path = art / "metadata.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        return Kernel(name=inputs.variant, bzimage=art / "bzImage", release=meta["release"],
                      modules_cpio=None, metadata=meta)

    def clean_tmp(self) -> None:
        """Remove work dirs of earlier builds (we hold the lock, so none is live)."""
        if self.tmp.is_dir():
            for child in self.tmp.iterdir():
                shutil.rmtree(child, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- stock tree: extract + configure once, atomically

    def ensure_tree(self, inputs: BuildInputs, progress: _Progress) -> Path:
        tree = self.tree_dir(inputs)
        if (tree / ".netbed-configured").is_file():
            self.log(f"  reusing the configured tree {tree.name} (make is incremental)")
            return tree
        work = self.tmp / f"{tree.name}.{os.getpid()}"
        work.mkdir(parents=True)
        self.log(f"  extracting {SOURCE_TARBALL.name} ({inputs.source_version})")
        progress.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(work),
                      "--strip-components=1"], cwd=work)
        self.log(f"  configuring: {BASE_CONFIG} + {FRAGMENT.name}, olddefconfig")
        env = self.env()
        progress.run(["make", BASE_CONFIG], cwd=work, env=env)
        progress.run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)],
                     cwd=work, env=env)
        progress.run(["make", "olddefconfig"], cwd=work, env=env)
        requested = parse_config(FRAGMENT.read_text(), str(FRAGMENT))
        merged = parse_config((work / ".config").read_text(), str(work / ".config"))
        if bad := config_mismatches(requested, merged):
            detail = "; ".join(f"{FRAGMENT}:{r.line}: {r.name}={r.value} ended up {got}"
                               for r, got in bad)
            raise ConfigError(f"Kconfig did not keep requested options: {detail}",
                              hint="add the options they depend on, or drop them "
                                   "(see `make menuconfig` help for the dependencies)")
        (work / ".netbed-configured").write_text(json.dumps(asdict(inputs.stock())) + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        work.rename(tree)
        return tree

    def make(self, tree: Path, variant: str, progress: _Progress) -> None:
        self.log(f"  compiling ({self.jobs} jobs, ccache, nice 10); log: {progress.logfile}")
        progress.run(make_argv(variant, self.jobs), cwd=tree, env=self.env())

    def publish(self, inputs: BuildInputs, tree: Path, seconds: float,
                extra: dict[str, Any]) -> Kernel:
        """Copy artifacts into a temp dir, then rename: a half artifact never counts as built."""
        art = self.artifact_dir(inputs)
        work = self.tmp / f"{art.name}.{os.getpid()}"
        work.mkdir(parents=True)
        shutil.copy2(tree / "arch/x86/boot/bzImage", work / "bzImage")
        shutil.copy2(tree / ".config", work / "config")
        config = parse_config((tree / ".config").read_text(), str(tree / ".config"))
        facts = kernel_facts(config)
        release = (tree / "include/config/kernel.release").read_text().strip()
        meta = {
            "variant": inputs.variant,
            "release": release,
            "cache_key": inputs.key(),
            "source_package": SOURCE_PACKAGE,
            "source_version": inputs.source_version,
            "base_config": inputs.base_config,
            "config_fragment": str(FRAGMENT.relative_to(IMAGES_DIR.parent)),
            "config_fragment_sha256": inputs.fragment_sha256,
            "config_sha256": sha256_file(tree / ".config"),
            "patches": [{"file": n, "sha256": h} for n, h in inputs.patches],
            "compiler": inputs.compiler,
            "preemption": facts.preemption,
            "hz": facts.hz,
            "timer": facts.timer,
            "nr_cpus": facts.nr_cpus,
            "recipe_version": inputs.recipe,
            "build_seconds": round(seconds, 1),
            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "bzimage_sha256": sha256_file(work / "bzImage"),
            **extra,
        }
        atomic_write_json(work / "metadata.json", meta)
        if art.exists():
            shutil.rmtree(art)
        work.rename(art)
        kernel = self.load(inputs)
        assert kernel is not None
        return kernel

    # -- the two variants

    def build_stock(self, inputs: BuildInputs) -> Kernel:
        start = time.monotonic()
        progress = _Progress(self.log, "stock", self.root / f"stock-{inputs.key()}.log")
        progress.logfile.unlink(missing_ok=True)
        fresh = not (self.tree_dir(inputs) / ".netbed-configured").is_file()
        tree = self.ensure_tree(inputs, progress)
        self.make(tree, "stock", progress)
        seconds = time.monotonic() - start
        self.log(f"kernel stock built in {seconds:.0f} s (wall; {progress.cpu_seconds:.0f} s CPU)")
        origin = "fresh source tree" if fresh else "incremental make in the existing tree"
        return self.publish(inputs, tree, seconds, {
            "built_from": origin, "build_cpu_seconds": round(progress.cpu_seconds, 1)})

    def relink_objtool_in_place(self, stock_tree: Path, work: Path, progress: _Progress) -> None:
        """Rebuild objtool for the copy's path, keeping the stock objtool's mtime.

        objtool is built with absolute paths (tools/ uses O=$(abspath ...)), so in a copied
        tree it is rebuilt, and every object lists the objtool binary as a prerequisite:
        a newer objtool would recompile the whole kernel. The sources are the same, so we
        build it first and give its outputs the stock binary's mtime; make then sees the
        objects as up to date and recompiles only what the patches touched.
        """
        stock_objtool = stock_tree / "tools/objtool/objtool"
        if not stock_objtool.is_file():
            return
        progress.run(["nice", "-n", "10", "make", f"-j{self.jobs}", "tools/objtool"], cwd=work,
                     env=self.env())
        st = stock_objtool.stat()
        for path in [work / "tools/objtool", *(work / "tools/objtool").rglob("*")]:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def build_patched(self, inputs: BuildInputs) -> Kernel:
        stock_inputs = inputs.stock()
        if self.load(stock_inputs) is None or not (
                self.tree_dir(inputs) / ".netbed-configured").is_file():
            self.log(f"kernel {inputs.variant} starts from the stock build, which is not "
                     "built yet: building stock first")
            self.build_stock(stock_inputs)
        start = time.monotonic()
        variant = inputs.variant
        progress = _Progress(self.log, variant, self.root / f"{variant}-{inputs.key()}.log")
        progress.logfile.unlink(missing_ok=True)
        work = self.tmp / f"{variant}-tree-{inputs.key()}.{os.getpid()}"
        # The copy stays in tmp/ when we are done (deleting ~2 GB takes a minute on a busy
        # disk): the next build's clean_tmp() removes it, and after a failure it is there
        # to inspect.
        self.log("  copying the stock build tree (objects reused, mtimes kept)")
        progress.run(["cp", "-a", "--reflink=auto", str(self.tree_dir(inputs)), str(work)],
                     cwd=self.root)
        for name, _ in inputs.patches:
            self.log(f"  applying {name}")
            progress.run(["patch", "-p1", "--forward", "--batch", "-i",
                          str(PATCHES_DIR / name)], cwd=work)
        self.relink_objtool_in_place(self.tree_dir(inputs), work, progress)
        self.make(work, variant, progress)
        seconds = time.monotonic() - start
        self.log(f"kernel {variant} built in {seconds:.0f} s (wall, patch-only rebuild; "
                 f"{progress.cpu_seconds:.0f} s CPU)")
        return self.publish(inputs, work, seconds, {
            "built_from": f"stock tree {stock_inputs.key()} + patches",
            "build_cpu_seconds": round(progress.cpu_seconds, 1)})


def ensure_built(variant: str, settings: Settings, log: Log = print) -> Kernel:
    """Return the cached `stock`/`patched` kernel, building it first when needed (says so)."""
    inputs = current_inputs(variant) if SOURCE_TARBALL.exists() else None
    build = _Build(settings, log)
    if inputs is not None and (kernel := build.load(inputs)) is not None:
        return kernel
    ensure_packages(BUILD_PACKAGES, log)
    inputs = current_inputs(variant)
    with _locked(build.root / ".build.lock"):
        if (kernel := build.load(inputs)) is not None:
            return kernel
        log(f"kernel {variant} (key {inputs.key()}) is not built yet: building it now "
            f"(a cold build takes minutes)")
        build.clean_tmp()
        if variant == "stock":
            return build.build_stock(inputs)
        return build.build_patched(inputs)

