"""The score path: the head's gradient carried into the LLM through h_k (departure 7 in r2rank.py).

Oracles: the expected value of ppo.score_gradient over every ranking (and every pair of rankings,
for the leave-one-out baseline), against finite differences of V(s) computed from Plackett-Luce's
product formula written out here; and one update of rollout.ppo_update on the tiny model in fp64,
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

from machinery import models
from head import ScoreHead
import rollout
from metrics import ndcg_at_k
from plackett_luce import standardized
from ppo import leave_one_out_baseline, score_gradient

from test_rollout import _float64_copy, _prompts


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


@pytest.fixture(scope="module")
def setting():
    """The tiny model in fp64, a head, two users of K = 3 candidates (their prompts share a prefix)."""
    model, tokenizer = models.build_tiny(seed=0)
    model = _float64_copy(model.eval())
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 8).double()
    prefix, suffixes = _prompts(tokenizer)
    prompts = [(prefix, suffixes), (prefix[:-2], suffixes[::-1])]  # two users
    return model, head, prompts


def _traces(responses, hidden_size):
    """Traces holding fixed traces: the update reads the tokens (and, for its gap statistics, the rest)."""
    width = max(1, max(len(r) for r in responses))
    lengths = torch.tensor([len(r) for r in responses])
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in responses], dtype=torch.long)  # right-padded
    return rollout.Traces(tokens, torch.zeros(len(responses), width), torch.arange(width)[None] < lengths[:, None],
                           lengths, lengths > 0, torch.zeros(len(responses), hidden_size))


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


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("trace_lengths", [[[2, 1, 3], [1, 4, 2]], [[0, 0, 0], [0, 0, 0]]])
def test_update_gradient_is_the_exact_gradient_of_the_objective(setting, shared_prefix, trace_lengths, monkeypatch):
    """The first PPO epoch's gradient (tokens + score path, micro-batches of 2 over K = 3, --pl-std 1)
    equals finite differences of F along random directions of every weight; with empty traces
    (--max-new-tokens 0) it is the score path alone, D = the trace count, and there is no second epoch."""
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

    def update(**kwargs):
        optimizer = RecordingOptimizer(model)
        cfg = types.SimpleNamespace(ppo_epochs=2, micro_batch=2, temperature=temperature, clip_eps=0.2, max_grad_norm=1e30)
        traces = [_traces(r, model.config.hidden_size) for r in responses]
        rollout.ppo_update(model, optimizer, prompts, traces, advantages, cfg, shared_prefix, **kwargs)
        assert len(optimizer.steps) == (2 if tokens else 1)  # no tokens: no second epoch to move AdamW
        assert all(p.grad is None for p in head.parameters())  # phi learns from Eq. 5 only
        return optimizer.steps[0]

    gradient = update(head=head, score_grads=score_grads)
    without = update()  # --no-score-path: the tokens alone
    monkeypatch.setattr(rollout, "trace_logprobs_shared" if shared_prefix else "trace_logprobs",
                        _detaching(getattr(rollout, "trace_logprobs_shared" if shared_prefix else "trace_logprobs")))
    detached = update(head=head, score_grads=score_grads)  # a mutation: h_k without its gradient

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


def _detaching(function):
    def wrapper(*args, **kwargs):
        out = function(*args, **kwargs)
        return (*out[:2], out[2].detach()) if len(out) == 3 else out
    return wrapper


def test_update_hidden_state_is_where_the_rollout_reads_it(setting):
    """The update's h_k is the rollout's: the scores it computes from its own forward equal the ones
    the head gave the decoded traces (decode_score_gap), with and without a trace."""
    model, head, prompts = setting
    model_fp32, tokenizer = models.build_tiny(seed=0)
    for max_new_tokens in (0, 5):
        traces = [rollout.sample_traces(model_fp32, tokenizer, prefix, suffixes, max_new_tokens,
                                         generator=torch.Generator().manual_seed(3)) for prefix, suffixes in prompts]
        cfg = types.SimpleNamespace(ppo_epochs=1, micro_batch=2, temperature=1.0, clip_eps=0.2, max_grad_norm=1.0)
        head32 = ScoreHead(model_fp32.config.hidden_size, 8)
        stats = rollout.ppo_update(model_fp32, RecordingOptimizer(model_fp32), prompts, traces, torch.zeros(2, 3), cfg,
                                   True, head=head32, score_grads=torch.zeros(2, 3))
        assert stats["decode_score_gap"] < 1e-4
        assert traces[0].final_hidden.abs().max() > 0.1  # a real hidden state, so a gap would show
