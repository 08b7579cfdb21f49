"""The RL stage: its pieces against independent computations, and the real CLI on the tiny model."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import plackett_luce
import r2rank
import rollout
from head import ScoreHead, score_traces
from machinery.models import load_head
from plackett_luce import standardized
from metrics import ndcg_at_k, ndcg_from_scores
from ppo import leave_one_out_baseline, reinforce_loss
from machinery import checkpoints, config, models, runs

from conftest import run_cli


def test_encode_user_prefix_plus_suffix_is_the_chat_prompt(synthetic_dir):
    _, tokenizer = models.build_tiny()
    cfg = config.Config()
    instance = data.load_split(synthetic_dir, "train")[0]
    prefix, suffixes = data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix)
    assert len(suffixes) == len(instance["candidates"])
    for k, suffix in enumerate(suffixes):
        expected = tokenizer.apply_chat_template(data.self_check_messages(instance, k), tokenize=False,
                                                 add_generation_prompt=True)
        assert tokenizer.decode(prefix + suffix) == expected
    assert instance["candidates"][0]["title"] not in tokenizer.decode(prefix)


def test_head_learns_to_rank_by_reinforce_through_plackett_luce():
    """Fixed per-candidate features; the relevant item is the one far out along a hidden direction u,
    on either side (relevance = a nonlinear hidden function, |u . x|, that a linear score cannot
    express). Trained only by REINFORCE through Plackett-Luce rankings with the NDCG@10 reward, the
    head must lift held-out NDCG@10 from about random (~0.23 for 1 + 19) to well above 0.8."""
    generator = torch.Generator().manual_seed(0)
    users, K, H = 128, 20, 8
    u = torch.nn.functional.normalize(torch.randn(H, generator=generator), dim=0)
    labels = torch.zeros(2 * users, K)
    labels[torch.arange(2 * users), torch.randint(K, (2 * users,), generator=generator)] = 1
    side = torch.randint(2, (2 * users, 1, 1), generator=generator) * 2 - 1
    features = torch.randn(2 * users, K, H, generator=generator) + 4.0 * side * labels[..., None] * u
    train_x, train_y, test_x, test_y = features[:users], labels[:users], features[users:], labels[users:]
    random_ndcg = ndcg_from_scores(torch.rand(users, K, generator=generator), test_y, 10).mean().item()
    torch.manual_seed(0)
    head = ScoreHead(H, 64)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    before = ndcg_from_scores(head(test_x).detach(), test_y, 10).mean().item()
    for _ in range(200):
        scores = head(train_x)
        rankings = plackett_luce.sample(scores.detach(), 8, generator)
        reward = ndcg_at_k(train_y[:, None, :].expand_as(rankings).gather(-1, rankings), 10)
        loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, leave_one_out_baseline(reward))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = ndcg_from_scores(head(test_x).detach(), test_y, 10).mean().item()
    assert random_ndcg < 0.35 and before < 0.5 and after > 0.8, (random_ndcg, before, after)


def test_ppo_update_moves_log_probs_with_the_sign_of_the_advantage(synthetic_dir):
    model, tokenizer = models.build_tiny()
    cfg = config.Config(max_new_tokens=6, lr=1e-3, ppo_epochs=1, micro_batch=3, max_history=3)
    instance = data.load_split(synthetic_dir, "train")[0]
    instance = dict(instance, candidates=instance["candidates"][:4], labels=instance["labels"][:4])
    traces, prompts = rollout.rollout_users(model, tokenizer, [instance], cfg, torch.Generator().manual_seed(0))
    responses = traces[0].token_lists()
    prefix, suffixes = prompts[0]
    initial = {name: value.clone() for name, value in model.state_dict().items()}

    def total_logp():
        with torch.no_grad():
            logp, mask = rollout.trace_logprobs(model, [prefix + s for s in suffixes], responses)
        return (logp * mask).sum(-1)

    before = total_logp()
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    for shared_prefix in (False, True):
        model.load_state_dict(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        stats = rollout.ppo_update(model, optimizer, prompts, traces, advantages, cfg, shared_prefix)
        after = total_logp()
        assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all()


def test_theta_old_is_the_updates_own_forward_not_the_decoding_log_probs(synthetic_dir):
    """Decode-time log-probs shifted by 0.5 (as a different code path or precision could shift them)
    change nothing in the update: epoch 1's ratio is exactly 1, and epoch 2's ratio measures only how
    far epoch 1 moved the policy. The shift shows up in decode_logp_gap alone."""
    model, tokenizer = models.build_tiny()
    cfg = config.Config(max_new_tokens=5, lr=1e-3, ppo_epochs=2, micro_batch=2, max_history=3, temperature=0.8)
    instance = data.load_split(synthetic_dir, "train")[0]
    instance = dict(instance, candidates=instance["candidates"][:3], labels=instance["labels"][:3])
    traces, prompts = rollout.rollout_users(model, tokenizer, [instance], cfg, torch.Generator().manual_seed(0))
    advantages = torch.tensor([[1.0, -1.0, 0.5]])
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    results = []
    for shift in (0.0, 0.5):
        model.load_state_dict(initial)
        shifted = [rollout.Traces(**{**vars(traces[0]), "logprobs": traces[0].logprobs - shift * traces[0].mask})]
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        stats = rollout.ppo_update(model, optimizer, prompts, shifted, advantages, cfg)
        results.append((stats, {name: value.clone() for name, value in model.state_dict().items()}))
    (plain, plain_weights), (shifted, shifted_weights) = results
    for name in plain_weights:
        assert torch.equal(plain_weights[name], shifted_weights[name]), name
    for name in ("ratio", "clip_frac", "approx_kl", "ppo_loss"):
        assert plain[name] == shifted[name]
    assert plain["decode_logp_gap"] < 1e-4 and shifted["decode_logp_gap"] == pytest.approx(0.5, abs=1e-4)

    # By hand, with one epoch: ratio 1 exactly, so the loss is minus the token-weighted mean advantage.
    model.load_state_dict(initial)
    one_epoch = rollout.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), prompts, traces, advantages,
                                  dataclasses.replace(cfg, ppo_epochs=1))
    lengths = traces[0].lengths.float()
    assert one_epoch["ratio"] == pytest.approx(1.0, abs=1e-12) and one_epoch["approx_kl"] == 0.0
    assert one_epoch["ppo_loss"] == pytest.approx(-(advantages[0] * lengths).sum().item() / lengths.sum().item())


def test_scores_do_not_depend_on_candidate_order_under_greedy_decoding(synthetic_dir):
    model, tokenizer = models.build_tiny()
    cfg = config.Config(max_new_tokens=5, max_history=4)
    instance = data.load_split(synthetic_dir, "train")[1]
    order = torch.randperm(len(instance["candidates"]), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = dict(instance, candidates=[instance["candidates"][i] for i in order], labels=[instance["labels"][i] for i in order])
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16)
    scores = score_traces(head, rollout.rollout_users(model, tokenizer, [instance], cfg, None, 0.0)[0])[0]
    shuffled_scores = score_traces(head, rollout.rollout_users(model, tokenizer, [shuffled], cfg, None, 0.0)[0])[0]
    torch.testing.assert_close(shuffled_scores, scores[order], atol=1e-5, rtol=0)


def test_a_reloaded_checkpoint_gives_the_same_scores(tmp_path, synthetic_dir):
    model, tokenizer = models.build_tiny(seed=3)
    cfg = config.Config(max_new_tokens=5, max_history=4, head_width=16)
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, cfg.head_width)
    optimizers = {"head": torch.optim.AdamW(head.parameters())}
    instances = data.load_split(synthetic_dir, "valid")[:2]

    def greedy_scores(m, t, h):
        return score_traces(h, rollout.rollout_users(m, t, instances, cfg, None, 0.0)[0])

    expected = greedy_scores(model, tokenizer, head)
    path = checkpoints.save_checkpoint(str(tmp_path), 7, model, tokenizer, head, optimizers, cfg)
    assert path.endswith("checkpoint-7") and runs.latest_checkpoint(str(tmp_path)) == path
    model2, tokenizer2 = models.load_policy(path, torch.device("cpu"), torch.float32)
    head2 = load_head(path, model2.config.hidden_size, "cpu")
    torch.testing.assert_close(greedy_scores(model2, tokenizer2, head2), expected)


def test_cli_trains_logs_checkpoints_and_resumes(tmp_path, synthetic_dir):
    out = str(tmp_path / "run")
    common = ["--model", "tiny", "--data", synthetic_dir, "--out", out, "--users-per-step", "1",
              "--max-new-tokens", "6", "--max-history", "3", "--save-every", "1", "--lr", "1e-4"]
    first = run_cli("--stage", "rl", "--max-steps", "2", *common)
    assert first.returncode == 0, first.stderr
    assert "1 users x 20 candidates = 20 traces per step" in first.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == [1, 2]
    for key in ("reward", "ndcg@10_greedy", "approx_kl", "clip_frac", "response_len", "answer_share", "step_time"):
        assert all(key in row for row in rows), key
    assert 0.0 <= rows[0]["reward"] <= 1.0
    checkpoint = os.path.join(out, "checkpoint-2")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "head.safetensors", "optimizer.pt", "r2rank.json"):
        assert os.path.isfile(os.path.join(checkpoint, name)), name
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]
    # Both the LLM and the head were updated between the two checkpoints.
    first_model = load_file(os.path.join(out, "checkpoint-1", "model.safetensors"))
    second_model = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert any(not torch.equal(first_model[name], second_model[name]) for name in first_model)
    first_head = load_file(os.path.join(out, "checkpoint-1", "head.safetensors"))
    second_head = load_file(os.path.join(checkpoint, "head.safetensors"))
    assert all(not torch.equal(first_head[name], second_head[name]) for name in first_head)

    # the resumed run also exercises gradient checkpointing (and with it the per-candidate update)
    second = run_cli("--stage", "rl", "--max-steps", "3", "--resume", "--gradient-checkpointing", "on", *common)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "checkpoint-2" in second.stdout
    assert "gradient checkpointing on (as given), shared-prefix update off" in second.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == [1, 2, 3]
    # The resumed head is the saved one, not a fresh initialization.
    saved = load_head(checkpoint, 64, "cpu")
    resumed = load_head(os.path.join(out, "checkpoint-3"), 64, "cpu")
    assert any(not torch.equal(a, b) for a, b in zip(saved.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.parametrize("advantage", ["reward", "batch", "counterfactual"])
def test_cli_trains_the_llm_with_each_advantage(tmp_path, synthetic_dir, advantage, monkeypatch):
    """The advantages handed to the PPO update, against each rule worked out from the step's rewards by hand."""
    rewards, handed, ndcg, update = [], [], r2rank.ndcg_at_k, rollout.ppo_update
    monkeypatch.setattr(r2rank, "ndcg_at_k", lambda *args: rewards.append(ndcg(*args)) or rewards[-1])  # phase 3: [U, S]
    monkeypatch.setattr(rollout, "ppo_update", lambda model, opt, prompts, traces, adv, *args, **kw:
                        handed.append(adv.detach().clone()) or update(model, opt, prompts, traces, adv, *args, **kw))
    out = str(tmp_path / advantage)
    r2rank.main(["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--users-per-step", "2",
                 "--max-new-tokens", "3", "--max-history", "3", "--max-steps", "1", "--lr", "1e-3", "--advantage",
                 advantage, "--advantage-samples", "16", "--temperature", "0.8", "--ppo-epochs", "1"])
    (row,) = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    (reward,), (given,) = rewards, handed  # [2 users, S], [2 users, K]
    means = reward.mean(1)
    if advantage == "reward":  # Eq. (6): every trace of a user gets the mean reward of its rankings
        expected = means[:, None].expand_as(given)
    elif advantage == "batch":  # minus the other user's mean reward
        expected = torch.stack([means[0] - means[1], means[1] - means[0]])[:, None].expand_as(given)
    if advantage != "counterfactual":  # its values: exact toys in test_ppo.py
        torch.testing.assert_close(given, expected)
    assert row["advantage_abs"] == pytest.approx(given.abs().mean().item(), abs=1e-6)
    assert row["reward"] == pytest.approx(means.mean().item(), abs=1e-6)
    assert 0.0 <= row["decode_logp_gap"] < 1e-3  # fp32 on a CPU: the decoding and the update's forward agree closely
    start, _ = models.build_tiny()
    trained = load_file(os.path.join(out, "checkpoint-1", "model.safetensors"))
    assert any(not torch.equal(trained[name], value) for name, value in start.state_dict().items() if name in trained)


def test_mlp_only_samples_each_users_traces_once_and_keeps_the_llm_fixed(tmp_path, synthetic_dir):
    out = str(tmp_path / "mlp")
    result = run_cli("--stage", "rl", "--freeze-llm", "--model", "tiny", "--data", synthetic_dir, "--out", out,
                     "--max-steps", "3", "--users-per-step", "4", "--max-new-tokens", "4", "--max-history", "3",
                     "--save-every", "1", "--keep-checkpoints", "0")  # checkpoint-1 is compared with checkpoint-3
    assert result.returncode == 0, result.stderr
    num_train = len(data.load_split(synthetic_dir, "train"))
    seen = {data.load_split(synthetic_dir, "train")[i]["user_id"]
            for step in range(3) for i in r2rank.users_for_step(num_train, 4, 0, step)}
    cache = torch.load(os.path.join(out, "checkpoint-3", "trace-cache.pt"), weights_only=True)
    assert set(cache) == seen  # every user sampled once, none missing
    early = torch.load(os.path.join(out, "checkpoint-1", "trace-cache.pt"), weights_only=True)
    assert all(torch.equal(early[user]["tokens"], cache[user]["tokens"]) for user in early)  # reused, not redrawn
    first = load_file(os.path.join(out, "checkpoint-1", "model.safetensors"))
    last = load_file(os.path.join(out, "checkpoint-3", "model.safetensors"))
    assert all(torch.equal(first[name], last[name]) for name in first)
    assert not all(torch.equal(a, b) for a, b in zip(load_file(os.path.join(out, "checkpoint-1", "head.safetensors")).values(),
                                                     load_file(os.path.join(out, "checkpoint-3", "head.safetensors")).values()))


def test_freeze_llm_first_train_users_validation_rolled_out_once_old_checkpoints_pruned(synthetic_dir, tmp_path, monkeypatch):
    greedy_rollouts, rollout_users = [], rollout.rollout_users

    def counting(model, tokenizer, instances, cfg, generator, temperature=None, fast_decode=True):
        if temperature == 0.0:
            greedy_rollouts.append([inst["user_id"] for inst in instances])
        return rollout_users(model, tokenizer, instances, cfg, generator, temperature, fast_decode)

    monkeypatch.setattr(rollout, "rollout_users", counting)
    out = str(tmp_path / "run")
    r2rank.main(["--stage", "rl", "--freeze-llm", "--model", "tiny", "--data", synthetic_dir, "--out", out,
                 "--max-steps", "6", "--users-per-step", "4", "--max-new-tokens", "4", "--max-history", "3",
                 "--train-users", "5", "--eval-every", "2", "--eval-users", "3", "--save-every", "1", "--keep-checkpoints", "2"])
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-5", "checkpoint-6"]
    first_five = {inst["user_id"] for inst in data.load_split(synthetic_dir, "train")[:5]}
    assert set(torch.load(os.path.join(out, "checkpoint-6", "trace-cache.pt"), weights_only=True)) == first_five
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows if "valid_ndcg@10" in row] == [0, 2, 4, 6]  # 0: the start
    assert len(greedy_rollouts) == 1  # the frozen LLM's validation traces are reused
    assert greedy_rollouts[0] == [inst["user_id"] for inst in data.load_split(synthetic_dir, "valid")[:3]]


def test_head_lr_0_freezes_the_head_and_the_start_is_validated_as_step_0(synthetic_dir, tmp_path):
    out = str(tmp_path / "run")
    r2rank.main(["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--head-lr", "0",
                 "--lr", "1e-3", "--max-steps", "2", "--users-per-step", "2", "--max-new-tokens", "3",
                 "--max-history", "3", "--eval-every", "2", "--eval-users", "3", "--save-every", "1"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [0, 1, 2] and set(rows[0]) == {"step", "valid_ndcg@10", "step_time"}
    heads = [load_file(os.path.join(out, f"checkpoint-{step}", "head.safetensors")) for step in (1, 2)]
    assert all(torch.equal(heads[0][name], heads[1][name]) for name in heads[0])  # AdamW at lr 0: no step, no decay
    llms = [load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors")) for step in (1, 2)]
    assert any(not torch.equal(llms[0][name], llms[1][name]) for name in llms[0])  # while the LLM learns
    # step 0 is the untrained LLM under that (unchanged) head
    cfg = config.parse_config(["--max-new-tokens", "3", "--max-history", "3"])
    model, tokenizer = models.load_policy("tiny", torch.device("cpu"), torch.float32)
    head = load_head(os.path.join(out, "checkpoint-1"), model.config.hidden_size, "cpu")
    start, _ = r2rank.validate(model, tokenizer, head, data.load_split(synthetic_dir, "valid")[:3], cfg)
    assert rows[0]["valid_ndcg@10"] == pytest.approx(start)


def test_new_head_ignores_the_head_saved_with_the_model(synthetic_dir, tmp_path):
    common = ["--stage", "rl", "--freeze-llm", "--data", synthetic_dir, "--max-steps", "1", "--users-per-step", "1",
              "--max-new-tokens", "2", "--max-history", "3", "--head-width", "8"]
    r2rank.main(common + ["--model", "tiny", "--out", str(tmp_path / "first"), "--seed", "1"])  # a trained head
    source = str(tmp_path / "first" / "checkpoint-1")
    r2rank.main(common + ["--model", "tiny", "--out", str(tmp_path / "fresh"), "--head-lr", "0"])
    r2rank.main(common + ["--model", source, "--out", str(tmp_path / "kept"), "--head-lr", "0"])
    r2rank.main(common + ["--model", source, "--out", str(tmp_path / "new"), "--head-lr", "0", "--new-head"])
    heads = {name: load_file(str(tmp_path / name / "checkpoint-1" / "head.safetensors")) for name in ("first", "fresh", "kept", "new")}
    same = lambda a, b: all(torch.equal(heads[a][key], heads[b][key]) for key in heads[a])
    assert same("kept", "first") and not same("new", "first")
    assert same("new", "fresh")  # the seeded initialization of a run from the bare LLM


def test_standardized_scores_by_hand():
    scores = torch.tensor([[0.0, 10.0, 20.0], [5.0, 5.0, 5.0]])
    # population std of (0, 10, 20) is sqrt(200 / 3) = 8.16497; 2 * 10 / 8.16497 = 2.44949
    torch.testing.assert_close(standardized(scores, 2.0), torch.tensor([[-2.44949, 0.0, 2.44949], [0.0, 0.0, 0.0]]))
    assert standardized(scores, 0.0) is scores  # off: the paper's raw scores


def test_pl_std_reaches_the_plackett_luce_sampler(synthetic_dir, tmp_path, monkeypatch):
    seen, sample = [], plackett_luce.sample
    monkeypatch.setattr(plackett_luce, "sample", lambda scores, *args: seen.append(scores) or sample(scores, *args))
    out = str(tmp_path / "run")
    r2rank.main(["--stage", "rl", "--freeze-llm", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--pl-std", "3",
                 "--max-steps", "2", "--users-per-step", "2", "--max-new-tokens", "2", "--max-history", "3"])
    assert len(seen) == 2 * 2  # per user, each from its own generator
    for scores in seen:
        torch.testing.assert_close(scores.std(-1, correction=0), torch.tensor(3.0))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(abs(row["score_std"] - 3.0) > 1e-3 for row in rows)  # the head's own spread is logged
    assert r2rank.signal_share(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.3, 0.2], [0.1, 0.1, 0.1], [0.0, 0.0, 1.0]])) == 0.5


def test_trace_cache_of_another_run_is_reused_and_checked(synthetic_dir, tmp_path, monkeypatch):
    common = ["--stage", "rl", "--freeze-llm", "--model", "tiny", "--data", synthetic_dir, "--max-history", "3",
              "--users-per-step", "3", "--train-users", "3", "--max-new-tokens", "4"]
    first = str(tmp_path / "first")
    r2rank.main(common + ["--out", first, "--max-steps", "1"])
    cache = os.path.join(first, "checkpoint-1", "trace-cache.pt")
    rolled_out, rollout_users = [], rollout.rollout_users

    def counting(model, tokenizer, instances, cfg, generator, temperature=None, fast_decode=True):
        rolled_out.extend(inst["user_id"] for inst in instances)
        return rollout_users(model, tokenizer, instances, cfg, generator, temperature, fast_decode)

    monkeypatch.setattr(rollout, "rollout_users", counting)
    second = str(tmp_path / "second")
    r2rank.main(common + ["--out", second, "--max-steps", "2", "--head-width", "8", "--trace-cache", cache])
    assert rolled_out == []  # the three users' traces came from the first run
    reused = torch.load(os.path.join(second, "checkpoint-2", "trace-cache.pt"), weights_only=True)
    assert all(torch.equal(reused[user]["tokens"], fields["tokens"]) for user, fields in torch.load(cache, weights_only=True).items())
    continued = common[:common.index("--model") + 1] + [os.path.join(first, "checkpoint-1")] + common[common.index("--model") + 2:]
    r2rank.main(continued + ["--out", str(tmp_path / "from-checkpoint"), "--max-steps", "1", "--trace-cache", cache])
    assert rolled_out == []  # the checkpoint of the run that made the cache holds its frozen LLM: reused, not refused
    elsewhere = common[:common.index("--model") + 1] + [str(tmp_path / "from-checkpoint" / "checkpoint-1")] \
        + common[common.index("--model") + 2:]
    beside = run_cli(*elsewhere, "--out", str(tmp_path / "beside"), "--trace-cache", cache)
    assert beside.returncode == 1 and "traces were made with --model tiny" in beside.stderr  # another checkpoint: still checked
    other = run_cli(*common, "--out", str(tmp_path / "third"), "--trace-cache", cache, "--max-new-tokens", "5")
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "traces were made with --max-new-tokens 4; this run has --max-new-tokens 5" in other.stderr
    forced = run_cli(*common, "--out", str(tmp_path / "fourth"), "--trace-cache", cache, "--response-prefix", "User")
    assert forced.returncode == 1 and "made with --response-prefix ; this run has --response-prefix User" in forced.stderr
    settings = os.path.join(first, "checkpoint-1", "r2rank.json")
    with open(settings) as f:
        saved = json.load(f)
    del saved["config"]["response_prefix"]  # a cache that does not record a setting is refused, not guessed
    with open(settings, "w") as f:
        json.dump(saved, f)
    unknown = run_cli(*common, "--out", str(tmp_path / "fifth"), "--trace-cache", cache)
    assert unknown.returncode == 1 and "made with --response-prefix None" in unknown.stderr


def test_no_reasoning_control_trains_a_head_on_the_prompts_last_hidden_state(synthetic_dir, tmp_path):
    out = str(tmp_path / "no-trace")
    r2rank.main(["--stage", "rl", "--freeze-llm", "--model", "tiny", "--data", synthetic_dir, "--out", out,
                 "--max-steps", "2", "--users-per-step", "2", "--max-new-tokens", "0", "--max-history", "3"])
    checkpoint = os.path.join(out, "checkpoint-2")
    model, tokenizer = models.load_policy(checkpoint, "cpu", torch.float32)
    train = {inst["user_id"]: inst for inst in data.load_split(synthetic_dir, "train")}
    cache = torch.load(os.path.join(checkpoint, "trace-cache.pt"), weights_only=True)
    assert len(cache) == 4
    for user, fields in cache.items():
        assert fields["tokens"].shape == (20, 0)
        prefix, suffixes = data.encode_user(tokenizer, train[user], max_history=3)
        with torch.no_grad():  # the whole prompt of the last candidate, one plain forward
            forward = model(input_ids=torch.tensor([prefix + suffixes[-1]]), output_hidden_states=True)
        torch.testing.assert_close(fields["final_hidden"][-1], forward.hidden_states[-1][0, -1], atol=1e-4, rtol=0)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(row["response_len"], row["distinct_share"]) for row in rows] == [(0.0, 1 / 20)] * 2


def test_response_prefix_ends_every_candidates_prompt(synthetic_dir):
    _, tokenizer = models.build_tiny()
    instance = data.load_split(synthetic_dir, "train")[0]
    prefix, suffixes = data.encode_user(tokenizer, instance)
    forced_prefix, forced = data.encode_user(tokenizer, instance, response_prefix="Yes, the")
    assert forced_prefix == prefix and len(forced) == len(suffixes) == 20
    for plain, suffix in zip(suffixes, forced):
        assert tokenizer.decode(suffix) == tokenizer.decode(plain) + "Yes, the"


def test_trace_stats_count_distinct_traces_and_mean_token_logprob_by_hand():
    _, tokenizer = models.build_tiny()
    pad = tokenizer.pad_token_id

    def user(tokens, logprobs, lengths, finished):
        tokens, logprobs, lengths = torch.tensor(tokens), torch.tensor(logprobs), torch.tensor(lengths)
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return rollout.Traces(tokens, logprobs, mask, lengths, torch.tensor(finished), torch.zeros(2, 4))

    same = user([[5, 6], [5, 6]], [[-1.0, -1.0], [-1.0, -1.0]], [2, 2], [False, False])  # 1 distinct text of 2
    # 2 of 2; the -9 is padding; the first trace ended with an eos exactly at the limit: not truncated
    different = user([[5, 6], [7, pad]], [[-0.5, -0.5], [-3.0, -9.0]], [2, 1], [True, True])
    stats = rollout.trace_stats([same, different], tokenizer)
    assert stats["distinct_share"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert stats["token_logp"] == pytest.approx((-4.0 - 1.0 - 3.0) / 7)
    assert stats["truncated_share"] == pytest.approx(2 / 4) and stats["response_len"] == pytest.approx(7 / 4)


def test_a_step_without_tokens_logs_no_token_statistics(synthetic_dir, tmp_path):
    """--max-new-tokens 0 trains the LLM through the score path alone: the means over tokens (ratio,
    clip_frac, approx_kl, ppo_loss, decode_logp_gap) are undefined and left out of the log, not written as 0."""
    out = str(tmp_path / "no-tokens")
    r2rank.main(["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--max-steps", "1",
                 "--users-per-step", "1", "--max-new-tokens", "0", "--max-history", "3"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert not {"ratio", "clip_frac", "approx_kl", "ppo_loss", "decode_logp_gap", "decode_logp_gap_max"} & set(row), row
    assert row["response_len"] == 0.0 and "decode_score_gap" in row and "advantage_abs" in row
