"""The bf16 tier: the RL paths under CPU bf16 autocast, which follows CUDA autocast's casting and caching
rules (only slowly), checked against something independent of the path itself.

The fault this tier guards against: autocast keeps the bf16 copy of each trained fp32 weight until
the outermost autocast context exits, and an in-place optimizer step does not refresh it. A PPO
epoch after a step taken inside the context computes with the old weights (ratio 1, approx_kl 0).
The oracles: a fresh model built from a snapshot of the weights after the step (new tensors, so no
cached copy can serve it), and the same run in fp32, where autocast caches nothing.

Tolerances: a fresh model with the same weights runs the same operations in the same dtypes, so its
log-probs equal the run's to fp32 summation noise (1e-5). bf16 against fp32 differs by rounding, and
the rounding changes which tokens are sampled, so the two runs update on different traces: the
second epoch's approx_kl is asked to lie within a factor of 2 of fp32's (a stale epoch gives exactly
0 with LoRA, and a small share of fp32's with all weights).
"""
import json
import types

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import data
import lora
import models
import r2rank
from conftest import run_cli
from head import ScoreHead

BF16 = torch.bfloat16
PROMPT_ARGS = types.SimpleNamespace(max_history=3, max_item_chars=200, prompt="self-check")


def tiny_policy(adapters, frozen=False):
    """The tiny model with LoRA adapters (rank 4) or every weight trained, frozen weights held in bf16
    (as r2rank.train_rl prepares it)."""
    model, tokenizer = r2rank.load_model("tiny", "cpu")
    torch.manual_seed(0)
    if frozen:
        model.requires_grad_(False)
        trained = []
    else:
        trained = lora.add_adapters(model, 4) if adapters else list(model.parameters())
    lora.hold_frozen_weights(model, BF16)
    return model.eval(), tokenizer, trained


def autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "all-weights"])
@pytest.mark.parametrize("layout", ["shared-prefix", "whole-prompts"])
def test_each_ppo_epoch_computes_with_the_weights_of_the_step_before(synthetic_dir, monkeypatch, adapters, layout):
    """Epoch 2's log-probs are those of a fresh model holding the weights after epoch 1's step (ratio != 1);
    whole-prompts is the layout of --gradient-checkpointing."""
    model, tokenizer, trained = tiny_policy(adapters)
    if layout == "whole-prompts":
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    args = types.SimpleNamespace(ppo_epochs=2, micro_batch=3, temperature=1.0, clip_eps=0.2)
    users = data.load_split(synthetic_dir, "train")[:2]
    K = len(users[0]["candidates"])
    prompts = r2rank.prompt_tokens(tokenizer, users, PROMPT_ARGS)
    torch.manual_seed(0)
    with autocast():  # the rollout, as r2rank.train_rl runs it
        flat, _ = r2rank.rollout(model, tokenizer, prompts, 6, 1.0)
    traces = [flat[u * K:(u + 1) * K] for u in range(len(users))]
    head = ScoreHead(model.config.hidden_size, 16)
    score_grads = torch.randn(len(users), K, generator=torch.Generator().manual_seed(1))  # the score path, in epoch 1

    snapshots, calls = [], []
    real_step, forward_traces = optimizer.step, r2rank.forward_traces

    def step_and_snapshot(*a, **kw):
        result = real_step(*a, **kw)
        snapshots.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        return result

    def recorded(*a, **kw):
        out = forward_traces(*a, **kw)
        calls.append((a[1:], kw, out[0].detach().clone()))
        return out

    monkeypatch.setattr(optimizer, "step", step_and_snapshot)
    monkeypatch.setattr(r2rank, "forward_traces", recorded)
    advantages = torch.randn(len(users), K, generator=torch.Generator().manual_seed(2))
    stats = r2rank.ppo_update(model, optimizer, prompts, traces, advantages, args, head=head, score_grads=score_grads,
                              dtype=BF16)
    monkeypatch.undo()

    half = len(calls) // 2
    first, second = calls[:half], calls[half:]
    assert len(snapshots) == 2 and len(first) == len(second) == len(users) * -(-K // 3)
    assert {a[4] for a, _, _ in calls} == {layout == "shared-prefix"}  # (prefix, suffixes, traces, temperature, shared)
    # the oracle: a new model holding the weights after epoch 1's step, in a new autocast context
    fresh, _ = r2rank.load_model("tiny", "cpu")
    if adapters:
        lora.add_adapters(fresh, 4)
    fresh.load_state_dict(snapshots[0])
    lora.hold_frozen_weights(fresh, BF16)
    fresh.train()
    moved = 0.0
    for (a, kw, logp), (_, _, old) in zip(second, first):
        with torch.no_grad(), autocast():
            expected = r2rank.forward_traces(fresh, *a, **kw)[0]
        torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
        moved = max(moved, (logp - old).abs().max().item())
    assert moved > 0.05  # lr 1e-2 moved the policy: a stale epoch 2 would repeat epoch 1's log-probs exactly
    assert stats["approx_kl"] > 1e-3 and stats["clip_frac"] > 0


def rl_rows(out):
    return {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


TINY_RUN = ["--stage", "rl", "--model", "tiny", "--device", "cpu", "--threads", 1, "--eval-every", 0, "--max-new-tokens", 4,
            "--users-per-step", 2, "--temperature", 1.0]


@pytest.mark.parametrize("adapters, lr", [(["--lora-rank", 4], 1e-2), ([], 1e-3)], ids=["lora", "all-weights"])
def test_rl_cli_in_bf16_moves_like_fp32_in_the_second_epoch(synthetic_dir, tmp_path, adapters, lr):
    kl = {}
    for dtype in ("float32", "bfloat16"):
        result = run_cli(*TINY_RUN, "--data", synthetic_dir, "--out", tmp_path / dtype, "--dtype", dtype, "--lr", lr,
                         "--ppo-epochs", 2, "--max-steps", 1, *adapters)
        assert result.returncode == 0, result.stderr
        assert f"torch.{dtype} compute" in result.stdout
        kl[dtype] = rl_rows(tmp_path / dtype)[1]["approx_kl"]
    assert kl["float32"] > 0.01
    assert 0.5 < kl["bfloat16"] / kl["float32"] < 2


def test_lora_in_bf16_saves_fp32_and_resumes_exactly(synthetic_dir, tmp_path):
    common = [*TINY_RUN, "--data", synthetic_dir, "--dtype", "bfloat16", "--lora-rank", 4, "--lr", 1e-2, "--save-every", 1]
    straight = run_cli(*common, "--out", tmp_path / "straight", "--max-steps", 2)
    assert straight.returncode == 0, straight.stderr
    first = run_cli(*common, "--out", tmp_path / "resumed", "--max-steps", 1)
    assert first.returncode == 0, first.stderr
    resumed = run_cli(*common, "--out", tmp_path / "resumed", "--max-steps", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again, once = rl_rows(tmp_path / "resumed")[2], rl_rows(tmp_path / "straight")[2]
    assert again == pytest.approx({**once, "step_time": again["step_time"]})
    # the merged checkpoint: every tensor fp32, the frozen base exactly its bf16 value plus the adapter
    checkpoint = tmp_path / "straight" / "checkpoint-1"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.float32}
        merged = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    with safe_open(str(checkpoint / "lora.safetensors"), "pt") as f:
        A, B = f.get_tensor("model.layers.0.self_attn.q_proj.lora_A"), f.get_tensor("model.layers.0.self_attn.q_proj.lora_B")
    start = models.build_tiny(seed=0)[0].model.layers[0].self_attn.q_proj.weight.detach()
    assert B.abs().max() > 0  # the adapter moved
    torch.testing.assert_close(merged, start.to(BF16).float() + 2.0 * B @ A, atol=1e-6, rtol=0)


def test_freeze_llm_in_bf16_trains_the_head_on_the_bf16_frozen_model(synthetic_dir, tmp_path):
    result = run_cli(*TINY_RUN, "--data", synthetic_dir, "--out", tmp_path / "mlp", "--dtype", "bfloat16", "--freeze-llm",
                     "--max-steps", 2)
    assert result.returncode == 0, result.stderr
    rows = rl_rows(tmp_path / "mlp")
    assert sorted(rows) == [1, 2] and all(row["head_loss"] == row["head_loss"] for row in rows.values())
    with safe_open(str(tmp_path / "mlp" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    start = models.build_tiny(seed=0)[0].model.layers[1].mlp.down_proj.weight.detach()
    assert saved.dtype == torch.float32 and torch.equal(saved, start.to(BF16).float())  # what the run computed with


class CountCasts(TorchDispatchMode):
    """Counts the casts (aten._to_copy) whose input is one of the given parameters."""

    def __init__(self, parameters):
        super().__init__()
        self.pointers, self.casts = {p.data_ptr() for p in parameters}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("adapters, frozen", [(True, False), (False, True), (False, False)],
                         ids=["lora", "freeze-llm", "all-weights"])
def test_a_rollout_casts_each_weight_at_most_once(synthetic_dir, adapters, frozen):
    """Frozen weights are held in bf16 (no cast at all); trained ones are cast once per autocast context,
    whatever the number of generated tokens. Without lora.hold_frozen_weights every frozen linear is cast
    again at every step of generate."""
    model, tokenizer, trained = tiny_policy(adapters, frozen)
    prompts = r2rank.prompt_tokens(tokenizer, data.load_split(synthetic_dir, "train")[:1], PROMPT_ARGS)
    casts = {}
    for new_tokens in (2, 10):
        counter = CountCasts(model.parameters())
        with autocast(), counter:
            traces, _ = r2rank.rollout(model, tokenizer, prompts, new_tokens, 0.0)
        assert max(map(len, traces)) == new_tokens  # the random model writes no end token: every step ran
        casts[new_tokens] = counter.casts
    linear_weights = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias) if p is not None}
    cast_once = [p for p in trained if id(p) in linear_weights or p.dim() == 2]  # linears and LoRA's A, B; not the norms
    assert casts[2] == casts[10] == (0 if frozen else len(cast_once))
    assert frozen or casts[2] > 0
    held = sum(1 for p in model.parameters() if not p.requires_grad and p.dtype == BF16)
    assert (held > 0) == (adapters or frozen)


def test_sft_in_bf16_steps_from_fresh_weights(synthetic_dir, tmp_path):
    """Every trace in one batch, two epochs: step 2's logged loss is the loss of checkpoint-1's weights on the
    same traces, computed here by a fresh model under bf16 autocast (each trace alone, whole prompts)."""
    from test_sft import encode_traces, hand_written_traces, write_traces

    train = data.load_split(synthetic_dir, "train")
    traces = hand_written_traces(train, 4)
    out = tmp_path / "sft"
    result = run_cli("--stage", "sft", "--model", "tiny", "--device", "cpu", "--threads", 1, "--data", synthetic_dir,
                     "--out", out, "--traces", write_traces(tmp_path / "traces.jsonl", traces), "--sft-epochs", 2,
                     "--sft-batch", 4, "--micro-batch", 2, "--sft-lr", 3e-2, "--lora-rank", 4, "--save-every", 1,
                     "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model, tokenizer = r2rank.load_model(str(out / "checkpoint-1"), "cpu")
    lora.hold_frozen_weights(model.requires_grad_(False), BF16)
    prompts, responses = encode_traces(tokenizer, train, traces)
    nll, count = 0.0, 0
    for prompt, response in zip(prompts, responses):
        with torch.no_grad(), autocast():
            logp, mask, _ = r2rank.forward_traces(model, [], [prompt], [response], 1.0)
        nll, count = nll - logp[mask].sum().item(), count + len(response)
    assert rows[1]["loss"] < rows[0]["loss"] - 0.05
    # checkpoint-1 holds the merged weights in fp32 (bf16 base + adapter): one rounding away from the run's
    assert rows[1]["loss"] == pytest.approx(nll / count, abs=0.02)
