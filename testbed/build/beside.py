"""Build the guest image and the cache-model plugin while the kernel compiles.

A fresh clone's first run needs three builds before its first boot: the kernel (minutes),
the guest image and the plugin (under a minute each). Done one after another they add
up; the kernel's `make` leaves part of the two cores idle (a cold build takes 461-476
CPU-s in 238-245 s of wall time, and extraction, configuration and the link are serial),
enough for the image and the plugin. So the side builds run in one
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
import queue
import threading
from collections.abc import Callable
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


def image_job(settings: Settings, log: Log) -> SideJob:
    """The guest image every run boots (a no-op when cached)."""
    return SideJob("image", lambda: ensure_image(settings, log))


def plugin_job(settings: Settings, log: Log) -> SideJob:
    """The cache-model plugin, for a run whose counters come from the model."""
    return SideJob("plugin", lambda: build_plugin(settings, log))


def _lower_priority(nice: int) -> None:
    """Raise this thread's nice value (and so its children's); best effort."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, nice))
    except OSError:
        pass


class Beside:
    """`with Beside(log) as side: side.add(job); body()` runs the added jobs in order in one
    thread while the body runs, then waits for them; a side job's error is raised after a
    body that succeeded (and the jobs after it are skipped).

    Jobs can be added while the body runs, as soon as it knows they are needed (the
    plugin, once the KVM probe has decided the counters). The thread runs in a copy of
    the caller's context, so its steps go to the run's timings recorder."""

    def __init__(self, log: Log, what: str = "kernel build", nice: int = SIDE_NICE) -> None:
        self.log, self.what, self.nice = log, what, nice
        self.error: BaseException | None = None
        self.failed_job = ""
        self._queue: queue.SimpleQueue[SideJob | None] = queue.SimpleQueue()
        self._names: list[str] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Beside:
        return self

    def add(self, job: SideJob) -> None:
        """Queue `job` behind the others (the thread starts with the first)."""
        self._names.append(job.name)
        self._queue.put(job)
        if self._thread is None:
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._work,),
                                            name="netbed-beside", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        _lower_priority(self.nice)
        with timings.beside(self.what):
            while (job := self._queue.get()) is not None:
                if self.error is not None:
                    continue  # after a failure the rest is skipped (the queue drains)
                try:
                    with timings.step("build", job.name):
                        job.run()
                except BaseException as exc:  # handed to the caller's thread in __exit__
                    self.error, self.failed_job = exc, job.name

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        if thread.is_alive():
            self.log(f"waiting for the build of the {' and the '.join(self._names)} beside "
                     f"the {self.what}")
        thread.join()
        if self.error is None:
            return
        if exc is None:
            raise self.error
        self.log(f"(the {self.failed_job} build beside the {self.what} failed too: "
                 f"{self.error})")
