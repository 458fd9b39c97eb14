"""testbed.build.beside: the image and plugin builds beside the kernel build."""

from __future__ import annotations

import os
import threading

import pytest

from testbed import timings
from testbed.build.beside import Beside, SideJob


def _recorded() -> timings.Timings:
    return timings.Timings(clock=lambda: 0.0, now=lambda: "2026-12-07T00:00:00+00:00")


def test_side_jobs_run_while_the_body_runs_and_are_marked_beside():
    started = threading.Event()
    order: list[str] = []
    with timings.recording(_recorded()) as steps, Beside(print) as side:
        side.add(SideJob("image", lambda: (order.append("image"), started.set())))
        # the body waits for a side job: they run at the same time, not after it
        assert started.wait(10)
        with timings.step("build", "kernel patched"):
            order.append("kernel")
        side.add(SideJob("plugin", lambda: order.append("plugin")))  # decided later
    assert sorted(order) == ["image", "kernel", "plugin"] and order.index("image") < \
        order.index("plugin")
    by_name = {s.name: s for s in steps.steps}
    assert by_name["image"].beside == by_name["plugin"].beside == "kernel build"
    assert by_name["kernel patched"].beside == ""  # the body's own steps are not beside


def test_side_jobs_run_at_a_lower_priority_than_the_body():
    seen: list[int] = []
    body = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with Beside(print, nice=19) as side:
        side.add(SideJob("image", lambda: seen.append(
            os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))))
    assert seen == [19] and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == body


def test_a_side_failure_is_raised_after_the_body_and_stops_the_later_jobs():
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("mmdebstrap failed")

    with timings.recording(_recorded()) as steps, \
            pytest.raises(RuntimeError, match="mmdebstrap failed"), Beside(print) as side:
        side.add(SideJob("image", broken))
        side.add(SideJob("plugin", lambda: ran.append("p")))
        ran.append("body")
    assert ran == ["body"]
    assert [(s.name, s.ok) for s in steps.steps] == [("image", False)]


def test_the_body_s_failure_comes_first_and_the_side_failure_is_said():
    lines: list[str] = []

    def broken() -> None:
        raise RuntimeError("plugin does not compile")

    with pytest.raises(ValueError, match="patch does not apply"), \
            Beside(lines.append) as side:
        side.add(SideJob("plugin", broken))
        raise ValueError("patch does not apply")
    assert any("plugin build beside the kernel build failed too" in ln for ln in lines)


def test_no_jobs_no_thread():
    before = threading.active_count()
    with Beside(print) as side:
        assert threading.active_count() == before
    assert side.error is None


def test_a_step_round_trips_with_what_it_ran_beside(tmp_path):
    steps = _recorded()
    steps.attach(tmp_path / "timings.json")
    with timings.recording(steps), timings.beside("kernel build"), \
            timings.step("build", "image"):
        pass
    (loaded,) = timings.load_steps(tmp_path / "timings.json")
    assert loaded.beside == "kernel build" and loaded.name == "image"
