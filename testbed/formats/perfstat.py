"""perf stat: the receiver's command (`-a -A -x<SEP>`), its raw file, its parser.

Raw file: `perf-stat.csv`. Parsed rows are tidy (`metric`, `cpu`, `value`, `unit`,
`status` of "ok", "not-supported" or "not-counted").
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from typing import Any

import pandas as pd

from testbed.errors import NetbedError

# --------------------------------------------------------------------------- perf stat

PERF_SEPARATOR = ";"
# Written instead of the raw file where perf did not count, with the reason (e.g. kept
# out of cache-model windows: testbed.run.window); analysis gives not-supported rows.
RAW_UNSUPPORTED = "perf-unsupported"
RAW = "perf-stat.csv"  # `perf stat -a -A -x<SEP>` of the receiver
RAW_ERRORS = "perf.err"  # perf's (and the inner script's) stderr in plain windows
FILES = (RAW, RAW_UNSUPPORTED, RAW_ERRORS)
SOFTWARE_EVENTS: tuple[str, ...] = (
    "task-clock",
    "context-switches",
    "cpu-migrations",
    "page-faults",
    "cpu-clock",
)
HARDWARE_EVENTS: tuple[str, ...] = (
    "cycles",
    "instructions",
    "cache-references",
    "cache-misses",
    "L1-dcache-loads",
    "L1-dcache-load-misses",
    "LLC-loads",
    "LLC-load-misses",
)


def perf_events(pmu: bool) -> list[str]:
    """Software events always; hardware cache events only where a PMU counts them."""
    return [*SOFTWARE_EVENTS, *(HARDWARE_EVENTS if pmu else ())]


def perf_stat_command(
    duration: float,
    events: Sequence[str],
    sep: str = PERF_SEPARATOR,
    output: str | None = None,
    timeout_margin: float = 30,
    command: Sequence[str] = (),
    control: tuple[str, str] | None = None,
) -> str:
    """`perf stat -a -A -x<sep>` over a `sleep` of the measured window, or over
    `command` (which should last `duration`: the measured window's own script).

    perf writes its table to stderr; with `output` it writes to that file instead
    (`-o`), which keeps it apart from perf's own warnings. With `control` (a
    control FIFO and an ack FIFO) perf starts with its events disabled (`-D -1`)
    and counts only between the `enable` and `disable` its command writes there,
    so perf can start (seconds in a slow guest) before the window opens.
    """
    if not events:
        raise NetbedError("perf_stat_command needs at least one event", hint="use perf_events()")
    for ev in events:
        if sep in ev:
            raise NetbedError(f"perf event {ev!r} contains the separator {sep!r}",
                              hint="choose another separator")
    if len(sep) != 1 or sep in ",:-/" or sep.isalnum():
        raise NetbedError(
            f"perf stat separator {sep!r} may appear in event names or values",
            hint="use ';'",
        )
    if duration <= 0:
        raise NetbedError(f"perf stat duration must be positive, got {duration}", hint="e.g. 5")
    argv = ["perf", "stat", "-a", "-A", f"-x{sep}"]
    if output:
        argv += ["-o", output]
    if control:
        argv += ["-D", "-1", "--control", f"fifo:{control[0]},{control[1]}"]
    argv += ["-e", ",".join(events), "--", *(command or ("sleep", f"{duration:g}"))]
    return with_timeout(argv, duration, timeout_margin)


def with_timeout(argv: Sequence[str], duration: float, timeout_margin: float) -> str:
    """`argv` under `timeout`: killed `timeout_margin` (at least 1 s) after `duration`,
    and SIGKILLed 5 s later. The window script runs its inner script this way where
    perf does not wrap it (cache-model windows)."""
    limit = math.ceil(duration) + max(1, math.ceil(timeout_margin))
    return shlex.join(["timeout", "-k", "5", str(limit), *argv])


_PERF_STATUS = {"<not supported>": "not-supported", "<not counted>": "not-counted"}


def parse_perf_stat(text: str, sep: str = PERF_SEPARATOR) -> pd.DataFrame:
    """Parse `perf stat -a -A -x<sep>` rows: "CPU0;123;unit;event;runtime;pct;...".

    `<not supported>` and `<not counted>` stay visible (value NaN plus status),
    never zero: a missing counter must not read as "no cache misses". Rows for
    the same event and CPU (perf repeats them with cgroups) are summed.
    """
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(sep)
        if len(parts) < 4 or not re.fullmatch(r"CPU\d+", parts[0]):
            # perf's comments ("# started on ...") and summary lines without -A
            continue
        cpu = parts[0][3:]
        raw_value, unit, event = parts[1].strip(), parts[2].strip(), parts[3].strip()
        status = _PERF_STATUS.get(raw_value, "ok")
        value = math.nan
        if status == "ok":
            try:
                value = float(raw_value)
            except ValueError as exc:
                raise NetbedError(
                    f"perf stat line {lineno}: value {raw_value!r} is not a number",
                    hint="the file should come from `perf stat -x;` (see perf_stat_command)",
                ) from exc
        pct = _float_or_nan(parts[5]) if len(parts) > 5 else math.nan
        rows.append(
            {"metric": event, "cpu": cpu, "value": value, "unit": unit, "status": status,
             "running_pct": pct}
        )
    df = pd.DataFrame(rows, columns=["metric", "cpu", "value", "unit", "status", "running_pct"])
    if df.empty or not df.duplicated(["metric", "cpu"]).any():
        return df
    return (
        df.groupby(["metric", "cpu"], sort=False, as_index=False)
        .agg(value=("value", lambda s: s.sum(min_count=1)), unit=("unit", "first"),
             status=("status", "first"), running_pct=("running_pct", "min"))
    )


def _float_or_nan(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


