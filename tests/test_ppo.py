"""PPO and REINFORCE losses: gradients against hand-derived values and finite differences; the LLM's
advantages, and the update each drives, against exact enumeration on a toy."""
import itertools
import math

import pytest
import torch

import plackett_luce
from metrics import ndcg_at_k
from ppo import (batch_baseline_advantages, clipped_token_loss, counterfactual_advantages, grpo_advantages,
                 leave_one_out_baseline, llm_loss, reinforce_loss)


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
    # Only rows 0 and 1 take the clipped term; rows 2 and 3 lie outside the range, but the unclipped
    # term is the smaller one there and its gradient flows.
    assert stats["clip_frac"] == pytest.approx(0.5)
    # Hand-computed objective: min(1.5, 1.2), min(-0.5, -0.8), min(0.5, 0.8), min(-1.5, -1.2)
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 0.5 - 1.5) / 4)
    # k3 estimator: mean of (r - 1) - log r
    kl = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)) / 4
    assert stats["approx_kl"] == pytest.approx(kl, rel=1e-6)
    assert stats["ratio"] == pytest.approx(1.0)


def test_masked_tokens_get_zero_gradient_and_do_not_count():
    generator = torch.Generator().manual_seed(0)
    old_logp = torch.randn(2, 4, generator=generator)
    logp = (old_logp + 0.05 * torch.randn(2, 4, generator=generator)).requires_grad_(True)  # ratios inside 1 +- eps
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.randn(2, 4, generator=generator)  # per-token advantages
    loss, _ = clipped_token_loss(logp, old_logp, advantages, mask)
    loss.backward()
    assert (logp.grad[~mask] == 0).all() and (logp.grad[mask] != 0).all()
    # Changing masked values changes nothing.
    logp2 = logp.detach().clone()
    logp2[~mask] = 100.0
    assert clipped_token_loss(logp2, old_logp, advantages, mask)[0].item() == pytest.approx(loss.item())


def test_empty_mask_gives_zero_loss_and_no_token_statistics():
    """With no valid token (--max-new-tokens 0) the token term is 0, not nan, and its statistics are left
    out rather than reported as 0 (a ratio of 0 would read as a policy that collapsed); llm_loss keeps the
    score path's term."""
    loss, stats = clipped_token_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and stats == {}
    scores = torch.tensor([0.5, -1.0], requires_grad=True)
    loss, stats = llm_loss(torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2), torch.zeros(2, 0, dtype=torch.bool),
                           divisor=2, scores=scores, score_grads=torch.tensor([1.0, 3.0]))
    assert stats == {} and loss.item() == pytest.approx(-(0.5 - 3.0) / 2)
    _, stats = llm_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.tensor([[True, False]]), divisor=1)
    assert stats == {"clip_frac": 0.0, "approx_kl": 0.0, "ratio": 1.0, "ppo_loss": -1.0}


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


# ----------------------------------------------------------------------------- the LLM's advantages


def _exact_value(scores, labels, k=10):
    """E_{tau ~ PL(s)} NDCG@k(tau) by enumerating all K! rankings. scores [..., K], labels [K]."""
    K = labels.shape[-1]
    perms = torch.tensor(list(itertools.permutations(range(K))))  # [K!, K]
    log_p = plackett_luce.log_prob(scores[..., None, :], perms)  # [..., K!]
    return (log_p.exp() * ndcg_at_k(labels[perms], k)).sum(-1)


def test_counterfactual_advantages_match_exact_values():
    scores = torch.tensor([[0.5, -0.3, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    estimate = counterfactual_advantages(scores, labels, k=3, num_samples=100_000,
                                         generator=torch.Generator().manual_seed(0))
    for u in range(2):
        exact = []
        for k in range(5):
            replaced = scores[u].clone()
            replaced[k] = (scores[u].sum() - scores[u, k]) / 4  # the mean of the other four scores
            exact.append(_exact_value(scores[u], labels[u], 3) - _exact_value(replaced, labels[u], 3))
        torch.testing.assert_close(estimate[u], torch.stack(exact), atol=4e-3, rtol=0)
    # equal scores: each already is the mean of the others, and common random numbers make every
    # advantage exactly 0 (independent noise would leave Monte-Carlo noise of about 0.05)
    same = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert (counterfactual_advantages(same, torch.tensor([[0.0, 1.0, 0.0, 0.0]]), num_samples=64) == 0).all()


def test_batch_baseline_advantages_by_hand():
    reward = torch.tensor([[0.2, 0.4], [0.6, 0.6], [1.0, 0.0]])  # user means 0.3, 0.6, 0.5
    torch.testing.assert_close(batch_baseline_advantages(reward), torch.tensor([0.3 - 0.55, 0.6 - 0.4, 0.5 - 0.45]))


def _toy():
    """K = 4 items, one positive (item 1). Trace k is a binary trace y_k ~ Bernoulli(sigmoid(theta_k));
    a fixed head scores it s_k = base_k + lift_k y_k. The positive's trace lifts its score a lot
    (it decides the ranking), a negative's a little."""
    theta = torch.tensor([0.3, -0.5, 0.8, 0.0], dtype=torch.float64)
    base = torch.tensor([1.0, 0.0, 0.5, -0.5], dtype=torch.float64)
    lift = torch.tensor([0.5, 6.0, 1.0, 0.3], dtype=torch.float64)
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    ys = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)  # all 16 traces
    return theta, base, lift, labels, ys


def _exact_gradient_and_update(advantage_fn, std=0.0):
    """(grad of E_y[V(std(s(y)))] w.r.t. theta, E_y[sum_k grad log pi(y_k) E[A_k | y]]), both by
    enumeration over the 16 trace vectors (and all 24 rankings for V); std: --pl-std."""
    theta, base, lift, labels, ys = _toy()
    leaf = theta.clone().requires_grad_(True)
    p1 = torch.sigmoid(leaf)
    prob_y = torch.where(ys == 1, p1, 1 - p1).prod(-1)  # [16]
    scores = base + lift * ys  # [16, 4]
    values = _exact_value(plackett_luce.standardized(scores, std), labels)
    (true_grad,) = torch.autograd.grad((prob_y * values).sum(), leaf)
    grad_log_pi = ys - torch.sigmoid(theta)  # [16, 4]: d log pi(y_k) / d theta_k
    advantages = advantage_fn(scores, labels.expand(16, -1))  # [16, 4]
    update = (prob_y.detach()[:, None] * grad_log_pi * advantages).sum(0)
    return true_grad, update


def test_counterfactual_update_is_the_exact_policy_gradient():
    """The update the counterfactual advantage drives equals grad E[NDCG] on the toy (up to the PL
    Monte-Carlo error), including the coordinate whose trace decides the ranking."""
    generator = torch.Generator().manual_seed(0)
    true_grad, update = _exact_gradient_and_update(
        lambda s, y: counterfactual_advantages(s, y, num_samples=20_000, generator=generator))
    torch.testing.assert_close(update, true_grad, atol=2e-3, rtol=0)
    assert true_grad[1] > 0.01  # the positive's trace helps: pushed up
    # Power of the check: a baseline that depends on the trace itself (the mean of all K scores,
    # s_k included) is biased, and the same comparison catches it.
    def biased(scores, labels):
        variants = scores[:, None, :].repeat(1, 4, 1)
        variants[:, range(4), range(4)] = scores.mean(-1, keepdim=True)
        return _exact_value(scores, labels[0]) [:, None] - _exact_value(variants, labels[0])
    _, biased_update = _exact_gradient_and_update(biased)
    assert (biased_update - true_grad).abs().max() > 0.01


def test_counterfactual_update_under_pl_std_is_the_exact_policy_gradient():
    """With --pl-std the variants are standardized one by one after s_k is replaced in the raw scores,
    and the update is still grad E[V(std(s))]. Replacing s_k in the standardized vector instead (whose
    every entry depends on y_k) misses it by over ten times the tolerance."""
    std = 2.0
    generator = torch.Generator().manual_seed(0)
    true_grad, update = _exact_gradient_and_update(
        lambda s, y: counterfactual_advantages(s, y, num_samples=20_000, generator=generator, std=std), std)
    torch.testing.assert_close(update, true_grad, atol=2e-3, rtol=0)
    generator = torch.Generator().manual_seed(0)
    _, biased_update = _exact_gradient_and_update(lambda s, y: counterfactual_advantages(
        plackett_luce.standardized(s, std), y, num_samples=20_000, generator=generator), std)
    assert (biased_update - true_grad).abs().max() > 0.01


def test_reward_and_batch_baseline_updates_are_the_exact_policy_gradient():
    """The paper's advantage (the expected reward V(s), what the mean of S rewards estimates) drives the
    exact gradient; so does it minus another user's reward, which does not depend on this user's traces."""
    true_grad, update = _exact_gradient_and_update(lambda s, y: _exact_value(s, y[0])[:, None].expand(-1, 4))
    torch.testing.assert_close(update, true_grad, atol=1e-12, rtol=0)
    other_user = torch.tensor([0.7, 0.3], dtype=torch.float64)  # an independent user's S = 2 rewards

    def batch(scores, labels):
        values = _exact_value(scores, labels[0])  # [16]
        return torch.stack([batch_baseline_advantages(torch.stack([value.expand(2), other_user]))[0]
                            for value in values])[:, None].expand(-1, 4)
    true_grad, update = _exact_gradient_and_update(batch)
    torch.testing.assert_close(update, true_grad, atol=1e-12, rtol=0)


def test_grpo_advantages_by_hand():
    # rewards 1, 0, 0, 0: mean 1/4, population std sqrt(3)/4
    std = math.sqrt(3) / 4
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) / (std + 1e-4)
    torch.testing.assert_close(grpo_advantages(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)), expected)
    # groups along the last dimension; a group of equal rewards gets exactly 0
    out = grpo_advantages(torch.tensor([[0.3, 0.3, 0.3], [2.0, 0.0, 1.0]]))
    assert out[0].eq(0).all()
    torch.testing.assert_close(out[1], torch.tensor([1.0, -1.0, 0.0]) / (math.sqrt(2 / 3) + 1e-4))


def _expected_grpo_update(logits, reward_of, G, advantages_of=grpo_advantages):
    """E[sum_i A_i grad log pi(y_i)] over every G-tuple of outcomes of a softmax policy, exactly."""
    logits = logits.clone().requires_grad_(True)
    logp = logits.log_softmax(-1)
    surrogate = 0.0
    for tuple_ in itertools.product(range(len(logits)), repeat=G):
        y = torch.tensor(tuple_)
        advantages = advantages_of(reward_of[y])
        surrogate = surrogate + logp[y].sum().exp().detach() * (advantages * logp[y]).sum()
    surrogate.backward()
    return logits.grad


def test_grpo_update_for_a_binary_reward_is_a_scaled_exact_gradient():
    """ppo.grpo_advantages' docstring: with a 0/1 reward, the expected update is G (f(1) - f(0)) grad P(r = 1),
    f computed here from the binomial law of the other G - 1 samples' successes."""
    G, logits = 3, torch.tensor([0.4, -0.3, 1.1, 0.0], dtype=torch.float64)
    reward_of = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    update = _expected_grpo_update(logits, reward_of, G)

    theta = logits.clone().requires_grad_(True)
    (theta.softmax(-1) * reward_of).sum().backward()  # P(r = 1)
    p = float((logits.softmax(-1) * reward_of).sum())

    def advantage(own, successes):  # A of a sample with reward `own` in a group with `successes` ones
        mean = successes / G
        std = math.sqrt(mean * (1 - mean))
        return 0.0 if successes in (0, G) else (own - mean) / (std + 1e-4)
    f = {own: sum(math.comb(G - 1, n) * p ** n * (1 - p) ** (G - 1 - n) * advantage(own, n + own)
                  for n in range(G)) for own in (0, 1)}
    assert f[1] > 0 > f[0]
    torch.testing.assert_close(update, G * (f[1] - f[0]) * theta.grad, atol=1e-10, rtol=0)


def test_grpo_update_for_a_graded_reward_is_not_the_policy_gradient():
    """With three reward levels the expected GRPO update leaves the direction of grad E[r] (the bias the
    docstring states). The same enumeration with a leave-one-out baseline instead gives G grad E[r]
    exactly, so the check can tell the two apart."""
    G, logits = 3, torch.tensor([0.4, -0.3, 1.1, 0.0], dtype=torch.float64)
    reward_of = torch.tensor([1.0, 0.1, 0.0, 0.1], dtype=torch.float64)
    theta = logits.clone().requires_grad_(True)
    (theta.softmax(-1) * reward_of).sum().backward()
    update = _expected_grpo_update(logits, reward_of, G)
    cosine = torch.nn.functional.cosine_similarity(update, theta.grad, dim=0)
    assert 0 < cosine < 0.99
    unbiased = _expected_grpo_update(logits, reward_of, G, lambda r: r - leave_one_out_baseline(r))
    torch.testing.assert_close(unbiased, G * theta.grad, atol=1e-12, rtol=0)
