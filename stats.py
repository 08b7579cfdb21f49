"""The statistics behind Table 2's markers and Fig. 4's error bars (Sec. 4.1.1 of the R2Rank paper). numpy only;
copies alone.

    wilcoxon_signed_rank(x, y)      the paired two-sided test behind the markers (p < .05/.01/.001)
    bootstrap_ci(values)            95% percentile-bootstrap interval of a mean
    significance_marker(p)          the paper's marker of a p-value

Wilcoxon: zero differences are dropped (zero_method "wilcox", as R and scipy by default); users on
whom two methods rank the positive equally are common and carry no sign.
"""
import math

import numpy as np


def average_ranks(values):
    """[N] -> [N] ranks 1..N of the values, ascending; equal values share their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2)[inverse]


def wilcoxon_signed_rank(x, y, zero_method="wilcox", exact_max_n=25):
    """Two-sided paired Wilcoxon signed-rank test of x against y (e.g. two methods' per-user NDCG@10).

    x, y: [N] paired values. returns (statistic, p_value), statistic T = min(W+, W-), where W+ (W-) is
    the sum of the ranks of |x - y| over the positive (negative) differences; equal |differences|
    share their average rank (|differences| equal to 12 decimals count as equal: float noise).
    zero_method: "wilcox" drops zero differences before ranking (R's wilcox.test, scipy's default);
    "pratt" ranks them with the rest and leaves their ranks out of both sums (Pratt, 1959).
    p-value, with n the differences ranked and n0 the zeros among them:
      exact when n <= exact_max_n, no ties and no zeros: p = min(1, 2 P(W+ <= T)) under H0, where
      the 2^n equally likely sign assignments are counted by dynamic programming over the ranks;
      else the normal approximation without continuity correction (scipy's default):
        mu = (n(n+1) - n0(n0+1)) / 4
        sigma^2 = (n(n+1)(2n+1) - n0(n0+1)(2n0+1)) / 24 - sum_ties (t^3 - t) / 48
        p = 2 (1 - Phi(|T - mu| / sigma)).
    All differences zero: (0.0, 1.0).
    """
    if zero_method not in ("wilcox", "pratt"):
        raise ValueError(f"zero_method must be 'wilcox' or 'pratt', got {zero_method!r}")
    diffs = np.round(np.asarray(x, dtype=float) - np.asarray(y, dtype=float), 12)
    if zero_method == "wilcox":
        diffs = diffs[diffs != 0]
    n, n_zero = len(diffs), int((diffs == 0).sum())
    if n == n_zero:
        return 0.0, 1.0
    ranks = average_ranks(np.abs(diffs))
    statistic = float(min(ranks[diffs > 0].sum(), ranks[diffs < 0].sum()))
    tie_sizes = np.unique(np.abs(diffs[diffs != 0]), return_counts=True)[1]
    if n <= exact_max_n and n_zero == 0 and (tie_sizes == 1).all():
        ways = np.zeros(n * (n + 1) // 2 + 1)  # ways[w] = sign assignments with W+ = w
        ways[0] = 1
        for rank in range(1, n + 1):
            ways[rank:] = ways[rank:] + ways[:-rank]
        return statistic, min(1.0, 2 * ways[:int(statistic) + 1].sum() / 2.0 ** n)
    mean = (n * (n + 1) - n_zero * (n_zero + 1)) / 4
    variance = ((n * (n + 1) * (2 * n + 1) - n_zero * (n_zero + 1) * (2 * n_zero + 1)) / 24
                - (tie_sizes ** 3 - tie_sizes).sum() / 48)
    z = (statistic - mean) / math.sqrt(variance)
    return statistic, math.erfc(abs(z) / math.sqrt(2))  # = 2 (1 - Phi(|z|))


def bootstrap_ci(values, resamples=1000, seed=0, level=0.95):
    """Percentile-bootstrap interval of the mean of values [N]: (low, high), seeded."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    picks = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values[picks].mean(1), [tail, 100 - tail])
    return float(low), float(high)


def significance_marker(p_value):
    """The paper's markers: † p < 0.05, ‡ p < 0.01, § p < 0.001, else none."""
    return "§" if p_value < 0.001 else "‡" if p_value < 0.01 else "†" if p_value < 0.05 else ""
