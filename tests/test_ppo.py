"""PPO and REINFORCE losses: gradients against hand-derived values and finite differences."""
import math

import pytest
import torch

import plackett_luce
from ppo import clipped_token_loss, leave_one_out_baseline, reinforce_loss


def test_gradient_at_ratio_one_is_minus_advantage_over_valid_tokens():
    old_logp = torch.randn(3, 5)
    logp = old_logp.clone().requires_grad_(True)
    advantages = torch.tensor([0.7, -1.5, 0.2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, stats = clipped_token_loss(logp, old_logp, advantages, mask)
    loss.backward()
    num_valid = mask.sum().item()  # 9
    expected = torch.where(mask, -advantages[:, None] / num_valid, torch.zeros(()))
    torch.testing.assert_close(logp.grad, expected)
    # Identity: at ratio 1 the loss is minus the token-weighted mean advantage.
    assert loss.item() == pytest.approx(-(0.7 * 3 + -1.5 * 5 + 0.2 * 1) / 9, rel=1e-6)
    assert stats == pytest.approx({"clip_frac": 0.0, "approx_kl": 0.0, "ratio": 1.0}, abs=1e-6)


def test_clipped_side_gets_zero_gradient_other_side_does_not():
    eps = 0.2
    old_logp = torch.zeros(4, 1)
    # ratios 1.5, 0.5, 0.5, 1.5 with advantages +, -, +, -
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]])).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, stats = clipped_token_loss(logp, old_logp, advantages, mask, clip_eps=eps)
    loss.backward()
    grad = logp.grad[:, 0]
    # Row 0: A > 0 and r > 1 + eps -> clipped. Row 1: A < 0 and r < 1 - eps -> clipped.
    assert grad[0] == 0 and grad[1] == 0
    # Rows 2, 3: the unclipped branch is the minimum: d(-r A / N)/d logp = -r A / N.
    assert grad[2].item() == pytest.approx(-0.5 * 1.0 / 4)
    assert grad[3].item() == pytest.approx(-1.5 * -1.0 / 4)
    assert stats["clip_frac"] == pytest.approx(1.0)
    # Hand-computed objective: min(1.5, 1.2), min(-0.5, -0.8), min(0.5, 0.8), min(-1.5, -1.2)
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 0.5 - 1.5) / 4)
    # k3 estimator: mean of (r - 1) - log r
    kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)) / 4
    assert stats["approx_kl"] == pytest.approx(kl, rel=1e-6)
    assert stats["ratio"] == pytest.approx(1.0)


def test_masked_tokens_get_zero_gradient_and_do_not_count():
    old_logp = torch.randn(2, 4)
    logp = (old_logp + 0.1 * torch.randn(2, 4)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.randn(2, 4)  # per-token advantages
    loss, _ = clipped_token_loss(logp, old_logp, advantages, mask)
    loss.backward()
    assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).all()
    # Changing masked values changes nothing.
    logp2 = logp.detach().clone()
    logp2[~mask] = 100.0
    assert clipped_token_loss(logp2, old_logp, advantages, mask)[0].item() == pytest.approx(loss.item())


def test_empty_mask_gives_zero_loss_not_nan():
    loss, stats = clipped_token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and not math.isnan(stats["approx_kl"])


def _brute_force_log_prob(scores, ranking):
    remaining = list(ranking)
    total = 0.0
    for item in ranking:
        total += scores[item] - math.log(sum(math.exp(scores[j]) for j in remaining))
        remaining.remove(item)
    return total


def test_reinforce_gradient_matches_finite_differences():
    scores = torch.tensor([0.3, -0.2, 1.1, 0.0], dtype=torch.float64, requires_grad=True)
    rankings = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3], [3, 2, 1, 0]])
    reward = torch.tensor([0.9, 0.4, 0.1], dtype=torch.float64)
    baseline = leave_one_out_baseline(reward)
    loss = reinforce_loss(plackett_luce.log_prob(scores, rankings), reward, baseline)
    loss.backward()

    def loss_oracle(values):
        weights = [(r - b) for r, b in zip(reward.tolist(), baseline.tolist())]
        return -sum(w * _brute_force_log_prob(values, rk) for w, rk in zip(weights, rankings.tolist())) / 3

    h = 1e-6
    for i in range(4):
        up, down = scores.tolist(), scores.tolist()
        up[i] += h
        down[i] -= h
        assert scores.grad[i].item() == pytest.approx((loss_oracle(up) - loss_oracle(down)) / (2 * h), abs=1e-7)


def test_reinforce_without_baseline_weights_by_raw_reward():
    log_prob = torch.tensor([-1.0, -2.0], requires_grad=True)
    reward = torch.tensor([0.5, 1.0])
    reinforce_loss(log_prob, reward).backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-0.25, -0.5]))


def test_leave_one_out_baseline_by_hand():
    reward = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    torch.testing.assert_close(leave_one_out_baseline(reward), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))
    with pytest.raises(ValueError):
        leave_one_out_baseline(torch.ones(3, 1))


def test_leave_one_out_baseline_is_exact_for_equal_rewards():
    """When all S rewards of a group are equal, reward - baseline must be exactly 0. The plain
    formula (S r - r) / (S - 1) misses r by one rounding step for many values, e.g. the NDCG of a
    positive at rank 2 (1 / log2(3)) with S = 8."""
    ndcg_values = [1 / math.log2(rank + 1) for rank in range(1, 21)]
    values = torch.cat([torch.tensor(ndcg_values), torch.rand(200, generator=torch.Generator().manual_seed(0))])
    for samples in (2, 3, 7, 8, 16):
        reward = values[:, None].expand(-1, samples).contiguous()
        assert (reward - leave_one_out_baseline(reward) == 0).all()
        assert (reward - leave_one_out_baseline(reward.T.contiguous(), dim=0).T == 0).all()
    # a group with one different reward keeps the mean of the others (by hand), beside an equal group
    reward = torch.tensor([[0.3, 0.3, 0.3, 0.9], [0.2, 0.2, 0.2, 0.2]])
    torch.testing.assert_close(leave_one_out_baseline(reward), torch.tensor([[0.5, 0.5, 0.5, 0.3], [0.2, 0.2, 0.2, 0.2]]))
