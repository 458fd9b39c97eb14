"""Where one repetition's wall time goes: its phases and its round trips into the guests.

A 2-second window cost 5-6.5 s of wall time per repetition under TCG, and the rest
was spent outside the window: applying the policy, starting netperf, waiting for
the window's edges, fetching its files. Each command in a guest is one SSH round
trip (0.2-0.7 s under TCG: the guest's sshd, `timeout` and `sh` are emulated), so
the repetition counts them per guest as it goes, and the run keeps the split in
the repetition's step of `timings.json` (its `detail`), where a slow phase shows
without re-running anything.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from testbed.shell import Result, Shell


@dataclass
class Phases:
    """The named phases of one repetition (seconds, in the order they ran) and the
    round trips made into each guest. Thread-safe: two guests' commands may overlap."""

    clock: Callable[[], float] = time.monotonic
    seconds: dict[str, float] = field(default_factory=dict)
    trips: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase `name` (added to it when the name repeats)."""
        start = self.clock()
        try:
            yield
        finally:
            took = self.clock() - start
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + took

    def split(self, name: str, tail: str, at: float) -> None:
        """Move the part of phase `name` after clock time `at` (it ended since) into phase
        `tail`: the part of the traffic after the window was seen closed is the stop."""
        with self._lock:
            after = max(0.0, self.clock() - at)
            self.seconds[name] = self.seconds.get(name, 0.0) - after
            self.seconds[tail] = self.seconds.get(tail, 0.0) + after

    def count(self, guest: str) -> None:
        with self._lock:
            self.trips[guest] = self.trips.get(guest, 0) + 1

    def summary(self) -> str:
        """One line for the step's detail (pure): 'prepare 0.81 s, ...; round trips 5 (rx 3,
        tx 2)'."""
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        total = sum(self.trips.values())
        each = ", ".join(f"{k} {v}" for k, v in sorted(self.trips.items()))
        return f"{parts}; round trips {total}" + (f" ({each})" if each else "")


class CountingShell:
    """A `Shell` that counts its round trips into `phases` under the name `guest`."""

    def __init__(self, inner: Shell, guest: str, phases: Phases) -> None:
        self.inner = inner
        self.guest = guest
        self.phases = phases

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        self.phases.count(self.guest)
        return self.inner.run(command, timeout=timeout, check=check)
