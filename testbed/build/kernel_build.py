"""Build the guest kernel variants of a kernels file (configs/kernels.yaml).

A fair comparison between variants needs them to differ only by what the file says
differs: same source package, same config fragment (merged onto `allnoconfig`),
same compiler. So the cache key of a build is exactly those inputs (plus the patch
hashes, the variant's own fragment and its LOCALVERSION), and `metadata.json`
records them for every result.

Cache layout under `<cache_dir>/kernels/`:

    tree-<tree-key>/      extracted source + configured build tree of one base and config,
                          unpatched; compiled once an unpatched variant of it (`stock`)
                          was built (then patched variants start from it)
    <variant>-<key>/      bzImage, config, metadata.json   (exists only when complete)
    <variant>-<key>.log   the build's output
    sources/<package>/    a Debian source fetched from another suite (kernel_source)
    tmp/                  work in progress (renamed into place when complete) and the
                          last patched variant's build tree (removed by the next build)
    <cache_dir>/ccache/   ccache for all kernel compiles

How a variant is built depends on what the cache holds (`build_plan`):

- unpatched (no patches, no LOCALVERSION of its own): in `tree-<tree-key>/` itself.
- patched, base tree compiled: a copy of the tree (`cp -a --reflink=auto`, mtimes
  kept) with the patches applied, so make recompiles only what the patches touch.
- patched, base tree not compiled (a fresh clone whose experiment needs only
  `patched`): fresh source extracted and configured in the variant's own work dir in
  tmp/, the patches applied, one compile. Compiling the unpatched tree first and then
  recompiling a copy would cost a whole cold compile plus a copy more. No compiled tree
  is left for later: a later unpatched build (`stock`) is a cold tree build (its
  unchanged files come from the ccache), and a later patched variant of the base, while
  the tree is still uncompiled, is built from fresh source the same way.

Before any compile the configuration is checked (every requested option kept by
Kconfig) and the patches are applied (to copies of the files they touch when the tree
is shared; to the fresh work dir otherwise): a patch that does not apply is refused
with its kernels file line and first failing hunk, not after minutes of compiling.
Artifacts are copied into tmp/ and renamed into place only when complete.

Keys of `stock`, `patched` and `affine-copy` are those of recipe 1 (before the kernels
file): the key hashes the base, the variant's fragment and its localversion only where
they differ from what recipe 1 implied (6.1, no extra fragment, the localversion recipe 1
gave that name), so caches built before it are still found.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from testbed import files as publish
from testbed import timings
from testbed.build.kernel import Kernel
from testbed.build.kernel_source import (
    KernelSource,
    ensure_source,
    extract_command,
    known_source,
    sha256_file,
    source_record,
)
from testbed.build.sysdeps import ensure_packages
from testbed.errors import CommandError, ConfigError
from testbed.experiment.kernelfile import (
    DEBIAN_BASES,
    DEFAULT_BASE,
    FRAGMENT,
    PATCHES_DIR,
    ConfigLine,
    KernelSet,
    PatchRef,
    Variant,
    load_kernels,
    parse_config,
)
from testbed.files import atomic_write_json
from testbed.settings import IMAGES_DIR, Settings
from testbed.shell import HostShell

__all__ = ["FRAGMENT", "PATCHES_DIR", "BuildInputs", "ConfigLine", "ensure_built",
           "parse_config", "sha256_file"]

Log = Callable[[str], None]

SOURCE_PACKAGE = DEBIAN_BASES[DEFAULT_BASE].package
SOURCE_TARBALL = Path(DEBIAN_BASES[DEFAULT_BASE].tarball)
BASE_CONFIG = "allnoconfig"
# Bump when the recipe (commands, base config, layout) changes: old caches are not reused.
RECIPE_VERSION = 1
PROGRESS_EVERY_S = 30.0
COMPILED_MARKER = ".netbed-compiled"
CONFIGURED_MARKER = ".netbed-configured"

# Debian package -> a command or file that proves it is installed (the base's source
# package comes on top: testbed.build.kernel_source).
BUILD_PACKAGES = {
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

# ---------------------------------------------------------------- pure parts


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


_HUNK_FAILED = re.compile(r"^Hunk #(\d+) FAILED at (\d+)", re.M)
_PATCHING = re.compile(r"^(?:patching|checking) file '?([^'\n]+?)'?$", re.M)


def touched_files(text: str) -> tuple[str, ...]:
    """Files a -p1 patch changes or creates, from its `--- a/x` / `+++ b/x` lines."""
    out: dict[str, None] = {}
    for m in re.finditer(r"^(?:---|\+\+\+) (\S+)", text, re.M):
        path = m.group(1)
        if path == "/dev/null" or "/" not in path:
            continue
        out[path.split("/", 1)[1]] = None
    return tuple(out)


def hunk_text(patch_text: str, file: str, number: int, limit: int = 24) -> tuple[int, str]:
    """Hunk `number` (1-based) of `file` in a patch: (its line in the patch file, its text)."""
    lines = patch_text.splitlines()
    current, count = "", 0
    for i, line in enumerate(lines):
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0].strip()
            current = target.split("/", 1)[1] if "/" in target else target
            count = 0
        elif line.startswith("@@ ") and current == file:
            count += 1
            if count == number:
                return i + 1, "\n".join(_hunk_lines(lines, i, limit))
    return 0, ""


_HUNK_HEAD = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")


def _hunk_lines(lines: list[str], start: int, limit: int) -> list[str]:
    """The hunk at lines[start], as long as its header's line counts say (at most `limit`)."""
    m = _HUNK_HEAD.match(lines[start])
    old, new = (int(m.group(1) or 1), int(m.group(2) or 1)) if m else (0, 0)
    body = [lines[start]]
    for nxt in lines[start + 1:]:
        if (old <= 0 and new <= 0) or len(body) >= limit:
            break
        kind = nxt[:1]
        if kind in (" ", ""):
            old, new = old - 1, new - 1
        elif kind == "-":
            old -= 1
        elif kind == "+":
            new -= 1
        elif kind != "\\":
            break
        body.append(nxt)
    return body


def first_failure(output: str, patch_text: str) -> str:
    """What `patch` said went wrong first, with the failing hunk's text where it names one."""
    failed = _HUNK_FAILED.search(output)
    if failed:
        files = [m for m in _PATCHING.finditer(output) if m.start() < failed.start()]
        file = files[-1].group(1) if files else "?"
        number = int(failed.group(1))
        line, text = hunk_text(patch_text, file, number)
        where = f" (patch line {line})" if line else ""
        return (f"{file}: hunk #{number}{where} FAILED (expected near line "
                f"{failed.group(2)} of the source):\n{text}").rstrip()
    for marker in ("can't find file to patch", "Reversed (or previously applied) patch",
                   "malformed patch", "Only garbage was found", "No file to patch"):
        for said in output.splitlines():
            if marker in said:
                return said.strip()
    tail = [ln for ln in output.strip().splitlines() if ln.strip()]
    return tail[-1] if tail else "patch failed without saying why"


# What recipe 1 (one LOCALVERSION per variant name, before the kernels file) appended to
# `uname -r`. A variant with one of these names and this localversion keeps recipe 1's key,
# which did not hash the localversion; any other variant's key hashes it.
LEGACY_LOCALVERSION = {"stock": "", "patched": "-wakelocal", "affine-copy": "-affinecopy"}


@dataclass(frozen=True)
class BuildInputs:
    """Everything that decides a build's output; the cache key hashes exactly this."""

    variant: str
    source_version: str
    fragment_sha256: str
    compiler: str
    patches: tuple[tuple[str, str], ...] = ()  # (file name, sha256), in order
    recipe: int = RECIPE_VERSION
    base_config: str = BASE_CONFIG
    base: str = DEFAULT_BASE
    extra_fragment_sha256: str = ""            # the variant's own fragment, if any
    localversion: str = ""

    def key(self) -> str:
        data: dict[str, Any] = {"source_version": self.source_version,
                                "fragment_sha256": self.fragment_sha256,
                                "compiler": self.compiler, "recipe": self.recipe,
                                "base_config": self.base_config}
        # recipe 1 keys (stock, patched) hashed exactly the fields above plus the patches
        if self.patches:
            data["patches"] = [list(p) for p in self.patches]
        if self.base != DEFAULT_BASE:
            data["base"] = self.base
        if self.extra_fragment_sha256:
            data["extra_fragment_sha256"] = self.extra_fragment_sha256
        # (an unpatched build without a localversion is its tree's: no name changes that)
        legacy = LEGACY_LOCALVERSION.get(self.variant, None if self.patches else "")
        if legacy != self.localversion:
            data["localversion"] = self.localversion
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def tree(self) -> BuildInputs:
        """The unpatched build of the same base and config this one starts from (its tree)."""
        return BuildInputs("stock", self.source_version, self.fragment_sha256, self.compiler,
                           (), self.recipe, self.base_config, self.base,
                           self.extra_fragment_sha256, "")

    @property
    def in_tree(self) -> bool:
        """Built in its base's tree itself (no patches, no LOCALVERSION of its own)."""
        return not self.patches and not self.localversion


# How a build proceeds (module docstring): in its base's tree, from a copy of the compiled
# tree + patches, or from fresh source + patches when the tree is not compiled.
IN_TREE, FROM_TREE_COPY, FROM_FRESH_SOURCE = "in-tree", "tree-copy", "fresh-source"


def build_plan(inputs: BuildInputs, tree_compiled: bool) -> str:
    """IN_TREE, FROM_TREE_COPY or FROM_FRESH_SOURCE for a build of `inputs`.

    A variant of its own (patches or LOCALVERSION) reuses a compiled tree: only what its
    patches touch recompiles. Without one, compiling the unpatched tree first would add a
    whole cold compile nobody asked for (plus the copy and the recompile), so it compiles
    once, from fresh source with its patches applied."""
    if inputs.in_tree:
        return IN_TREE
    return FROM_TREE_COPY if tree_compiled else FROM_FRESH_SOURCE


def patch_argv(path: Path) -> list[str]:
    """How a variant's patch is applied: -p1, no fuzz (see apply_patch), never reversed."""
    return ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "-i", str(path)]


def make_argv(localversion: str, jobs: int, target: str = "bzImage") -> list[str]:
    """The make command for a build (nice: the machine is shared)."""
    return ["nice", "-n", "10", "make", f"-j{jobs}", "CC=ccache gcc",
            f"LOCALVERSION={localversion}", "KBUILD_BUILD_USER=netbed",
            "KBUILD_BUILD_HOST=netbed", target]


# ---------------------------------------------------------------- effects


def _output(cmd: list[str]) -> str:
    return HostShell().run(cmd, hint=f"apt-get install {' '.join(sorted(BUILD_PACKAGES))}"
                           ).stdout


def source_version() -> str:
    """The exact Debian version of the 6.1 source package, e.g. '6.1.192-2'."""
    return _output(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE]).strip()


def compiler_version() -> str:
    return _output(["gcc", "--version"]).splitlines()[0].strip()


def inputs_for(variant: Variant, source: KernelSource) -> BuildInputs:
    """The inputs of a build of `variant` from `source` on this host, now."""
    patches = tuple((ref.path.name, sha256_file(ref.path)) for ref in variant.patches)
    extra = sha256_file(variant.config) if variant.config is not None else ""
    return BuildInputs(variant.name, source.version, sha256_file(FRAGMENT), compiler_version(),
                       patches, base=variant.base.name, extra_fragment_sha256=extra,
                       localversion=variant.localversion)


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
        # depend mode: ccache keys on the compiler's own -MMD output instead of running
        # the preprocessor once more per file on a miss (a cold build's overhead)
        return {**os.environ, "CCACHE_DIR": str(ccache), "CCACHE_DEPEND": "1", "LC_ALL": "C"}

    def artifact_dir(self, inputs: BuildInputs) -> Path:
        return self.root / f"{inputs.variant}-{inputs.key()}"

    def tree_dir(self, inputs: BuildInputs) -> Path:
        return self.root / f"tree-{inputs.tree().key()}"

    def load(self, inputs: BuildInputs) -> Kernel | None:
        art = self.artifact_dir(inputs)
        meta_path = art / "metadata.json"
        if not meta_path.is_file():
            return None
        # recipe-1 artifacts (stock, patched) predate these fields; their key says they hold
        meta = {"base": inputs.base, "localversion": inputs.localversion,
                **json.loads(meta_path.read_text())}
        return Kernel(name=inputs.variant, bzimage=art / "bzImage", release=meta["release"],
                      modules_cpio=None, metadata=meta)

    def tree_compiled(self, inputs: BuildInputs) -> bool:
        """The tree holds a finished unpatched build (recipe 1 trees: a published stock)."""
        tree = self.tree_dir(inputs)
        legacy = self.root / f"stock-{inputs.tree().key()}" / "metadata.json"
        return (tree / CONFIGURED_MARKER).is_file() and (
            (tree / COMPILED_MARKER).is_file() or legacy.is_file())

    def clean_tmp(self) -> None:
        """Remove work dirs of earlier builds (we hold the lock, so none is live), and
        what publishing moved aside; say so: besides the copy a patched build keeps,
        they are what an interrupted or failed build left."""
        found = sorted(self.tmp.iterdir()) if self.tmp.is_dir() else []
        found += [p for p in self.root.glob(f"{publish.STALE_PREFIX}*") if p.is_dir()]
        if found:
            self.log("removing the work folders of earlier kernel builds (a patched build's "
                     "tree, or what an interrupted or failed build left): "
                     + ", ".join(p.name for p in found))
        for child in found:
            shutil.rmtree(child, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- the base's tree: extract + configure once, atomically

    def ensure_tree(self, variant: Variant, inputs: BuildInputs, source: KernelSource,
                    progress: _Progress) -> Path:
        tree = self.tree_dir(inputs)
        if (tree / CONFIGURED_MARKER).is_file():
            self.log(f"  reusing the configured tree {tree.name} (make is incremental)")
            return tree
        work = self.tmp / f"{tree.name}.{os.getpid()}"
        self.extract_and_configure(variant, source, work, progress)
        (work / CONFIGURED_MARKER).write_text(json.dumps(
            {"inputs": inputs.tree().__dict__, "source": source_record(source)}) + "\n")
        publish.publish_dir(work, tree, lambda d: (d / CONFIGURED_MARKER).is_file())
        return tree

    def extract_and_configure(self, variant: Variant, source: KernelSource, work: Path,
                              progress: _Progress) -> None:
        """The source in `work` (a new dir), configured: allnoconfig + the variant's
        fragments + olddefconfig, every requested option checked."""
        work.mkdir(parents=True)
        self.log(f"  extracting {source.describe()}")
        progress.run(extract_command(source, work), cwd=work)
        names = " + ".join(f.name for f in variant.fragments)
        self.log(f"  configuring: {BASE_CONFIG} + {names}, olddefconfig")
        env = self.env()
        progress.run(["make", BASE_CONFIG], cwd=work, env=env)
        progress.run(["scripts/kconfig/merge_config.sh", "-m", ".config",
                      *(str(f) for f in variant.fragments)], cwd=work, env=env)
        progress.run(["make", "olddefconfig"], cwd=work, env=env)
        check_config(variant, work / ".config", source)

    def compile_tree(self, inputs: BuildInputs, tree: Path, progress: _Progress) -> None:
        """The unpatched build in the tree itself; the marker says it finished."""
        (tree / COMPILED_MARKER).unlink(missing_ok=True)
        self.make(tree, "", progress)
        (tree / COMPILED_MARKER).write_text(inputs.tree().key() + "\n")

    def make(self, tree: Path, localversion: str, progress: _Progress) -> None:
        self.log(f"  compiling ({self.jobs} jobs, ccache, nice 10); log: {progress.logfile}")
        progress.run(make_argv(localversion, self.jobs), cwd=tree, env=self.env())

    def check_patches(self, variant: Variant, tree: Path, source: KernelSource) -> None:
        """Apply the patches, in order, to copies of the files they touch: a patch that does
        not apply stops the build here, before anything compiles."""
        work = self.tmp / f"patch-check-{variant.name}.{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            texts = [ref.path.read_text(errors="replace") for ref in variant.patches]
            for text in texts:
                for rel in touched_files(text):
                    src = tree / rel
                    if src.is_file() and not (work / rel).exists():
                        (work / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, work / rel)
            for ref, text in zip(variant.patches, texts, strict=True):
                apply_patch(ref, text, work, variant, source)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def publish(self, variant: Variant, inputs: BuildInputs, source: KernelSource,
                tree: Path, seconds: float, extra: dict[str, Any]) -> Kernel:
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
            "base": variant.base.name,
            "source_kind": source.kind,
            "source_package": source.package or "",
            "source_suite": source.suite or "",
            "source_version": inputs.source_version,
            "source_path": str(source.tarball or source.tree or ""),
            "base_config": inputs.base_config,
            "config_fragment": _shown(FRAGMENT),
            "config_fragment_sha256": inputs.fragment_sha256,
            "config_extra": _shown(variant.config) if variant.config else None,
            "config_extra_sha256": inputs.extra_fragment_sha256 or None,
            "config_sha256": sha256_file(tree / ".config"),
            "patches": [{"file": n, "sha256": h, "path": _shown(ref.path)}
                        for (n, h), ref in zip(inputs.patches, variant.patches, strict=True)],
            "localversion": inputs.localversion,
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
        publish.publish_dir(work, art, lambda d: (d / "metadata.json").is_file())
        kernel = self.load(inputs)
        assert kernel is not None
        return kernel

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

    def build(self, variant: Variant, inputs: BuildInputs, source: KernelSource) -> Kernel:
        """The variant's build, as `build_plan` says (the module docstring has the cases)."""
        name = variant.name
        start = time.monotonic()
        progress = _Progress(self.log, name, self.root / f"{name}-{inputs.key()}.log")
        progress.logfile.unlink(missing_ok=True)
        plan = build_plan(inputs, self.tree_compiled(inputs))
        if plan == FROM_FRESH_SOURCE:
            return self.build_fresh(variant, inputs, source, progress, start)
        fresh = not (self.tree_dir(inputs) / CONFIGURED_MARKER).is_file()
        tree = self.ensure_tree(variant, inputs, source, progress)
        if plan == IN_TREE:
            if not self.tree_compiled(inputs):
                self.log(f"  the tree {tree.name} is not compiled yet: compiling it")
                self.compile_tree(inputs, tree, progress)
            else:
                self.make(tree, "", progress)  # incremental: a no-op on a finished tree
            origin = "fresh source tree" if fresh else "the existing tree"
            return self._done(variant, inputs, source, tree, start, progress, origin)
        self.check_patches(variant, tree, source)
        tree_ready, tree_cpu = time.monotonic(), progress.cpu_seconds
        work = self.tmp / f"{name}-tree-{inputs.key()}.{os.getpid()}"
        # The copy stays in tmp/ when we are done (deleting ~2 GB takes a minute on a busy
        # disk): the next build's clean_tmp() removes it, and after a failure it is there
        # to inspect.
        self.log("  copying the base's build tree (objects reused, mtimes kept)")
        progress.run(["cp", "-a", "--reflink=auto", str(tree), str(work)], cwd=self.root)
        for ref in variant.patches:
            self.log(f"  applying {ref.path.name}")
            progress.run(patch_argv(ref.path), cwd=work)
        self.relink_objtool_in_place(tree, work, progress)
        self.make(work, variant.localversion, progress)
        origin = f"tree {inputs.tree().key()} + patches"
        return self._done(variant, inputs, source, work, start, progress, origin,
                          patch_only_seconds=round(time.monotonic() - tree_ready, 1),
                          patch_only_cpu_seconds=round(progress.cpu_seconds - tree_cpu, 1))

    def build_fresh(self, variant: Variant, inputs: BuildInputs, source: KernelSource,
                    progress: _Progress, start: float) -> Kernel:
        """No compiled tree of the base: extract and configure the source in the variant's
        own work dir, apply the patches (a failing one is refused before compiling, with
        its kernels file line and hunk), compile once. The work dir stays in tmp/ like a
        tree copy (the next build's clean_tmp() removes it); the tree is not compiled."""
        self.log(f"  the tree {self.tree_dir(inputs).name} is not compiled: building "
                 f"{variant.name} from fresh source with its patches (one compile; the "
                 "unpatched tree is not built)")
        work = self.tmp / f"{variant.name}-tree-{inputs.key()}.{os.getpid()}"
        self.extract_and_configure(variant, source, work, progress)
        for ref in variant.patches:
            self.log(f"  applying {ref.path.name}")
            said = apply_patch(ref, ref.path.read_text(errors="replace"), work, variant,
                               source)
            with progress.logfile.open("a") as out:
                out.write(f"\n$ {' '.join(patch_argv(ref.path))}\n{said}")
        self.make(work, variant.localversion, progress)
        origin = "fresh source + patches" if variant.patches else "fresh source"
        return self._done(variant, inputs, source, work, start, progress, origin)

    def _done(self, variant: Variant, inputs: BuildInputs, source: KernelSource, tree: Path,
              start: float, progress: _Progress, origin: str, **extra: Any) -> Kernel:
        seconds = time.monotonic() - start
        self.log(f"kernel {variant.name} built in {seconds:.0f} s (wall; "
                 f"{progress.cpu_seconds:.0f} s CPU) from {origin}")
        timings.record("build", f"kernel {variant.name}", seconds,
                       f"{progress.cpu_seconds:.0f} CPU-s")
        return self.publish(variant, inputs, source, tree, seconds, {
            "built_from": origin, "build_cpu_seconds": round(progress.cpu_seconds, 1),
            **extra})


def _shown(path: Path) -> str:
    """A repository file relative to the repository, anything else as it is."""
    try:
        return str(path.resolve().relative_to(IMAGES_DIR.parent))
    except ValueError:
        return str(path)


def check_config(variant: Variant, config: Path, source: KernelSource) -> None:
    """Every option the fragments request (a later fragment wins) survived Kconfig."""
    requested: dict[str, ConfigLine] = {}
    for frag in variant.fragments:
        requested.update(parse_config(frag.read_text(), _shown(frag)))
    merged = parse_config(config.read_text(), str(config))
    if bad := config_mismatches(requested, merged):
        detail = "\n".join(f"  {r.source}:{r.line}: {r.name}={r.value} ended up {got}"
                           for r, got in bad)
        raise ConfigError(
            f"{variant.where}: kernel {variant.name}: Kconfig of {source.describe()} did not "
            f"keep requested options:\n{detail}",
            hint="add the options they depend on, drop them, or turn them off for this "
                 "variant with '# CONFIG_X is not set' in its `config:` fragment")


def apply_patch(ref: PatchRef, text: str, work: Path, variant: Variant,
                source: KernelSource) -> str:
    """Apply one patch in `work`; a failure names the kernels file line and the hunk.

    Without fuzz: a hunk whose context does not match exactly (GNU patch would otherwise
    ignore up to two context lines) is refused, so a variant never carries a change in
    a place its author did not mean; an offset (the same lines elsewhere) is accepted.
    Returns what patch said."""
    proc = subprocess.run(patch_argv(ref.path),
                          cwd=work, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise ConfigError(
            f"{ref.where}: kernel {variant.name}: {ref.path.name} does not apply to "
            f"{variant.base.name} ({source.describe()}): "
            f"{first_failure(proc.stdout + proc.stderr, text)}",
            hint="refresh the patch against this base (patches are per base: a variant on "
                 "another base lists its own), or fix the order of the list")
    return proc.stdout + proc.stderr


def find_built(variant: Variant, source: KernelSource, settings: Settings) -> Kernel | None:
    """The cached kernel of `variant` built from `source`, or None (nothing is built)."""
    return _Build(settings, lambda m: None).load(inputs_for(variant, source))


def tree_dir_of(settings: Settings, inputs: BuildInputs) -> Path:
    """The build tree a build of `inputs` starts from (it may not exist yet)."""
    return _Build(settings, lambda m: None).tree_dir(inputs)


def variant_of(name: str, kernels: KernelSet | None = None) -> Variant:
    return (kernels or load_kernels()).variant(name)


def ensure_built(variant: str | Variant, settings: Settings, log: Log = print,
                 kernels: KernelSet | None = None) -> Kernel:
    """Return the cached kernel of a variant, building it first when needed (says so)."""
    v = variant if isinstance(variant, Variant) else variant_of(variant, kernels)
    build = _Build(settings, log)
    known = known_source(v.base, settings)
    if known is not None and (kernel := build.load(inputs_for(v, known))) is not None:
        return kernel
    ensure_packages(BUILD_PACKAGES, log)
    with _locked(build.root / ".build.lock"):
        source = ensure_source(v.base, settings, log)
        inputs = inputs_for(v, source)
        if (kernel := build.load(inputs)) is not None:
            return kernel
        log(f"kernel {v.name} (key {inputs.key()}) is not built yet: building it now "
            f"(a cold build takes minutes)")
        build.clean_tmp()
        return build.build(v, inputs, source)


def find_built_named(name: str, settings: Settings,
                     kernels: KernelSet | None = None) -> Kernel | None:
    """The cached kernel of the variant `name` for today's inputs, or None: never builds,
    never downloads a source (a base whose source is not here yet has nothing built)."""
    v = variant_of(name, kernels)
    known = known_source(v.base, settings)
    return None if known is None else find_built(v, known, settings)
