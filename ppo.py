"""Policy-gradient losses of R2Rank (Eqs. 5-6 of the R2Rank paper) and the LLM's advantages, as pure
functions.

    token_logprobs              log pi_theta of the sampled tokens at the sampling temperature (Eq. 6's ratio)
    clipped_token_loss          token-level clipped PPO for the LLM's trace tokens         (Eq. 6)
    llm_loss                    a micro-batch's part of the LLM's loss: Eq. 6 plus the score path
    reinforce_loss              REINFORCE for the scoring head through log P(tau | s)      (Eq. 5)
    score_gradient              the same estimate of dV/ds, carried into the LLM (the score path, Sec. 3.3)
    leave_one_out_baseline      the mean reward of the other samples of a group         (beyond the paper)
    counterfactual_advantages   per-trace credit: V(s) - V(s with s_k replaced)         (beyond the paper)
    batch_baseline_advantages   a user's reward minus the other users' mean reward      (beyond the paper)
    grpo_advantages             GRPO's group-standardized reward (the compared systems in baselines/)

Where this departs from the paper (the numbers of the one list, at the top of r2rank.py):
2. The paper's REINFORCE uses the raw reward rho(tau) as the weight. A baseline is optional here;
   with one, the estimate stays unbiased and its variance drops (every NDCG is >= 0, so without a
   baseline every sampled ranking is pushed up, just some more than others).
3. Eq. (6) gives every token the ranking's reward rho(tau) (no baseline). That is an unbiased policy
   gradient, but every step raises the log-prob of every sampled token, and its variance is large.
   counterfactual_advantages and batch_baseline_advantages are unbiased too, with a baseline.
4. Eq. (6) sums the clipped objective over all tokens of all K traces. We divide by the number of
   valid tokens (see clipped_token_loss) so the step size does not scale with K or trace length.

Where the update is not exactly unbiased, and why: (a) the per-token mean divides by the step's token
count, which depends on the sampled traces; with traces of different lengths this ratio is not an
unbiased estimate of grad E[reward] (a fixed divisor, such as the step's token budget, would be; with
equal lengths, as with 1-token traces, it is exact). (b) After the first PPO epoch (ratio 1, the plain
policy gradient) the same traces are reused under a changed policy; the clipping bounds that step,
as in any PPO.
"""
import torch

import plackett_luce
from metrics import ndcg_at_k


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / T) at the targets, in fp32 or wider: each token's log-prob under the distribution it
    was sampled from (departure 6). logits [..., V], targets [...] -> [...]. Temperature 0 (greedy) has no
    sampling distribution: the untempered model's log-probs are returned then."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 from bf16, fp64 stays
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    # gather minus logsumexp: the log softmax at the target only, without a second [..., V] tensor
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def clipped_token_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Token-level clipped PPO loss, Eq. (6) of the R2Rank paper (ascending J = descending -J).

    logp:       [N, T] log pi_theta(o_t | state) of the sampled tokens, current policy (with grad)
    old_logp:   [N, T] the same under pi_theta_old, the policy that sampled the traces (no grad)
    advantages: [N] one value per trace (the paper uses the listwise reward rho(tau)), or [N, T]
    mask:       [N, T] bool or 0/1, True on trace tokens that count
    clip_eps:   trust-region half-width epsilon

    Per token, with r = exp(logp - old_logp): objective = min(r * A, clip(r, 1 - eps, 1 + eps) * A).
    loss = - sum over valid tokens of the objective / number of valid tokens (at least 1).

    Why normalize: Eq. (6) is a plain sum, so its gradient grows with the number of traces and with
    their length, and the learning rate would have to be retuned whenever K, the batch or the token
    budget changes. Dividing by the valid-token count of the (micro-)batch makes the loss a per-token
    mean. Every token still weighs the same, so a long trace carries more total weight than a short
    one in proportion to its length (as in the plain sum); only the overall scale changes. (A
    per-trace mean instead would give every trace equal weight and shrink each token of a long trace.)

    returns: (loss, stats) with stats = {"clip_frac": share of valid tokens whose clipped term is the
             one taken (r beyond 1 + eps with A > 0, or below 1 - eps with A < 0: no gradient),
             "approx_kl": mean of (r - 1) - log r (the k3 estimator of KL(old || new)),
             "ratio": mean r}, all over valid tokens, as Python floats. With no valid token the loss is 0
             and stats is {}: a mean over no tokens is undefined, and 0 would read as a ratio of 0.
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

    if not mask.any():  # no token (e.g. --max-new-tokens 0): nothing to average
        return loss, {}
    with torch.no_grad():
        stats = {
            "clip_frac": ((clipped < unclipped).to(mask.dtype) * mask).sum() / num_valid,
            "approx_kl": (((ratio - 1.0) - log_ratio) * mask).sum() / num_valid,
            "ratio": (ratio * mask).sum() / num_valid,
        }
    return loss, {name: value.item() for name, value in stats.items()}


def llm_loss(logp, old_logp, advantages, mask, divisor, clip_eps=0.2, scores=None, score_grads=None):
    """One micro-batch's part of the LLM's loss in an RL step: summed over the step's micro-batches,
    its gradient is the step's estimate of - grad_theta J / D (r2rank.ppo_update accumulates it).

        the tokens (Eq. 6):      - sum over the micro-batch's valid tokens of min(r A, clip(r) A) / D
        the score path (Sec. 3.3, departure 7 of r2rank.py):  - sum_k g_k s_k(theta) / D

    logp, old_logp, mask [B, T], advantages [B] or [B, T]: as in clipped_token_loss.
    divisor D: the step's valid-token count (departure 4), or its trace count when the traces are
    empty (--max-new-tokens 0); the same D for both terms, so they add up to one estimate.
    scores [B]: s_k = f_phi(h_k(theta)) with phi held fixed (gradient into theta through h_k only);
    score_grads [B]: g = dV/ds (score_gradient), detached. None, None: the tokens' term alone.
    Together: grad J = E[sum_k A_k grad log pi(y_k)] + E[sum_k dV/ds_k grad s_k], the whole gradient
    of J(theta) = E[V(s(theta, y))].
    returns: (loss, stats) with clipped_token_loss's stats and "ppo_loss", its per-token mean loss
    ({} with no valid token: the score path's term alone, and no token to average over).
    """
    token_loss, stats = clipped_token_loss(logp, old_logp, advantages, mask, clip_eps)
    loss = token_loss * (mask.sum().item() / divisor)  # token_loss is a mean over these tokens
    if scores is not None:
        loss = loss - (score_grads.to(scores.dtype) * scores).sum() / divisor
    return loss, {**stats, "ppo_loss": token_loss.item()} if stats else {}


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


def score_gradient(scores, rankings, reward, baseline=None, std=0.0):
    """REINFORCE estimate of dV/ds, the gradient of a user's expected reward V(s) = E_{tau ~ PL(s)} rho(tau)
    with respect to its K scores: the signal the score path carries from the rankings into the LLM.

    scores:   [U, K] the head's raw scores (any grad is ignored)
    rankings: [U, S] + [K] rankings sampled from PL(standardized(scores, std)), reward: [U, S] their rho
    baseline: optional [U, S], e.g. leave_one_out_baseline(reward); std: --pl-std (0 = raw scores)
    returns:  [U, K], detached: mean over the S rankings of (rho - b) * grad_s log P(tau | std(s)).

    With std > 0 the gradient is taken through the standardization, so it is dV/ds with respect to the
    raw scores, what the head's output, and so the LLM's hidden state, moves. Unbiased for dV/ds when
    the baseline of each ranking does not depend on that ranking (the leave-one-out baseline depends
    on the other S - 1 only, which are drawn independently given s; E[grad log P] = 0 removes it).
    It is the head's REINFORCE (Eq. 5) stopped at the scores: the head's loss back-propagates the same
    quantity into phi, and r2rank.ppo_update carries it on into theta through h_k.
    """
    raw = scores.detach().to(torch.promote_types(scores.dtype, torch.float32)).requires_grad_(True)
    weight = reward if baseline is None else reward - baseline
    with torch.enable_grad():
        log_p = plackett_luce.log_prob(plackett_luce.standardized(raw, std)[:, None, :], rankings)  # [U, S]
        (grad,) = torch.autograd.grad((weight.detach().to(raw.dtype) * log_p).mean(1).sum(), raw)
    return grad


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


def counterfactual_advantages(scores, labels, k=10, num_samples=256, generator=None, std=0.0):
    """Per-trace advantage by a counterfactual (difference) reward: what trace k's score is worth.

    scores: [U, K] the head's raw scores s (detached), labels: [U, K] relevance, k: NDCG cut-off,
    std: --pl-std, the spread Plackett-Luce sees (0 = raw scores).
    returns: [U, K], A_k = V(s) - V(s^(k)), unscaled (a caller may scale by one constant per step).

    V(s) = E_{tau ~ PL(s)} NDCG@k(tau), the expected reward of the scores, estimated from
    `num_samples` Plackett-Luce rankings. s^(k) is s with s_k replaced by the mean of the user's other
    K - 1 scores: the score a trace with no information about item k would be expected to give.
    All K + 1 score vectors of a user are ranked with the same Gumbel noise (common random numbers),
    so V(s) - V(s^(k)) is exactly 0 when s_k already equals that mean, and small score changes are
    not drowned in sampling noise. Costs PL samples only, no LLM call.

    Why it is unbiased. The LLM's objective is J(theta) = E_y[V(s(y))], y = (y_1, ..., y_K) the
    traces, drawn independently given the prompts; s_k depends on y_k alone. Its gradient is
    sum_k E[grad log pi(y_k) V(s)], which Eq. (6) estimates with V(s) replaced by a sampled
    rho(tau). Subtracting b_k = V(s^(k)) from trace k's weight changes nothing in expectation,
    because b_k depends on the other traces y_{-k} only (s_k has been replaced) and
    E_{y_k}[grad log pi(y_k)] = 0:  E[grad log pi(y_k) b_k] = E_{y_-k}[b_k E_{y_k}[grad log pi(y_k)]] = 0.
    The Monte-Carlo estimates of V(s) and V(s^(k)) are unbiased for any fixed scores and their
    noise is independent of the traces, so they add variance, not bias. What is left,
    V(s) - V(s^(k)), is large where trace k decided the ranking and 0 where it did not, with its
    own sign per trace (a shared reward cannot tell the K traces of a user apart).

    With std > 0 every variant is standardized on its own, V(std(s)) - V(std(s^(k))): the replacement
    is made in raw scores, which depend on y_k alone. (Replacing s_k in the already standardized
    vector would not do: every standardized score depends on all K traces, so the baseline would
    depend on y_k and the advantage would be biased; tests/test_ppo.py shows it by enumeration.)
    """
    U, K = scores.shape
    if K < 2:
        raise ValueError("counterfactual advantages need at least 2 candidates per user")
    scores = scores.detach().to(torch.promote_types(scores.dtype, torch.float32))
    others_mean = (scores.sum(-1, keepdim=True) - scores) / (K - 1)  # [U, K]
    # K + 1 score vectors per user: s itself, then s^(k) for k = 1..K
    variants = scores[:, None, :].repeat(1, K + 1, 1)  # [U, K + 1, K]
    item = torch.arange(K, device=scores.device)
    variants[:, item + 1, item] = others_mean
    variants = plackett_luce.standardized(variants, std)
    noise = plackett_luce.gumbel_noise((U, 1, num_samples, K), generator, scores.dtype, scores.device)
    rankings = plackett_luce.sample(variants, num_samples, gumbel=noise)  # [U, K + 1, S, K]
    relevance = labels.to(scores.dtype)[:, None, None, :].expand_as(rankings).gather(-1, rankings)
    value = ndcg_at_k(relevance, k).mean(-1)  # [U, K + 1]
    return value[:, :1] - value[:, 1:]


def batch_baseline_advantages(reward):
    """The paper's advantage with a baseline: a user's mean reward minus the other users' mean reward.

    reward: [U, S] rewards of the S rankings sampled for each of the step's U users (U >= 2).
    returns: [U], one advantage for all K traces of a user.
    Unbiased: the other users' traces are drawn independently of this user's, so their mean reward
    is a baseline that does not depend on the traces it is subtracted from (leave_one_out_baseline).
    """
    user_reward = reward.mean(-1)
    return user_reward - leave_one_out_baseline(user_reward, dim=0)


def grpo_advantages(reward, eps=1e-4):
    """GRPO's advantage (DeepSeekMath, Shao et al., 2024), as RecZero and R2ec use it: each sample's
    reward standardized within its group, (r_i - mean(r)) / (std(r) + eps), population std.

    reward: [..., G] rewards of G samples drawn for the same prompt; returns the same shape. A group
    whose rewards are all equal gets 0 (nothing to learn from it).

    Not an unbiased estimate of grad E[r], and exactly how: mean and std include the sample itself,
    so A_i depends on y_i through them. Since the other G - 1 samples are drawn independently of y_i,
    E[A_i grad log pi(y_i)] = E_y[f(r(y)) grad log pi(y)] with f(r) = E[A_i | r_i = r], the advantage
    a sample of reward r gets on average: the update is the policy gradient of the transformed reward
    f(r) (f held fixed), not of r, and f is not r minus a constant: how hard a sample is pushed
    depends on the spread of its group. For a 0/1 reward, f(1) >= 0 >= f(0) and the expectation is exactly
    G (f(1) - f(0)) grad P(r = 1): the right direction, scaled by a factor that grows as the success
    rate nears 0 or 1, so across groups easy and hopeless prompts get more weight than the objective
    gives them (Liu et al., 2025, "Understanding R1-Zero-Like Training", Dr. GRPO). tests/test_ppo.py checks both statements by exact
    enumeration on a toy policy.
    """
    mean = reward.mean(-1, keepdim=True)
    std = reward.std(-1, keepdim=True, correction=0)
    same = (reward == reward[..., :1]).all(-1, keepdim=True)
    return torch.where(same, 0.0, (reward - mean) / (std + eps))
