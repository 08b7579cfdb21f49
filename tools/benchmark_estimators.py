"""Bias and variance of the LLM's policy-gradient estimators (--advantage), on exact toys.

    python tools/benchmark_estimators.py                  # K = 4, 5, 6; 20 toys each
    python tools/benchmark_estimators.py --toys 50 --steps 4000

Not collected by pytest: it prints figures to read. The toy is Algorithm 1 with the LLM cut down to
what can be enumerated. U users per step, K candidates each, one positive. Trace k of user u is a
binary trace y ~ Bernoulli(sigmoid(theta . x_uk)), theta in R^D shared by all users (the LLM's
weights), x_uk fixed features. A fixed head scores it s_uk = base_uk + lift_uk * y_uk. The reward is
NDCG@10 of a Plackett-Luce ranking of the scores, J(theta) = mean_u E[NDCG_u].

Exact, by enumerating all 2^K trace vectors and all K! rankings per user:
    grad J                       the true gradient
    E[update] per estimator      sum_k grad log pi(y_k) E[A_k | y], averaged over y
Monte Carlo, over --steps simulated steps with the project's own functions (ppo.*, plackett_luce.*):
    the mean update (it must agree with the exact E[update]: a check of the exact column) and the
    relative variance E||update - E[update]||^2 / ||E[update]||^2 (scale-free, so the item rule,
    whose scale is arbitrary, compares too; for the unbiased estimators E[update] = grad J).

Estimators: reward (the paper's Eq. 6: the mean NDCG of the user's S rankings), batch (minus the
other users' mean), counterfactual (ppo.counterfactual_advantages), and item: the credit rule that
--advantage item used until it was removed, g_k (s_k - mean s) with g_k the REINFORCE estimate of
dE[NDCG]/ds_k (unscaled here; the removed code also scaled it to unit std per step).
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

ESTIMATORS = ("reward", "batch", "counterfactual", "item")


def make_toy(K, users, features, generator):
    """Random toy: theta [D], x [U, K, D], base and lift [U, K], labels [U, K] (one positive each)."""
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)
    labels = torch.zeros(users, K, dtype=torch.float64)
    labels[torch.arange(users), torch.randint(0, K, (users,), generator=generator)] = 1.0
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
    weights = prob_y.detach()[..., None, None]
    return true_grad, {name: (weights * grad_log_pi * a[..., None]).sum((1, 2)).mean(0) for name, a in advantages.items()}


def simulate(toy, steps, rankings_per_user, cf_samples, generator):
    """{estimator: [steps, D] updates} of `steps` independent simulated steps."""
    users, K, _ = toy["x"].shape
    p1 = torch.sigmoid(toy["x"] @ toy["theta"])  # [U, K]
    y = (torch.rand(steps, users, K, generator=generator, dtype=torch.float64) < p1).double()
    scores = toy["base"] + toy["lift"] * y  # [N, U, K]
    labels = toy["labels"].expand_as(scores)
    rankings = plackett_luce.sample(scores, rankings_per_user, generator)  # [N, U, S, K]
    reward = ndcg_at_k(labels[..., None, :].expand_as(rankings).gather(-1, rankings), 10)  # [N, U, S]
    flat = lambda t: t.reshape(steps * users, *t.shape[2:])
    # the removed item credit: REINFORCE estimate of dE/ds_k with the leave-one-out baseline, times s_k - mean
    leaf = scores.clone().requires_grad_(True)
    weight = reward - leave_one_out_baseline(reward)
    (g,) = torch.autograd.grad((weight * plackett_luce.log_prob(leaf[..., None, :], rankings)).mean(-1).sum(), leaf)
    advantages = {
        "reward": reward.mean(-1, keepdim=True).expand(-1, -1, K),
        "batch": torch.stack([batch_baseline_advantages(r) for r in reward])[..., None].expand(-1, -1, K),
        "counterfactual": counterfactual_advantages(flat(scores), flat(labels), 10, cf_samples, generator).view(steps, users, K),
        "item": g * (scores - scores.mean(-1, keepdim=True)),
    }
    grad_log_pi = (y - p1)[..., None] * toy["x"]  # [N, U, K, D]
    return {name: (grad_log_pi * a[..., None]).sum(2).mean(1) for name, a in advantages.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", default="4,5,6", help="comma-separated K values")
    parser.add_argument("--toys", type=int, default=20, help="random toys per K")
    parser.add_argument("--users", type=int, default=4, help="users per step (the batch baseline needs >= 2)")
    parser.add_argument("--features", type=int, default=4, help="D, the dimension of theta")
    parser.add_argument("--steps", type=int, default=2000, help="simulated steps per toy for the variance")
    parser.add_argument("--rankings", type=int, default=8, help="S, Plackett-Luce rankings per user")
    parser.add_argument("--cf-samples", type=int, default=256, help="rankings per value in the counterfactual")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.users} users x K candidates per step, theta in R^{args.features}, S = {args.rankings} rankings, "
          f"counterfactual with {args.cf_samples} rankings per value; {args.toys} toys per K, {args.steps} steps each; "
          f"seed {args.seed}\n")
    print("| K | estimator | relative bias, median (max) | cos(E[update], grad J), min | wrong-sign coordinates "
          "| relative variance, median (range) | relative variance / counterfactual's, median |")
    print("|---|---|---|---|---|---|---|")
    for K in (int(k) for k in args.candidates.split(",")):
        rows = {name: {"bias": [], "cos": [], "wrong": 0, "var": [], "mc_gap": []} for name in ESTIMATORS}
        for _ in range(args.toys):
            toy = make_toy(K, args.users, args.features, generator)
            true_grad, expected = exact(toy)
            updates = simulate(toy, args.steps, args.rankings, args.cf_samples, generator)
            for name in ESTIMATORS:
                mean, e = updates[name].mean(0), expected[name]
                row = rows[name]
                row["bias"].append(((e - true_grad).norm() / true_grad.norm()).item())
                row["cos"].append(torch.nn.functional.cosine_similarity(e, true_grad, dim=0).item())
                row["wrong"] += int((torch.sign(e) != torch.sign(true_grad)).sum())
                row["var"].append((updates[name] - e).pow(2).sum(-1).mean().item() / e.pow(2).sum().item())
                # the simulated mean must match the exact expectation (within Monte-Carlo error)
                row["mc_gap"].append(((mean - e).norm() / (updates[name].std(0).norm() / args.steps ** 0.5)).item())
        cf_var = torch.tensor(rows["counterfactual"]["var"])
        for name in ESTIMATORS:
            row = rows[name]
            bias, var = torch.tensor(row["bias"]), torch.tensor(row["var"])
            bias_text = "scale-free (see cos)" if name == "item" else f"{bias.median():.3g} ({bias.max():.3g})"
            print(f"| {K} | {name} | {bias_text} | {min(row['cos']):.3f} | {row['wrong']} of {args.toys * args.features} "
                  f"| {var.median():.3g} ({var.min():.3g}-{var.max():.3g}) | {(var / cf_var).median():.3g} |")
        gaps = torch.tensor([g for name in ESTIMATORS for g in rows[name]["mc_gap"]])
        print(f"|   | check | simulated mean vs exact E[update]: median {gaps.median():.2f}, max {gaps.max():.2f} "
              "standard errors | | | | |")


if __name__ == "__main__":
    main()
