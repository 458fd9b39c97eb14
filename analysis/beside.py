"""One call run in a process of its own while the caller goes on with other work.

The report's cache-model attribution (analysis.symbols) reads only the run folder and
writes only its own files, so `write_report` runs it beside collating, the statistics
and the figures: on two cores the report takes about as long as the longer of the two
instead of their sum. With one CPU, or when the caller says the call is too small
to pay for a process (~1 s of imports), it runs in the caller's process, at `with`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class Beside(Generic[T]):
    """`with Beside(fn, *args) as job: ...; job.result()`: fn(*args) runs in a child
    process from `with` on (or there, in this one, with one CPU or `separate` False);
    `result()` waits for it and returns its value or raises its exception. Leaving the
    block waits too."""

    def __init__(self, fn: Callable[..., T], *args: object, separate: bool = True) -> None:
        self._fn, self._args, self._separate = fn, args, separate
        self._pool: ProcessPoolExecutor | None = None
        self._future: Future[T] = Future()

    def __enter__(self) -> Beside[T]:
        if self._separate and (os.cpu_count() or 1) > 1:
            # "spawn", not fork: the caller (run-matrix) may hold threads (SSH, progress)
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            self._future = self._pool.submit(self._fn, *self._args)
        else:
            try:
                self._future.set_result(self._fn(*self._args))
            except Exception as exc:  # raised by result(), as a child's would be
                self._future.set_exception(exc)
        return self

    def result(self) -> T:
        return self._future.result()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
