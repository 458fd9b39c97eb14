"""Debian's prebuilt kernel, extracted from its .deb into the cache (never installed).

Its NIC drivers are modules, so we pack the modules the guest needs (and their
dependencies, with a fresh modules.dep) into a small cpio that is appended to the
rootfs initramfs; the guest's init loads them with modprobe.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from testbed import files as publish
from testbed.build.cpio import pack_cpio
from testbed.build.kernel import Kernel
from testbed.build.sysdeps import IMAGE_PACKAGES, apt_command, ensure_packages
from testbed.errors import NetbedError
from testbed.progress import Log
from testbed.settings import Settings
from testbed.shell import HostShell

META_PACKAGE = "linux-image-amd64"
# Bumped whenever what we extract changes, so old caches are not reused.
LAYOUT_VERSION = 2
# Modules the guest init loads; dependencies are added from modinfo.
GUEST_MODULES = ("e1000", "virtio_net", "virtio_pci", "virtio_rng")


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    return HostShell(cwd=cwd).run(cmd).stdout


def resolve_image_package() -> str:
    """The versioned package behind linux-image-amd64 (e.g. linux-image-6.1.0-56-amd64)."""
    out = _run(apt_command("-q", "-s", "install", "--no-install-recommends", META_PACKAGE))
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0] == "Inst" and parts[1].startswith("linux-image-6"):
            return parts[1]
    out = _run(["apt-cache", "depends", META_PACKAGE])
    for line in out.splitlines():
        if "Depends:" in line and "linux-image-" in line:
            return line.split("Depends:", 1)[1].strip()
    raise NetbedError(f"cannot find the kernel package behind {META_PACKAGE}",
                      hint="run apt-get update")


def module_closure(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for `wanted` plus everything they depend on (via modinfo)."""
    by_name = {p.name.split(".ko")[0].replace("-", "_"): p for p in modules_root.rglob("*.ko*")}
    todo = [w.replace("-", "_") for w in wanted]
    seen: dict[str, Path | None] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = by_name.get(name)
        if path is None:  # built in: nothing to load
            seen[name] = None
            continue
        seen[name] = path
        deps = _run(["modinfo", "-F", "depends", str(path)]).strip()
        todo.extend(d for d in deps.split(",") if d)
    return sorted(p for p in seen.values() if p is not None)


def ensure_distro_kernel(settings: Settings, log: Log = print) -> Kernel:
    ensure_packages(IMAGE_PACKAGES, log)
    package = resolve_image_package()
    release = package.removeprefix("linux-image-")
    dest = settings.cache_dir / "kernels" / f"distro-{release}-{LAYOUT_VERSION}"
    kernel = Kernel(
        name="distro",
        bzimage=dest / "bzImage",
        release=release,
        modules_cpio=dest / "modules.cpio",
        metadata={"package": package, "variant": "distro", "source": "debian-prebuilt"},
    )
    if _complete(dest):
        return _with_version(kernel, dest)
    with publish.building(dest):
        if not _complete(dest):
            publish.sweep_leftovers(dest, f"Debian kernel {package}", log)
            _extract(package, release, dest, log)
    return _with_version(kernel, dest)


def _complete(dest: Path) -> bool:
    return (dest / "done").is_file()


def _extract(package: str, release: str, dest: Path, log: Log) -> None:
    """Download the package and unpack what the guests need into `dest`, atomically."""
    log(f"extracting Debian kernel {package} into {dest} (once)")
    with publish.work_dir(dest) as tmp:
        _run(apt_command("-q", "download", package), cwd=tmp)
        deb = next(tmp.glob("*.deb"))
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        out = tmp / "out"
        out.mkdir()
        shutil.copy2(root / "boot" / f"vmlinuz-{release}", out / "bzImage")
        shutil.copy2(root / "boot" / f"config-{release}", out / "config")
        mods_src = root / "lib" / "modules" / release
        stage = tmp / "stage"
        # usr/lib, not lib: in the merged-/usr rootfs /lib is a symlink, and a "lib"
        # directory entry in an appended archive would replace it and break every binary.
        mod_dir = stage / "usr" / "lib" / "modules" / release
        for ko in module_closure(mods_src, GUEST_MODULES):
            target = mod_dir / ko.relative_to(mods_src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ko, target)
        for extra in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (mods_src / extra).exists():
                shutil.copy2(mods_src / extra, mod_dir / extra)
        _run(["depmod", "-b", str(stage / "usr"), release])
        pack_cpio(stage, out / "modules.cpio")
        (out / "version").write_text(version + "\n")
        (out / "done").write_text("ok\n")
        publish.publish_dir(out, dest, _complete)


def _with_version(kernel: Kernel, dest: Path) -> Kernel:
    version = (dest / "version").read_text().strip()
    return Kernel(kernel.name, kernel.bzimage, kernel.release, kernel.modules_cpio,
                  {**kernel.metadata, "package_version": version})
