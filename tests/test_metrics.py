"""NDCG against hand-computed values."""
import math

import pytest
import torch

from evaluate import ndcg_at_k, ndcg_from_scores, rank_by_scores


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
