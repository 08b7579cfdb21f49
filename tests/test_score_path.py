"""The score path: the head's gradient carried into the LLM through h_k (departure 7 in r2rank.py).

Oracles: the expected value of ppo.score_gradient over every ranking (and every pair of rankings,
for the leave-one-out baseline), against finite differences of V(s) computed from Plackett-Luce's
product formula written out here; and one update of r2rank.ppo_update on the tiny model in fp64,
against central finite differences of the objective it claims to ascend,

    F(theta) = (1 / D) [ sum_k A_k log pi_theta(y_k) + sum_u V(std(s_u(theta))) ],   s_uk = f_phi(h_k(theta, y_k)),

computed from a plain unpadded forward per sequence (no cache, no shared prefix, no batching), with
V enumerated over all K! rankings and the traces y held fixed (the token term covers their law).
"""
import itertools
import math
import types

import pytest
import torch

import models
import r2rank
from conftest import float64_copy
from head import ScoreHead
from metrics import ndcg_at_k
from plackett_luce import standardized
from ppo import leave_one_out_baseline, score_gradient


def _pl_probability(scores, ranking):
    """P(ranking | scores) by Eq. (4)'s product, one factor per position (plain Python sums)."""
    remaining, probability = list(ranking), 1.0
    for item in ranking:
        probability = probability * torch.exp(scores[item]) / sum(torch.exp(scores[j]) for j in remaining)
        remaining.remove(item)
    return probability


def _value(scores, labels, k=10):
    """V(s) = sum over all K! rankings of P(tau | s) NDCG@k(tau). scores [K] (differentiable), labels [K]."""
    perms = list(itertools.permutations(range(len(labels))))
    gains = ndcg_at_k(labels[torch.tensor(perms)], k)
    return sum(_pl_probability(scores, perm) * gain for perm, gain in zip(perms, gains))


def _finite_difference_gradient(f, x, eps=1e-6):
    return torch.stack([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in torch.eye(len(x), dtype=x.dtype)])


@pytest.mark.parametrize("std", [0.0, 1.5])
def test_score_gradient_is_unbiased_for_dv_ds(std):
    """E[score_gradient] over the rankings' law equals dV/ds w.r.t. the raw scores, through --pl-std too:
    one ranking (every permutation weighted by its probability), and two rankings with the
    leave-one-out baseline (every ordered pair)."""
    raw = torch.tensor([0.4, -0.7, 1.3, 0.1], dtype=torch.float64)
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    exact = _finite_difference_gradient(lambda s: _value(standardized(s[None], std)[0], labels, 3), raw)
    perms = list(itertools.permutations(range(4)))
    sharp = standardized(raw[None], std)[0]
    probability = {perm: float(_pl_probability(sharp, perm)) for perm in perms}
    gain = {perm: ndcg_at_k(labels[list(perm)], 3) for perm in perms}

    one = sum(probability[p] * score_gradient(raw[None], torch.tensor([[p]]), gain[p].reshape(1, 1), std=std)[0]
              for p in perms)
    torch.testing.assert_close(one, exact, atol=1e-8, rtol=0)

    two = torch.zeros(4, dtype=torch.float64)
    for p, q in itertools.product(perms, repeat=2):
        reward = torch.stack([gain[p], gain[q]])[None]  # [1, 2]
        g = score_gradient(raw[None], torch.tensor([[p, q]]), reward, leave_one_out_baseline(reward), std)[0]
        two += probability[p] * probability[q] * g
    torch.testing.assert_close(two, exact, atol=1e-8, rtol=0)
    assert exact.abs().max() > 0.01  # a real signal to match
    # Power: the gradient w.r.t. the standardized scores, not chained back to the raw ones, is another vector.
    if std:
        unchained = sum(probability[p] * score_gradient(sharp[None], torch.tensor([[p]]), gain[p].reshape(1, 1))[0]
                        for p in perms)
        assert (unchained - exact).abs().max() > 0.01


class RecordingOptimizer:
    """Stands in for AdamW: records each parameter's gradient at every step() and changes nothing."""

    def __init__(self, model):
        self.named = list(model.named_parameters())
        self.steps = []

    def step(self):
        self.steps.append({name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for name, p in self.named})

    def zero_grad(self, set_to_none=True):
        for _, p in self.named:
            p.grad = None


def update_args(**changes):
    return types.SimpleNamespace(**{**dict(ppo_epochs=2, micro_batch=2, temperature=1.0, clip_eps=0.2), **changes})


def two_users(tokenizer):
    """Two users of K = 3 candidates: prefixes of different lengths, suffixes of different lengths."""
    prefix = tokenizer("Instructions and a user context, shared by all candidates.\n")["input_ids"]
    suffixes = [tokenizer(text)["input_ids"] for text in ["Red tent", "Blue watering can - category: gardening", "Gamepad"]]
    assert len({len(s) for s in suffixes}) == 3
    return [(prefix, suffixes), (prefix[:-2], suffixes[::-1])]


@pytest.fixture(scope="module")
def setting():
    """The tiny model in fp64, a head, two users' prompts."""
    model, tokenizer = models.build_tiny(seed=0)
    model = float64_copy(model.eval())
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 8).double()
    return model, head, two_users(tokenizer)


def _oracle(model, head, prompts, responses, temperature):
    """Per user: [K] log pi(y_k) and [K] s_k, each sequence through the model alone (fp64, with grad)."""
    logps, scores = [], []
    for (prefix, suffixes), user_responses in zip(prompts, responses):
        user_logp, user_scores = [], []
        for suffix, response in zip(suffixes, user_responses):
            ids = torch.tensor([prefix + suffix + response])
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]  # [T, H]
            logits = model.get_output_embeddings()(hidden[-len(response) - 1:-1]) / temperature  # predict the response
            targets = torch.tensor(response, dtype=torch.long)[:, None]
            user_logp.append(logits.log_softmax(-1).gather(-1, targets).sum())  # 0 for an empty trace
            user_scores.append(head(hidden[-1]))  # the response's last token, or the prompt's
        logps.append(torch.stack(user_logp))
        scores.append(torch.stack(user_scores))
    return torch.stack(logps), torch.stack(scores)


@pytest.mark.parametrize("layout", ["shared prefix", "whole prompts (gradient checkpointing)"])
@pytest.mark.parametrize("trace_lengths", [[[2, 1, 3], [1, 4, 2]], [[0, 0, 0], [0, 0, 0]]])
def test_update_gradient_is_the_exact_gradient_of_the_objective(setting, layout, trace_lengths, monkeypatch):
    """The first PPO epoch's gradient (tokens + score path, micro-batches of 2 over K = 3, --pl-std 1)
    equals finite differences of F along random directions of every weight; with empty traces
    (--max-new-tokens 0) it is the score path alone, D = the trace count, and there is no second epoch.
    The second layout is the one --gradient-checkpointing runs: every row holds its whole prompt."""
    model, head, prompts = setting
    std, temperature, labels = 1.0, 0.7, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    responses = [[torch.randint(3, 200, (n,), generator=generator).tolist() for n in user] for user in trace_lengths]
    advantages = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    tokens = sum(map(sum, trace_lengths))
    divisor = tokens or 6

    def objective():
        logp, scores = _oracle(model, head, prompts, responses, temperature)
        values = sum(_value(standardized(scores[u][None], std)[0], labels[u], 10) for u in range(2))
        return ((advantages * logp).sum() + values) / divisor

    with torch.no_grad():  # g = dV/ds at theta, w.r.t. the raw scores, by finite differences of V
        raw = _oracle(model, head, prompts, responses, temperature)[1]
        score_grads = torch.stack([_finite_difference_gradient(lambda s: _value(standardized(s[None], std)[0], labels[u]),
                                                               raw[u]) for u in range(2)])
    layouts = []
    forward_traces = r2rank.forward_traces

    def recorded(*args, **kwargs):
        layouts.append(kwargs.get("shared", args[5] if len(args) > 5 else True))
        return forward_traces(*args, **kwargs)

    monkeypatch.setattr(r2rank, "forward_traces", recorded)
    monkeypatch.setattr(r2rank, "MAX_GRAD_NORM", 1e30)  # the gradient itself, not its clipped step
    if layout != "shared prefix":
        model.activation_checkpointing_enable()  # as r2rank.train_rl switches it on

    def update(**kwargs):
        optimizer = RecordingOptimizer(model)
        r2rank.ppo_update(model, optimizer, prompts, responses, advantages, update_args(temperature=temperature), **kwargs)
        assert len(optimizer.steps) == (2 if tokens else 1)  # no tokens: no second epoch to move AdamW
        assert all(p.grad is None for p in head.parameters())  # phi learns from Eq. 5 only
        return optimizer.steps[0]

    try:
        gradient = update(head=head, score_grads=score_grads)
        without = update()  # --no-score-path: the tokens alone
        monkeypatch.setattr(r2rank, "forward_traces", lambda *args, **kwargs: _detached_hidden(recorded(*args, **kwargs)))
        detached = update(head=head, score_grads=score_grads)  # a mutation: h_k without its gradient
    finally:
        if layout != "shared prefix":
            model.activation_checkpointing_disable()
    assert set(layouts) == {layout == "shared prefix"}

    generator = torch.Generator().manual_seed(2)
    parameters = dict(model.named_parameters())
    for _ in range(2):
        direction = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in parameters.items()}
        norm = math.sqrt(sum(float((d * d).sum()) for d in direction.values()))
        direction = {name: d / norm for name, d in direction.items()}  # a unit step in weight space
        eps = 1e-4
        with torch.no_grad():
            values = []
            for sign in (1, -1):
                for name, p in parameters.items():
                    p.add_(sign * eps * direction[name])
                values.append(objective())
                for name, p in parameters.items():
                    p.sub_(sign * eps * direction[name])
        numeric = (values[0] - values[1]) / (2 * eps)

        def along(grads):  # the update descends the loss, so - gradient . direction is F's slope
            return -sum((grads[name] * direction[name]).sum() for name in parameters)

        assert math.isclose(along(gradient), numeric, rel_tol=1e-6, abs_tol=1e-10), (float(along(gradient)), float(numeric))
        for wrong in (without, detached):  # leaving the score path out (or cutting it at h_k) fails the check
            assert abs(along(wrong) - numeric) > 1e-4 * max(abs(numeric), 1e-3), (float(along(wrong)), float(numeric))


def _detached_hidden(out):
    logp, mask, hidden = out
    return logp, mask, hidden.detach()


@pytest.mark.parametrize("max_new_tokens", [0, 5])
def test_update_hidden_state_is_where_the_rollout_reads_it(monkeypatch, max_new_tokens):
    """The h_k that ppo_update's score path reads (its forward, in micro-batches) is the rollout's, with and
    without a trace: f_phi of it is the score the step ranked by."""
    model, tokenizer = models.build_tiny(seed=0)
    model.eval()
    prompts = two_users(tokenizer)
    torch.manual_seed(3)
    flat, hidden = r2rank.rollout(model, tokenizer, prompts, max_new_tokens, 1.0)
    assert hidden.abs().max() > 0.1  # a real hidden state, so a gap would show
    seen, forward_traces = [], r2rank.forward_traces

    def recorded(*args, **kwargs):
        out = forward_traces(*args, **kwargs)
        seen.append(out[2].detach())
        return out

    monkeypatch.setattr(r2rank, "forward_traces", recorded)
    head = ScoreHead(model.config.hidden_size, 8)
    traces = [flat[:3], flat[3:]]
    r2rank.ppo_update(model, RecordingOptimizer(model), prompts, traces, torch.zeros(2, 3), update_args(ppo_epochs=1),
                      head=head, score_grads=torch.zeros(2, 3))
    assert [len(h) for h in seen] == [2, 1, 2, 1]  # micro-batches of 2 over K = 3, per user
    torch.testing.assert_close(torch.cat(seen), hidden, atol=1e-5, rtol=0)
