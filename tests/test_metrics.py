"""NDCG against hand-computed values (metrics.py); the Wilcoxon test and the bootstrap (stats.py) against
independent oracles.

Oracles: every 2^n sign assignment enumerated; textbook critical values of the signed-rank test;
Darwin's Zea mays differences from Fisher's "The Design of Experiments" (T = 24, exact two-sided
p = 0.041259765625, the example of scipy.stats.wilcoxon's documentation); a normal approximation with
a tie and a zero worked by hand.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from metrics import ndcg_at_k, ndcg_from_scores, rank_by_scores
from stats import average_ranks, bootstrap_ci, significance_marker, wilcoxon_signed_rank


def test_binary_single_positive_matches_hand_computation():
    # One relevant item at rank 3: DCG = 1 / log2(4) = 0.5, ideal = 1.
    rel = torch.tensor([0, 0, 1, 0, 0])
    assert ndcg_at_k(rel, 10).item() == pytest.approx(0.5)
    assert ndcg_at_k(rel, 3).item() == pytest.approx(0.5)
    assert ndcg_at_k(rel, 2).item() == 0.0
    assert ndcg_at_k(torch.tensor([1, 0, 0]), 1).item() == pytest.approx(1.0)


def test_graded_relevance_matches_hand_computation():
    rel = torch.tensor([1.0, 3.0, 0.0, 2.0])
    gains = [1, 7, 0, 3]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = 7 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(rel, 4).item() == pytest.approx(dcg / ideal, rel=1e-6)
    dcg2 = 1 / 1 + 7 / math.log2(3)
    ideal2 = 7 / 1 + 3 / math.log2(3)
    assert ndcg_at_k(rel, 2).item() == pytest.approx(dcg2 / ideal2, rel=1e-6)


def test_no_relevant_item_gives_zero_and_k_beyond_list_length():
    assert ndcg_at_k(torch.zeros(4), 10).item() == 0.0
    rel = torch.tensor([0, 1])
    assert ndcg_at_k(rel, 100).item() == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError):
        ndcg_at_k(rel, 0)


def test_batched_shapes():
    rel = torch.tensor([[[1, 0, 0], [0, 0, 1]], [[0, 1, 0], [0, 0, 0]]])
    out = ndcg_at_k(rel, 10)
    assert out.shape == (2, 2)
    expected = torch.tensor([[1.0, 0.5], [1 / math.log2(3), 0.0]])
    torch.testing.assert_close(out, expected)


def test_from_scores_ranks_descending():
    scores = torch.tensor([0.1, 0.9, 0.5])
    labels = torch.tensor([0, 0, 1])
    assert ndcg_from_scores(scores, labels, 10).item() == pytest.approx(1 / math.log2(3))


def test_ties_are_broken_pessimistically():
    labels = torch.tensor([1, 0, 0, 0])
    # All scores equal: the relevant item goes last among the tied ones, whatever its position.
    assert ndcg_from_scores(torch.zeros(4), labels, 10).item() == pytest.approx(1 / math.log2(5))
    assert ndcg_from_scores(torch.zeros(4), labels.flip(0), 10).item() == pytest.approx(1 / math.log2(5))
    # A tie only between the positive and one negative, both above the rest.
    scores = torch.tensor([2.0, 2.0, 1.0, 0.0])
    assert rank_by_scores(scores, labels).tolist() == [1, 0, 2, 3]
    assert ndcg_from_scores(scores, labels, 10).item() == pytest.approx(1 / math.log2(3))


# ---------------------------------------------------------------- Wilcoxon signed-rank


def enumerated_p(diffs):
    """Two-sided exact p by brute force: the share of the 2^n sign assignments of the ranks 1..n whose
    min(W+, W-) is at most the observed one (distinct nonzero |differences| only)."""
    n = len(diffs)
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    observed = min(ranks[diffs > 0].sum(), ranks[diffs < 0].sum())
    total = n * (n + 1) // 2
    hits = 0
    for signs in itertools.product((0, 1), repeat=n):
        w_plus = int(np.dot(signs, np.arange(1, n + 1)))
        hits += min(w_plus, total - w_plus) <= observed
    return observed, hits / 2 ** n


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_exact_p_equals_enumeration_of_all_sign_assignments(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        magnitudes = rng.permutation(np.arange(1, n + 1)) * 0.37 + rng.random(n) * 0.01  # distinct
        diffs = magnitudes * rng.choice([-1, 1], size=n)
        y = rng.random(n)
        statistic, p_value = wilcoxon_signed_rank(y + diffs, y)
        expected_statistic, expected_p = enumerated_p(diffs)
        assert statistic == expected_statistic
        assert p_value == pytest.approx(expected_p, abs=1e-12)


def test_published_example_darwin_zea_mays():
    # Cross- minus self-fertilized plant heights (eighths of an inch), Fisher (1935).
    diffs = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    statistic, p_value = wilcoxon_signed_rank(diffs, np.zeros(15))
    assert statistic == 24.0  # ranks of -48 and -67: 10 + 14
    assert p_value == pytest.approx(0.041259765625, abs=1e-12)
    # swapping the samples changes nothing in a two-sided test
    assert wilcoxon_signed_rank(np.zeros(15), diffs) == (statistic, p_value)


# Two-sided critical values of T (reject at alpha when T <= value), from the standard textbook table.
CRITICAL_05 = {6: 0, 7: 2, 8: 3, 9: 5, 10: 8, 11: 10, 12: 13, 13: 17, 14: 21, 15: 25, 16: 29, 17: 34,
               18: 40, 19: 46, 20: 52, 21: 58, 22: 65, 23: 73, 24: 81, 25: 89}
CRITICAL_01 = {8: 0, 9: 1, 10: 3, 11: 5, 12: 7, 13: 9, 14: 12, 15: 15, 16: 19, 17: 23, 18: 27, 19: 32,
               20: 37, 21: 42, 22: 48, 23: 54, 24: 61, 25: 68}


def diffs_with_statistic(n, statistic):
    """Differences +-1..+-n whose negative ranks sum to `statistic` (< n(n+1)/4, so T = statistic)."""
    negative, left = set(), statistic
    for rank in range(n, 0, -1):
        if rank <= left:
            negative.add(rank)
            left -= rank
    assert left == 0
    return np.array([-rank if rank in negative else rank for rank in range(1, n + 1)], dtype=float)


@pytest.mark.parametrize("table, alpha", [(CRITICAL_05, 0.05), (CRITICAL_01, 0.01)])
def test_textbook_critical_values(table, alpha):
    for n, critical in table.items():
        statistic, p_value = wilcoxon_signed_rank(diffs_with_statistic(n, critical), np.zeros(n))
        assert statistic == critical and p_value <= alpha, n
        statistic, p_value = wilcoxon_signed_rank(diffs_with_statistic(n, critical + 1), np.zeros(n))
        assert statistic == critical + 1 and p_value > alpha, n


def test_normal_approximation_with_a_tie_and_a_zero_by_hand():
    # Ten pairs; x - y = 15, -7, 5, 20, 0, -9, 17, -12, 5, -10: one zero, |5| twice.
    x = [125, 115, 130, 140, 140, 115, 140, 125, 140, 135]
    y = [110, 122, 125, 120, 140, 124, 123, 137, 135, 145]
    # wilcox: drop the zero, n = 9; ranks 5,5 -> 1.5 each; 7 -> 3, 9 -> 4, 10 -> 5, 12 -> 6, 15 -> 7, 17 -> 8, 20 -> 9.
    # W+ = 1.5 + 1.5 + 7 + 8 + 9 = 27, W- = 3 + 4 + 5 + 6 = 18, T = 18.
    # mu = 9 * 10 / 4 = 22.5; sigma^2 = 9 * 10 * 19 / 24 - (2^3 - 2) / 48 = 71.25 - 0.125 = 71.125.
    statistic, p_value = wilcoxon_signed_rank(x, y)
    z = (18 - 22.5) / math.sqrt(71.125)
    assert statistic == 18.0
    assert p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-12)
    assert p_value == pytest.approx(0.5936, abs=1e-4)
    # pratt: the zero takes rank 1, the others move up one: W+ = 2.5 + 2.5 + 8 + 9 + 10 = 32,
    # W- = 4 + 5 + 6 + 7 = 22, T = 22; mu = (10 * 11 - 1 * 2) / 4 = 27;
    # sigma^2 = (10 * 11 * 21 - 1 * 2 * 3) / 24 - 6 / 48 = 96 - 0.125 = 95.875.
    statistic, p_value = wilcoxon_signed_rank(x, y, zero_method="pratt")
    z = (22 - 27) / math.sqrt(95.875)
    assert statistic == 22.0
    assert p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-12)


def test_large_n_without_ties_uses_the_normal_approximation():
    n = 30
    diffs = diffs_with_statistic(n, 100)
    statistic, p_value = wilcoxon_signed_rank(diffs, np.zeros(n))
    z = (100 - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert statistic == 100 and p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-12)


def test_identical_samples_and_average_ranks():
    assert wilcoxon_signed_rank([0.5, 0.2, 1.0], [0.5, 0.2, 1.0]) == (0.0, 1.0)
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert [significance_marker(p) for p in (0.2, 0.04, 0.005, 0.0001)] == ["", "†", "‡", "§"]


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (25, 100, 400):
        values = rng.random(n)
        low, high = bootstrap_ci(values, resamples=2000, seed=1)
        assert low <= values.mean() <= high
        widths.append(high - low)
        assert bootstrap_ci(values, resamples=2000, seed=1) == (low, high)  # seeded
    assert widths[0] > widths[1] > widths[2]
    # about 1.96 * std / sqrt(n) on each side for n = 400 uniform values (std 0.289)
    assert widths[2] == pytest.approx(2 * 1.96 * 0.2887 / 20, rel=0.2)
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
