"""Where a kernel variant's source comes from, and what exactly it is (for the cache key).

- `debian-6.1`: bookworm's `linux-source-6.1`, installed on the host as a package
  (/usr/src/linux-source-6.1.tar.xz); its version is `dpkg-query`'s.
- a Debian base from another suite (`debian-6.12`: bookworm-backports'
  `linux-source-6.12`): its .deb is downloaded with apt pointed at a sources list and
  state directories of netbed's own (`-o` options, as testbed.build.qemu_backport does;
  the system's apt configuration is never read or edited, nothing is installed) and
  unpacked into `<cache_dir>/kernels/sources/<package>/`, where `source.json`, written
  last, records the version and the .deb's sha256. The first fetch pins the version;
  removing the directory fetches the suite's current one.
- a local tarball (version: its sha256) or source tree (version: a digest of every
  file's path, size and mtime; .git and build outputs are not looked at).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.build.qemu_backport import apt_options, binary_sources
from testbed.build.sysdeps import ensure_packages
from testbed.errors import NetbedError
from testbed.experiment.kernelfile import Base, DebianSource
from testbed.progress import Log
from testbed.settings import Settings
from testbed.shell import HostShell

SOURCE_MANIFEST = "source.json"
# Directories of a local tree that say nothing about its source (VCS data, our outputs).
_TREE_SKIP = {".git", ".hg", ".svn"}


@dataclass(frozen=True)
class KernelSource:
    """A base made concrete: what to extract or copy, and its exact version."""

    base: str                 # as the kernels file names it
    kind: str                 # debian | tarball | tree
    version: str              # Debian version, or sha256:<hex> / tree:<hex>
    tarball: Path | None = None
    tree: Path | None = None
    package: str | None = None
    suite: str | None = None

    def describe(self) -> str:
        what = self.package or str(self.tarball or self.tree)
        return f"{what} {self.version}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """A digest of a source tree's files (relative path, size, mtime): cheap, and any edit
    changes it."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _TREE_SKIP)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
    shell = HostShell(cwd=cwd, env={"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    return shell.run(cmd, hint=hint).stdout


def source_dir(settings: Settings, deb: DebianSource) -> Path:
    return settings.cache_dir / "kernels" / "sources" / deb.package


def known_source(base: Base, settings: Settings) -> KernelSource | None:
    """The source if it is here already (installed, fetched, or local), else None: no
    package is installed and nothing is downloaded."""
    if base.debian is None:
        return _local(base)
    deb = base.debian
    if deb.suite is None:
        tarball = Path(deb.tarball)
        if not tarball.is_file():
            return None
        version = _run(["dpkg-query", "-W", "-f=${Version}", deb.package]).strip()
        return KernelSource(base.name, "debian", version, tarball=tarball, package=deb.package)
    manifest = source_dir(settings, deb) / SOURCE_MANIFEST
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    return KernelSource(base.name, "debian", data["version"],
                        tarball=manifest.parent / data["tarball"], package=deb.package,
                        suite=deb.suite)


def ensure_source(base: Base, settings: Settings, log: Log = print) -> KernelSource:
    """The source of `base`, installing (the host's suite) or fetching (another suite) once."""
    found = known_source(base, settings)
    if found is not None:
        return found
    assert base.debian is not None  # a local base is always known (or was refused)
    deb = base.debian
    if deb.suite is None:
        ensure_packages({deb.package: deb.tarball}, log)
    else:
        fetch_debian_source(deb, settings, log)
    found = known_source(base, settings)
    if found is None:
        raise NetbedError(f"{deb.package}: no {deb.tarball} after installing it",
                          hint="check the package's contents with dpkg -L")
    return found


def fetch_debian_source(deb: DebianSource, settings: Settings, log: Log = print) -> None:
    """Download `deb.package` from `deb.suite` with apt options of our own and keep its
    tarball under the cache (source.json last: a half fetch never counts)."""
    assert deb.suite is not None
    ensure_packages({"dpkg-dev": "dpkg-deb", "apt": "apt-get"}, log)
    dest = source_dir(settings, deb)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hint = (f"the Debian mirror ({settings.debian_mirror}) must carry {deb.suite} with "
            f"{deb.package}")
    log(f"fetching {deb.package} from {deb.suite} into {dest} (once; the host's apt "
        "configuration stays as it is, nothing is installed)")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp_s:
        tmp = Path(tmp_s)
        sources = tmp / "sources.list"
        sources.write_text(binary_sources(settings.debian_mirror, settings.debian_suite,
                                          deb.suite))
        for sub in ("lists/partial", "cache", "archives/partial", "debs", "root", "out"):
            (tmp / sub).mkdir(parents=True)
        opts = apt_options(tmp, sources)
        _run(["apt-get", *opts, "-q", "update"], hint=hint)
        _run(["apt-get", *opts, "-q", "-t", deb.suite, "download", deb.package],
             cwd=tmp / "debs", hint=hint)
        debs = sorted((tmp / "debs").glob(f"{deb.package}_*.deb"))
        if len(debs) != 1:
            raise NetbedError(f"apt downloaded {len(debs)} files for {deb.package}", hint=hint)
        version = _run(["dpkg-deb", "-f", str(debs[0]), "Version"]).strip()
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")])
        inner = tmp / "root" / deb.tarball.lstrip("/")
        if not inner.is_file():
            raise NetbedError(f"{debs[0].name} has no {deb.tarball}", hint=hint)
        out = tmp / "out"
        inner.rename(out / inner.name)
        (out / SOURCE_MANIFEST).write_text(json.dumps({
            "package": deb.package, "suite": deb.suite, "version": version,
            "deb": debs[0].name, "deb_sha256": sha256_file(debs[0]),
            "tarball": inner.name}, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    log(f"{deb.package} {version} fetched")


def _local(base: Base) -> KernelSource:
    assert base.path is not None
    if base.path.is_file():
        return KernelSource(base.name, "tarball", "sha256:" + sha256_file(base.path),
                            tarball=base.path)
    if base.path.is_dir():
        return KernelSource(base.name, "tree", "tree:" + tree_digest(base.path),
                            tree=base.path)
    raise NetbedError(f"kernel base {base.name}: {base.path} is gone",
                      hint="restore it or change the variant's base")


def extract_command(source: KernelSource, dest: Path) -> list[str]:
    """The command that puts the source into `dest` (an empty directory)."""
    if source.tarball is not None:
        return ["tar", "-xf", str(source.tarball), "-C", str(dest), "--strip-components=1"]
    assert source.tree is not None
    return ["cp", "-a", "--reflink=auto", f"{source.tree}/.", str(dest)]


def source_record(source: KernelSource) -> dict[str, str | None]:
    """What metadata.json says about the source."""
    data = asdict(source)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
