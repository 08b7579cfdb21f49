"""r2rank.rollout (Eq. 1 for several users in one `generate` call, each user's prefix cache computed once)
and r2rank.forward_traces (the update's teacher-forced pass), on the tiny model.

Oracles: transformers' own `generate` on each whole prompt alone (no shared prefix, no padding, no
other row); a plain unpadded forward per sequence for the log-probs and h_k; forward_traces with every
row holding its whole prompt (shared=False) in fp64, for values and gradients; the softmax of the
model's own logits for the distribution the tokens are drawn from.
"""
import contextlib
import types
import warnings

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

import models
import r2rank
import sources
from conftest import float64_copy
from head import ScoreHead
from protocol import Protocol, build_instances

K = 3
PROMPT_ARGS = types.SimpleNamespace(max_history=20, max_item_chars=200, prompt="self-check", max_new_tokens=6)


def load_tiny(generation_config=None):
    """--model tiny through r2rank.load_model, with weights of std 0.3: at --model tiny's 0.1 a random model
    writes nearly the same token everywhere, at 0.3 its greedy tokens vary between prompts and steps.
    generation_config: set on the model before load_model's reset, as a hub folder's file would be."""
    model, tokenizer = models.build_tiny(seed=0, init_std=0.3)
    if generation_config is not None:
        model.generation_config = generation_config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "load_offline", lambda name, seed=0, flag="--model": (model, tokenizer))
        model, tokenizer = r2rank.load_model("tiny", "cpu")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def instances():
    splits, _ = build_instances(sources.synthetic_raw(users=60, seed=0), Protocol(history=20, candidates=K))
    return splits["train"][:5]


@pytest.fixture(scope="module")
def prompts(tiny, instances):
    """Three users' (prefix, [suffix] * K), prefixes of different lengths (histories of 4-10 items)."""
    prompts = r2rank.prompt_tokens(tiny[1], instances[:3], PROMPT_ARGS)
    assert len({len(prefix) for prefix, _ in prompts}) == 3  # the longest prefix pads the others
    assert len({len(s) for _, suffixes in prompts for s in suffixes}) > 1  # and suffixes are padded too
    return prompts


@contextlib.contextmanager
def stop_tokens(model, stops):
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stops
    try:
        yield set(stops)
    finally:
        model.generation_config.eos_token_id = saved


def a_third_of_the_vocabulary(model):
    """Stop tokens under which rows end at different steps (the random model alone almost never writes its eos)."""
    return list(range(0, model.config.vocab_size, 3))


def generate_alone(model, prompt, max_new_tokens):
    """transformers' generate on one whole prompt, greedy, cut after its first stop token."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens)[0, len(prompt):].tolist()
    stops = model.generation_config.eos_token_id
    return next((out[:n + 1] for n, token in enumerate(out) if token in stops), out)


def plain_forward(model, ids):
    """The model's own forward on one unpadded sequence: (logits [T, V], last layer after the final norm [T, H])."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


def user_rows(rows, u):
    return rows[u * K:(u + 1) * K]


@pytest.mark.parametrize("stops", ["eos", "a third of the vocabulary"])
def test_greedy_traces_of_several_users_equal_generate_on_each_whole_prompt(tiny, prompts, stops):
    model, tokenizer = tiny
    with stop_tokens(model, model.generation_config.eos_token_id if stops == "eos" else a_third_of_the_vocabulary(model)):
        traces, _ = r2rank.rollout(model, tokenizer, prompts, 10, 0.0)
        expected = [generate_alone(model, prefix + suffix, 10) for prefix, suffixes in prompts for suffix in suffixes]
    assert traces == expected
    assert len({tuple(trace) for trace in traces}) > 3  # the tokens vary between rows
    assert stops == "eos" or len({len(trace) for trace in traces}) > 1  # and rows end at different steps


def test_a_prompt_with_an_empty_prefix_or_empty_suffixes_is_the_whole_prompt(tiny, prompts):
    """How the prompt is split between prefix and suffixes changes nothing: all of it in the suffixes (no
    cache), or all of it in the prefix (each row's first token is then the prefix's last)."""
    model, tokenizer = tiny
    (prefix, suffixes), other = prompts[0], prompts[1]
    whole = [prefix + suffix for suffix in suffixes]
    expected = [generate_alone(model, prompt, 6) for prompt in whole]
    no_prefix, _ = r2rank.rollout(model, tokenizer, [([], whole), other], 6, 0.0)
    assert no_prefix[:K] == expected
    no_suffix, hidden = r2rank.rollout(model, tokenizer, [(whole[1], [[]] * K), other], 6, 0.0)
    assert no_suffix[:K] == [expected[1]] * K
    with torch.no_grad():
        torch.testing.assert_close(hidden[0], plain_forward(model, whole[1] + expected[1])[1][-1], atol=1e-4, rtol=0)


def test_traces_stop_after_the_first_stop_token_or_at_the_budget(tiny, prompts):
    model, tokenizer = tiny
    with stop_tokens(model, a_third_of_the_vocabulary(model)) as stops:
        torch.manual_seed(1)
        traces, _ = r2rank.rollout(model, tokenizer, prompts, 4, 1.0)
    for trace in traces:
        assert 1 <= len(trace) <= 4 and not stops & set(trace[:-1])
        assert trace[-1] in stops or len(trace) == 4
    assert any(len(trace) < 4 for trace in traces) and any(trace[-1] not in stops for trace in traces)  # both ends seen


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_and_logprobs_equal_a_plain_forward_of_each_sequence(tiny, prompts, temperature):
    """rollout's h_k equals forward_traces' at the same traces (1e-5), and both equal the last layer of a plain
    forward at the trace's final token; forward_traces' log-probs are log softmax(logits / T) of that forward."""
    model, tokenizer = tiny
    with stop_tokens(model, a_third_of_the_vocabulary(model)):
        torch.manual_seed(2)
        traces, hidden = r2rank.rollout(model, tokenizer, prompts, 8, temperature)
    assert hidden.dtype == torch.float32 and hidden.shape == (len(prompts) * K, model.config.hidden_size)
    assert len({len(trace) for trace in traces}) > 1
    for u, (prefix, suffixes) in enumerate(prompts):
        with torch.no_grad():
            logp, mask, teacher_hidden = r2rank.forward_traces(model, prefix, suffixes, user_rows(traces, u), temperature)
            untempered = r2rank.forward_traces(model, prefix, suffixes, user_rows(traces, u), 1.0)[0]
        torch.testing.assert_close(teacher_hidden, user_rows(hidden, u), atol=1e-5, rtol=0)
        assert mask.sum(1).tolist() == [len(trace) for trace in user_rows(traces, u)]
        assert temperature == 1.0 or (logp - untempered)[mask].abs().max() > 0.01  # T does change them
        for k, (suffix, trace) in enumerate(zip(suffixes, user_rows(traces, u))):
            prompt = prefix + suffix
            with torch.no_grad():
                logits, last_layer = plain_forward(model, prompt + trace)
            expected = (logits[len(prompt) - 1:-1] / temperature).log_softmax(-1).gather(-1, torch.tensor(trace)[:, None])[:, 0]
            torch.testing.assert_close(logp[k, :len(trace)], expected, atol=1e-4, rtol=0)
            assert (logp[k, len(trace):] == 0).all()
            torch.testing.assert_close(hidden[u * K + k], last_layer[-1], atol=1e-4, rtol=0)


def test_no_trace_reads_the_hidden_state_at_the_prompts_last_token(tiny, prompts):
    model, tokenizer = tiny
    traces, hidden = r2rank.rollout(model, tokenizer, prompts, 0, 1.0)
    assert traces == [[]] * (len(prompts) * K)
    for u, (prefix, suffixes) in enumerate(prompts):
        with torch.no_grad():
            _, mask, teacher_hidden = r2rank.forward_traces(model, prefix, suffixes, [[]] * K, 1.0)
        assert not mask.any()
        torch.testing.assert_close(teacher_hidden, user_rows(hidden, u), atol=1e-5, rtol=0)
        for k, suffix in enumerate(suffixes):
            with torch.no_grad():
                torch.testing.assert_close(hidden[u * K + k], plain_forward(model, prefix + suffix)[1][-1], atol=1e-4, rtol=0)


def test_shared_prefix_equals_whole_prompts_in_value_and_gradient(tiny, prompts):
    """forward_traces through the prefix cache (shared=True) against every row holding its whole prompt, in
    fp64: the log-probs, h_k, and the gradient of a loss that reads both (the tokens and the score path)."""
    model, tokenizer = tiny
    prefix, suffixes = prompts[0]
    with stop_tokens(model, a_third_of_the_vocabulary(model)):
        torch.manual_seed(3)
        traces, _ = r2rank.rollout(model, tokenizer, [(prefix, suffixes)], 7, 1.0)
    traces[0] = []  # an empty trace among the others: h_k at its prompt's last token
    model = float64_copy(model)
    generator = torch.Generator().manual_seed(4)
    token_weights = torch.randn(K, 7, generator=generator, dtype=torch.float64)
    hidden_weights = torch.randn(K, model.config.hidden_size, generator=generator, dtype=torch.float64)

    def value_and_gradient(shared):
        model.zero_grad(set_to_none=True)
        logp, mask, hidden = r2rank.forward_traces(model, prefix, suffixes, traces, 0.7, shared=shared)
        ((logp * token_weights[:, :logp.shape[1]] * mask).sum() + (hidden * hidden_weights).sum()).backward()
        return logp.detach(), mask, hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole, shared = value_and_gradient(False), value_and_gradient(True)
    assert whole[0].dtype == torch.float64 and torch.equal(whole[1], shared[1])
    torch.testing.assert_close(shared[0], whole[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(shared[2], whole[2], atol=1e-12, rtol=0)
    for name, grad in whole[3].items():
        torch.testing.assert_close(shared[3][name], grad, atol=1e-10, rtol=1e-10, msg=name)
    assert max(g.abs().max() for g in whole[3].values()) > 1e-3


def test_sampled_traces_are_reproducible_under_torch_manual_seed(tiny, prompts):
    model, tokenizer = tiny
    drawn = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        drawn.append(r2rank.rollout(model, tokenizer, prompts, 6, 1.0))
    assert drawn[0][0] == drawn[1][0] and torch.equal(drawn[0][1], drawn[1][1])
    assert drawn[0][0] != drawn[2][0]


def test_a_hub_generation_config_does_not_change_the_sampled_distribution(tiny, prompts):
    """Qwen's generation_config.json (top_k 20, top_p 0.8, repetition penalty 1.05, temperature 0.7), set before
    load_model, is replaced: the traces are those of a model that never had it, and the first token's
    frequencies over many rows are softmax(logits / T) of the model, its tail included."""
    model, tokenizer = tiny
    hub = GenerationConfig(do_sample=True, top_k=20, top_p=0.8, repetition_penalty=1.05, temperature=0.7,
                           eos_token_id=model.generation_config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    loaded, _ = load_tiny(hub)
    for name in ("do_sample", "top_k", "top_p", "repetition_penalty", "temperature"):
        assert getattr(loaded.generation_config, name) is None, name
    drawn = []
    for policy in (model, loaded):
        torch.manual_seed(6)
        drawn.append(r2rank.rollout(policy, tokenizer, prompts, 8, 1.0)[0])
    assert drawn[0] == drawn[1]

    prompt = tokenizer("Profile: none\nCANDIDATE ITEM\n")["input_ids"], tokenizer("Red tent")["input_ids"]
    rows, temperature = 4000, 0.7
    torch.manual_seed(7)
    traces, _ = r2rank.rollout(loaded, tokenizer, [(prompt[0], [prompt[1]] * rows)], 1, temperature)
    counts = torch.bincount(torch.tensor([trace[0] for trace in traces]), minlength=loaded.config.vocab_size).double()
    with torch.no_grad():
        p = (plain_forward(loaded, prompt[0] + prompt[1])[0][-1].double() / temperature).softmax(-1)
    assert ((counts - rows * p).abs() <= 5 * (rows * p * (1 - p)).sqrt() + 1).all()
    order = p.argsort(descending=True)
    nucleus = order[:int((p[order].cumsum(0) < 0.8).sum()) + 1]  # top-p 0.8's tokens
    for kept in (order[:20], nucleus):  # what top-k 20 and top-p 0.8 would keep
        tail, drawn_tail = 1 - p[kept].sum(), 1 - counts[kept].sum() / rows
        assert tail > 0.05 and abs(drawn_tail - tail) <= 5 * (tail * (1 - tail) / rows).sqrt()


def test_scores_do_not_depend_on_how_many_users_share_a_generate_call(tiny, instances, monkeypatch):
    """score_users rolls out ROLLOUT_ROWS // K whole users per call; the greedy scores are the same for any grouping."""
    model, tokenizer = tiny
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 8)
    calls, rollout = [], r2rank.rollout

    def counted(model, tokenizer, prompts, *args):
        calls.append(len(prompts))
        return rollout(model, tokenizer, prompts, *args)

    monkeypatch.setattr(r2rank, "rollout", counted)
    scores = {}
    for rows in (2 * K, 1000):
        monkeypatch.setattr(r2rank, "ROLLOUT_ROWS", rows)
        scores[rows] = r2rank.score_users(model, tokenizer, head, instances, PROMPT_ARGS, torch.float32)
    assert calls == [2, 2, 1, 5] and scores[1000].shape == (5, K)
    torch.testing.assert_close(scores[2 * K], scores[1000], atol=1e-5, rtol=0)


def test_the_installed_transformers_cache_keyword_is_used(tiny, prompts):
    """No deprecated keyword reaches the model: transformers 5.24 renamed past_key_values to cache."""
    model, tokenizer = tiny
    prefix, suffixes = prompts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        r2rank.rollout(model, tokenizer, prompts[:1], 3, 1.0)
        r2rank.forward_traces(model, prefix, suffixes, [[1, 2], [3], [4, 5]], 1.0)


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
