"""decode.py under bf16 autocast rounds attention as SDPA's kernels do: the scores q k^T of the bf16
q and k are kept in fp32, the softmax is taken in fp32, and only the probabilities are cast to bf16
for the product with the values.

Oracles: the attention computed here by hand in fp32 from the same bf16 inputs; the model's own
forward (rollout.trace_logprobs, SDPA) under the same autocast, with its fp32 forward as the
yardstick of bf16 rounding. (conftest's autouse fixture runs every test on one torch thread.)
"""
import pytest
import torch

import data
import decode
import rollout
from machinery import models, sources

BF16 = torch.bfloat16


def _attention_inputs(prefix_length, seed=0):
    """bf16 query [K, kv_heads, G, T, d] (already scaled), keys [K, kv_heads, S, d], allowed [K, 1, 1, T, S]
    and prefix keys [kv_heads, P, d], with scores up to ~30 (trained models' logits reach that and more):
    rounded to bf16, such a score moves by up to 2^-9 of itself, ~0.06."""
    K, kv_heads, G, T, S, d = 3, 2, 2, 4, 6, 32
    generator = torch.Generator().manual_seed(seed)
    query = (torch.randn(K, kv_heads, G, T, d, generator=generator) * 8 / d ** 0.5).to(BF16)
    keys = torch.randn(K, kv_heads, S, d, generator=generator).to(BF16)
    prefix_keys = torch.randn(kv_heads, prefix_length, d, generator=generator).to(BF16)
    allowed = torch.rand(K, 1, 1, T, S, generator=generator) > 0.3
    allowed[..., 0] = True  # every query sees a row key (as a token sees itself in decode.forward)
    return query, keys, allowed, prefix_keys


def _reference_probs(query, keys, allowed, prefix_keys, round_scores=False):
    """softmax over [prefix | row keys] of the scores q k^T computed in fp32 from the bf16 inputs, by hand:
    the prefix's keys repeated per row, one einsum, -inf where not allowed. round_scores: the scores
    rounded to bf16 first (what a bf16 matmul returns): the rounding decode.py must not do."""
    K, kv_heads, _, T, _ = query.shape
    P = prefix_keys.shape[1]
    all_keys = torch.cat([prefix_keys.float().expand(K, -1, -1, -1), keys.float()], dim=2)  # [K, kv_heads, P + S, d]
    sees = torch.cat([torch.ones(K, 1, 1, T, P, dtype=torch.bool), allowed], dim=-1)
    scores = torch.einsum("khgtd,khsd->khgts", query.float(), all_keys)
    if round_scores:
        scores = scores.to(BF16).float()
    return scores.masked_fill(~sees, float("-inf")).softmax(-1)  # [K, kv_heads, G, T, P + S]


@pytest.mark.parametrize("prefix_length", [0, 20])
def test_attention_scores_are_fp32_products_of_the_bf16_inputs(prefix_length):
    """One-hot values (key j's value is the unit vector e_j) make attention return its probabilities,
    rounded once to bf16 (every other product term is an exact 0): they must be the fp32 softmax of
    the fp32 scores, rounded to bf16. The tolerance allows one bf16 rounding step (2^-7 relative),
    should the two fp32 softmaxes differ in their last bits; scores rounded to bf16 first move the
    probabilities by several percent (checked below, so this test can fail)."""
    query, keys, allowed, prefix_keys = _attention_inputs(prefix_length)
    K, kv_heads, S, d = keys.shape
    P = prefix_length
    one_hot = torch.eye(d, dtype=BF16)
    values = one_hot[P:P + S].expand(K, kv_heads, S, d)
    prefix = (prefix_keys, one_hot[:P].expand(kv_heads, P, d)) if P else None
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = decode.attention(query, keys, values, allowed, prefix)  # [K, kv_heads, G, T, d]
    assert out.dtype == BF16
    probs = out.float()[..., :P + S]
    assert (out.float()[..., P + S:] == 0).all()
    expected = _reference_probs(query, keys, allowed, prefix_keys).to(BF16).float()
    tolerance = dict(rtol=2 ** -7, atol=0)
    torch.testing.assert_close(probs, expected, **tolerance)
    rounded = _reference_probs(query, keys, allowed, prefix_keys, round_scores=True).to(BF16).float()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(rounded, expected, **tolerance)


@pytest.mark.parametrize("prefix_length", [0, 20])
def test_attention_output_is_the_bf16_probabilities_times_the_values(prefix_length):
    """Random values: the output is (fp32 softmax -> bf16) @ values up to the output's own bf16
    roundings. decode.py rounds the prefix's and the rows' products separately and then their sum,
    each rounding within 2^-8 of its magnitude, so |out - reference| <= 2^-8 (2 sum_j p_j |v_j| + |out|)."""
    query, keys, allowed, prefix_keys = _attention_inputs(prefix_length, seed=1)
    K, kv_heads, S, d = keys.shape
    P = prefix_length
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(K, kv_heads, S, d, generator=generator).to(BF16)
    prefix_values = torch.randn(kv_heads, P, d, generator=generator).to(BF16)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = decode.attention(query, keys, values, allowed, (prefix_keys, prefix_values) if P else None).float()
    probs = _reference_probs(query, keys, allowed, prefix_keys).to(BF16).float()
    all_values = torch.cat([prefix_values.float().expand(K, -1, -1, -1), values.float()], dim=2)[:, :, None]
    expected = probs @ all_values  # [K, kv_heads, G, T, d], in fp32
    bound = 2 ** -8 * (2 * probs @ all_values.abs() + expected.abs()) + 1e-6
    worst = ((out - expected).abs() / bound).max().item()
    assert worst <= 1, f"|out - reference| reaches {worst:.2f} x the bound"


def test_decoded_logprobs_round_like_the_models_own_forward_in_bf16():
    """Log-probs recorded by sample_traces on decode.py, and trace_logprobs (the model's forward,
    SDPA) on the same tokens, both under bf16 autocast, on a few users' real prompts.

    Tolerance: the two paths compute the same function with different roundings, so their gap is
    measured against the model's own bf16 rounding error, |bf16 forward - fp32 forward| on the same
    tokens: the mean gap must stay under 3/4 of it. decode.py rounding as SDPA does measured 0.50 of
    it here (0.43-0.64 per user: the tiny model, its weights drawn with std 0.3, turns single roundings
    into log-prob changes of up to ~0.1); with the scores rounded to bf16 (the earlier decode.py) it
    measured 1.03 (0.93-1.22 per user), as far from the model's bf16 forward as that is from fp32.
    The model keeps std 0.3 (--model tiny's is 0.1 since issue 42): there bf16's own error is large
    enough to be the yardstick (0.007 at 0.1, under the 0.01 asked for below)."""
    model, tokenizer = models.build_tiny(seed=0, init_std=0.3)
    model.eval()
    assert decode.supported(model)  # sample_traces decodes on decode.py (fast_decode), not transformers' cache
    splits, _ = data.build_instances(sources.synthetic_raw(users=50, seed=0), data.Protocol(history=20, candidates=4))
    gaps, bf16_errors = [], []
    for user in range(4):
        prefix, suffixes = data.encode_user(tokenizer, splits["train"][user])
        prompts = [prefix + suffix for suffix in suffixes]
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            traces = rollout.sample_traces(model, tokenizer, prefix, suffixes, 16,
                                            generator=torch.Generator().manual_seed(user))
            forward_bf16, mask = rollout.trace_logprobs(model, prompts, traces.token_lists())
        with torch.no_grad():
            forward_fp32, _ = rollout.trace_logprobs(model, prompts, traces.token_lists())
        assert torch.equal(mask, traces.mask) and mask.sum() > 0
        gaps.append((traces.logprobs - forward_bf16)[mask].abs())
        bf16_errors.append((forward_bf16 - forward_fp32)[mask].abs())
    gap, bf16_error = torch.cat(gaps).mean().item(), torch.cat(bf16_errors).mean().item()
    assert bf16_error > 0.01  # bf16 does round here: the yardstick is not zero
    assert gap < 0.75 * bf16_error, f"mean |decode - forward| {gap:.4f}, mean |bf16 - fp32| {bf16_error:.4f}"
