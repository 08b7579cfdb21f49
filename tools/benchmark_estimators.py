"""Bias and variance of the LLM's policy-gradient estimators (--advantage), on exact toys.

    python tools/benchmark_estimators.py [--toys 50 --steps 4000]     # K = 4, 5, 6

Algorithm 1 cut down to what can be enumerated: trace y_uk ~ Bernoulli(sigmoid(theta . x_uk)), theta shared (the LLM),
a fixed head s_uk = base_uk + lift_uk * y_uk, reward NDCG@10 of a Plackett-Luce ranking. grad J and each estimator's
E[update] are exact (all 2^K traces, K! rankings); --steps simulated steps (ppo.*, plackett_luce.*) check them and
give the variance. Estimators: reward (Eq. 6), batch, counterfactual, and item (a removed rule: g_k (s_k - mean s)).
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plackett_luce  # noqa: E402
from metrics import ndcg_at_k  # noqa: E402
from ppo import batch_baseline_advantages, counterfactual_advantages, leave_one_out_baseline  # noqa: E402

USERS, FEATURES, RANKINGS, CF_SAMPLES = 4, 4, 8, 256  # users per step, D, S, rankings per counterfactual value


def make_toy(K, users, features, generator):
    """Random toy: theta [D], x [U, K, D], base and lift [U, K], labels [U, K] (one positive each)."""
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.randint(0, K, (users,), generator=generator), K).double()
    return {"theta": normal(features), "x": normal(users, K, features), "base": normal(users, K),
            "lift": 2.0 * normal(users, K), "labels": labels}


def exact_values(scores, labels, perms):
    """V(s) = E_{tau ~ PL(s)} NDCG@10(tau) by enumeration. scores [..., K], labels [..., K] -> [...]."""
    log_p = plackett_luce.log_prob(scores[..., None, :], perms)  # [..., K!]
    relevance = labels[..., None, :].expand(*log_p.shape, labels.shape[-1]).gather(-1, perms.expand(*log_p.shape, -1))
    return (log_p.exp() * ndcg_at_k(relevance, 10)).sum(-1)


def exact(toy):
    """(grad J, {estimator: E[update]}) by enumeration over every user's 2^K trace vectors."""
    users, K, _ = toy["x"].shape
    perms = torch.tensor(list(itertools.permutations(range(K))))
    ys = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)), dtype=torch.float64)  # [Y, K]
    theta = toy["theta"].clone().requires_grad_(True)
    p1 = torch.sigmoid(toy["x"] @ theta)  # [U, K]
    prob_y = torch.where(ys[None] == 1, p1[:, None], 1 - p1[:, None]).prod(-1)  # [U, Y]
    scores = (toy["base"][:, None] + toy["lift"][:, None] * ys[None]).detach().requires_grad_(True)  # [U, Y, K]
    labels = toy["labels"][:, None].expand_as(scores)
    values = exact_values(scores, labels, perms)  # [U, Y]
    (true_grad,) = torch.autograd.grad((prob_y * values.detach()).sum(1).mean(), theta)
    (dv_ds,) = torch.autograd.grad(values.sum(), scores)  # [U, Y, K], exact dV/ds_k
    scores, p1 = scores.detach(), p1.detach()
    # s^(k): s_k replaced by the mean of the other K - 1 scores
    others = (scores.sum(-1, keepdim=True) - scores) / (K - 1)
    variants = scores[..., None, :].repeat(1, 1, K, 1)
    variants[..., range(K), range(K)] = others
    advantages = {
        "reward": values[..., None].detach().expand(-1, -1, K),
        "batch": values[..., None].detach().expand(-1, -1, K),  # the other users' mean is independent: no bias
        "counterfactual": values.detach()[..., None] - exact_values(variants, labels[..., None, :].expand_as(variants), perms),
        "item": dv_ds * (scores - scores.mean(-1, keepdim=True)),
    }
    grad_log_pi = (ys[None] - p1[:, None])[..., None] * toy["x"][:, None]  # [U, Y, K, D]
    return true_grad, {name: (prob_y.detach()[..., None, None] * grad_log_pi * a[..., None]).sum((1, 2)).mean(0)
                       for name, a in advantages.items()}


def simulate(toy, steps, rankings_per_user, cf_samples, generator):
    """{estimator: [steps, D] updates} of `steps` independent simulated steps."""
    users, K, _ = toy["x"].shape
    p1 = torch.sigmoid(toy["x"] @ toy["theta"])  # [U, K]
    y = (torch.rand(steps, users, K, generator=generator, dtype=torch.float64) < p1).double()
    scores = toy["base"] + toy["lift"] * y  # [N, U, K]
    labels = toy["labels"].expand_as(scores)
    rankings = plackett_luce.sample(scores, rankings_per_user, generator)  # [N, U, S, K]
    reward = ndcg_at_k(labels[..., None, :].expand_as(rankings).gather(-1, rankings), 10)  # [N, U, S]
    # the removed item credit: REINFORCE estimate of dE/ds_k with the leave-one-out baseline, times s_k - mean
    leaf = scores.clone().requires_grad_(True)
    weight = reward - leave_one_out_baseline(reward)
    (g,) = torch.autograd.grad((weight * plackett_luce.log_prob(leaf[..., None, :], rankings)).mean(-1).sum(), leaf)
    advantages = {
        "reward": reward.mean(-1, keepdim=True).expand(-1, -1, K),
        "batch": torch.stack([batch_baseline_advantages(r) for r in reward])[..., None].expand(-1, -1, K),
        "counterfactual": counterfactual_advantages(scores.view(-1, K), labels.reshape(-1, K), 10, cf_samples, generator).view(steps, users, K),
        "item": g * (scores - scores.mean(-1, keepdim=True)),
    }
    grad_log_pi = (y - p1)[..., None] * toy["x"]  # [N, U, K, D]
    return {name: (grad_log_pi * a[..., None]).sum(2).mean(1) for name, a in advantages.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", default="4,5,6", help="comma-separated K values")
    parser.add_argument("--toys", type=int, default=20, help="random toys per K")
    parser.add_argument("--steps", type=int, default=2000, help="simulated steps per toy for the variance")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{USERS} users x K candidates per step, theta in R^{FEATURES}, S = {RANKINGS} rankings, counterfactual with "
          f"{CF_SAMPLES} rankings per value; {args.toys} toys per K, {args.steps} steps each; seed {args.seed}\n")
    print("| K | estimator | relative bias, median (max) | cos(E[update], grad J), min | wrong-sign coordinates "
          "| relative variance, median (range) | relative variance / counterfactual's, median |\n|---|---|---|---|---|---|---|")
    for K in map(int, args.candidates.split(",")):
        found = {}  # estimator -> [toys, 5]: bias, cos, wrong signs, relative variance, Monte-Carlo gap
        for _ in range(args.toys):
            toy = make_toy(K, USERS, FEATURES, generator)
            true_grad, expected = exact(toy)
            updates = simulate(toy, args.steps, RANKINGS, CF_SAMPLES, generator)
            for name, e in expected.items():
                u = updates[name]  # [steps, D]; its mean must match the exact expectation, within Monte-Carlo error
                found.setdefault(name, []).append([
                    ((e - true_grad).norm() / true_grad.norm()).item(), torch.cosine_similarity(e, true_grad, dim=0).item(),
                    (e.sign() != true_grad.sign()).sum().item(), ((u - e).pow(2).sum(-1).mean() / e.pow(2).sum()).item(),
                    ((u.mean(0) - e).norm() / (u.std(0).norm() / args.steps ** 0.5)).item()])
        found = {name: torch.tensor(rows).T for name, rows in found.items()}  # [5, toys] each
        for name, (bias, cos, wrong, var, _) in found.items():
            bias_text = "scale-free (see cos)" if name == "item" else f"{bias.median():.3g} ({bias.max():.3g})"
            print(f"| {K} | {name} | {bias_text} | {cos.min():.3f} | {int(wrong.sum())} of {args.toys * FEATURES} "
                  f"| {var.median():.3g} ({var.min():.3g}-{var.max():.3g}) | {(var / found['counterfactual'][3]).median():.3g} |")
        gaps = torch.cat([rows[4] for rows in found.values()])
        print(f"|   | check | simulated mean vs exact E[update]: median {gaps.median():.2f}, max {gaps.max():.2f} standard errors | | | | |")


if __name__ == "__main__":
    main()
