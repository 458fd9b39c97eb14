"""Build the guest image and the cache-model plugin while the kernel compiles.

A fresh clone's first run needs three builds before its first boot: the kernel (minutes),
the guest image and the plugin (under a minute each). Done one after another they add
up; the kernel's `make` leaves part of the two cores idle (a cold build measured 876 CPU-s in
480 s of wall time: extraction, configuration, objtool and the link are serial), more than
the image and the plugin need (about 40 and 8 CPU-s). So the side builds run in one
background thread while the kernel builds, at nice 19: on Linux a nice value belongs to
a thread and the processes it starts inherit it, so mmdebstrap, cpio and gcc take the
cycles `make` (nice 10) leaves over instead of slowing it.

Each side build is a timings step marked `beside` (testbed.timings): the quickstart's
breakdown shows it without adding it to the run's wall time. A failure of a side build
is raised when the kernel build is done (its own failure comes first); what a side build
finished stays in the cache either way.
"""

from __future__ import annotations

import contextvars
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from testbed import timings
from testbed.build.cachemodel_plugin import build_plugin
from testbed.build.images import ensure_image
from testbed.progress import Log
from testbed.settings import Settings

SIDE_NICE = 19


@dataclass(frozen=True)
class SideJob:
    """One build that can run beside another: its timings step name and the work."""

    name: str
    run: Callable[[], object]


def side_jobs(settings: Settings, plugin: bool, log: Log) -> list[SideJob]:
    """The builds a run needs besides its kernels: the image, and the plugin when the
    cache model counts any repetition (each is a no-op when cached)."""
    jobs = [SideJob("image", lambda: ensure_image(settings, log))]
    if plugin:
        jobs.append(SideJob("plugin", lambda: build_plugin(settings, log)))
    return jobs


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (and so its children's); best effort."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, nice))
    except OSError:
        pass


class Beside:
    """`with Beside(jobs, log): body()` runs the jobs in order in a thread while the body
    runs, then waits for them; a side job's error is raised after a body that succeeded.

    The thread runs in a copy of the caller's context, so its steps go to the run's
    timings recorder."""

    def __init__(self, jobs: Sequence[SideJob], log: Log, what: str = "kernel build",
                 nice: int = SIDE_NICE) -> None:
        self.jobs, self.log, self.what, self.nice = list(jobs), log, what, nice
        self.error: BaseException | None = None
        self.failed_job = ""
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Beside:
        if self.jobs:
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._work,),
                                            name="netbed-beside", daemon=True)
            self._thread.start()
        return self

    def _work(self) -> None:
        _lower_priority(self.nice)
        with timings.beside(self.what):
            for job in self.jobs:
                try:
                    with timings.step("build", job.name):
                        job.run()
                except BaseException as exc:  # handed to the caller's thread in __exit__
                    self.error, self.failed_job = exc, job.name
                    return

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            names = " and ".join(j.name for j in self.jobs)
            self.log(f"waiting for the {names} build{'s' if len(self.jobs) > 1 else ''} "
                     f"beside the {self.what}")
        thread.join()
        if self.error is None:
            return
        if exc is None:
            raise self.error
        self.log(f"(the {self.failed_job} build beside the {self.what} failed too: "
                 f"{self.error})")
