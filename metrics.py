"""The metric of R2Rank and its statistics (Sec. 3.1 and 4.1.1 of the R2Rank paper): NDCG@k, the RL
reward and the number in Table 2, and the tests behind Table 2's markers.

    ndcg_at_k(relevance, k)         NDCG@k of rankings given as relevance in ranked order
    ndcg_from_scores(scores, labels, k)  NDCG@k of the ranking that sorts the scores (ties pessimistic)
    positive_ranks(scores, labels)  the rank of the positive in that ranking (Fig. 5)
    wilcoxon_signed_rank(x, y)      the paired two-sided test behind the markers †/‡/§ (p < .05/.01/.001)
    bootstrap_ci(values)            95% percentile-bootstrap interval of a mean (Fig. 4's error bars)

    DCG@k(tau)  = sum_{i=1..min(k, K)} (2^rel_tau(i) - 1) / log2(i + 1)
    NDCG@k(tau) = DCG@k(tau) / DCG@k(ideal ranking), and 0 when no item is relevant.

Wilcoxon: zero differences are dropped (zero_method "wilcox", as R and scipy by default); users on
whom two methods rank the positive equally are common and carry no sign.

Torch only at import (numpy is imported by the statistics functions that use it), so this file copies
into another project alone.
"""
import math

import torch


def ndcg_at_k(relevance, k):
    """NDCG@k of rankings whose relevance labels are already in ranked order.

    relevance: [..., K] graded (or binary) relevance, relevance[..., 0] is the top-ranked item.
    k:         cut-off, any integer >= 1 (k > K means "the whole list").
    returns:   [...] float, in [0, 1]; 0 for lists with no relevant item.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevance = relevance.to(torch.promote_types(relevance.dtype, torch.float32))
    cutoff = min(k, relevance.shape[-1])
    positions = torch.arange(cutoff, device=relevance.device, dtype=relevance.dtype)
    discounts = 1.0 / torch.log2(positions + 2.0)  # rank i (1-based) -> 1 / log2(i + 1)
    gains = torch.exp2(relevance) - 1.0
    ideal_gains = gains.sort(dim=-1, descending=True).values
    dcg = (gains[..., :cutoff] * discounts).sum(-1)
    ideal_dcg = (ideal_gains[..., :cutoff] * discounts).sum(-1)
    return torch.where(ideal_dcg > 0, dcg / ideal_dcg.clamp(min=torch.finfo(dcg.dtype).tiny), 0.0)


def rank_by_scores(scores, labels):
    """Item indices sorted by score, best first, with ties broken pessimistically.

    Among items with equal scores the less relevant ones are ranked first, so a model can never gain
    from ties: constant scores get the worst ranking, not one that depends on candidate order.
    scores, labels: [..., K]; returns [..., K] long.
    """
    # Two stable sorts: the second (by score) keeps the first's order (relevance ascending) on ties.
    by_label = torch.argsort(labels, dim=-1, stable=True)
    by_score = torch.argsort(scores.gather(-1, by_label), dim=-1, descending=True, stable=True)
    return by_label.gather(-1, by_score)


def ndcg_from_scores(scores, labels, k):
    """NDCG@k of the ranking induced by sorting scores (descending; ties pessimistic, see rank_by_scores).

    scores: [..., K] float, labels: [..., K] relevance aligned with the scores. returns [...].
    """
    order = rank_by_scores(scores, labels)
    return ndcg_at_k(labels.gather(-1, order), k)


def positive_ranks(scores, labels):
    """1-based rank of each list's (first) most relevant item in the ranking that sorts the scores,
    ties broken pessimistically as in ndcg_from_scores.

    scores, labels: [..., K]. returns [...] long, in 1..K.
    """
    order = rank_by_scores(scores, labels)
    return (order == labels.argmax(-1, keepdim=True)).long().argmax(-1) + 1


# ------------------------------------------------------------------------------------- statistics


def average_ranks(values):
    """[N] -> [N] ranks 1..N of the values, ascending; equal values share their average rank."""
    import numpy as np
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
    import numpy as np
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
    import numpy as np
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
