"""Guest code symbols: address -> function name, for the cache model's attribution (pure).

Kernel symbols come from the receiver's own `/proc/kallsyms` (read as root, so the
addresses are real): it reflects KASLR and lists module functions (e1000,
virtio_net), which a build's System.map cannot. The runner stores the text
symbols, gzip-compressed, once per distinct table in the run folder
(`symbols/kallsyms-<sha>.txt.gz`) and each repetition names the file it used in
`cachemodel-symbols.json`, so analysis never needs the build cache.

User code: QEMU's plugin API cannot tell which process runs, so a user address
names a function only where that is unambiguous: our static, non-PIE guest tools
linked at distinct addresses (symbol tables from `nm`). Any other user address is
labelled by the address range it lies in (USER_RANGES), e.g. `[user:pie-exe]`.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from testbed.errors import NetbedError

SYMBOLS_REF = "cachemodel-symbols.json"  # in a repetition folder: which tables it used
SYMBOLS_DIR = "symbols"  # in the run folder: the tables themselves
FILES = (SYMBOLS_REF,)
KERNEL_SPLIT = 1 << 63  # upper half of the x86-64 address space: kernel
MAX_GUESSED_SIZE = 256 << 10  # a kallsyms entry has no size: at most this far to the next
KERNEL_UNKNOWN = "[kernel:unknown]"
# The cache model keeps user pcs exact only below USER_EXACT_BELOW (our static tools);
# above, it charges a pc to the start of its USER_GRANULE block (at least
# USER_EXACT_BELOW), because randomized user code made its sites grow without bound
# (cachemodel/plugin/model.c, model_site_pc). So every bound of USER_RANGES above
# USER_EXACT_BELOW is a multiple of the granule, and a block's start has its pcs' label.
USER_EXACT_BELOW = 1 << 32
USER_GRANULE = 1 << 40
# (start, end, label) for user addresses no table resolves; Linux x86-64 layout.
USER_RANGES: tuple[tuple[int, int, str], ...] = (
    (0, USER_EXACT_BELOW, "[user:low (static exe)]"),
    (0x550000000000, 0x570000000000, "[user:pie-exe]"),
    (0x7E0000000000, 0x800000000000, "[user:mmap/libs/stack]"),
)
USER_OTHER = "[user:other]"
TEXT_TYPES = frozenset("tTwW")

KALLSYMS_COMMAND = ("grep -E '^[0-9a-f]+ [tTwW] ' /proc/kallsyms")
_KALLSYMS_LINE = re.compile(r"^([0-9a-fA-F]+)\s+([A-Za-z])\s+(\S+)(?:\s+\[(\S+)\])?\s*$")
_NM_LINE = re.compile(r"^([0-9a-fA-F]+)\s+(?:([0-9a-fA-F]+)\s+)?([A-Za-z])\s+(\S+)\s*$")


@dataclass(frozen=True)
class Symbol:
    start: int
    end: int  # exclusive
    name: str


@dataclass(frozen=True)
class SymbolTable:
    """Sorted, non-overlapping address ranges with names."""

    starts: npt.NDArray[np.uint64]
    ends: npt.NDArray[np.uint64]
    names: npt.NDArray[np.object_]

    @classmethod
    def build(cls, symbols: Iterable[Symbol]) -> SymbolTable:
        """Sort; where ranges overlap (aliases at one address), the first name sorted
        by (start, name) wins and later ones start where it ends."""
        syms = sorted((s for s in symbols if s.end > s.start), key=lambda s: (s.start, s.name))
        out: list[Symbol] = []
        for s in syms:
            if out and s.start < out[-1].end:
                if s.end <= out[-1].end:
                    continue
                s = Symbol(out[-1].end, s.end, s.name)
            out.append(s)
        return cls(np.array([s.start for s in out], dtype=np.uint64),
                   np.array([s.end for s in out], dtype=np.uint64),
                   np.array([s.name for s in out], dtype=object))

    def __len__(self) -> int:
        return len(self.starts)

    def lookup(self, addrs: Sequence[int] | npt.NDArray[np.uint64]) -> list[str | None]:
        """The name covering each address, or None."""
        return [None if n is None else str(n)
                for n in self.resolve(np.asarray(addrs, dtype=np.uint64)).tolist()]

    def resolve(self, addrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.object_]:
        """`lookup` as an object array (None where no range covers the address)."""
        out = np.full(len(addrs), None, dtype=object)
        if not len(self):
            return out
        i = np.searchsorted(self.starts, addrs, side="right") - 1
        ok = (i >= 0) & (addrs < self.ends[np.maximum(i, 0)])
        out[ok] = self.names[i[ok]]
        return out


def parse_kallsyms(text: str, source: str = "kallsyms") -> SymbolTable:
    """Text symbols of /proc/kallsyms (or System.map); a size is guessed from the next
    symbol, capped at MAX_GUESSED_SIZE. Module symbols are named `func [module]`."""
    entries: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _KALLSYMS_LINE.match(line)
        if not m:
            raise NetbedError(f"{source}:{n}: not a kallsyms line: {line[:80]!r}",
                              hint="expected '<hex address> <type> <name> [module]'")
        if m.group(2) not in TEXT_TYPES:
            continue
        addr = int(m.group(1), 16)
        name = m.group(3) + (f" [{m.group(4)}]" if m.group(4) else "")
        entries.append((addr, name))
    if entries and all(a == 0 for a, _ in entries):
        raise NetbedError(f"{source}: every address is 0 (kptr_restrict hid them)",
                          hint="read /proc/kallsyms as root, or set kernel.kptr_restrict=0")
    entries.sort()
    starts = sorted({a for a, _ in entries})
    nxt: dict[int, int] = dict(zip(starts, [*starts[1:], 1 << 64], strict=True))
    return SymbolTable.build(Symbol(a, min(nxt[a], a + MAX_GUESSED_SIZE), name)
                             for a, name in entries)


def parse_nm(text: str, prefix: str, source: str = "nm") -> SymbolTable:
    """`nm -S --defined-only` of a static binary: function symbols with their sizes,
    named `<prefix>:<function>`."""
    syms: list[Symbol] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _NM_LINE.match(line)
        if not m:
            raise NetbedError(f"{source}:{n}: not an nm line: {line[:80]!r}",
                              hint="produce it with `nm -S --defined-only <binary>`")
        if m.group(3) not in TEXT_TYPES or not m.group(2):
            continue
        start = int(m.group(1), 16)
        syms.append(Symbol(start, start + int(m.group(2), 16), f"{prefix}:{m.group(4)}"))
    return SymbolTable.build(syms)


def merge(tables: Iterable[SymbolTable]) -> SymbolTable:
    """One table from several; overlapping ranges from different tables are dropped
    on both sides (ambiguous: two binaries at the same addresses)."""
    all_syms = [Symbol(int(s), int(e), str(n)) for t in tables
                for s, e, n in zip(t.starts, t.ends, t.names, strict=True)]
    all_syms.sort(key=lambda s: (s.start, s.end))
    keep = [True] * len(all_syms)
    reach, owner = -1, -1
    for i, s in enumerate(all_syms):
        if s.start < reach and owner >= 0:
            keep[i] = keep[owner] = False
        if s.end > reach:
            reach, owner = s.end, i
    return SymbolTable.build(s for s, k in zip(all_syms, keep, strict=True) if k)


def user_range_label(addr: int) -> str:
    for start, end, label in USER_RANGES:
        if start <= addr < end:
            return label
    return USER_OTHER


def attribute(addrs: Sequence[int] | npt.NDArray[np.uint64], kernel: SymbolTable | None,
              user: SymbolTable | None) -> list[str]:
    """A symbol (or range label) for every instruction address (vectorised: a window's
    sites table has ~10^5 of them)."""
    a = np.asarray(addrs, dtype=np.uint64)
    none = np.full(len(a), None, dtype=object)
    is_kernel = a >= np.uint64(KERNEL_SPLIT)
    out = np.where(is_kernel, kernel.resolve(a) if kernel is not None else none,
                   user.resolve(a) if user is not None else none)
    missing = np.array([not name for name in out.tolist()], dtype=bool)
    out[missing & is_kernel] = KERNEL_UNKNOWN
    user_missing = missing & ~is_kernel
    out[user_missing] = _user_range_labels(a[user_missing])
    return [str(name) for name in out.tolist()]


def _user_range_labels(addrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.object_]:
    """`user_range_label` of every address."""
    out = np.full(len(addrs), USER_OTHER, dtype=object)
    for start, end, label in reversed(USER_RANGES):  # the first range that holds it wins
        out[(addrs >= np.uint64(start)) & (addrs < np.uint64(end))] = label
    return out


def compress_table(text: str) -> tuple[str, bytes]:
    """(content-addressed file name, gzip bytes) of a kallsyms text (deterministic)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"kallsyms-{digest}.txt.gz", gzip.compress(text.encode(), mtime=0)


def decompress_table(data: bytes, source: str) -> str:
    try:
        return gzip.decompress(data).decode()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise NetbedError(f"{source}: not a gzip-compressed symbol table: {exc}",
                          hint="the runner writes it; rerun the cell to recreate it") from exc


RANGES_HEADER = "# netbed symbol ranges: start end name (hex, end exclusive)"


def format_ranges(table: SymbolTable) -> str:
    """A table as text (e.g. the user tools' symbols) that parse_table reads back."""
    lines = [RANGES_HEADER]
    lines += [f"{int(s):x} {int(e):x} {n}" for s, e, n in
              zip(table.starts, table.ends, table.names, strict=True)]
    return "\n".join(lines) + "\n"


def parse_table(text: str, source: str) -> SymbolTable:
    """A stored table: format_ranges output, or else kallsyms text."""
    if not text.startswith(RANGES_HEADER):
        return parse_kallsyms(text, source)
    syms: list[Symbol] = []
    for n, line in enumerate(text.splitlines()[1:], 2):
        parts = line.split(" ", 2)
        try:
            syms.append(Symbol(int(parts[0], 16), int(parts[1], 16), parts[2]))
        except (ValueError, IndexError) as exc:
            raise NetbedError(f"{source}:{n}: not a 'start end name' line: {line[:80]!r}",
                              hint="the runner writes these; rerun the cell") from exc
    return SymbolTable.build(syms)
