"""analysis.beside: a call in a process of its own (or this one), its value or exception back."""

from __future__ import annotations

import operator

import pytest

from analysis import beside
from analysis.beside import Beside


def _value_and_exception() -> None:
    with Beside(operator.add, 2, 3) as job:
        assert job.result() == 5
    with Beside(operator.truediv, 1, 0) as job, pytest.raises(ZeroDivisionError):
        job.result()


@pytest.mark.process
def test_in_a_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(beside.os, "cpu_count", lambda: 2)
    _value_and_exception()


def test_with_one_cpu_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(beside.os, "cpu_count", lambda: 1)
    _value_and_exception()  # a unit test: starting a process here would raise
    calls: list[int] = []
    with Beside(calls.append, 7) as job:  # runs at `with`
        assert calls == [7]
        job.result()


def test_not_separate_runs_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(beside.os, "cpu_count", lambda: 2)
    calls: list[int] = []
    with Beside(calls.append, 7, separate=False) as job:
        assert calls == [7]
        job.result()
