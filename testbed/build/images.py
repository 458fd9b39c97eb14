"""The guest root filesystem: built with mmdebstrap, packed as an initramfs, cached.

The cache key is the content hash of the recipe (images/rootfs/*, images/tools/*.c,
suite and mirror), so editing the recipe rebuilds and nothing else does, and the new
image is published beside the old one, which stays for runs that booted from it. A
build happens in a work folder and is renamed into place when complete, one build
per image at a time (testbed.files), so an interrupted build never counts as
built and the next one says it was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from testbed import files as publish
from testbed.build.cpio import clamp_mtimes, pack_cpio
from testbed.build.kernel import Kernel
from testbed.build.sysdeps import IMAGE_PACKAGES, ensure_packages
from testbed.progress import Log
from testbed.settings import IMAGES_DIR, Settings
from testbed.shell import HostShell

RECIPE_DIR = IMAGES_DIR / "rootfs"
TOOLS_DIR = IMAGES_DIR / "tools"
# Components: netperf lives in non-free. Passed to mmdebstrap, never to the host's apt.
COMPONENTS = ("main", "non-free")
# Parts of the root nobody reads in a guest; dropping them shortens unpacking at boot.
TRIM_PATHS = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/lintian", "usr/share/bash-completion", "var/lib/apt/lists", "var/cache/apt",
    "var/cache/debconf", "var/log",
)
SOURCE_DATE_EPOCH = 1700000000


@dataclass(frozen=True)
class GuestImage:
    """A built rootfs archive and what SSH needs to trust it."""

    key: str
    rootfs_cpio: Path
    host_key_pub: str  # "ssh-ed25519 AAAA..." of the image's sshd
    manifest: Path


def read_package_list(path: Path = RECIPE_DIR / "packages.txt") -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#", 1)[0].strip()]


def recipe_files() -> list[Path]:
    return sorted([p for p in RECIPE_DIR.rglob("*") if p.is_file()]
                  + list(TOOLS_DIR.glob("*.c")))


def recipe_key(settings: Settings) -> str:
    """Content hash of everything that determines the image."""
    h = hashlib.sha256()
    h.update(f"{settings.debian_suite}\n{settings.debian_mirror}\n{COMPONENTS}\n".encode())
    h.update(Path(__file__).read_bytes())
    for path in recipe_files():
        h.update(str(path.relative_to(IMAGES_DIR)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def mmdebstrap_command(settings: Settings, packages: list[str], target: Path) -> list[str]:
    """The mmdebstrap call: minbase plus our packages, docs excluded at unpack time."""
    excludes = ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*",
                "/usr/share/info/*"]
    cmd = [
        "mmdebstrap", "--variant=minbase", "--mode=root",
        f"--components={','.join(COMPONENTS)}",
        f"--include={','.join(packages)}",
        "--aptopt=Acquire::Languages \"none\"",
        "--aptopt=APT::Install-Recommends \"false\"",
    ]
    cmd += [f"--dpkgopt=path-exclude={p}" for p in excludes]
    cmd += [settings.debian_suite, str(target), settings.debian_mirror]
    return cmd


def _customize(root: Path) -> str:
    """Our init, sshd setup, static tools, trimming. Returns the sshd host public key."""
    shutil.copy2(RECIPE_DIR / "init", root / "init")
    (root / "init").chmod(0o755)
    shutil.copy2(RECIPE_DIR / "inittab", root / "etc" / "inittab")
    shutil.copy2(RECIPE_DIR / "sshd_config", root / "etc" / "ssh" / "sshd_config")
    for old in (root / "etc" / "ssh").glob("ssh_host_*"):
        old.unlink()
    key = root / "etc" / "ssh" / "ssh_host_ed25519_key"
    HostShell().run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "netbed-guest",
                     "-f", str(key)])
    bindir = root / "usr" / "local" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for src in sorted(TOOLS_DIR.glob("*.c")):
        HostShell().run(["gcc", "-static", "-O2", "-pthread", "-o", str(bindir / src.stem),
                         str(src)])
    for rel in TRIM_PATHS:
        target = root / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir(parents=True)
    return (key.with_suffix(".pub")).read_text().strip().rsplit(" ", 1)[0]


def _manifest(root: Path) -> dict[str, str]:
    out = HostShell().run(["chroot", str(root), "dpkg-query", "-W", "-f",
                           "${Package}\t${Version}\n"])
    return dict(line.split("\t", 1) for line in out.stdout.splitlines() if "\t" in line)


def ensure_image(settings: Settings, log: Log = print) -> GuestImage:
    """The cached image for the current recipe, building it first if needed."""
    key = recipe_key(settings)
    dest = settings.cache_dir / "images" / key
    if not _complete(dest):
        with publish.building(dest):
            if not _complete(dest):  # (another process may have built it meanwhile)
                publish.sweep_leftovers(dest, f"guest image {key}", log)
                ensure_packages(IMAGE_PACKAGES, log)
                _build(settings, key, dest, log)
    return GuestImage(key, dest / "rootfs.cpio", (dest / "host_key.pub").read_text().strip(),
                      dest / "manifest.json")


def _complete(dest: Path) -> bool:
    return (dest / "done").is_file()


def _build(settings: Settings, key: str, dest: Path, log: Log) -> None:
    packages = read_package_list()
    log(f"building guest image {key} with mmdebstrap ({len(packages)} packages; "
        "about a minute, once per recipe change)")
    started = time.monotonic()
    with publish.work_dir(dest) as tmp:
        root = tmp / "root"
        HostShell(env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}).run(
            mmdebstrap_command(settings, packages, root))
        manifest = _manifest(root)
        host_key = _customize(root)
        clamp_mtimes(root, SOURCE_DATE_EPOCH)
        out = tmp / "out"
        out.mkdir()
        log("packing the initramfs")
        pack_cpio(root, out / "rootfs.cpio")
        (out / "host_key.pub").write_text(host_key + "\n")
        (out / "manifest.json").write_text(json.dumps(
            {"key": key, "packages": manifest, "suite": settings.debian_suite,
             "components": list(COMPONENTS)}, indent=2, sort_keys=True))
        (out / "done").write_text("ok\n")
        shutil.rmtree(root)
        publish.publish_dir(out, dest, _complete)
    size = (dest / "rootfs.cpio").stat().st_size / 2**20
    log(f"guest image {key}: {size:.0f} MiB, built in {time.monotonic() - started:.0f} s")


def ensure_initrd(image: GuestImage, kernel: Kernel, settings: Settings) -> Path:
    """rootfs archive + the kernel's module archive, concatenated (the kernel unpacks both)."""
    if kernel.modules_cpio is None:
        return image.rootfs_cpio
    tag = hashlib.sha256(f"{image.key}:{kernel.modules_cpio}".encode()).hexdigest()[:16]
    out = settings.cache_dir / "initrd" / f"{tag}.cpio"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as dst:
        for part in (image.rootfs_cpio, kernel.modules_cpio):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    return out
