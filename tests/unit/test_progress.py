"""testbed.progress: pace and ETA of a matrix run."""

from __future__ import annotations

from testbed.progress import eta_seconds, fmt_seconds


def test_eta_from_pace():
    assert eta_seconds(0, 10, 5) is None
    assert eta_seconds(2, 10.0, 3) == 15.0
    assert fmt_seconds(None) == "?" and fmt_seconds(75) == "1m15s" and fmt_seconds(3700) == "1h01m"


def test_the_first_repetitions_one_off_setup_does_not_set_the_pace(monkeypatch):
    # a fresh clone: the first repetition waits for the kernel build (450 s), the rest
    # take 15 s each; the ETA must say minutes, not hours
    from testbed import progress

    clock = iter([0.0, 465.0, 480.0, 495.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    p = progress.Progress(10, 0, lines.append, use_terminal=False)
    for _ in range(3):
        p.start("rep")
        p.finish("ok")
    assert lines[1].endswith("(ETA ?)")  # one repetition: no pace yet
    assert lines[-1].endswith("(ETA 1m45s)")  # 7 more at 15 s
