"""The evidence statistics against hand-worked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hcomposer.stats import (
    bootstrap_ci,
    bootstrap_mean_band,
    noise_floor,
    pooled_seed_std,
    seed_std,
    spearman,
    spearman_ci,
    spearman_diff_ci,
    tied_with_best,
)


def test_spearman_known_answers():
    # One swapped neighbour pair among 4: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # Ties take average ranks: x ranks (1.5, 1.5, 3), y ranks (1, 2, 3) -> r = sqrt(3)/2.
    assert spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_ci_of_two_values_spans_both():
    # Resampled means of (0, 1) are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are the extremes.
    assert bootstrap_ci([0.0, 1.0], n_boot=4000) == (0.0, 1.0)
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = bootstrap_ci(np.linspace(0, 1, 101))
    assert lo < 0.5 < hi and hi - lo < 0.25


def test_bootstrap_mean_band_resamples_rows():
    curves = [[0.0, 1.0], [2.0, 3.0]]
    mean, lo, hi = bootstrap_mean_band(curves, n_boot=4000)
    assert mean.tolist() == [1.0, 2.0]
    # Each column's resampled mean is one of (a, (a+b)/2, b): the band spans the two rows.
    assert lo.tolist() == [0.0, 1.0] and hi.tolist() == [2.0, 3.0]
    same = bootstrap_mean_band([[1.0, 0.5]] * 5)
    assert all(np.array_equal(a, [1.0, 0.5]) for a in same)


def test_spearman_ci_covers_rho():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(scale=0.5, size=40)
    rho, lo, hi = spearman_ci(x, y)
    assert lo <= rho <= hi and 0.6 < rho < 1.0 and hi - lo < 0.4
    rho, lo, hi = spearman_ci([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])
    assert rho == pytest.approx(1.0) and lo == pytest.approx(1.0)


def test_spearman_diff_ci_known_answers():
    y = [1, 2, 3, 4, 5, 6]
    # The same score twice: every resample's difference is exactly 0.
    assert spearman_diff_ci(y, y, y) == (0.0, 0.0, 0.0)
    # A perfect score against a reversed one: rho 1 - (-1) = 2 in every resample.
    d, lo, hi = spearman_diff_ci(y, y[::-1], y)
    assert (d, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
    # Swapping the two scores mirrors the difference and its interval.
    rng = np.random.default_rng(1)
    a, b, out = rng.normal(size=(3, 30))
    d1, lo1, hi1 = spearman_diff_ci(a, b, out)
    d2, lo2, hi2 = spearman_diff_ci(b, a, out)
    assert d1 == pytest.approx(spearman(a, out) - spearman(b, out))
    assert (d2, lo2, hi2) == pytest.approx((-d1, -hi1, -lo1))
    assert lo1 <= d1 <= hi1
    # Pairing matters: two nearly identical scores (one neighbour pair swapped) move
    # together in every resample, so the paired interval is far narrower than the one the
    # two separate intervals would give.
    x = rng.normal(size=40)
    out = x + rng.normal(scale=1.0, size=40)
    x2 = x.copy()
    i, j = np.argsort(x)[20:22]
    x2[i], x2[j] = x[j], x[i]
    _, plo, phi = spearman_diff_ci(x, x2, out)
    _, lo_a, hi_a = spearman_ci(x, out)
    _, lo_b, hi_b = spearman_ci(x2, out)
    assert phi - plo < 0.1 * ((hi_a - lo_b) - (lo_a - hi_b))
    with pytest.raises(ValueError):
        spearman_diff_ci([1, 2, 3], [1, 2], [1, 2, 3])


def test_seed_noise_known_answers():
    per_seed = {"a": [1.0, 2.0, 3.0], "b": [0.0, 0.0, 0.0], "c": [0.0, 2.0, 4.0]}
    assert seed_std(per_seed["a"]) == pytest.approx(1.0) and seed_std([5.0]) == 0.0
    assert noise_floor(per_seed) == pytest.approx(1.0)  # median of 1, 0, 2
    # Sums of squares 2 + 0 + 8 over 2 + 2 + 2 degrees of freedom.
    assert pooled_seed_std(per_seed) == pytest.approx(math.sqrt(10 / 6))


def test_tied_with_best_known_answer():
    per_seed = {"A": [1.0, 1.1, 0.9], "B": [0.95, 1.05, 0.85], "C": [0.5, 0.6, 0.4]}
    tied, margins = tied_with_best(per_seed)
    # Pooled s = sqrt(3 * 0.02 / 6) = 0.1; margin = 1.6449 * 0.1 * sqrt(2/3) = 0.1343.
    assert margins["B"] == pytest.approx(1.6448536 * 0.1 * math.sqrt(2 / 3), rel=1e-5)
    assert tied == {"A", "B"}  # B is 0.05 below the best, C 0.5 below
    # With one seed there is no noise estimate: only the best itself.
    tied1, _ = tied_with_best({"A": [1.0], "B": [0.99]})
    assert tied1 == {"A"}


def test_pair_agreement_known_answer():
    from hcomposer.stats import pair_agreement

    proxy = {
        "A": [1.0, 1.1, 0.9],
        "B": [0.95, 1.05, 0.85],
        "C": [0.5, 0.6, 0.4],
        "D": [0.0, 0.1, -0.1],
    }
    # Pooled proxy s = 0.1 on 8 dof; two-sided 95% t = 2.306; margin 2.306 * 0.1 * sqrt(2/3)
    # = 0.188: A-B (0.05 apart) is not separated, the other 5 pairs are.
    scale = {"A": [2.0, 2.02], "B": [1.9], "C": [2.5], "D": [1.0]}
    out = pair_agreement(proxy, scale)
    assert out["pairs"] == 6 and out["proxy_separated"] == 5
    assert out["proxy_dof"] == 8 and out["proxy_std"] == pytest.approx(0.1)
    # The scale runs agree on A > C and B > C (lower loss); D, last on the proxy, has the
    # lowest loss: three discordant pairs.
    assert out["proxy_concordant"] == 2
    assert sorted(map(tuple, out["discordant"])) == [("A", "D"), ("B", "D"), ("C", "D")]
    # Scale noise from A alone: s = 0.01414 on 1 dof, t = 12.706; margin for n = 2 vs 1 is
    # 12.706 * 0.01414 * sqrt(1.5) = 0.220, for 1 vs 1 0.254: every proxy-separated pair's
    # losses differ by more (smallest: A-C 0.49), so all 5 are separated by both.
    assert out["both_separated"] == 5 and out["both_concordant"] == 2
    # Noisier scale runs: A's two seeds 0.2 apart; now A-C (0.4 apart, margin 2.2) is not.
    out = pair_agreement(proxy, {**scale, "A": [2.0, 2.2]})
    assert out["proxy_separated"] == 5 and out["both_separated"] == 0
    # Without a pattern trained on two seeds the scale side has no noise estimate.
    out = pair_agreement(proxy, {k: v[:1] for k, v in scale.items()})
    assert out["both_separated"] == 0 and math.isnan(out["scale_std"])


def test_bootstrap_diff_ci_known_answers():
    from hcomposer.stats import bootstrap_diff_ci

    # No spread: the difference is exact and so is its interval.
    assert bootstrap_diff_ci([1.0, 1.0, 1.0], [0.25, 0.25]) == (0.75, 0.75, 0.75)
    # Half ones against zeros, 100 each: 0.5 with standard error sqrt(0.25 / 100) = 0.05,
    # so the 95% interval is about 0.5 +- 1.96 * 0.05.
    diff, lo, hi = bootstrap_diff_ci([0.0, 1.0] * 50, [0.0] * 100)
    assert diff == 0.5
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02)
    assert hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    # Swapping the samples mirrors the interval.
    d2, lo2, hi2 = bootstrap_diff_ci([0.0] * 100, [0.0, 1.0] * 50)
    assert d2 == -0.5 and lo2 <= -0.5 <= hi2 and lo2 < -0.35 and hi2 > -0.65
    # The median instead of the mean: one outlier moves the mean by 45/11, not the median.
    # (A resample's median is 50 only if 6 of its 11 draws hit the 1-in-11 outlier: p ~ 1e-4.)
    import numpy as np

    a, b = [5.0] * 10 + [50.0], [2.0] * 11
    assert bootstrap_diff_ci(a, b, stat=np.median) == (3.0, 3.0, 3.0)
    assert bootstrap_diff_ci(a, b)[0] == pytest.approx(3.0 + 45.0 / 11)
