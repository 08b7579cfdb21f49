"""The metric of R2Rank and its uses (Sec. 3.1 and 4.1.1 of the R2Rank paper): NDCG@k, the RL
reward and the number in Table 2, and Fig. 5's positive rank.

    ndcg_at_k(relevance, k)         NDCG@k of rankings given as relevance in ranked order
    ndcg_from_scores(scores, labels, k)  NDCG@k of the ranking that sorts the scores (ties pessimistic)
    positive_ranks(scores, labels)  the rank of the positive in that ranking (Fig. 5)

    DCG@k(tau)  = sum_{i=1..min(k, K)} (2^rel_tau(i) - 1) / log2(i + 1)
    NDCG@k(tau) = DCG@k(tau) / DCG@k(ideal ranking), and 0 when no item is relevant.

Torch only: it copies into another project alone. The tests behind Table 2's markers: stats.py.
"""
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
