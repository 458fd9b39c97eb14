"""The one statistical method of every comparison netbed reports (pure).

Repetitions are few (quick.yaml: 3 per cell), so the method has to be right at n = 3:

- **Ratios** (rates, counters per KB, latencies; every value > 0): the ratio of
  geometric means, new over base, with a 95% Welch t interval computed on the logs
  of the per-repetition values. It is exact for log-normal noise with equal spreads
  and close to it otherwise (Welch-Satterthwaite degrees of freedom). A contrast of
  more than two groups (the interaction: e1000 effect over the offloading NIC's
  effect) is the exponential of a signed sum of log means, its interval again Welch's.
- **Differences** (shares 0..1, and counts that can be 0 so have no log): the
  difference of means with a Welch t interval on the values themselves.

Why not the percentile bootstrap: a resample of three values has only 10 distinct
medians (and few distinct means), so at n = 3 its interval is far too narrow and
"finds" effects that are not there (tests/unit/test_stats.py measures it). Why not
the Mann-Whitney U test: at 3 vs 3 its smallest two-sided p-value is 0.1, so it can
never reject at 5% however large the effect. The p-value here is the Welch t test's
on the same scale as the interval, so "p < 0.05" and "the interval excludes no
change" are the same statement.

One repetition on a side, or no spread at all (equal small counts), gives the point
estimate and no interval (never a zero-width one), and the verdict is then "not
detectable". The verdict words are the same in
the comparison tables and in the answer: a change is `higher` / `lower` or
`not detectable`; a claim is `supported` / `contradicted` / `not detectable`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
ALPHA = 1 - LEVEL

# Verdict words, the same everywhere (comparison tables, the answer, the terminal).
HIGHER: Final = "higher"
LOWER: Final = "lower"
NOT_DETECTABLE: Final = "not detectable"
SUPPORTED: Final = "supported"
CONTRADICTED: Final = "contradicted"
ChangeVerdict = Literal["higher", "lower", "not detectable"]
ClaimVerdict = Literal["supported", "contradicted", "not detectable"]

Scale = Literal["log", "linear"]
# Per-repetition values: a list, or an array of them.
Values = Sequence[float] | np.ndarray[Any, Any]

METHOD_TEXT = ("Ratios are of geometric means over repetitions with 95% Welch t intervals "
               "on log values (right at n = 3, where a percentile bootstrap is too narrow "
               "and a Mann-Whitney test cannot reach p < 0.1); shares, and counts that can "
               "be zero, are compared as differences of means with a Welch t interval. "
               "One repetition on a side (or no spread) gives no interval, and the row "
               "says so. An interval that includes no change is never worded as an effect.")


def _clean(values: Values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def _welch(samples: Sequence[np.ndarray], signs: Sequence[int],
           level: float) -> tuple[float, float, float, float]:
    """(estimate, lo, hi, p) of sum sign_i * mean(x_i); NaN interval with n < 2 on a side."""
    est = float(sum(s * a.mean() for s, a in zip(signs, samples, strict=True)))
    if min(len(a) for a in samples) < 2:
        return est, math.nan, math.nan, math.nan
    terms = [float(a.var(ddof=1)) / len(a) for a in samples]
    se2 = sum(terms)
    if se2 == 0:  # no spread on any side (small counts): a t interval is undefined
        return est, math.nan, math.nan, math.nan
    df = se2 ** 2 / sum(t ** 2 / (len(a) - 1) for t, a in zip(terms, samples, strict=True))
    se = math.sqrt(se2)
    half = float(sps.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * sps.t.sf(abs(est) / se, df))
    return est, est - half, est + half, p


@dataclass(frozen=True)
class Ratio:
    """Geometric-mean ratio (or ratio of ratios) with its Welch interval; n per group."""

    ratio: float
    lo: float
    hi: float
    n: tuple[int, ...]
    p: float = math.nan

    @property
    def detected(self) -> bool:
        return not math.isnan(self.lo) and (self.lo > 1 or self.hi < 1)

    @property
    def verdict(self) -> ChangeVerdict:
        if not self.detected:
            return "not detectable"
        return "higher" if self.ratio > 1 else "lower"

    @property
    def width(self) -> float:
        """hi / lo: how many-fold the interval spans (NaN without one)."""
        return self.hi / self.lo if self.lo > 0 else math.nan

    def pct(self) -> str:
        if math.isnan(self.ratio):
            return "n/a"
        if math.isnan(self.lo):
            return f"{(self.ratio - 1) * 100:+.1f}% (no CI)"
        return (f"{(self.ratio - 1) * 100:+.1f}% [{(self.lo - 1) * 100:+.1f}, "
                f"{(self.hi - 1) * 100:+.1f}]")

    def times(self) -> str:
        """"1.93x [1.41, 2.64]", the form the claims table uses."""
        if math.isnan(self.ratio):
            return "n/a"
        if math.isnan(self.lo):
            return f"{self.ratio:.2f}x (no CI)"
        return f"{self.ratio:.2f}x [{self.lo:.2f}, {self.hi:.2f}]"


NAN_RATIO = Ratio(math.nan, math.nan, math.nan, ())


@dataclass(frozen=True)
class Difference:
    """Mean difference new - base with its 95% Welch interval."""

    diff: float
    lo: float
    hi: float
    n: tuple[int, int]
    new_mean: float
    base_mean: float
    p: float = math.nan

    @property
    def detected(self) -> bool:
        return not math.isnan(self.lo) and (self.lo > 0 or self.hi < 0)

    @property
    def verdict(self) -> ChangeVerdict:
        if not self.detected:
            return "not detectable"
        return "higher" if self.diff > 0 else "lower"

    def pp(self) -> str:
        """The difference of two shares in percentage points."""
        if math.isnan(self.diff):
            return "n/a"
        if math.isnan(self.lo):
            return f"{self.diff * 100:+.0f} pp (no CI)"
        return f"{self.diff * 100:+.0f} pp [{self.lo * 100:+.0f}, {self.hi * 100:+.0f}]"


def log_contrast(groups: Sequence[Values], signs: Sequence[int],
                 level: float = LEVEL) -> Ratio:
    """exp(sum sign_i * mean(log x_i)) with a Welch t interval.

    Two groups (+1 new, -1 base) give a ratio of geometric means; four give an
    interaction (ratio of ratios). Values must be positive (else NaN: use
    diff_contrast); a group with fewer than two values gives the point estimate
    without an interval.
    """
    logs = []
    for g in groups:
        a = _clean(g)
        if len(a) == 0 or np.any(a <= 0):
            return Ratio(math.nan, math.nan, math.nan, tuple(len(_clean(x)) for x in groups))
        logs.append(np.log(a))
    est, lo, hi, p = _welch(logs, signs, level)
    n = tuple(len(a) for a in logs)
    return Ratio(math.exp(est), math.exp(lo) if not math.isnan(lo) else math.nan,
                 math.exp(hi) if not math.isnan(hi) else math.nan, n, p)


def diff_contrast(new: Values, base: Values,
                  level: float = LEVEL) -> Difference:
    """mean(new) - mean(base) with a Welch t interval."""
    a, b = _clean(new), _clean(base)
    n = (len(a), len(b))
    if not len(a) or not len(b):
        return Difference(math.nan, math.nan, math.nan, n, math.nan, math.nan)
    est, lo, hi, p = _welch([a, b], [1, -1], level)
    return Difference(est, lo, hi, n, float(a.mean()), float(b.mean()), p)


def scale_for(unit: str | None, values: Values) -> Scale:
    """log for positive quantities, linear for shares and anything with a zero or less."""
    if unit == "fraction":
        return "linear"
    a = _clean(values)
    return "log" if len(a) and bool(np.all(a > 0)) else "linear"


def claim_verdict(effect: Ratio | Difference, expected_up: bool) -> ClaimVerdict:
    """A claim that predicts a change in one direction, against the measured contrast."""
    if not effect.detected:
        return "not detectable"
    up = effect.verdict == HIGHER
    return "supported" if up == expected_up else "contradicted"


def interaction_verdict(r: Ratio, e1000_effect: Ratio) -> ClaimVerdict:
    """"Locality matters more without checksum offload" from the ratio of effects.

    Supported when the interval says the e1000 effect is larger in magnitude (the
    ratio of effects lies beyond 1 in the direction of the e1000 effect), contradicted
    when it says the opposite, not detectable when it includes 1.
    """
    if math.isnan(r.lo) or math.isnan(e1000_effect.ratio) or e1000_effect.ratio == 1:
        return "not detectable"
    up = e1000_effect.ratio > 1
    if (r.lo > 1) if up else (r.hi < 1):
        return "supported"
    if (r.hi < 1) if up else (r.lo > 1):
        return "contradicted"
    return "not detectable"


@dataclass(frozen=True)
class Change:
    """New against base as the comparison tables show it.

    `scale` log: ratio of geometric means (center_* are geometric means); linear: the
    difference of means shown relative to the base mean (center_* are means). pct_lo
    and pct_hi bound the % change; `p_value` is Welch's on the same scale.
    """

    n_base: int
    n_new: int
    center_base: float
    center_new: float
    scale: str
    ratio: float
    pct: float
    pct_lo: float
    pct_hi: float
    p_value: float
    significant: bool
    verdict: str


def compare_samples(base: Values, new: Values, unit: str | None = None,
                    level: float = LEVEL) -> Change:
    """One row of a comparison table: the answer's method on one pair of cells."""
    b, n = _clean(base), _clean(new)
    nan = math.nan
    if len(b) == 0 or len(n) == 0:
        return Change(len(b), len(n), nan, nan, "log", nan, nan, nan, nan, nan, False,
                      NOT_DETECTABLE)
    scale = scale_for(unit, [*b, *n])
    if scale == "log":
        r = log_contrast([n, b], [1, -1], level)
        gb, gn = float(np.exp(np.log(b).mean())), float(np.exp(np.log(n).mean()))
        return Change(len(b), len(n), gb, gn, scale, r.ratio, (r.ratio - 1) * 100,
                      (r.lo - 1) * 100, (r.hi - 1) * 100, r.p, r.detected, r.verdict)
    d = diff_contrast(n, b, level)
    mb, mn = d.base_mean, d.new_mean
    rel = (lambda x: x / mb * 100) if mb != 0 else (lambda x: nan)
    ratio = mn / mb if mb != 0 else nan
    lo, hi = sorted((rel(d.lo), rel(d.hi))) if mb < 0 else (rel(d.lo), rel(d.hi))
    return Change(len(b), len(n), mb, mn, scale, ratio, rel(d.diff), lo, hi, d.p, d.detected,
                  d.verdict)


# What counts as an effect that matters when a claim is judged: a 10% change in a
# per-KB count or a rate, 10 percentage points of a share. An interval inside these
# bounds rules a meaningful effect out; one that includes no change but reaches beyond
# them leaves the claim undecided, and the reason says how wide it was.
MEANINGFUL_RATIO = 1.10
MEANINGFUL_PP = 0.10


def _no_interval(n: tuple[int, ...]) -> str:
    if n and min(n) < 2:
        return f"one repetition on a side ({_n_text(n)}): no interval"
    return f"no spread between repetitions ({_n_text(n)}): no interval"


def _n_text(n: tuple[int, ...]) -> str:
    return "n = " + " vs ".join(map(str, n)) if len(n) == 2 else "n = " + "/".join(map(str, n))


def judge_ratio(r: Ratio, expected_up: bool,
                meaningful: float = MEANINGFUL_RATIO) -> tuple[ClaimVerdict, str]:
    """A claim that predicts a ratio above 1 (`expected_up`) or below: the verdict and why.

    supported / contradicted when the interval excludes 1; contradicted too when it lies
    inside [1/meaningful, meaningful] (no effect that matters); otherwise not
    detectable, with the interval's reach past the meaningful effect as the reason.
    """
    pct = f"{(meaningful - 1) * 100:.0f}%"
    if math.isnan(r.ratio):
        return NOT_DETECTABLE, "no values to compare"
    if math.isnan(r.lo):
        return NOT_DETECTABLE, _no_interval(r.n)
    if r.detected:
        word: ClaimVerdict = SUPPORTED if (r.ratio > 1) == expected_up else CONTRADICTED
        return word, "CI excludes 1"
    if 1 / meaningful <= r.lo and r.hi <= meaningful:
        return CONTRADICTED, f"CI within ±{pct}: no effect of {pct} or more"
    return NOT_DETECTABLE, (f"CI includes 1 and reaches past ±{pct}: {_n_text(r.n)} "
                            "cannot tell an effect of that size")


def judge_null_diff(d: Difference, meaningful: float = MEANINGFUL_PP,
                    ) -> tuple[ClaimVerdict, str]:
    """A claim that says a share does not change: an equivalence test. Supported when the
    interval lies within ±meaningful, even if it excludes 0 (a change too small to matter
    is what the claim allows); contradicted only when the whole interval lies beyond
    ±meaningful; an interval that excludes 0 but reaches inside the band cannot tell
    whether the change matters."""
    pp = f"{meaningful * 100:.0f} pp"
    if math.isnan(d.diff):
        return NOT_DETECTABLE, "no values to compare"
    if math.isnan(d.lo):
        return NOT_DETECTABLE, _no_interval(d.n)
    if -meaningful <= d.lo and d.hi <= meaningful:
        return SUPPORTED, f"CI within ±{pp}: no change that matters"
    if d.lo > meaningful or d.hi < -meaningful:
        return CONTRADICTED, f"CI beyond ±{pp}: a change that matters"
    if d.detected:
        return NOT_DETECTABLE, (f"CI excludes 0 but reaches inside ±{pp}: {_n_text(d.n)} "
                                "cannot tell whether the change matters")
    return NOT_DETECTABLE, (f"CI includes 0 and reaches past ±{pp}: {_n_text(d.n)} "
                            "cannot tell")


def judge_diff(d: Difference, expected_up: bool,
               meaningful: float = MEANINGFUL_PP) -> tuple[ClaimVerdict, str]:
    """A claim that predicts a share rises (`expected_up`) or falls."""
    pp = f"{meaningful * 100:.0f} pp"
    if math.isnan(d.diff):
        return NOT_DETECTABLE, "no values to compare"
    if math.isnan(d.lo):
        return NOT_DETECTABLE, _no_interval(d.n)
    if d.detected:
        return (SUPPORTED if (d.diff > 0) == expected_up else CONTRADICTED), "CI excludes 0"
    if -meaningful <= d.lo and d.hi <= meaningful:
        return CONTRADICTED, f"CI within ±{pp}: no change of {pp} or more"
    return NOT_DETECTABLE, (f"CI includes 0 and reaches past ±{pp}: {_n_text(d.n)} "
                            "cannot tell")
