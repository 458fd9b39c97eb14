"""Progress of a matrix run: done/total, the current repetition, and an ETA.

On a terminal it is a rich progress bar; elsewhere (CI logs, pipes) one plain line
per event, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

# Where a long operation reports progress: one human-readable line per call.
Log = Callable[[str], None]


def eta_seconds(done_now: int, elapsed: float, remaining: int) -> float | None:
    """Remaining time from the mean pace of repetitions run in this session (pure)."""
    if done_now <= 0:
        return None
    return elapsed / done_now * remaining


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, already_done: int, log: Callable[[str], None],
                 use_terminal: bool | None = None) -> None:
        self.total = total
        self.done = already_done
        self.ran = 0
        self.log = log
        self.started = time.monotonic()
        # the first repetition of a session carries one-off work (kernel build, image,
        # plugin, first boot: minutes on a fresh clone), so the pace is taken after it
        self.first_finished: float | None = None
        self.current = ""
        self.bar = None
        if use_terminal if use_terminal is not None else sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("netbed", total=total, completed=already_done)

    def start(self, what: str) -> None:
        self.current = what
        if self.bar is not None:
            self.bar.update(self.task, description=what)
        else:
            self.log(f"[{self.done + 1}/{self.total}] {what} ...")

    def finish(self, outcome: str) -> None:
        self.done += 1
        self.ran += 1
        now = time.monotonic()
        if self.first_finished is None:
            self.first_finished = now
        eta = eta_seconds(self.ran - 1, now - self.first_finished, self.total - self.done)
        if self.bar is not None:
            self.bar.console.print(f"{self.current}: {outcome}")
            self.bar.update(self.task, completed=self.done)
            if self.done >= self.total:
                self.bar.stop()
        else:
            self.log(f"[{self.done}/{self.total}] {self.current}: {outcome} "
                     f"(ETA {fmt_seconds(eta)})")
