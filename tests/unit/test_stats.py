"""analysis.stats: error rates of the one comparison method on synthetic data at the
repetitions quick.yaml uses (n = 3 per cell), and why not the alternatives.

Synthetic values are drawn here, in the open, with a stated effect size: they test the
statistics, not the testbed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis import stats

N = 3  # repetitions per cell in configs/quick.yaml
SIGMA = 0.05  # log-normal spread between repetitions (5%)


def draw(rng: np.random.Generator, median: float, n: int = N, sigma: float = SIGMA) -> list[float]:
    return list(median * np.exp(rng.normal(0, sigma, n)))


def interaction_claim(rng: np.random.Generator, e1000_effect: float, virtio_effect: float,
                      sigmas: tuple[float, ...] = (SIGMA,) * 4) -> str:
    new, base = draw(rng, 100 * e1000_effect, sigma=sigmas[0]), draw(rng, 100, sigma=sigmas[1])
    o_new = draw(rng, 50 * virtio_effect, sigma=sigmas[2])
    o_base = draw(rng, 50, sigma=sigmas[3])
    r = stats.log_contrast([new, base, o_new, o_base], [1, -1, -1, 1])
    return stats.interaction_verdict(r, stats.log_contrast([new, base], [1, -1]))


def test_a_known_interaction_is_supported_in_most_seeds():
    rng = np.random.default_rng(1)
    verdicts = [interaction_claim(rng, 0.7, 0.95) for _ in range(400)]
    assert verdicts.count(stats.SUPPORTED) / len(verdicts) >= 0.8
    assert stats.CONTRADICTED not in verdicts


@pytest.mark.parametrize("sigmas", [(SIGMA,) * 4, (0.02, 0.08, 0.05, 0.03)])
def test_without_an_interaction_a_claim_is_made_in_at_most_5_percent(sigmas):
    rng = np.random.default_rng(2)
    verdicts = [interaction_claim(rng, 0.8, 0.8, sigmas) for _ in range(4000)]
    false = sum(v != stats.NOT_DETECTABLE for v in verdicts)
    # 5% nominal; the slack is ~3 standard errors of a 4000-draw estimate
    assert false / len(verdicts) <= 0.05 + 0.01, false / len(verdicts)


def test_the_ratio_interval_covers_the_true_ratio_at_n3():
    """Coverage of the 95% interval of a +10% change, 3 vs 3 log-normal repetitions."""
    rng = np.random.default_rng(3)
    trials = 4000
    covered = 0
    for _ in range(trials):
        r = stats.log_contrast([draw(rng, 11.0), draw(rng, 10.0)], [1, -1])
        covered += r.lo <= 1.1 <= r.hi
    assert 0.93 <= covered / trials <= 0.975, covered / trials


def test_a_simple_effect_without_change_is_claimed_in_at_most_5_percent():
    rng = np.random.default_rng(4)
    claims = sum(stats.log_contrast([draw(rng, 10), draw(rng, 10)], [1, -1]).detected
                 for _ in range(4000))
    assert claims / 4000 <= 0.06


def test_a_20_percent_change_is_found_at_n3_with_5_percent_noise():
    rng = np.random.default_rng(5)
    found = [stats.compare_samples(draw(rng, 10.0), draw(rng, 12.0)) for _ in range(400)]
    assert sum(c.verdict == stats.HIGHER for c in found) / 400 >= 0.8
    assert not any(c.verdict == stats.LOWER for c in found)


def test_p_value_and_interval_say_the_same_thing():
    rng = np.random.default_rng(6)
    for _ in range(300):
        c = stats.compare_samples(draw(rng, 10.0), draw(rng, 10.6))
        assert (c.p_value < stats.ALPHA) == c.significant


def test_a_percentile_bootstrap_at_n3_would_claim_far_more_often():
    """Why not the bootstrap: at n = 3 its interval is too narrow (documents the choice)."""
    rng = np.random.default_rng(7)
    claims = 0
    for _ in range(400):
        a, b = np.array(draw(rng, 10)), np.array(draw(rng, 10))
        boot = (np.exp(np.log(rng.choice(a, (1000, N))).mean(1)) /
                np.exp(np.log(rng.choice(b, (1000, N))).mean(1)))
        lo, hi = np.quantile(boot, [0.025, 0.975])
        claims += lo > 1 or hi < 1
    assert claims / 400 > 0.10


def test_mann_whitney_at_3_vs_3_can_never_reach_5_percent():
    """Why not Mann-Whitney: the most extreme 3-vs-3 ordering has two-sided p = 0.1."""
    p = sps.mannwhitneyu([10.0, 11.0, 12.0], [100.0, 110.0, 120.0],
                         alternative="two-sided").pvalue
    assert p == pytest.approx(0.1)
    c = stats.compare_samples([10.0, 11.0, 12.0], [100.0, 110.0, 120.0])
    assert c.significant and c.verdict == stats.HIGHER


def test_one_repetition_gives_no_interval_and_zeros_give_no_ratio():
    r = stats.log_contrast([[2.0], [1.0, 1.1]], [1, -1])
    assert r.ratio == pytest.approx(2 / math.sqrt(1.1)) and math.isnan(r.lo)
    assert not r.detected and "no CI" in r.pct() and r.verdict == stats.NOT_DETECTABLE
    assert math.isnan(stats.log_contrast([[0.0, 1.0], [1.0, 1.0]], [1, -1]).ratio)


def test_shares_and_counts_with_zeros_are_compared_as_differences():
    c = stats.compare_samples([0.0, 0.0, 0.0], [0.9, 1.0, 0.95], unit="fraction")
    assert c.scale == "linear" and c.verdict == stats.HIGHER and math.isnan(c.pct)
    c = stats.compare_samples([0.0, 2.0, 1.0], [1.0, 3.0, 2.0], unit="segments")
    assert c.scale == "linear" and c.pct == pytest.approx(100.0)
    assert stats.compare_samples([], [1.0]).verdict == stats.NOT_DETECTABLE


def test_claim_verdict_reads_the_direction_a_claim_predicts():
    up = stats.log_contrast([[2.0, 2.1, 2.05], [1.0, 1.02, 0.99]], [1, -1])
    assert stats.claim_verdict(up, expected_up=True) == stats.SUPPORTED
    assert stats.claim_verdict(up, expected_up=False) == stats.CONTRADICTED
    flat = stats.log_contrast([[1.0, 1.3, 0.8], [1.0, 1.2, 0.9]], [1, -1])
    assert stats.claim_verdict(flat, expected_up=True) == stats.NOT_DETECTABLE


def test_equal_small_counts_give_no_interval_not_a_certain_change():
    """1 retransmission in both base repetitions, 0 in both new ones: no spread, so no
    t interval; never a zero-width interval that calls -100% certain."""
    c = stats.compare_samples([1.0, 1.0], [0.0, 0.0], unit="segments")
    assert c.pct == pytest.approx(-100) and math.isnan(c.pct_lo)
    assert not c.significant and c.verdict == stats.NOT_DETECTABLE
    word, why = stats.judge_ratio(stats.log_contrast([[2.0, 2.0], [1.0, 1.0]], [1, -1]), True)
    assert word == stats.NOT_DETECTABLE and why.startswith("no spread")


@pytest.mark.parametrize(("same", "cross", "word"), [
    # a tiny but tight difference: placement changes the share by far less than 10 pp
    ([0.0010, 0.0011, 0.0012], [0.0001, 0.0002, 0.0001], stats.SUPPORTED),
    # the whole interval beyond 10 pp: the share does change with placement
    ([1.0, 0.999, 0.998], [0.0, 0.001, 0.002], stats.CONTRADICTED),
    # excludes 0 but reaches inside the band: whether it matters cannot be told
    ([0.10, 0.14, 0.06], [0.0, 0.01, 0.0], stats.NOT_DETECTABLE),
    # includes 0 and reaches past the band
    ([0.5, 0.0, 0.3], [0.2, 0.0, 0.4], stats.NOT_DETECTABLE),
])
def test_a_claim_of_no_change_is_an_equivalence_test(same, cross, word):
    word_, why = stats.judge_null_diff(stats.diff_contrast(same, cross))
    assert word_ == word, why
