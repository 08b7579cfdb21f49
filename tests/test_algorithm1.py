"""algorithm1.py (Algorithm 1 in one file, on transformers' generate and forward) pinned to r2rank's full path.

The oracle is r2rank.py's own step: on one fixed batch (the same prompts, traces, weights and rankings; the
tiny model and head in fp64) algorithm1.rl_step and the phases of train_rl (r2rank.llm_advantages,
ppo.score_gradient, r2rank.update_llm -> rollout.ppo_update with the shared prefix and micro-batches of 2,
ppo.reinforce_loss, r2rank.update_head) give the same losses, the same gradients of every LLM and head
weight at every optimizer step (both PPO epochs, the second under the clipped ratio; the LLM's before and after
the norm clipping), and the same weights after, with the token term alone and with the score path, for both
advantages. They agree to ~1e-13 of each tensor's size; the test asks for 1e-6. The settings are the
README quickstart's, parsed by config.py, so a changed quickstart or default that algorithm1.py does not
follow fails here too.
"""
import dataclasses
import os
import shlex
import types

import pytest
import torch

import algorithm1
import data
import plackett_luce
import ppo
import r2rank
import rollout
from head import ScoreHead, score_traces
from metrics import ndcg_at_k
from machinery import config, datasets, models

from conftest import ROOT, run_script
from test_rollout import _float64_copy

TOLERANCE = 1e-6  # relative to each tensor's size (fp64: the two paths agree to ~1e-13)


def quickstart_flags():
    """The README quickstart's r2rank.py flags (--data, --out and --eval-every left out) and data.py's --candidates."""
    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    rl = next(line for line in text.splitlines() if line.startswith("python r2rank.py --stage rl --model tiny"))
    flags = shlex.split(rl.split("#")[0])[2:]
    for name in ("--data", "--out", "--eval-every"):
        del flags[flags.index(name):flags.index(name) + 2]
    synthetic = shlex.split(next(line for line in text.splitlines() if line.startswith("python data.py synthetic --pointwise")))
    return flags, int(synthetic[synthetic.index("--candidates") + 1])


def test_constants_are_the_quickstarts():
    flags, candidates = quickstart_flags()
    cfg = config.parse_config(flags)
    a = algorithm1
    assert (a.MODEL, a.SEED, a.CANDIDATES, a.STEPS) == (cfg.model, cfg.seed, candidates, cfg.max_steps)
    assert (a.MAX_HISTORY, a.MAX_ITEM_CHARS, a.MAX_NEW_TOKENS, a.TEMPERATURE) == (cfg.max_history, cfg.max_item_chars,
                                                                                 cfg.max_new_tokens, cfg.temperature)
    assert (a.USERS_PER_STEP, a.NUM_RANKINGS, a.REWARD_K, a.PL_STD) == (cfg.users_per_step, cfg.num_rankings, cfg.reward_k, cfg.pl_std)
    assert (a.ADVANTAGE, a.SCORE_PATH, a.BASELINE) == (cfg.advantage, cfg.score_path, cfg.baseline)
    assert (a.PPO_EPOCHS, a.CLIP_EPS, a.MAX_GRAD_NORM) == (cfg.ppo_epochs, cfg.clip_eps, cfg.max_grad_norm)
    assert (a.LR, a.HEAD_LR, a.HEAD_WIDTH, a.HEAD_WEIGHT_DECAY) == (cfg.lr, cfg.head_lr, cfg.head_width, cfg.head_weight_decay)
    assert (a.EVAL_USERS, cfg.prompt, cfg.response_prefix, cfg.top_p) == (cfg.eval_users, "self-check", "", 1.0)


class RecordingAdamW:
    """AdamW that records every weight's gradient at each step(), before it steps (after the clipping), and
    (unclipped) the gradients each call of torch.nn.utils.clip_grad_norm_ is given."""

    def __init__(self, module, monkeypatch=None, **kwargs):
        self.named, self.inner, self.grads = list(module.named_parameters()), torch.optim.AdamW(module.parameters(), **kwargs), []
        self.unclipped = []
        if monkeypatch:
            clip = torch.nn.utils.clip_grad_norm_

            def recording_clip(parameters, max_norm):
                parameters = list(parameters)
                self.unclipped.append([p.grad.clone() for p in parameters])
                return clip(parameters, max_norm)
            monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)

    def step(self):
        self.grads.append({name: p.grad.clone() for name, p in self.named})
        self.inner.step()

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two users of K = 4 candidates of the pointwise set, fixed traces of 1-4 tokens, the fp64 tiny model
    with weights of std 0.3 (--model tiny's are 0.1): its token log-probs spread widely, so that one step
    moves the tokens' ratios by different amounts and the second epoch clips some of them, not all."""
    folder = str(tmp_path_factory.mktemp("pointwise") / "data")
    datasets.build_synthetic(folder, users=20, pointwise=True, candidates=4)
    instances = data.load_split(folder, "train")[:2]
    model, tokenizer = models.build_tiny(seed=0, init_std=0.3)
    generator = torch.Generator().manual_seed(1)
    traces = [[torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths] for lengths in ([2, 1, 3, 4], [1, 4, 2, 2])]
    return instances, _float64_copy(model.eval()), tokenizer, traces


def algorithm1_step(monkeypatch, instances, model, tokenizer, traces, cfg):
    """algorithm1.rl_step on the fixed traces, under cfg's advantage and score path: (row, rankings, LLM
    losses per llm_loss call, the LLM's and the head's recording optimizers, the head)."""
    monkeypatch.setattr(algorithm1, "ADVANTAGE", cfg.advantage)
    monkeypatch.setattr(algorithm1, "SCORE_PATH", cfg.score_path)
    monkeypatch.setattr(algorithm1, "rollout", lambda *args, **kwargs: [t for user in traces for t in user])
    losses, sampled = [], []
    monkeypatch.setattr(algorithm1, "llm_loss", recording(ppo.llm_loss, losses))
    monkeypatch.setattr(plackett_luce, "sample", recording(plackett_luce.sample, sampled))
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 8).double()
    optimizers = {"llm": RecordingAdamW(model, monkeypatch, lr=cfg.lr, weight_decay=0.0),
                  "head": RecordingAdamW(head, lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)}
    row = algorithm1.rl_step(model, tokenizer, head, optimizers, instances, torch.Generator().manual_seed(2))
    monkeypatch.undo()
    return row, sampled[0], losses, optimizers, head


def recording(function, calls):
    def wrapper(*args, **kwargs):
        out = function(*args, **kwargs)
        calls.append(out)
        return out
    return wrapper


def r2rank_step(monkeypatch, instances, model, tokenizer, traces, rankings, cfg):
    """train_rl's phases 2-4 on the same traces and rankings, through r2rank.py's functions."""
    prompts = [data.encode_user(tokenizer, inst, cfg.max_history, cfg.max_item_chars, cfg.response_prefix,
                                data.PROMPTS[cfg.prompt]) for inst in instances]
    samples = []
    for (prefix, suffixes), user_traces in zip(prompts, traces):  # what rollout.sample_users returns, h_k included
        with torch.no_grad():
            final_hidden = rollout.trace_logprobs_shared(model, prefix, suffixes, user_traces, cfg.temperature, True)[2]
        lengths = torch.tensor([len(t) for t in user_traces])
        width = int(lengths.max())
        tokens = torch.tensor([t + [0] * (width - len(t)) for t in user_traces])  # right-padded
        samples.append(rollout.Traces(tokens, torch.zeros(tokens.shape), torch.arange(width)[None] < lengths[:, None],
                                       lengths, torch.zeros(len(lengths), dtype=torch.bool), final_hidden))
    losses = []
    monkeypatch.setattr(rollout, "llm_loss", recording(ppo.llm_loss, losses))
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 8).double()
    run = types.SimpleNamespace(model=model, head=head, shared_prefix=True, dtype=torch.float32,  # fp32: no autocast
                                optimizers={"llm": RecordingAdamW(model, monkeypatch, lr=cfg.lr, weight_decay=0.0),
                                            "head": RecordingAdamW(head, lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)})
    labels = torch.tensor([inst["labels"] for inst in instances], dtype=torch.float32)
    # r2rank.train_rl, phases 2-4, line for line
    raw_scores = score_traces(run.head, samples)
    scores = plackett_luce.standardized(raw_scores, cfg.pl_std)
    reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), cfg.reward_k)
    baseline = ppo.leave_one_out_baseline(reward) if cfg.baseline else None
    advantages = r2rank.llm_advantages(cfg, raw_scores, labels, reward, None)
    score_grads = ppo.score_gradient(raw_scores, rankings, reward, baseline, cfg.pl_std) if cfg.score_path else None
    r2rank.update_llm(run, cfg, prompts, samples, advantages, score_grads)
    head_loss = ppo.reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
    r2rank.update_head(run, head_loss * 1.0)
    monkeypatch.undo()
    return reward, head_loss.item(), losses, run.optimizers, head


def assert_same(got, expected, what):
    """|got - expected| <= TOLERANCE x max |expected| (and 1e-12), tensor by tensor."""
    scale = max(float(expected.abs().max()), 1e-6)
    assert float((got - expected).abs().max()) <= TOLERANCE * scale, (what, float((got - expected).abs().max()), scale)


def per_epoch(losses, calls_per_epoch):
    return [sum(loss.item() for loss, _ in losses[i:i + calls_per_epoch]) for i in range(0, len(losses), calls_per_epoch)]


@pytest.mark.parametrize("advantage", ["reward", "batch"])
@pytest.mark.parametrize("score_path", [False, True])
def test_step_equals_r2rank_full_path(batch, monkeypatch, advantage, score_path):
    instances, model, tokenizer, traces = batch
    flags, _ = quickstart_flags()
    # --lr 1e-5, not the quickstart's 3e-3: there the second epoch clips every token's ratio (no gradient to compare)
    cfg = config.parse_config(flags + ["--users-per-step", "2", "--micro-batch", "2", "--advantage", advantage, "--lr", "1e-5"]
                              + ([] if score_path else ["--no-score-path"]))
    prompts = [algorithm1.self_check_prompts(tokenizer, inst) for inst in instances]
    assert prompts == [[p + s for s in suffixes] for p, suffixes in (data.encode_user(tokenizer, inst, 0) for inst in instances)]
    mine = _float64_copy(model)
    row, rankings, losses, optimizers, head = algorithm1_step(monkeypatch, instances, mine, tokenizer, traces, cfg)
    theirs = _float64_copy(model)
    reward, head_loss, their_losses, their_optimizers, their_head = r2rank_step(monkeypatch, instances, theirs, tokenizer,
                                                                               traces, rankings, cfg)

    assert rankings.shape == (2, cfg.num_rankings, 4)
    assert row["reward"] == pytest.approx(reward.mean().item(), abs=1e-12)
    assert row["head_loss"] == pytest.approx(head_loss, rel=TOLERANCE)
    mine_epochs, their_epochs = per_epoch(losses, 2), per_epoch(their_losses, 4)  # 2 users, in 1 or 2 micro-batches each
    assert len(mine_epochs) == len(their_epochs) == 2
    assert mine_epochs == pytest.approx(their_epochs, rel=TOLERANCE)  # the step's loss, each PPO epoch
    second = [stats["clip_frac"] for _, stats in their_losses[4:]]
    assert 0 < sum(second) / len(second) < 1, second  # the second epoch clips some ratios, not all
    for name in ("llm", "head"):
        assert len(optimizers[name].grads) == len(their_optimizers[name].grads) == (2 if name == "llm" else 1)
        for step, (got, expected) in enumerate(zip(optimizers[name].grads, their_optimizers[name].grads)):
            for weight in expected:
                assert_same(got[weight], expected[weight], f"{name} step {step} {weight}")
    assert len(optimizers["llm"].unclipped) == len(their_optimizers["llm"].unclipped) == 2
    for epoch, (got, expected) in enumerate(zip(optimizers["llm"].unclipped, their_optimizers["llm"].unclipped)):
        for (weight, _), mine_grad, their_grad in zip(their_optimizers["llm"].named, got, expected):
            assert_same(mine_grad, their_grad, f"llm epoch {epoch} {weight}, before the clipping")
    for (weight, got), expected in zip(list(mine.named_parameters()) + list(head.named_parameters()),
                                       list(theirs.parameters()) + list(their_head.parameters())):
        assert_same(got.detach(), expected.detach(), f"after the step: {weight}")
    if score_path:  # power: without the score path algorithm1's first gradient is far from r2rank's with it
        without = algorithm1_step(monkeypatch, instances, _float64_copy(model), tokenizer, traces,
                                  dataclasses.replace(cfg, score_path=False))[3]["llm"].grads[0]
        expected = their_optimizers["llm"].grads[0]
        assert max(float((without[w] - expected[w]).abs().max() / expected[w].abs().max()) for w in expected) > 1e-3


def test_rollout_is_the_fast_paths(batch):
    """Phase 1-2 against rollout.sample_traces (decode.py's KV-cache decoding): the same greedy traces, and
    forward's log-probs and h_k equal those read while decoding (fp32)."""
    instances, _, tokenizer, _ = batch
    model, _ = models.build_tiny(seed=0)
    model.eval()
    prefix, suffixes = data.encode_user(tokenizer, instances[0], 0)
    prompts = algorithm1.self_check_prompts(tokenizer, instances[0])
    greedy = algorithm1.rollout(model, tokenizer, prompts, max_new_tokens=6, temperature=0.0)
    decoded = rollout.sample_traces(model, tokenizer, prefix, suffixes, 6, temperature=0.0)
    assert greedy == decoded.token_lists()
    with torch.no_grad():
        logp, mask, hidden = algorithm1.forward(model, prompts, greedy, temperature=1.0)
    torch.testing.assert_close(logp[mask], decoded.logprobs[decoded.mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden, decoded.final_hidden, atol=1e-4, rtol=1e-4)
    # sampled at temperature 1 from the whole softmax: generate's default top_k 50 would never draw a token
    # outside the 50 likeliest, which hold this much of the mass here
    torch.manual_seed(3)
    first = algorithm1.rollout(model, tokenizer, prompts[:1] * 400, max_new_tokens=1, temperature=1.0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    outside = ~torch.isin(torch.arange(len(logits)), logits.topk(50).indices)
    drawn_outside = sum(outside[trace[0]].item() for trace in first)
    assert logits.softmax(-1)[outside].sum() > 0.05 and drawn_outside > 0
    assert all(len(trace) == 1 for trace in first)


def test_script_prints_a_curve(monkeypatch):
    """python algorithm1.py, cut to 2 steps: the start's and the end's validation NDCG@10 and a line per step."""
    monkeypatch.setenv("ALGORITHM1_STEPS", "2")
    result = run_script(os.path.join(ROOT, "algorithm1.py"), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    curve = [float(line.split()[-1]) for line in lines if "valid_ndcg@10" in line]
    steps = [line for line in lines if " reward " in line]
    assert len(curve) == 2 and all(0 <= value <= 1 for value in curve), result.stdout
    assert len(steps) == 2 and all(0 <= float(line.split()[3]) <= 1 for line in steps), result.stdout
