"""Adaptive repetitions: when a cell has enough of them (pure), and the record of why.

The rule (as pbench's max-stddev): every cell gets `min` repetitions; then, round
by round, the cells whose coefficient of variation (sample sd / |mean|) of the
metric is above `target_cv` get one more, until it is within target or `max`
repetitions were attempted. A decision before round r uses repetitions 0..r-1
only, so a resumed run takes the same decisions as an uninterrupted one.

Stopping when the CV looks good is optional stopping: the CV and the spread of
the stopped sample are biased low, and a confidence interval computed as if n
were fixed is too narrow. The record says so (`OPTIONAL_STOPPING_NOTE`) and the
analysis reports the cells' CV together with the stopping reason, the number of
repetitions and the cells that reached `max` without meeting the target.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from testbed.files import read_json
from testbed.formats import record, windowrates
from testbed.run.folder import RepDir

StopReason = Literal["within-target", "max-reached", "fixed"]
# `done` records the window's own rate (testbed.formats.windowrates); netperf's
# throughput is the fallback for repetitions recorded before it did.
DEFAULT_METRICS = (windowrates.THROUGHPUT, "throughput")
STOPPING_FILE = record.STOPPING

OPTIONAL_STOPPING_NOTE = (
    "Repetitions were adaptive: a cell got more rounds while its CV was above target. "
    "Stopping on a good-looking CV biases that CV (and the spread) low and makes "
    "fixed-n confidence intervals too narrow. The analysis therefore shows each cell's "
    "number of repetitions and stopping reason next to its CV, treats the target as "
    "met only with at least `min` repetitions, and flags cells that reached `max` "
    "above target instead of hiding them.")


def cv(values: Sequence[float]) -> float | None:
    """Sample coefficient of variation; None with fewer than 2 values or a zero mean."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean = statistics.fmean(finite)
    if mean == 0:
        return None
    return statistics.stdev(finite) / abs(mean)


@dataclass(frozen=True)
class Rule:
    min: int
    max: int
    target_cv: float


@dataclass(frozen=True)
class Stop:
    """Why a cell stopped (or None while it goes on), with what the decision rested on."""

    cell_id: str
    repetitions: int           # repetitions attempted (done or failed)
    values: int                # of them with a value of the metric
    cv: float | None
    reason: StopReason | None  # None: it needs another round
    metric: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def decide(rule: Rule, cell_id: str, attempted: int, values: Sequence[float],
           metric: str) -> Stop:
    """Whether a cell with `attempted` repetitions and these metric values stops now."""
    c = cv(values)
    reason: StopReason | None = None
    if attempted >= rule.min and c is not None and len(values) >= rule.min \
            and c <= rule.target_cv:
        reason = "within-target"
    elif attempted >= rule.max:
        reason = "max-reached"
    return Stop(cell_id, attempted, len(values), c, reason, metric)


def metric_value(info: Mapping[str, object], metric: str | None) -> tuple[str, float | None]:
    """The metric's value in a repetition's `done` record: (metric used, value or None).

    Without a metric named, window.throughput where recorded, else netperf's throughput.
    """
    names = (metric,) if metric else DEFAULT_METRICS
    for name in names:
        v = info.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return name, float(v)
    return names[-1], None


def done_value(rep: RepDir, metric: str | None) -> tuple[str, float | None]:
    """The metric of a finished repetition (None if it failed or did not record it)."""
    if not rep.is_complete:  # failed, unfinished or damaged: no value
        return (metric or DEFAULT_METRICS[-1]), None
    info = read_json(rep.file(record.DONE))
    return metric_value(info if isinstance(info, dict) else {}, metric)
