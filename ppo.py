"""Policy-gradient losses of R2Rank (Eqs. 5-6 of the R2Rank paper), as pure functions.

    clipped_token_loss  token-level clipped PPO for the LLM's reasoning tokens       (Eq. 6)
    reinforce_loss      REINFORCE for the scoring head through log P(tau | s)        (Eq. 5)
    leave_one_out_baseline   the mean reward of the other samples of the same user   (beyond the paper)

Where this departs from the paper:
1. Eq. (6) sums the clipped objective over all tokens of all K traces. We divide by the number of
   valid tokens (see clipped_token_loss) so the step size does not scale with K or trace length.
2. The paper's REINFORCE uses the raw reward rho(tau) as the weight. A baseline is optional here;
   with one, the estimate stays unbiased and its variance drops (every NDCG is >= 0, so without a
   baseline every sampled ranking is pushed up, just some more than others).
"""
import torch


def clipped_token_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Token-level clipped PPO loss, Eq. (6) of the R2Rank paper (ascending J = descending -J).

    logp:       [N, T] log pi_theta(o_t | state) of the sampled tokens, current policy (with grad)
    old_logp:   [N, T] the same under pi_theta_old, the policy that sampled the traces (no grad)
    advantages: [N] one value per trace (the paper uses the listwise reward rho(tau)), or [N, T]
    mask:       [N, T] bool or 0/1, True on response tokens that count
    clip_eps:   trust-region half-width epsilon

    Per token, with r = exp(logp - old_logp): objective = min(r * A, clip(r, 1 - eps, 1 + eps) * A).
    loss = - sum over valid tokens of the objective / number of valid tokens (at least 1).

    Why normalize: Eq. (6) is a plain sum, so its gradient grows with the number of traces and with
    their length, and the learning rate would have to be retuned whenever K, the batch or the token
    budget changes. Dividing by the valid-token count of the (micro-)batch makes the loss a per-token
    mean. Every token still weighs the same, so a long trace carries more total weight than a short
    one in proportion to its length (as in the plain sum); only the overall scale changes. (A
    per-trace mean instead would give every trace equal weight and shrink each token of a long trace.)

    returns: (loss, stats) with stats = {"clip_frac": share of valid tokens with |r - 1| > eps,
             "approx_kl": mean of (r - 1) - log r (the k3 estimator of KL(old || new)),
             "ratio": mean r}, all over valid tokens, as Python floats.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [N, 1], broadcast over tokens
    # Padding may hold any value: zero its log-ratio first so that exp() can never overflow there
    # (inf * 0 = nan would otherwise leak into the sum and the gradient).
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0)
    mask = mask.to(logp.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    num_valid = mask.sum().clamp(min=1)
    loss = -(objective * mask).sum() / num_valid

    with torch.no_grad():
        stats = {
            "clip_frac": (((ratio - 1.0).abs() > clip_eps).to(mask.dtype) * mask).sum() / num_valid,
            "approx_kl": (((ratio - 1.0) - log_ratio) * mask).sum() / num_valid,
            "ratio": (ratio * mask).sum() / num_valid,
        }
    return loss, {name: value.item() for name, value in stats.items()}


def reinforce_loss(rank_log_prob, reward, baseline=None):
    """REINFORCE loss for the scoring head, Eq. (5) of the R2Rank paper.

    rank_log_prob: [...] log P(tau | s) of sampled rankings (with grad into the scores s)
    reward:        [...] rho(tau) of the same rankings, e.g. NDCG@10
    baseline:      optional, broadcastable to reward (e.g. leave_one_out_baseline(reward))

    loss = - mean((reward - baseline) * log P(tau | s)); its gradient is a Monte-Carlo estimate of
    - grad E_tau[rho(tau)]. The weight is detached: only log P carries gradient.
    """
    weight = reward if baseline is None else reward - baseline
    return -(weight.detach() * rank_log_prob).mean()


def leave_one_out_baseline(reward, dim=-1):
    """For each sample, the mean reward of the other samples along `dim` (needs >= 2 samples).

    reward: [..., S, ...]; returns the same shape. Unlike the plain mean, it does not depend on the
    sample it is subtracted from, so the policy gradient stays unbiased.
    """
    count = reward.shape[dim]
    if count < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per group")
    baseline = (reward.sum(dim, keepdim=True) - reward) / (count - 1)
    # Where a group's rewards are all equal the baseline is the reward itself, exactly. The formula
    # above can miss it by one rounding step, and an advantage scaled to unit std (as item-level
    # credit is) would turn that into a full-size update in a direction set by rounding alone.
    same = (reward == reward.narrow(dim, 0, 1)).all(dim, keepdim=True)
    return torch.where(same, reward, baseline)
