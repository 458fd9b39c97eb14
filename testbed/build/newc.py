"""A writer for small newc (SVR4 cpio) archives, for probe initramfs images.

The host's cpio cannot put a device node into an archive without creating it on
disk first (which needs root); the format is simple enough to write directly.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdevmajor: int = 0
    rdevminor: int = 0

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def encode_entry(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0,
              entry.rdevmajor, entry.rdevminor, len(name), 0]
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    out = header + name + _pad4(len(header) + len(name)) + entry.data + _pad4(len(entry.data))
    return out


def encode_newc(entries: list[CpioEntry]) -> bytes:
    body = b"".join(encode_entry(e, i + 1) for i, e in enumerate(entries))
    return body + encode_entry(CpioEntry(TRAILER, 0), 0)


def write_newc(path: Path, entries: list[CpioEntry]) -> None:
    path.write_bytes(encode_newc(entries))
