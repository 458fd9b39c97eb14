"""Where a run's wall time went: one record per step, kept in the run folder.

A fresh clone's first run spends most of its time in one-off work (kernel builds,
the guest image, the KVM probe, the cache-model plugin) and the rest in boots and
repetitions. `timings.json` lists those steps with their start time and duration,
so `benchmarks.quickstart` (and anyone asking "why did this take 16 minutes")
reads the breakdown instead of re-deriving it from log lines.

The steps are recorded by whoever does the work, through the recorder installed
for the run (`recording`): a build or probe deep in the library needs no recorder
threaded through every caller, and outside a run (doctor, tests) it records nothing.
Steps taken before the run folder exists (the probe decides the counter plan
before the folder is made) are kept in memory and written when it is attached.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from testbed.files import atomic_write_json, now_iso, read_json

TIMINGS_FILE = "timings.json"
FORMAT = 1

# What a step is; the quickstart's breakdown groups by it.
STEP_KINDS = ("packages", "probe", "build", "boot", "repetition", "plain", "report")


@dataclass(frozen=True)
class Step:
    """One timed piece of work. `detail` says what it did ("built", "cached", ...)."""

    kind: str
    name: str
    started: str  # UTC, ISO 8601, seconds
    seconds: float
    detail: str = ""
    session: int = 0  # 0 for the session that made the run, 1.. for each resume
    ok: bool = True  # False when the step raised (its time still counts)
    beside: str = ""  # the step it ran beside (testbed.build.beside): its time is not added

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        return cls(kind=str(data["kind"]), name=str(data["name"]),
                   started=str(data["started"]), seconds=float(data["seconds"]),
                   detail=str(data.get("detail", "")), session=int(data.get("session", 0)),
                   ok=bool(data.get("ok", True)), beside=str(data.get("beside", "")))


@dataclass
class StepNote:
    """What the body of a step says about itself before it ends."""

    detail: str = ""


@dataclass
class Timings:
    """The steps of one session of a run; written to `path` after each step once attached."""

    clock: Callable[[], float] = time.monotonic
    now: Callable[[], str] = now_iso
    steps: list[Step] = field(default_factory=list)
    path: Path | None = None
    session: int = 0
    _earlier: list[Step] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # side builds add too

    def attach(self, path: Path) -> None:
        """Write to `path` from now on; a resumed run's earlier sessions are kept."""
        self.path = path
        if path.is_file():
            data = read_json(path)
            self._earlier = [Step.from_dict(s) for s in data.get("steps", [])]
            self.session = 1 + max((s.session for s in self._earlier), default=-1)
            self.steps = [Step(**{**asdict(s), "session": self.session}) for s in self.steps]
        self._write()

    def add(self, step: Step) -> None:
        with self._lock:
            self.steps.append(step)
            self._write()

    @contextlib.contextmanager
    def step(self, kind: str, name: str, detail: str = "") -> Iterator[StepNote]:
        """Time the body as one step (recorded also when it raises, marked not ok)."""
        note = StepNote(detail)
        started, start = self.now(), self.clock()
        ok = False
        try:
            yield note
            ok = True
        finally:
            self.add(Step(kind, name, started, round(self.clock() - start, 3), note.detail,
                          self.session, ok, _BESIDE.get()))

    def _write(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"format": FORMAT,
                                          "steps": [asdict(s) for s in
                                                    [*self._earlier, *self.steps]]})


_CURRENT: ContextVar[Timings | None] = ContextVar("netbed_timings", default=None)
_BESIDE: ContextVar[str] = ContextVar("netbed_timings_beside", default="")


@contextlib.contextmanager
def recording(timings: Timings) -> Iterator[Timings]:
    """Make `timings` the recorder of every `step()` in this context (one run session)."""
    token = _CURRENT.set(timings)
    try:
        yield timings
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def step(kind: str, name: str, detail: str = "") -> Iterator[StepNote]:
    """Time the body as a step of the current run; outside a run, just run it."""
    timings = _CURRENT.get()
    if timings is None:
        yield StepNote(detail)
        return
    with timings.step(kind, name, detail) as note:
        yield note


@contextlib.contextmanager
def beside(what: str) -> Iterator[None]:
    """Mark the steps of this context as run beside `what` (in a thread of their own)."""
    token = _BESIDE.set(what)
    try:
        yield
    finally:
        _BESIDE.reset(token)


def record(kind: str, name: str, seconds: float, detail: str = "") -> None:
    """Add a step that just ended after `seconds` to the current run (if any): for work
    timed where it is done, e.g. a kernel build whose variant builds another first."""
    timings = _CURRENT.get()
    if timings is None:
        return
    started = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")
    timings.add(Step(kind, name, started, round(seconds, 3), detail, timings.session,
                     beside=_BESIDE.get()))


def load_steps(path: Path) -> list[Step]:
    """The steps of a run folder's timings.json (empty when there is none)."""
    if not path.is_file():
        return []
    return [Step.from_dict(s) for s in read_json(path).get("steps", [])]
