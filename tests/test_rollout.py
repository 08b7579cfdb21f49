"""Trace sampling with a shared KV-cache prefix and teacher-forced log-probs, on the tiny model.

Oracles: transformers' own `generate` on the plain, unshared prompts; a fresh unpadded forward pass
per sequence for the log-probs and the final hidden state.
"""
import copy
import types
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from machinery import models, sources
import rollout
import sampling


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.build_tiny(seed=0)
    return model.eval(), tokenizer


def _prompts(tokenizer):
    prefix = tokenizer("Instructions and a user context, shared by all candidates.\n")["input_ids"]
    suffixes = [tokenizer(text)["input_ids"] for text in
                ["Red tent", "Blue watering can - category: gardening; color: blue", "Gamepad"]]
    assert len({len(s) for s in suffixes}) == 3  # different lengths: padding is exercised
    return prefix, suffixes


def _generate_plain(model, tokenizer, prompts, max_new_tokens):
    """transformers' generate, one prompt at a time (no padding at all), greedy."""
    responses = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):]
        response = []
        for token in out.tolist():
            response.append(token)
            if token == tokenizer.eos_token_id:
                break
        responses.append(response)
    return responses


@pytest.mark.parametrize("fast_decode", [True, False])  # decode.py's forward, the model's own with its cache
def test_greedy_shared_prefix_equals_plain_generate(tiny, fast_decode):
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    samples = rollout.sample_traces(model, tokenizer, prefix, suffixes, max_new_tokens=12, temperature=0.0,
                                    fast_decode=fast_decode)
    expected = _generate_plain(model, tokenizer, [prefix + s for s in suffixes], 12)
    assert samples.token_lists() == expected
    # The plain path of the same function (empty prefix, whole prompts) agrees too.
    plain = rollout.sample_traces(model, tokenizer, [], [prefix + s for s in suffixes], max_new_tokens=12, temperature=0.0,
                                  fast_decode=fast_decode)
    assert plain.token_lists() == expected


@pytest.mark.parametrize("temperature, fast_decode", [(1.0, True), (0.7, True), (0.7, False)])
def test_recorded_logprobs_and_final_hidden_match_a_fresh_forward(tiny, temperature, fast_decode):
    """Log-probs of the distribution the tokens were drawn from, log softmax(logits / T), recorded while
    decoding and recomputed by teacher forcing, against a plain unpadded forward per sequence."""
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    samples = rollout.sample_traces(model, tokenizer, prefix, suffixes, max_new_tokens=10, temperature=temperature,
                                    generator=torch.Generator().manual_seed(0), fast_decode=fast_decode)
    prompts = [prefix + s for s in suffixes]
    with torch.no_grad():
        logp, mask = rollout.trace_logprobs(model, prompts, samples.token_lists(), temperature)
        untempered, _ = rollout.trace_logprobs(model, prompts, samples.token_lists())
    assert torch.equal(mask, samples.mask)
    assert temperature == 1.0 or (logp - untempered)[mask].abs().max() > 0.01  # T does change them
    for k, (prompt, response) in enumerate(zip(prompts, samples.token_lists())):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        logits = out.logits[0, len(prompt) - 1:-1].float() / temperature
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        torch.testing.assert_close(samples.logprobs[k, :len(response)], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(logp[k, :len(response)], expected, atol=1e-4, rtol=0)
        # last-layer hidden state (after the final norm) at the trace's final token
        torch.testing.assert_close(samples.final_hidden[k], out.hidden_states[-1][0, -1], atol=1e-4, rtol=0)


def test_no_trace_reads_the_hidden_state_at_the_prompts_last_token(tiny):
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    samples = rollout.sample_traces(model, tokenizer, prefix, suffixes, max_new_tokens=0, temperature=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert samples.token_lists() == [[], [], []] and samples.tokens.shape == (3, 0)
    assert samples.lengths.tolist() == [0, 0, 0] and not samples.finished.any()
    for k, suffix in enumerate(suffixes):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prefix + suffix]), output_hidden_states=True)
        torch.testing.assert_close(samples.final_hidden[k], out.hidden_states[-1][0, -1], atol=1e-4, rtol=0)


def test_traces_stop_at_eos_or_the_token_limit(tiny):
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    samples = rollout.sample_traces(model, tokenizer, prefix, suffixes, max_new_tokens=6, temperature=1.0,
                                    generator=torch.Generator().manual_seed(1))
    for tokens, finished, length in zip(samples.token_lists(), samples.finished, samples.lengths):
        assert len(tokens) == length <= 6
        assert finished == (tokens[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in tokens[:-1]
        assert finished or length == 6


def test_sampling_is_reproducible_and_logprob_gradient_flows(tiny):
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    first = rollout.sample_traces(model, tokenizer, prefix, suffixes, 8, generator=torch.Generator().manual_seed(5))
    second = rollout.sample_traces(model, tokenizer, prefix, suffixes, 8, generator=torch.Generator().manual_seed(5))
    assert first.token_lists() == second.token_lists()
    logp, mask = rollout.trace_logprobs(model, [prefix + s for s in suffixes], first.token_lists())
    logp[mask].sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_tiny_tokenizer_survives_save_and_reload(tiny, tmp_path):
    _, tokenizer = tiny
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Blue tent - category: camping; color: blue\n", "<answer>Not Recommend</answer>",
             "naïve café, 12 ünïcode words!", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "hello"}]
    assert (reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == "<|endoftext|>"


def _float64_copy(model):
    """The model in fp64, RMSNorm included (transformers' RMSNorm computes in fp32 whatever the input):
    two exact computations of the same function then agree to ~1e-14, so a tight tolerance can tell
    a real difference from rounding."""
    model = copy.deepcopy(model).double()

    def rms_norm(self, hidden):
        return self.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
    return model


def test_shared_prefix_update_matches_the_plain_path_in_value_and_gradient(tiny):
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    samples = rollout.sample_traces(model, tokenizer, prefix, suffixes, 7, generator=torch.Generator().manual_seed(2))
    responses = samples.token_lists()
    model = _float64_copy(model)
    weights = torch.randn(len(suffixes), samples.tokens.shape[1], generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        logp, mask = fn()
        (logp * weights[:, :logp.shape[1]] * mask).sum().backward()
        return logp.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = loss_and_grads(lambda: rollout.trace_logprobs(model, [prefix + s for s in suffixes], responses, 0.7))
    shared = loss_and_grads(lambda: rollout.trace_logprobs_shared(model, prefix, suffixes, responses, 0.7))
    assert plain[0].dtype == torch.float64
    assert torch.equal(plain[1], shared[1])
    torch.testing.assert_close(shared[0], plain[0], atol=1e-12, rtol=0)
    for name, grad in plain[2].items():
        torch.testing.assert_close(shared[2][name], grad, atol=1e-10, rtol=1e-10, msg=name)


def test_decoding_uses_the_installed_transformers_cache_keyword(tiny):
    """No deprecated keyword reaches the model: transformers 5.24 renamed past_key_values to cache and
    removes the old name in 5.40; versions before 5.24 know only past_key_values."""
    model, tokenizer = tiny
    prefix, suffixes = _prompts(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        rollout.sample_traces(model, tokenizer, prefix, suffixes, 3, generator=torch.Generator().manual_seed(0))
        rollout.trace_logprobs_shared(model, prefix, suffixes, [[1, 2], [3], [4, 5]])


def test_decode_forward_applies_lora_adapters_like_the_models_own(tiny):
    """decode.py calls the layers' own modules, so adapters (models.py) act in it as in the model's forward."""
    from machinery import models

    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    torch.manual_seed(0)
    models.add_adapters(model, 4)
    for layer in models.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 would make the adapters do nothing
    prefix, suffixes = _prompts(tokenizer)
    fast, plain = (rollout.sample_traces(model, tokenizer, prefix, suffixes, 8, generator=torch.Generator().manual_seed(4),
                                         fast_decode=fast_decode) for fast_decode in (True, False))
    assert fast.token_lists() == plain.token_lists()
    torch.testing.assert_close(fast.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.final_hidden, plain.final_hidden, atol=1e-5, rtol=0)
    base = rollout.sample_traces(tiny[0], tokenizer, prefix, suffixes, 1, temperature=0.0)
    assert (base.final_hidden - rollout.sample_traces(model, tokenizer, prefix, suffixes, 1, temperature=0.0).final_hidden).abs().max() > 1e-2


def _users(tokenizer, count, candidates=4):
    """Synthetic users with prompts of different lengths (histories of 4-10 items), K = `candidates`."""
    import data

    splits, _ = data.build_instances(sources.synthetic_raw(users=60, seed=0), data.Protocol(history=20, candidates=candidates))
    prompts = [data.encode_user(tokenizer, instance) for instance in splits["train"][:count]]
    assert len({len(prefix) for prefix, _ in prompts}) > 1  # the longest prefix pads the others: exercised
    return prompts


@pytest.fixture
def early_stops(tiny):
    """The tiny model with a third of its vocabulary as end tokens: sampled rows end at different steps and
    users at different steps (a random model alone almost never writes its one eos)."""
    model, tokenizer = tiny
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = list(range(0, model.config.vocab_size, 3))
    yield model, tokenizer
    model.generation_config.eos_token_id = saved


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_users_decoded_together_draw_what_each_draws_alone(early_stops, temperature):
    """sample_users (all users' rows in one batch) against sample_traces one user at a time: the same
    tokens, the same generator states after (so a resumed run or another torchrun rank draws the same),
    log-probs and final hidden states equal up to the attention's summation order (prefixes padded).
    The states are those of one draw of the user's K rows per step up to the step its last row ended
    (a fresh generator drawn that often), though the stop rule looks only every STOP_CHECK_EVERY steps."""
    model, tokenizer = early_stops
    prompts = _users(tokenizer, 5)
    together_generators = [torch.Generator().manual_seed(10 + u) for u in range(5)]
    alone_generators = [torch.Generator().manual_seed(10 + u) for u in range(5)]
    together = rollout.sample_users(model, tokenizer, prompts, 20, temperature, generators=together_generators)
    lengths = torch.stack([samples.lengths for samples in together])
    assert temperature == 0 or (lengths < 20).any() and len(set(lengths.max(1).values.tolist())) > 1  # users end apart
    for samples, (prefix, suffixes), together_generator, alone_generator in zip(together, prompts, together_generators,
                                                                                alone_generators):
        alone = rollout.sample_traces(model, tokenizer, prefix, suffixes, 20, temperature, generator=alone_generator)
        assert samples.token_lists() == alone.token_lists()
        assert torch.equal(samples.finished, alone.finished) and torch.equal(samples.mask, alone.mask)
        assert torch.equal(together_generator.get_state(), alone_generator.get_state())
        if temperature:
            drawn = torch.Generator().manual_seed(10 + prompts.index((prefix, suffixes)))
            for _ in range(int(alone.lengths.max())):  # next_tokens' draw: one fp64 uniform per row and step
                torch.rand(len(suffixes), dtype=torch.float64, generator=drawn)
            assert torch.equal(drawn.get_state(), alone_generator.get_state())
        torch.testing.assert_close(samples.logprobs, alone.logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(samples.final_hidden, alone.final_hidden, atol=1e-4, rtol=0)


def test_rollout_users_groups_by_rollout_rows_and_validation_rolls_out_together(tiny, monkeypatch):
    """rollout_users: groups of at most cfg.rollout_rows rows, the same K within a group; the tokens do not
    depend on the grouping. rl_run.validate (greedy) goes through it, so its users are batched too."""
    import data
    from head import ScoreHead
    from machinery import config, rl_run

    assert rollout.user_groups([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert rollout.user_groups([4, 4, 3, 3, 4], 100) == [[0, 1], [2, 3], [4]]
    assert rollout.user_groups([20, 20], 10) == [[0], [1]]  # a user larger than the bound goes alone
    model, tokenizer = tiny
    splits, _ = data.build_instances(sources.synthetic_raw(users=60, seed=0), data.Protocol(history=20, candidates=4))
    users = splits["train"][:5]
    groups, sample_users = [], rollout.sample_users

    def spy(model, tokenizer, prompts, *args):
        groups.append(len(prompts))
        return sample_users(model, tokenizer, prompts, *args)

    monkeypatch.setattr(rollout, "sample_users", spy)
    cfg = config.Config(model="tiny", max_new_tokens=6)
    traces = {}
    for rows in (8, 1000):
        cfg.rollout_rows = rows  # the field config.py is to add; rollout reads it with getattr
        generators = [torch.Generator().manual_seed(u) for u in range(5)]
        samples, _ = rollout.rollout_users(model, tokenizer, users, cfg, generators)
        traces[rows] = [s.token_lists() for s in samples]
    assert groups == [2, 2, 1, 5] and traces[8] == traces[1000]
    groups.clear()
    torch.manual_seed(0)
    rl_run.validate(model, tokenizer, ScoreHead(model.config.hidden_size, 8), users, cfg)
    assert groups == [5]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_reads_nothing_back_per_token(tiny, temperature):
    """No host sync per decode step (each would stall a GPU's queue): no .item(), no boolean indexing
    (nonzero), no `if tensor`, whatever the number of tokens; the stop rule's one read per
    STOP_CHECK_EVERY steps is a .tolist(), not counted here. (Before: 1 nonzero per step for the final
    hidden state, 1 item per step for the stop rule, 2 more per user and step inside torch.multinomial.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                        torch.ops.aten.is_nonzero.default):
                self.reads += 1
            return func(*args, **(kwargs or {}))

    model, tokenizer = tiny
    prompts = _users(tokenizer, 2)
    reads = {}
    for new_tokens in (4, 20):
        with CountReads() as counter:
            samples = rollout.sample_users(model, tokenizer, prompts, new_tokens, temperature,
                                           generators=[torch.Generator().manual_seed(u) for u in range(2)])
        assert max(int(s.lengths.max()) for s in samples) == new_tokens  # every step ran
        reads[new_tokens] = counter.reads
    assert reads[4] == reads[20] == 0


@pytest.mark.parametrize("lengths", [[7, 4, 0], [7, 4, 5]])
def test_attention_with_a_prefix_per_user_equals_each_user_alone(lengths):
    """decode.attention over U users' rows, each block attending to its own (padded) prefix, against the
    same rows of each user with its own unpadded prefix."""
    import decode

    generator = torch.Generator().manual_seed(0)
    U, R, kv_heads, G, T, S, d = 3, 2, 2, 3, 1, 5, 8
    # [7, 4, 0]: the last user has no prefix, every one of its prefix slots is padding; [7, 4, 5]: the
    # first 4 slots are every user's, only the rest is masked
    query = torch.randn(U * R, kv_heads, G, T, d, generator=generator)
    keys, values = (torch.randn(U * R, kv_heads, S, d, generator=generator) for _ in range(2))
    allowed = torch.rand(U * R, 1, 1, T, S, generator=generator) > 0.3
    allowed[..., -1] = True
    prefixes = [None if P == 0 else ([torch.randn(kv_heads, P, d, generator=generator)],
                                     [torch.randn(kv_heads, P, d, generator=generator)]) for P in lengths]
    prefix_keys, prefix_values, valid, shortest = decode.stack_prefixes(prefixes)
    assert prefix_keys[0].shape == (U, kv_heads, 7, d) and valid.sum(1).tolist() == lengths and shortest == min(lengths)
    together = decode.attention(query, keys, values, allowed, (prefix_keys[0], prefix_values[0], valid, shortest))
    for user, prefix in enumerate(prefixes):
        rows = slice(user * R, (user + 1) * R)
        alone = decode.attention(query[rows], keys[rows], values[rows], allowed[rows],
                                 None if prefix is None else (prefix[0][0], prefix[1][0]))
        torch.testing.assert_close(together[rows], alone, atol=1e-6, rtol=1e-6)


def test_inverse_cdf_hand_numbers_and_frequencies():
    """inverse_cdf against hand-placed uniforms (u * total inside each id's interval, blocks of 2 ids, a
    zero and a padded last block), and the frequencies of 400,000 draws against the probabilities within
    5 binomial standard errors, for block sizes that do and do not divide V; a zero is never drawn."""
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.3, 0.4]] * 2) * torch.tensor([[1.0], [3.0]])  # row 2 unnormalized
    for u, want in [(0.0, 0), (0.0999, 0), (0.1001, 1), (0.2999, 1), (0.3001, 3), (0.5999, 3), (0.6001, 4), (1 - 1e-12, 4)]:
        got = sampling.inverse_cdf(probs, torch.tensor([u, u], dtype=torch.float64), block=2)
        assert got.tolist() == [want, want], (u, got)
    # Zeros at both ends: u = 0 lands on the first id with mass, u = 1 (the rounding guard's case, outside
    # [0, 1)) on the last one, never on a zero or on the padding.
    edges = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0]])
    for block in (2, 3):
        for u, want in [(0.0, 3), (1.0, 4)]:
            assert sampling.inverse_cdf(edges, torch.tensor([u], dtype=torch.float64), block=block).item() == want
    generator = torch.Generator().manual_seed(0)
    p = (torch.randn(13, generator=generator) * 1.5).softmax(-1)
    p[[2, 7]] = 0.0
    p = p / p.sum()
    n = 400_000
    for block in (4, 5, 256):
        ids = sampling.inverse_cdf(p.expand(n, -1), torch.rand(n, dtype=torch.float64, generator=generator), block=block)
        counts = torch.bincount(ids, minlength=13).double()
        assert counts[[2, 7]].sum() == 0 and counts.numel() == 13
        sigma = (n * p.double() * (1 - p.double())).sqrt()
        assert ((counts - n * p.double()).abs() <= 5 * sigma + 1e-9).all(), (block, counts / n, p)


def test_next_tokens_nucleus_and_per_user_streams():
    """next_tokens with top-p 0.6 draws only the nucleus, in proportion (hand-built logits: p = .5, .3,
    .1, .1 -> the nucleus {0, 1}, renormalized .625 / .375); each user's block of rows uses its own
    generator alone (the same ids when another user's generator is different)."""
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().expand(2 * 50_000, -1)
    ids = sampling.next_tokens(logits, 1.0, 0.6, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    counts = torch.bincount(ids, minlength=4).double()
    assert counts[2:].sum() == 0
    n, p = ids.numel(), 0.625
    assert abs(counts[0] - n * p) <= 5 * (n * p * (1 - p)) ** 0.5
    other = sampling.next_tokens(logits, 1.0, 0.6, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(9)])
    assert torch.equal(ids[:50_000], other[:50_000]) and not torch.equal(ids[50_000:], other[50_000:])
