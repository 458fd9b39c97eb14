"""testbed.run.phases: a repetition's phases and its round trips into each guest."""

from __future__ import annotations

import itertools

from testbed.run.phases import CountingShell, Phases
from testbed.shell import Result


class _Shell:
    def __init__(self) -> None:
        self.commands: list[tuple[str, float | None, bool]] = []

    def run(self, command: str, timeout: float | None = None, check: bool = True) -> Result:
        self.commands.append((command, timeout, check))
        return Result(command, 0, "out", "")


def test_phases_add_up_per_name_in_the_order_they_first_ran():
    ticks = itertools.count(0.0, 0.5)
    phases = Phases(clock=lambda: next(ticks))
    with phases.phase("apply"):
        pass
    with phases.phase("traffic"):
        pass
    with phases.phase("apply"):
        pass
    assert phases.seconds == {"apply": 1.0, "traffic": 0.5}
    assert phases.summary() == "apply 1.00 s, traffic 0.50 s; round trips 0"


def test_a_counting_shell_passes_each_command_on_and_counts_it_per_guest():
    phases = Phases()
    inner = _Shell()
    rx, tx = CountingShell(inner, "rx", phases), CountingShell(_Shell(), "tx", phases)
    assert rx.run("echo a", timeout=5, check=False).stdout == "out"
    rx.run("echo b")
    tx.run("echo c")
    assert inner.commands == [("echo a", 5, False), ("echo b", None, True)]
    assert phases.trips == {"rx": 2, "tx": 1}
    assert phases.summary().endswith("round trips 3 (rx 2, tx 1)")


def test_a_phase_that_raises_still_counts_its_time():
    ticks = itertools.count(0.0, 2.0)
    phases = Phases(clock=lambda: next(ticks))
    try:
        with phases.phase("fetch"):
            raise RuntimeError("lost")
    except RuntimeError:
        pass
    assert phases.seconds == {"fetch": 2.0}


def test_the_tail_of_a_phase_moves_to_its_own_name():
    now = [0.0]
    phases = Phases(clock=lambda: now[0])
    with phases.phase("traffic"):
        now[0] = 3.0
        closed = phases.clock()
        now[0] = 3.5
    phases.split("traffic", "stop", closed)
    assert phases.seconds == {"traffic": 3.0, "stop": 0.5}
