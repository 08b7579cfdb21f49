"""Plackett-Luce distribution over rankings (Eq. 4 of the R2Rank paper).

Given scores s = (s_1, ..., s_K), a ranking tau (item indices, best first) has probability

    P(tau | s) = prod_{k=1..K}  exp(s_tau(k)) / sum_{j=k..K} exp(s_tau(j))

i.e. pick the first item with softmax(s), remove it, pick the next from the rest, and so on.

Torch only, no state, safe to copy into another project:
    sample(scores, num_samples, generator, mask)  -> rankings  [..., num_samples, K]
    log_prob(scores, rankings, mask)              -> log P     [...]
    standardized(scores, std)                     -> scores with a fixed spread (how sharp PL is)

Sampling uses the Gumbel-top-K trick: add independent Gumbel(0, 1) noise to every score and sort.
The resulting order is an exact draw from PL(s) (Yellott, 1977), and it is one vectorized sort
instead of K sequential softmax draws.
"""
import torch


def _working_dtype(scores):
    # Half-precision scores tie too often and lose the tail of the softmax; do the math in >= fp32.
    return torch.promote_types(scores.dtype, torch.float32)


def sample(scores, num_samples=1, generator=None, mask=None, gumbel=None):
    """Draw rankings from PL(scores).

    scores:  [..., K] float
    mask:    [..., K] bool, True = real candidate (optional). Masked items are placed after all real
             items in every sample (in index order), so rows with fewer than K candidates can share
             a batch.
    gumbel:  [..., num_samples, K] Gumbel(0, 1) noise to use instead of fresh draws (optional,
             broadcast against the scores): the same noise under several score vectors gives
             common random numbers, so differences between them are not drowned in sampling noise.
    returns: [..., num_samples, K] long, item indices, best first.
    """
    keys = scores.detach().to(_working_dtype(scores)).unsqueeze(-2)  # [..., 1, K]
    if gumbel is None:
        gumbel = gumbel_noise(keys.shape[:-2] + (num_samples, keys.shape[-1]), generator, keys.dtype, keys.device)
    keys = keys + gumbel  # [..., S, K]
    if mask is not None:
        keys = keys.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    # stable=True keeps masked items (all -inf) in index order.
    return torch.argsort(keys, dim=-1, descending=True, stable=True)


def gumbel_noise(shape, generator=None, dtype=torch.float32, device=None):
    """Independent Gumbel(0, 1) draws of the given shape: -log(E) with E ~ Exponential(1)."""
    return -torch.empty(shape, dtype=dtype, device=device).exponential_(generator=generator).log()


def log_prob(scores, rankings, mask=None):
    """log P(rankings | scores) under Plackett-Luce, Eq. (4) of the R2Rank paper.

    scores:   [..., K] float (any float dtype; computed and returned in fp32 or wider)
    rankings: [..., K] long, item indices, best first. Leading dimensions broadcast against
              scores', e.g. scores[:, None, :] with rankings [B, S, K] gives [B, S].
    mask:     [..., K] bool, True = real candidate (optional, indexed like scores). Masked items
              contribute nothing: they get no factor of their own and are left out of every
              denominator, so the result is the PL log-probability of the real items' order.
    returns:  [...] log-probabilities, differentiable in scores.

    Stable for any score gap: the denominators sum_{j>=k} exp(s_tau(j)) are a reversed cumulative
    logsumexp, never a sum of exponentials.
    """
    dtype = _working_dtype(scores)
    batch_shape = torch.broadcast_shapes(scores.shape[:-1], rankings.shape[:-1])
    scores = scores.to(dtype).expand(batch_shape + scores.shape[-1:])
    rankings = rankings.expand(batch_shape + rankings.shape[-1:])
    ranked_scores = scores.gather(-1, rankings)  # [..., K], s_tau(1), ..., s_tau(K)
    if mask is not None:
        ranked_mask = mask.expand(batch_shape + mask.shape[-1:]).gather(-1, rankings)
        # A huge finite fill (not -inf) keeps exp() at exactly 0 in the denominators while
        # avoiding (-inf) - (-inf) = nan in positions that are zeroed out below anyway.
        ranked_scores = ranked_scores.masked_fill(~ranked_mask, torch.finfo(dtype).min)
    # log sum_{j >= k} exp(s_tau(j)) for every k: logcumsumexp over the reversed ranking.
    log_denominators = ranked_scores.flip(-1).logcumsumexp(-1).flip(-1)
    terms = ranked_scores - log_denominators  # [..., K]
    if mask is not None:
        terms = terms.masked_fill(~ranked_mask, 0.0)
    return terms.sum(-1)


def standardized(scores, std):
    """Each row of K scores [..., K] shifted to mean 0 and scaled to std `std` (population std); std 0
    returns them unchanged. PL is shift-invariant, so this fixes only how sharp the distribution is,
    and the order of the scores does not change. Differentiable: the RL stage takes the gradient of the
    reward through it back to the head's raw scores (departure 8 in r2rank.py, `--pl-std`)."""
    if not std:
        return scores
    centered = scores - scores.mean(-1, keepdim=True)
    return std * centered / centered.std(-1, keepdim=True, correction=0).clamp(min=1e-6)
