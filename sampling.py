"""Drawing the next token: one row of logits each, one uniform number per row, and the log-probs the
update recomputes. Torch only; copies alone.

    next_tokens(logits, temperature, top_p, generators)   -> [N] ids    (Eq. 1's y ~ pi_theta, one step)
    inverse_cdf(probs, uniforms)                          -> [N] ids    (the exact draw behind it)
    token_logprobs(logits, targets, temperature)          -> [...] fp32  (pi_theta of each drawn token)

Why not torch.multinomial: for one sample it draws an Exp(1) number for every token of the vocabulary
and row (K x V a step; on a CPU about 150 ms a step for 160 rows of a 49,152-token vocabulary, a fifth
of the decode step) and reads the probabilities back to check them (.item(), a host sync on a GPU).
inverse_cdf draws from the same distribution with one number per row.
"""
import torch


def token_logprobs(logits, targets, temperature=1.0):
    """log softmax(logits / T) at the targets, in fp32 or wider: the log-prob of each token under the
    distribution it was sampled from. logits [..., V], targets [...] -> [...].

    Temperature 0 (greedy) has no sampling distribution; the untempered model's log-probs are
    returned then (they are only logged). Nucleus truncation (top-p < 1) is not included: the RL
    stage refuses it (config.parse_config), since the kept set itself depends on theta.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 from bf16, fp64 stays
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    # gather minus logsumexp: the log softmax at the target only, without a second [..., V] tensor
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def next_tokens(logits, temperature, top_p, generators, drawing=None):
    """[N, V] fp32 logits -> [N] ids. temperature 0 = greedy (argmax). Sampled, the N rows are in
    len(generators) equal blocks, one per user, and block u is drawn with generators[u] (None: torch's
    global stream), so a user's tokens do not depend on the users decoded beside it. drawing[u] False
    skips block u (its user's rows have all ended: its generator is left as it is; its ids are arbitrary).

    One uniform number per row, drawn in fp64 (inverse_cdf): a step draws K numbers from each user's
    generator. Nucleus (top_p < 1): the most likely tokens until their mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature if temperature != 1 else logits).softmax(-1)  # no pass over [N, V] for T = 1
    if top_p < 1.0:
        # the nucleus: tokens whose higher-ranked mass is below top_p (always at least one)
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    rows = probs.shape[0] // len(generators)
    uniforms = torch.cat([torch.rand(rows, dtype=torch.float64, device=probs.device, generator=generator) if draw
                          else torch.zeros(rows, dtype=torch.float64, device=probs.device)
                          for generator, draw in zip(generators, drawing or [True] * len(generators))])
    return inverse_cdf(probs, uniforms)


def inverse_cdf(probs, uniforms, block=256):
    """The id i whose interval [c_{i-1}, c_i) of the cumulative mass holds u * c_V, per row: an exact draw
    from probs when u ~ U[0, 1), in two levels so that no [N, V] array is summed in fp64.

    probs [N, V] >= 0, not necessarily normalized (a zero is never drawn); uniforms [N] fp64 in [0, 1).
    1. the block of `block` consecutive ids: inverse CDF over the blocks' masses (fp32 sums, then fp64);
    2. the id inside it: inverse CDF over that block's ids (fp64), at the same fraction of the block's mass.
    So id i is drawn with probability (m_b / sum of m) * (p_i / sum of p in b), where m_b is the fp32 sum
    of block b: relative errors of fp32 summation (about 1e-7), as torch.multinomial's. returns [N] ids.
    """
    N, V = probs.shape
    if V % block:  # zeros padded to whole blocks (a copy, only then)
        probs = torch.nn.functional.pad(probs, (0, -V % block))
    blocks = probs.view(N, -1, block)  # [N, B, block]
    mass = blocks.sum(-1).double()  # [N, B]
    cdf = mass.cumsum(-1)
    target = uniforms[:, None] * cdf[:, -1:]  # [N, 1]
    last_block = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the last block with mass (u * total rounded up)
    chosen = torch.searchsorted(cdf, target, right=True).minimum(last_block)  # first cdf > target: mass > 0
    start = torch.where(chosen > 0, cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)  # mass before the block
    fraction = ((target - start) / (cdf.gather(1, chosen) - start)).clamp(0.0, 1.0)  # where in the block, [0, 1]
    inside = blocks.gather(1, chosen[:, :, None].expand(N, 1, block))[:, 0].double().cumsum(-1)  # [N, block]
    last_id = (inside < inside[:, -1:]).sum(-1, keepdim=True)  # the block's last id with mass
    offset = torch.searchsorted(inside, fraction * inside[:, -1:], right=True).minimum(last_id)
    return (chosen * block + offset)[:, 0]
