"""Keep one set of booted guests while consecutive repetitions need the same ones.

Booting costs seconds to minutes under TCG, so repetitions that need the same
guests (same kernel, NIC and vCPUs: the key) share a boot. A repetition with
another key shuts the current guests down first; a failure invalidates them, so
the retry starts from a fresh boot. Policies write every knob and read it back,
so a reused boot cannot leak state from the previous repetition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

Booted = TypeVar("Booted")
Cell = TypeVar("Cell")


class BootCache(Generic[Cell, Booted]):
    """`get(cell)` returns guests for `cell`, reusing the current ones when the key matches.

    `boot(cell)` is a context manager that starts the guests and stops them on exit.
    """

    def __init__(self, boot: Callable[[Cell], contextlib.AbstractContextManager[Booted]],
                 key: Callable[[Cell], Hashable]) -> None:
        self._boot = boot
        self._key = key
        self._stack = contextlib.ExitStack()
        self._current: tuple[Hashable, Booted] | None = None
        self.boots = 0  # how many times guests were started (for progress and tests)

    def get(self, cell: Cell) -> Booted:
        key = self._key(cell)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        self.invalidate()
        booted = self._stack.enter_context(self._boot(cell))
        self.boots += 1
        self._current = (key, booted)
        return booted

    def invalidate(self) -> None:
        """Stop the current guests (after a failure, or before booting others)."""
        self._current = None
        self._stack.close()

    def __enter__(self) -> BootCache[Cell, Booted]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.invalidate()
