"""benchmarks.quickstart: the breakdown of a fresh clone's README commands, parsed from
the stamped log and the run folder's timings.json (captured output, no run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.quickstart import (
    Line,
    breakdown,
    commands,
    format_breakdown,
    parse_log,
    report_seconds,
    stamp,
    step_rows,
)
from testbed.timings import Step, load_steps

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "quickstart"


@pytest.fixture()
def captured() -> tuple[list[Line], list[Step]]:
    return (parse_log((FIXTURES / "quickstart.log").read_text()),
            load_steps(FIXTURES / "timings.json"))


def rows(b) -> dict[str, float]:
    return {r.label.strip(): r.seconds for r in b.rows}


def test_a_stamped_line_reads_back():
    assert parse_log(stamp(12.5, "run", "netbed: guests ready in 5.0 s") + "\nnoise\n") == [
        Line(12.5, "run", "netbed: guests ready in 5.0 s")]


def test_commands_are_spanned_by_their_bench_markers(captured):
    lines, _ = captured
    pip, run = commands(lines)
    assert (pip.name, pip.status, round(pip.seconds, 1)) == ("pip", 0, 6.7)
    assert (run.name, run.status, round(run.seconds, 2)) == ("run-matrix", 0, 416.65)


def test_a_command_the_log_stops_inside_has_no_status():
    lines = parse_log("1.000 bench start run-matrix\n90.000 run netbed: building\n")
    (run,) = commands(lines)
    assert run.status is None and run.seconds == 89.0


def test_every_build_is_its_own_row_and_cached_ones_are_left_out(captured):
    _, steps = captured
    got = {r.label: r for r in step_rows(steps)}
    assert got["kernel stock"].seconds == 236.0 and got["kernel stock"].note == "452 CPU-s"
    assert got["kernel patched"].seconds == 38.0 and got["KVM probe"].seconds == 25.2
    assert "initrd patched" not in got and "host packages" not in got  # no time spent
    assert got["boots (2)"].seconds == 9.5
    assert got["instrumented repetitions (2)"].seconds == 29.0
    assert got["plain repetitions (2)"].note == "8.0-9.0 s each, median 8.5 s"


def test_the_report_runs_from_the_summary_line_to_the_end_of_run_matrix(captured):
    lines, _ = captured
    run = commands(lines)[1]
    assert report_seconds(lines, run) == pytest.approx(24.6)


def test_the_breakdown_accounts_for_the_whole_run(captured):
    b = breakdown(*captured)
    r = rows(b)
    assert b.total == pytest.approx(423.4) and b.load == (0.84, 1.95) and b.failed == []
    inner = [x for x in b.rows if x.label.startswith("  ")]
    assert sum(x.seconds for x in inner) == pytest.approx(r["run-matrix"])
    assert r["other"] == pytest.approx(416.65 - (236 + 38 + 25.2 + 21.3 + 4.1 + 9.5 + 29
                                                 + 17 + 24.6))
    text = format_breakdown(b)
    assert "kernel stock" in text and "README: Fresh clone to report: 7.1 min (423 s)" in text
    assert "pip 6.7 s" in b.readme and "kernel stock 236 s" in b.readme
    assert "report 25 s" in b.readme


def test_a_failed_command_is_said_to_be_not_a_clean_run():
    lines = parse_log("0.000 bench start pip\n5.000 bench end pip rc=1\n")
    b = breakdown(lines, [])
    assert b.failed == ["pip"] and "NOT a clean run: pip" in format_breakdown(b)


def test_a_captured_fresh_clone_run_breaks_down_into_its_steps():
    """A real benchmark run (tiny config, 2026-12-07, contended host): every step is there
    and the rows add up to run-matrix's time."""
    here = FIXTURES / "tiny-2026-12-07"
    b = breakdown(parse_log((here / "quickstart.log").read_text()),
                  load_steps(here / "timings.json"))
    r = rows(b)
    assert r["pip"] == pytest.approx(6.0, abs=0.1) and r["kernel stock"] == pytest.approx(777.27)
    assert r["kernel patched"] == pytest.approx(78.04, abs=0.01) and r["KVM probe"] < 1
    assert r["boots (2)"] == pytest.approx(16.1, abs=0.1) and "report" in r
    inner = sum(x.seconds for x in b.rows if x.label.startswith("  "))
    assert inner == pytest.approx(r["run-matrix"]) and b.failed == []
    assert b.readme.startswith("Fresh clone to report: 15.9 min (955 s)")


def test_a_build_beside_the_kernel_build_is_shown_but_not_added(captured):
    from dataclasses import replace

    lines, steps = captured
    side = [replace(s, beside="kernel build") if s.name == "image" else s for s in steps]
    plain, overlapped = breakdown(lines, steps), breakdown(lines, side)
    image = next(r for r in overlapped.rows if r.label.strip() == "image")
    assert image.beside == "kernel build" and image.note.startswith("beside the kernel build")
    # its seconds are inside the kernel build's: "other" gets them back, the total is the same
    assert rows(overlapped)["other"] == pytest.approx(rows(plain)["other"] + image.seconds)
    assert overlapped.total == plain.total
    assert "(beside the kernel build)" in overlapped.readme
