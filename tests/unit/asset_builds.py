"""Fake effects for the asset builders (image, distro kernel, plugin header, plugin,
QEMU backport), so a build can be interrupted for real (SIGKILL of a process stuck in
its slowest step) and then rebuilt in seconds. Used by tests/unit/test_asset_builds.py;
run as a script, it starts one build that hangs in that step:

    python -m tests.unit.asset_builds ASSET CACHE_DIR
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.build import cachemodel_plugin, distro_kernel, images, qemu_backport
from testbed.settings import Settings
from testbed.shell import Result

STARTED = "STARTED"  # written into the cache dir when the slow step has begun
RELEASE = "6.1.0-99-amd64"
BACKPORT = "1:8.2.2+ds-0+deb12u1~bpo12+1"
SOURCE = cachemodel_plugin.QemuSource("qemu", "1:7.2+dfsg-7", ("bookworm",))


class Fakes:
    """Patches one builder's effects; `hang` makes its slow step block forever."""

    def __init__(self, cache: Path, hang: bool, patch: Callable[[Any, str, Any], None]) -> None:
        self.cache = cache
        self.hang = hang
        self.patch = patch

    def slow_step(self) -> None:
        if self.hang:
            (self.cache / STARTED).write_text("")
            time.sleep(600)

    # -- the image: mmdebstrap is the slow step
    def image(self) -> Callable[[Settings], object]:
        fakes = self

        class Shell:
            def __init__(self, *a: object, **k: object) -> None:
                pass

            def run(self, cmd: list[str], **k: object) -> Result:
                if cmd[0] == "mmdebstrap":
                    Path(cmd[-2]).mkdir(parents=True)
                    fakes.slow_step()
                return Result(" ".join(cmd), 0, "", "")

        self.patch(images, "HostShell", Shell)
        self.patch(images, "ensure_packages", lambda *a: None)
        self.patch(images, "_manifest", lambda root: {"netperf": "2.7"})
        self.patch(images, "_customize", lambda root: "ssh-ed25519 AAAA")
        self.patch(images, "pack_cpio", lambda root, out: out.write_bytes(b"070701"))
        return lambda s: images.ensure_image(s, log=print)

    # -- Debian's kernel: the download is the slow step
    def distro(self) -> Callable[[Settings], object]:
        def run(cmd: list[str], cwd: Path | None = None) -> str:
            if "download" in cmd:
                assert cwd is not None
                (cwd / f"linux-image-{RELEASE}_1_amd64.deb").write_bytes(b"deb")
                self.slow_step()
            elif cmd[:2] == ["dpkg-deb", "-f"]:
                return "6.1.99-1\n"
            elif cmd[:2] == ["dpkg-deb", "-x"]:
                root = Path(cmd[-1])
                (root / "boot").mkdir(parents=True)
                (root / "lib/modules" / RELEASE).mkdir(parents=True)
                for name in (f"vmlinuz-{RELEASE}", f"config-{RELEASE}"):
                    (root / "boot" / name).write_bytes(b"k")
            return ""

        self.patch(distro_kernel, "_run", run)
        self.patch(distro_kernel, "ensure_packages", lambda *a: None)
        self.patch(distro_kernel, "resolve_image_package", lambda: f"linux-image-{RELEASE}")
        self.patch(distro_kernel, "pack_cpio", lambda root, out: out.write_bytes(b"070701"))
        return lambda s: distro_kernel.ensure_distro_kernel(s, log=print)

    # -- the plugin's header: apt-get update against deb-src is the slow step
    def header(self) -> Callable[[Settings], object]:
        def run(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
            if "update" in cmd:
                self.slow_step()
            elif cmd[0] == "tar":
                assert cwd is not None
                header = cwd / "qemu-7.2" / cachemodel_plugin.HEADER_PATH
                header.parent.mkdir(parents=True)
                header.write_text("#define QEMU_PLUGIN_VERSION 1\n")
            return ""

        class Shell:
            def __init__(self, cwd: Path, **k: object) -> None:
                self.cwd = cwd

            def run(self, cmd: list[str], **k: object) -> Result:
                (self.cwd / "qemu_7.2.orig.tar.xz").write_bytes(b"tar")
                return Result(" ".join(cmd), 0, "", "")

        self.patch(cachemodel_plugin, "run_command", run)
        self.patch(cachemodel_plugin, "HostShell", Shell)
        return lambda s: cachemodel_plugin.fetch_plugin_header(s, print, SOURCE)

    # -- the plugin itself: the compiler is the slow step
    def plugin(self) -> Callable[[Settings], object]:
        headers = self.cache / "headers"
        headers.mkdir(parents=True, exist_ok=True)
        (headers / "qemu-plugin.h").write_text("#define QEMU_PLUGIN_VERSION 1\n")

        def run(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
            if cmd[0] == "pkg-config":
                return ""
            out = Path(cmd[cmd.index("-o") + 1])
            out.write_bytes(b"\x7fELF half")
            self.slow_step()
            out.write_bytes(b"\x7fELF whole")
            return ""

        self.patch(cachemodel_plugin, "run_command", run)
        self.patch(cachemodel_plugin, "ensure_packages", lambda *a: None)
        self.patch(cachemodel_plugin, "qemu_source", lambda s, qemu=None: SOURCE)
        self.patch(cachemodel_plugin, "resolve_qemu",
                   lambda s, log=print: qemu_backport.system_qemu(s))
        self.patch(cachemodel_plugin, "fetch_plugin_header", lambda s, log, src: headers)
        return lambda s: cachemodel_plugin.build_plugin(s, print)

    # -- the QEMU backport: the download is the slow step
    def qemu(self) -> Callable[[Settings], object]:
        def run(cmd: list[str], cwd: Path | None = None, hint: str | None = None) -> str:
            if "update" in cmd:  # the index apt would write
                lists = next(Path(o.split("=", 1)[1]) for o in cmd
                             if o.startswith("Dir::State::Lists="))
                (lists / "m_debian_dists_bookworm-backports_InRelease").write_text("x")
            if "-s" in cmd:
                return f"Inst qemu-system-x86 ({BACKPORT} Debian-backports [amd64])\n"
            if "download" in cmd:
                assert cwd is not None
                (cwd / "qemu-system-x86_1%3a8.2.2_amd64.deb").write_bytes(b"deb")
                self.slow_step()
            elif cmd[:2] == ["dpkg-deb", "-x"]:
                binary = Path(cmd[-1]) / "usr/bin" / qemu_backport.SYSTEM_BINARY
                binary.parent.mkdir(parents=True, exist_ok=True)
                binary.write_bytes(b"qemu")
            return ""

        self.patch(qemu_backport, "_run", run)
        self.patch(qemu_backport, "ensure_packages", lambda *a: None)
        return lambda s: qemu_backport.ensure_backport(s, print, BACKPORT)

    def build(self, asset: str) -> Callable[[Settings], object]:
        method: Callable[[], Callable[[Settings], object]] = getattr(self, asset)
        return method()


def main(asset: str, cache: str) -> None:
    mp = pytest.MonkeyPatch()
    build = Fakes(Path(cache), hang=True, patch=mp.setattr).build(asset)
    build(Settings(cache_dir=Path(cache)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
