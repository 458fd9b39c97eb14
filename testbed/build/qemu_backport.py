"""Which QEMU starts guests: Debian's bookworm-backports build (the default), unpacked
into the cache, or the host's apt-installed one.

The backport (QEMU 10.0) is the default because a cache-model run is faster on it
(cachemodel/README.md, "QEMU 10.0 (the default) and 7.2"). The host keeps its own QEMU (7.2 on
bookworm) as the fallback: when the backport cannot be downloaded, `resolve_qemu`
says so in one line and returns the system QEMU with the reason in
`QemuInstall.fallback`, which host.json and versions.json record. The decision is
taken once per process and cache, so every boot of a run uses the same QEMU. The
backport is fetched with apt pointed at a sources list and
state directories of ours (`-o` options; the system's apt configuration is never
read or edited), its .debs unpacked with `dpkg-deb -x` into
`<cache_dir>/qemu/<version>/root`, and started from there: its firmware through
`-L`, its modules through `QEMU_MODULE_DIR`, and any library the host lacks (or
has too old) from the same tree through `LD_LIBRARY_PATH`. Which packages that
takes is apt's own answer: a simulated install (`apt-get -s`) against the host's
dpkg status lists exactly what is missing.

`manifest.json`, written last, records version, packages and the sha256 of each
.deb; its presence makes the step idempotent. Pure parts (commands, the
simulation parser, the launch description) are unit-tested.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed import files as publish
from testbed.build.sysdeps import ensure_packages
from testbed.errors import CommandError, ConfigError, NetbedError
from testbed.progress import Log
from testbed.settings import CHOICES, Settings
from testbed.shell import HostShell

BACKPORT_SUITE = "bookworm-backports"
BACKPORT_VERSION = "1:10.0.2+ds-2+deb13u1~bpo12+1"
# What we ask apt for; its simulation adds what they depend on that the host lacks.
ROOT_PACKAGES = ("qemu-system-x86",)
SYSTEM_BINARY = "qemu-system-x86_64"
# Firmware search order given to QEMU with -L, before its compiled-in path
# (/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu, the host's files).
FIRMWARE_SUBDIRS = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")
MODULE_SUBDIR = "usr/lib/x86_64-linux-gnu/qemu"
LIBRARY_SUBDIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class QemuInstall:
    """How to start one QEMU: binary, firmware dirs (-L) and environment.

    `system` is the host's apt-installed QEMU (binary on PATH, nothing else);
    `backport` is an unpacked tree in the cache.
    """

    binary: str
    version: str = ""
    firmware_dirs: tuple[Path, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    kind: str = "system"
    # Why this is the system QEMU although the setting asked for the backport ("" when
    # it is what was asked for): recorded in the run's provenance.
    fallback: str = ""

    def argv_head(self) -> list[str]:
        """The start of every command line: the environment (through env(1), which
        execs QEMU, so the pid stays QEMU's), the binary, then -L per firmware dir."""
        head = ["env", *(f"{k}={v}" for k, v in self.env)] if self.env else []
        head.append(self.binary)
        for d in self.firmware_dirs:
            head += ["-L", str(d)]
        return head


@dataclass(frozen=True)
class DebFile:
    package: str
    version: str
    file: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    version: str
    suite: str
    debs: tuple[DebFile, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        return cls(version=data["version"], suite=data["suite"],
                   debs=tuple(DebFile(**d) for d in data["debs"]))


# ---------------------------------------------------------------- pure parts
def binary_sources(mirror: str, suite: str, backports: str = BACKPORT_SUITE) -> str:
    """deb lines for the base suite (+updates, +security) and the backports suite:
    apt needs the base to resolve dependencies as the host would."""
    base = mirror.rstrip("/")
    security = base + "-security" if base.endswith("/debian") else base
    return (f"deb {base} {suite} main\n"
            f"deb {base} {suite}-updates main\n"
            f"deb {security} {suite}-security main\n"
            f"deb {base} {backports} main\n")


def apt_options(state: Path, sources_list: Path) -> list[str]:
    """apt options that use only our sources list and our own state and archive dirs.

    The host's dpkg status stays the reference (so the simulation says what the host
    lacks); nothing is installed. `APT::Sandbox::User=root` because our directories are
    root's, not `_apt`'s.
    """
    return [
        "-o", f"Dir::Etc::SourceList={sources_list}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", f"Dir::Cache={state / 'cache'}",
        "-o", f"Dir::Cache::Archives={state / 'archives'}",
        "-o", "APT::Get::List-Cleanup=0",
        "-o", "APT::Sandbox::User=root",
    ]


def simulate_command(opts: Sequence[str], version: str, suite: str = BACKPORT_SUITE,
                     packages: Sequence[str] = ROOT_PACKAGES) -> list[str]:
    """apt's plan for installing the backport over this host (prints, changes nothing).
    `-t suite` lets apt take the dependencies from the backports suite too."""
    return ["apt-get", *opts, "-s", "-q", "--no-install-recommends", "-t", suite, "install",
            *(f"{p}={version}" for p in packages)]


_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ")


def parse_simulation(text: str) -> list[tuple[str, str]]:
    """(package, version) of every `Inst` line of `apt-get -s install`."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        m = _INST.match(line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def update_problem(output: str, lists: Sequence[str],
                   suite: str = BACKPORT_SUITE) -> str | None:
    """Why `apt-get update` left no index of `suite` (pure), or None when it has one.

    apt exits 0 when it cannot reach a mirror (it only warns), and the next step's error
    (`... is invalid for APT::Default-Release`) would hide why, so the warning is
    the reason: the first `E:`/`W:` line of the update, or its first `Err:` line with the
    indented line under it (apt's why; `W:` lines go to stderr), else a plain sentence."""
    if any(f"_{suite}_" in name and name.endswith(("Release", "InRelease")) for name in lists):
        return None
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    for prefix in ("E:", "W: Failed to fetch", "Err:", "W:"):
        for i, line in enumerate(lines):
            if line.startswith(prefix):
                below = lines[i + 1] if i + 1 < len(lines) else ""
                if prefix == "Err:" and below[:1].isspace():
                    line = f"{line}: {below.strip()}"
                return line[:300]
    return f"apt-get update fetched no index of {suite}"


def download_command(opts: Sequence[str], packages: Sequence[tuple[str, str]]) -> list[str]:
    return ["apt-get", *opts, "-q", "download", *(f"{p}={v}" for p, v in packages)]


def unpack_command(deb: Path, root: Path) -> list[str]:
    return ["dpkg-deb", "-x", str(deb), str(root)]


def install_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / "qemu" / version.replace(":", "_")


def launch_description(root: Path, version: str, library_dirs: Sequence[Path]) -> QemuInstall:
    """The unpacked tree as a QemuInstall (pure: existence is the caller's concern)."""
    env: list[tuple[str, str]] = [("QEMU_MODULE_DIR", str(root / MODULE_SUBDIR))]
    if library_dirs:
        env.append(("LD_LIBRARY_PATH", ":".join(str(d) for d in library_dirs)))
    return QemuInstall(binary=str(root / "usr/bin" / SYSTEM_BINARY), version=version,
                       firmware_dirs=tuple(root / d for d in FIRMWARE_SUBDIRS),
                       env=tuple(env), kind="backport")


def qemu_packages(packages: Sequence[tuple[str, str]]) -> list[str]:
    return [p for p, _ in packages if p.startswith("qemu-")]


def fallback_line(reason: str, system_binary: str) -> str:
    """The one line a run prints when it falls back to the host's QEMU (pure)."""
    return (f"QEMU {BACKPORT_VERSION} (bookworm-backports, the default) could not be "
            f"downloaded ({reason}): using the host's QEMU instead ({system_binary}, 7.2 on "
            "bookworm); qemu: system in invoke.yaml says so without trying")


def short_reason(exc: BaseException) -> str:
    """Why the download failed, in a few words, for the fallback line (pure): a failed
    command by its program, exit status and last line of output (apt's `E: ...`), any
    other error by its message's first line."""
    if isinstance(exc, CommandError):
        program = exc.command.split()[0] if exc.command else "command"
        lines = [ln.strip() for ln in exc.output.strip().splitlines() if ln.strip()]
        return f"{program} exit {exc.returncode}" + (f": {lines[-1]}" if lines else "")
    text = exc.message if isinstance(exc, NetbedError) else str(exc)
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class BackportUnavailable(NetbedError):
    """The backport could not be downloaded or unpacked (mirror or suite unreachable, the
    version gone): the system QEMU can stand in. A backport that unpacked but does not
    start is a different error and is not caught as this."""


# ---------------------------------------------------------------- effects
def _library_dirs(root: Path) -> list[Path]:
    """Dirs of the tree holding shared libraries (the backport's own deps)."""
    return [root / d for d in LIBRARY_SUBDIRS
            if (root / d).is_dir() and any((root / d).glob("*.so*"))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
    shell = HostShell(cwd=cwd, env={"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"})
    return shell.run(cmd, hint=hint).stdout


def load_backport(settings: Settings, version: str = BACKPORT_VERSION) -> QemuInstall | None:
    """The unpacked backport if it is complete (manifest written), else None."""
    dest = install_dir(settings.cache_dir, version)
    if not (dest / MANIFEST).is_file():
        return None
    root = dest / "root"
    return launch_description(root, version, _library_dirs(root))


def read_manifest(settings: Settings, version: str = BACKPORT_VERSION) -> Manifest | None:
    path = install_dir(settings.cache_dir, version) / MANIFEST
    return Manifest.from_json(path.read_text()) if path.is_file() else None


def ensure_backport(settings: Settings, log: Log = print,
                    version: str = BACKPORT_VERSION) -> QemuInstall:
    """Fetch and unpack the backport once; afterwards only read its manifest."""
    found = load_backport(settings, version)
    if found is not None:
        return found
    dest = install_dir(settings.cache_dir, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hint = (f"the Debian mirror ({settings.debian_mirror}) must carry {BACKPORT_SUITE} "
            f"with qemu-system-x86={version}")
    try:
        ensure_packages({"dpkg-dev": "dpkg-deb", "apt": "apt-get"}, log)
        with publish.building(dest):
            if load_backport(settings, version) is None:
                publish.sweep_leftovers(dest, f"QEMU {version}", log)
                _fetch(settings, version, dest, log, hint)
    except NetbedError as exc:
        raise BackportUnavailable(f"QEMU {version} could not be fetched: {exc}",
                                  hint=exc.hint or hint) from exc
    installed = load_backport(settings, version)
    assert installed is not None
    _run([*installed.argv_head(), "--version"],
         hint="the unpacked QEMU does not start: a library may be missing (ldd on it)")
    return installed


def _fetch(settings: Settings, version: str, dest: Path, log: Log, hint: str) -> None:
    """Download and unpack the packages into a work folder, then publish it as `dest`."""
    log(f"fetching QEMU {version} from {BACKPORT_SUITE} into {dest} (once; the host's "
        "QEMU and apt configuration stay as they are)")
    with publish.work_dir(dest) as tmp:
        sources = tmp / "sources.list"
        sources.write_text(binary_sources(settings.debian_mirror, settings.debian_suite))
        for sub in ("lists/partial", "cache", "archives/partial", "debs", "out/root"):
            (tmp / sub).mkdir(parents=True)
        opts = apt_options(tmp, sources)
        updated = _run(["apt-get", *opts, "-q", "update"], hint=hint)
        lists = sorted(f.name for f in (tmp / "lists").iterdir() if f.is_file())
        if (problem := update_problem(updated, lists)) is not None:
            raise NetbedError(problem, hint=hint)
        plan = parse_simulation(_run(simulate_command(opts, version), hint=hint))
        if not qemu_packages(plan):
            raise NetbedError(f"apt plans no QEMU package for qemu-system-x86={version}",
                              hint="is that version already installed system-wide? then use "
                                   "qemu: system")
        log("packages: " + ", ".join(f"{p} {v}" for p, v in plan))
        _run(download_command(opts, plan), cwd=tmp / "debs", hint=hint)
        debs: list[DebFile] = []
        for deb in sorted((tmp / "debs").glob("*.deb")):
            _run(unpack_command(deb, tmp / "out" / "root"))
            name, ver = deb.name.split("_")[:2]
            debs.append(DebFile(name, ver.replace("%3a", ":"), deb.name, _sha256(deb)))
        if len(debs) != len(plan):
            raise NetbedError(f"apt downloaded {len(debs)} of {len(plan)} packages",
                              hint=hint)
        out = tmp / "out"
        (out / MANIFEST).write_text(
            Manifest(version=version, suite=BACKPORT_SUITE, debs=tuple(debs)).to_json())
        publish.publish_dir(out, dest, lambda d: (d / MANIFEST).is_file())


def system_qemu(settings: Settings, fallback: str = "") -> QemuInstall:
    return QemuInstall(binary=settings.qemu_binary, kind="system", fallback=fallback)


# How the backport is obtained: ensure_backport, or a fake in tests.
Fetch = Callable[[Settings, Log], QemuInstall]

# Per process: cache folders whose backport could not be downloaded, and why. A run asks
# for its QEMU many times (host facts, the plugin build, every boot); after one failed
# download it keeps the system QEMU rather than retrying (minutes of apt timeouts each
# time) or switching QEMU between boots when the mirror comes back.
_FELL_BACK: dict[Path, str] = {}


def resolve_qemu(settings: Settings, log: Log = print,
                 fetch: Fetch = ensure_backport) -> QemuInstall:
    """The QEMU the `qemu` setting selects, fetched on first use; the system QEMU, said in
    one line, when the backport cannot be downloaded."""
    if settings.qemu == "system":
        return system_qemu(settings)
    if settings.qemu != "backport":
        raise ConfigError(f"netbed setting qemu: {settings.qemu!r} is not allowed",
                          hint=f"use one of {', '.join(CHOICES['qemu'])}")
    key = install_dir(settings.cache_dir, BACKPORT_VERSION)
    reason = _FELL_BACK.get(key)
    if reason is None:
        try:
            return fetch(settings, log)
        except BackportUnavailable as exc:
            reason = short_reason(exc.__cause__ or exc)
            _FELL_BACK[key] = reason
            log(fallback_line(reason, settings.qemu_binary))
    return system_qemu(settings, fallback=reason)


def known_qemu(settings: Settings) -> QemuInstall | None:
    """Like resolve_qemu without fetching: None when the backport is selected, not
    unpacked yet, and this process has not fallen back from it."""
    if settings.qemu == "backport":
        reason = _FELL_BACK.get(install_dir(settings.cache_dir, BACKPORT_VERSION))
        return load_backport(settings) if reason is None else system_qemu(settings, reason)
    return system_qemu(settings)
