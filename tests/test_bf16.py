"""The bf16 tier: every training path under CPU bf16 autocast, which follows CUDA autocast's casting
and caching rules (only slowly), checked against something independent of the path itself.

The fault this tier guards against: autocast keeps the bf16 copy of each trained fp32 weight until
the outermost autocast context exits, and an in-place optimizer step does not refresh it. A PPO
epoch after a step taken inside the context computes with the old weights (ratio 1, approx_kl 0).
The oracles: a fresh model built from a snapshot of the weights after the step (new tensors, so no
cached copy can serve it), and the same run in fp32, where autocast caches nothing.

Tolerances: a fresh model with the same weights runs the same operations in the same dtypes, so its
log-probs equal the run's to fp32 summation noise (1e-5). bf16 against fp32 differs by rounding, and
the rounding changes which tokens are sampled, so the two runs update on different traces: the
second epoch's approx_kl is asked to lie within a factor of 2 of fp32's (measured ratios 0.92-1.32
on the tiny model; a stale epoch gives exactly 0 with LoRA, and 0.2 of fp32's with all weights).
"""
import json

import pytest
import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import data
import decode
import rollout
from conftest import ROOT, run_cli, run_script
from head import ScoreHead
from machinery import config, models

BF16 = torch.bfloat16


def tiny_policy(lora, frozen=False):
    """The tiny model with LoRA adapters (rank 4) or every weight trained, frozen weights held in bf16."""
    model, tokenizer = models.build_tiny(seed=0)
    torch.manual_seed(0)
    if frozen:
        model.requires_grad_(False)
        trained = []
    else:
        trained = models.add_adapters(model, 4) if lora else list(model.parameters())
    models.hold_frozen_weights(model, BF16)
    return model, tokenizer, trained


def instances(synthetic_dir, users=2):
    return data.load_split(synthetic_dir, "train")[:users]


class Recorder:
    """Wraps rollout.trace_logprobs and trace_logprobs_shared: every call's arguments and log-probs."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("trace_logprobs", "trace_logprobs_shared"):
            original = getattr(rollout, name)
            monkeypatch.setattr(rollout, name, self.wrap(original))

    def wrap(self, original):
        def recorded(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append((original, args[1:], kwargs, out[0].detach().clone()))
            return out
        return recorded


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "all-weights"])
@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "per-candidate"])
def test_each_ppo_epoch_computes_with_the_weights_of_the_step_before(synthetic_dir, monkeypatch, lora, shared_prefix):
    model, tokenizer, trained = tiny_policy(lora)
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    cfg = config.Config(model="tiny", max_new_tokens=6, ppo_epochs=2, micro_batch=3, lr=1e-2)
    users = instances(synthetic_dir)
    generators = [torch.Generator().manual_seed(u) for u in range(len(users))]
    with models.mixed_precision(torch.device("cpu"), BF16):  # the rollout, as r2rank.train_rl runs it
        samples, prompts = rollout.rollout_users(model, tokenizer, users, cfg, generators)
    K = len(users[0]["candidates"])
    head = ScoreHead(model.config.hidden_size, 16)
    score_grads = torch.randn(len(users), K, generator=torch.Generator().manual_seed(1))  # the score path, in epoch 1

    snapshots = []
    real_step = optimizer.step

    def step_and_snapshot(*args, **kwargs):
        result = real_step(*args, **kwargs)
        snapshots.append({name: value.detach().clone() for name, value in model.state_dict().items()})
        return result
    monkeypatch.setattr(optimizer, "step", step_and_snapshot)
    recorder = Recorder(monkeypatch)
    advantages = torch.randn(len(users), K, generator=torch.Generator().manual_seed(2))
    stats = rollout.ppo_update(model, optimizer, prompts, samples, advantages, cfg, shared_prefix, head=head,
                               score_grads=score_grads, dtype=BF16)
    monkeypatch.undo()

    half = len(recorder.calls) // 2
    first, second = recorder.calls[:half], recorder.calls[half:]
    # the oracle: a new model holding the weights after epoch 1's step, in a new autocast context
    fresh, _ = models.build_tiny(seed=0)
    if lora:
        models.add_adapters(fresh, 4)
    fresh.load_state_dict(snapshots[0])
    models.hold_frozen_weights(fresh, BF16)
    fresh.train()
    moved = 0.0
    for (function, args, kwargs, logp), (_, _, _, old) in zip(second, first):
        with torch.no_grad(), models.mixed_precision(torch.device("cpu"), BF16):
            expected = function(fresh, *args, **{**kwargs, "return_hidden": False})[0]
        torch.testing.assert_close(logp, expected, atol=1e-5, rtol=0)
        moved = max(moved, (logp - old).abs().max().item())
    assert moved > 0.05  # lr 1e-2 moved the policy: a stale epoch 2 would repeat epoch 1's log-probs exactly
    assert stats["approx_kl"] > 1e-3 and stats["clip_frac"] > 0


def test_ppo_update_refuses_to_step_inside_autocast(synthetic_dir):
    model, tokenizer, trained = tiny_policy(lora=True)
    cfg = config.Config(model="tiny", max_new_tokens=2)
    with models.mixed_precision(torch.device("cpu"), BF16):
        samples, prompts = rollout.rollout_users(model, tokenizer, instances(synthetic_dir, 1), cfg, None)
        with pytest.raises(RuntimeError, match="outside autocast"):
            rollout.ppo_update(model, torch.optim.AdamW(trained), prompts, samples, torch.ones(1, 20), cfg, dtype=BF16)


def rl_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora, lr", [(["--lora-rank", 4], 1e-2), ([], 1e-3)], ids=["lora", "all-weights"])
def test_rl_cli_in_bf16_moves_like_fp32_in_the_second_epoch(synthetic_dir, tmp_path, lora, lr):
    kl = {}
    for dtype in ("float32", "bfloat16"):
        result = run_cli("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", tmp_path / dtype, "--device", "cpu",
                         "--dtype", dtype, "--lr", lr, "--ppo-epochs", 2, "--max-new-tokens", 4, "--max-steps", 1,
                         "--users-per-step", 2, *lora)
        assert result.returncode == 0, result.stderr
        assert f"torch.{dtype} compute" in result.stdout
        kl[dtype] = rl_rows(tmp_path / dtype)[0]["approx_kl"]
    assert kl["float32"] > 0.01
    assert 0.5 < kl["bfloat16"] / kl["float32"] < 2


def test_lora_in_bf16_saves_fp32_and_resumes_exactly(synthetic_dir, tmp_path):
    common = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--device", "cpu", "--dtype", "bfloat16",
              "--lora-rank", 4, "--lr", 1e-2, "--max-new-tokens", 4, "--users-per-step", 2, "--save-every", 1]
    straight = run_cli(*common, "--out", tmp_path / "straight", "--max-steps", 2)
    assert straight.returncode == 0, straight.stderr
    first = run_cli(*common, "--out", tmp_path / "resumed", "--max-steps", 1)
    assert first.returncode == 0, first.stderr
    resumed = run_cli(*common, "--out", tmp_path / "resumed", "--max-steps", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert rl_rows(tmp_path / "resumed")[1] == pytest.approx({**rl_rows(tmp_path / "straight")[1],
                                                              "step_time": rl_rows(tmp_path / "resumed")[1]["step_time"]})
    # the merged checkpoint: every tensor fp32, the frozen base exactly its bf16 value plus the adapter
    checkpoint = tmp_path / "straight" / "checkpoint-1"
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.float32}
        merged = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    with safe_open(str(checkpoint / "lora.safetensors"), "pt") as f:
        A, B = f.get_tensor("model.layers.0.self_attn.q_proj.lora_A"), f.get_tensor("model.layers.0.self_attn.q_proj.lora_B")
    start = models.build_tiny(seed=0)[0].model.layers[0].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(merged, start.to(BF16).float() + 2.0 * B @ A, atol=1e-6, rtol=0)


def test_freeze_llm_in_bf16_trains_the_head_on_the_bf16_frozen_model(synthetic_dir, tmp_path):
    result = run_cli("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", tmp_path / "mlp", "--device", "cpu",
                     "--dtype", "bfloat16", "--freeze-llm", "--max-new-tokens", 4, "--max-steps", 2, "--users-per-step", 2)
    assert result.returncode == 0, result.stderr
    assert all(row["head_loss"] == row["head_loss"] for row in rl_rows(tmp_path / "mlp"))
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


@pytest.mark.parametrize("lora, frozen", [(True, False), (False, True), (False, False)], ids=["lora", "freeze-llm", "all-weights"])
def test_a_decode_step_casts_no_weight(synthetic_dir, lora, frozen):
    """Frozen weights are held in bf16 (no cast at all); trained ones are cast once per autocast
    context, whatever the number of decode steps. Without hold_frozen_weights every frozen linear was
    cast again at every step (21 casts per step here)."""
    model, tokenizer, trained = tiny_policy(lora, frozen)
    prefix, suffixes = data.encode_user(tokenizer, instances(synthetic_dir, 1)[0])
    casts = {}
    for new_tokens in (2, 10):
        counter = CountCasts(model.parameters())
        with models.mixed_precision(torch.device("cpu"), BF16), counter:
            samples = rollout.sample_traces(model, tokenizer, prefix, suffixes, new_tokens, temperature=0.0)
        assert int(samples.lengths.max()) == new_tokens  # the random model writes no end token: every step ran
        casts[new_tokens] = counter.casts
    linear_weights = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias) if p is not None}
    cast_once = [p for p in trained if id(p) in linear_weights or p.dim() == 2]  # linears and LoRA's A, B; not the norms
    assert casts[2] == casts[10] == len(cast_once) > 0 if not frozen else casts[2] == casts[10] == 0
    held = sum(1 for p in model.parameters() if not p.requires_grad and p.dtype == BF16)
    assert (held > 0) == (lora or frozen)


def test_the_start_up_check_passes_decode_and_catches_a_wrong_one(synthetic_dir, monkeypatch):
    model, tokenizer, _ = tiny_policy(lora=True)
    cfg = config.Config(model="tiny", max_new_tokens=8)
    user = instances(synthetic_dir, 1)[0]
    agrees, gap = rollout.decode_agrees(model, tokenizer, user, cfg, BF16)
    assert agrees and gap < rollout.DECODE_TOLERANCE[BF16]
    real = decode.attention
    monkeypatch.setattr(decode, "attention", lambda query, *args: real(query * 3.0, *args))  # a wrong attention scale
    agrees, gap = rollout.decode_agrees(model, tokenizer, user, cfg, BF16)
    assert not agrees and gap > rollout.DECODE_TOLERANCE[BF16]


def test_float16_is_refused_in_one_line(synthetic_dir, tmp_path):
    result = run_cli("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", tmp_path / "run", "--dtype", "float16")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "--dtype bfloat16" in result.stderr
    assert not (tmp_path / "run").exists()


def test_sft_in_bf16_steps_from_fresh_weights(synthetic_dir, tmp_path):
    """Every trace in one batch, two epochs: step 2's logged loss is the loss of checkpoint-1's weights
    on the same traces, computed here by a fresh model under bf16 autocast."""
    from test_sft import encode_traces, hand_written_traces

    train = data.load_split(synthetic_dir, "train")
    traces = hand_written_traces(train, 4)
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    out = tmp_path / "sft"
    result = run_cli("--stage", "sft", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--traces", path,
                     "--sft-epochs", 2, "--sft-batch", 4, "--micro-batch", 2, "--sft-lr", 3e-2, "--lora-rank", 4,
                     "--save-every", 1, "--device", "cpu", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model, tokenizer = models.load_policy(str(out / "checkpoint-1"), torch.device("cpu"), torch.float32)
    models.hold_frozen_weights(model.requires_grad_(False), BF16)
    prompts, responses = encode_traces(tokenizer, train, traces)
    with torch.no_grad(), models.mixed_precision(torch.device("cpu"), BF16):
        logp, mask = rollout.trace_logprobs(model, prompts, responses)
    fresh_loss = -(logp[mask].sum() / mask.sum()).item()
    assert rows[1]["loss"] < rows[0]["loss"] - 0.05
    # checkpoint-1 holds the merged weights in fp32 (bf16 base + adapter): one rounding away from the run's
    assert rows[1]["loss"] == pytest.approx(fresh_loss, abs=0.02)


@pytest.mark.parametrize("system, extra", [("reczero", ["--negatives", 2]), ("r2ec", [])])
def test_the_compared_systems_in_bf16_step_outside_autocast(synthetic_dir, tmp_path, system, extra):
    """They share rollout.ppo_update (checked above); here, that they call it outside autocast (it
    refuses otherwise) and that a step with a non-zero advantage moves the second epoch. (A random model's
    4-token answers rarely parse, so RecZero's rule reward is often 0 for a whole group: 6 steps, so that
    some step has an advantage.)"""
    out = tmp_path / system
    result = run_script(f"{ROOT}/baselines/{system}.py", "--data", synthetic_dir, "--model", "tiny", "--out", out,
                        "--max-steps", 6, "--users-per-step", 2, "--group", 3, "--max-new-tokens", 4, "--lr", 1e-2,
                        "--device", "cpu", "--dtype", "bfloat16", *extra, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    moved = [row["approx_kl"] for row in rows if row["advantage_nonzero"] > 0]
    assert moved and min(moved) > 1e-3
