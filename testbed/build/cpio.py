"""newc cpio archives for initramfs, made with the host's cpio.

Archives are built from a sorted file list with owners kept as root, so the
same tree gives the same archive bytes (modulo mtimes, which we clamp).
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.errors import CommandError
from testbed.shell import HostShell


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every mtime to `epoch` (SOURCE_DATE_EPOCH style) for reproducible archives."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def pack_cpio(root: Path, out: Path) -> None:
    """Pack `root` as an uncompressed newc archive (unpacking it is the guest's cost)."""
    names = sorted(
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    )
    tmp = out.with_name(out.name + ".tmp")
    res = HostShell(cwd=root).run(
        ["cpio", "--quiet", "-o", "-H", "newc", "--reproducible", "-R", "0:0",
         "--force-local", "-O", str(tmp.absolute())],
        input="\n".join(names) + "\n", check=False)
    if not res.ok:
        tmp.unlink(missing_ok=True)
        raise CommandError("cpio -o -H newc", res.exit_code, res.stderr)
    os.replace(tmp, out)
