"""testbed.progress: pace and ETA of a matrix run."""

from __future__ import annotations

from testbed.progress import eta_seconds, fmt_seconds


def test_eta_from_pace():
    assert eta_seconds(0, 10, 5) is None
    assert eta_seconds(2, 10.0, 3) == 15.0
    assert fmt_seconds(None) == "?" and fmt_seconds(75) == "1m15s" and fmt_seconds(3700) == "1h01m"
