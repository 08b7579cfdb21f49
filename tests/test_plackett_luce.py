"""Plackett-Luce sampler and log-probability against independent oracles."""
import itertools
import math

import pytest
import torch

import plackett_luce


def brute_force_prob(scores, ranking):
    """Eq. (4) written as a product of plain Python softmax choices: the oracle."""
    remaining = list(ranking)
    prob = 1.0
    for item in ranking:
        prob *= math.exp(scores[item]) / sum(math.exp(scores[j]) for j in remaining)
        remaining.remove(item)
    return prob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_items", [1, 2, 3, 5, 6])
def test_log_prob_matches_product_formula_and_sums_to_one(num_items, dtype):
    scores = torch.randn(num_items, generator=torch.Generator().manual_seed(num_items), dtype=dtype) * 2
    perms = torch.tensor(list(itertools.permutations(range(num_items))))  # [K!, K]
    log_probs = plackett_luce.log_prob(scores, perms)  # scores broadcast over the K! rows
    assert log_probs.shape == (math.factorial(num_items),)
    assert log_probs.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(log_probs.exp().sum().item() - 1.0) < tol
    expected = torch.tensor([brute_force_prob(scores.tolist(), p.tolist()) for p in perms], dtype=torch.float64)
    torch.testing.assert_close(log_probs.exp().double(), expected, rtol=tol * 10, atol=tol)


def test_log_prob_is_stable_for_large_score_gaps():
    scores = torch.tensor([1000.0, 0.0, -1000.0])
    best = plackett_luce.log_prob(scores, torch.tensor([0, 1, 2]))
    worst = plackett_luce.log_prob(scores, torch.tensor([2, 1, 0]))
    assert torch.isfinite(best) and abs(best.item()) < 1e-6  # probability ~1
    # Hand-computed: first pick item 2 from all: -2000 + log(...) ~ -2000; then item 1 vs 0: -1000.
    assert worst.item() == pytest.approx(-3000.0, rel=1e-6)
    scores.requires_grad_(True)
    plackett_luce.log_prob(scores, torch.tensor([2, 1, 0])).backward()
    assert torch.isfinite(scores.grad).all()


def test_log_prob_gradcheck_fp64():
    scores = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    rankings = torch.stack([torch.randperm(5) for _ in range(3)])  # [3, 5]
    assert torch.autograd.gradcheck(lambda s: plackett_luce.log_prob(s[:, None, :], rankings), (scores,))
    mask = torch.tensor([[True, True, True, True, True], [True, False, True, True, False]])
    assert torch.autograd.gradcheck(lambda s: plackett_luce.log_prob(s[:, None, :], rankings, mask[:, None, :]), (scores,))


def test_log_prob_broadcasts_batch_of_users_and_samples():
    scores = torch.randn(4, 6)
    rankings = plackett_luce.sample(scores, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert rankings.shape == (4, 3, 6)
    log_probs = plackett_luce.log_prob(scores[:, None, :], rankings)
    assert log_probs.shape == (4, 3)
    for b in range(4):
        for s in range(3):
            assert log_probs[b, s].exp().item() == pytest.approx(brute_force_prob(scores[b].tolist(), rankings[b, s].tolist()), rel=1e-4)


def test_samples_are_permutations_with_expected_shape():
    scores = torch.randn(2, 3, 7)
    rankings = plackett_luce.sample(scores, num_samples=5)
    assert rankings.shape == (2, 3, 5, 7) and rankings.dtype == torch.long
    assert (rankings.sort(-1).values == torch.arange(7)).all()


def test_sample_frequencies_match_exact_probabilities():
    scores = torch.tensor([1.0, 0.3, -0.5, -1.2])
    num_samples = 200_000
    rankings = plackett_luce.sample(scores, num_samples=num_samples, generator=torch.Generator().manual_seed(1))
    perms = list(itertools.permutations(range(4)))
    index = {p: i for i, p in enumerate(perms)}
    counts = torch.zeros(len(perms))
    codes = (rankings * torch.tensor([64, 16, 4, 1])).sum(-1)  # one integer per ranking
    code_of = {sum(v * w for v, w in zip(p, (64, 16, 4, 1))): index[p] for p in perms}
    for code, count in zip(*torch.unique(codes, return_counts=True)):
        counts[code_of[code.item()]] = count
    expected = torch.tensor([brute_force_prob(scores.tolist(), list(p)) for p in perms])
    frequency = counts / num_samples
    # Binomial standard error per permutation; 5 sigma over 24 cells leaves no room for a wrong sampler.
    std_err = (expected * (1 - expected) / num_samples).sqrt()
    assert ((frequency - expected).abs() <= 5 * std_err + 1e-4).all(), (frequency, expected)


def test_sample_is_reproducible_with_a_generator():
    scores = torch.randn(3, 8)
    first = plackett_luce.sample(scores, 4, generator=torch.Generator().manual_seed(7))
    second = plackett_luce.sample(scores, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_mask_puts_padding_last_and_agrees_with_unpadded_log_prob():
    real = torch.tensor([0.5, -1.0, 2.0])
    # The same three items padded to K = 5 at positions 1 and 3, with arbitrary pad scores.
    padded = torch.tensor([0.5, 9.0, -1.0, 7.0, 2.0])
    mask = torch.tensor([True, False, True, False, True])
    position_of_real = torch.tensor([0, 2, 4])
    rankings = plackett_luce.sample(padded, num_samples=50, generator=torch.Generator().manual_seed(3), mask=mask)
    assert mask[rankings[:, :3]].all() and not mask[rankings[:, 3:]].any()
    padded_lp = plackett_luce.log_prob(padded, rankings, mask=mask)
    # Map the real part of every padded ranking back to indices 0..2 of the unpadded scores.
    real_rankings = torch.searchsorted(position_of_real, rankings[:, :3].contiguous())
    torch.testing.assert_close(padded_lp, plackett_luce.log_prob(real, real_rankings))
    # Masked items get no gradient.
    padded.requires_grad_(True)
    plackett_luce.log_prob(padded, rankings, mask=mask).sum().backward()
    assert (padded.grad[~mask] == 0).all() and (padded.grad[mask] != 0).all()


def test_mask_with_exhaustive_enumeration_sums_to_one():
    scores = torch.randn(5, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False])
    real = [0, 1, 3]
    perms = torch.tensor([list(p) + [2, 4] for p in itertools.permutations(real)])
    assert abs(plackett_luce.log_prob(scores, perms, mask=mask).exp().sum().item() - 1.0) < 1e-12
