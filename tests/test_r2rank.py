"""The RL stage of r2rank.py on the tiny model: what the CLI writes, checked against computations made apart
from it (a plain transformers load, a plain forward of each whole prompt, NDCG@10 by hand, the advantage
rules worked out from the step's rewards), and an uninterrupted run as the oracle of --resume."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import data
import models
import plackett_luce
import r2rank
import runs
from head import ScoreHead
from metrics import ndcg_at_k, ndcg_from_scores
from plackett_luce import standardized
from ppo import leave_one_out_baseline, reinforce_loss

from conftest import ROOT, run_cli, run_script


def rl_argv(out, data_dir, *extra):
    """A tiny run: 2 users of 20 candidates, 3-token traces, a checkpoint every step, no validation."""
    return ["--stage", "rl", "--model", "tiny", "--data", data_dir, "--out", str(out), "--users-per-step", "2",
            "--max-new-tokens", "3", "--max-history", "2", "--eval-every", "0", "--save-every", "1", "--threads", "1", *extra]


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved(out, step, name="model"):
    return load_file(os.path.join(out, f"checkpoint-{step}", f"{name}.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def untrained():
    """The weights every tiny run starts from (--seed 0)."""
    return models.build_tiny(seed=0)[0].state_dict()


def ndcg10_by_hand(scores, labels):
    """NDCG@10 of one user: candidates sorted by score, gain = label, discount 1 / log2(position + 1)."""
    order = sorted(range(len(scores)), key=lambda k: -scores[k])
    dcg = sum(labels[k] / math.log2(i + 2) for i, k in enumerate(order[:10]))
    return dcg / sum(label / math.log2(i + 2) for i, label in enumerate(sorted(labels, reverse=True)[:10]))


def prompt_hidden(model, tokenizer, instance, max_history):
    """h_k of every candidate without a trace, by one plain forward of each whole prompt: [K, H]."""
    prefix, suffixes = data.encode_user(tokenizer, instance, max_history)
    with torch.no_grad():
        return torch.stack([model.model(input_ids=torch.tensor([prefix + s])).last_hidden_state[0, -1] for s in suffixes])


# ------------------------------------------------------------------------------------------ the CLI


def test_the_cli_logs_a_row_per_step_and_writes_checkpoints_transformers_loads(tmp_path, synthetic_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = run_cli(*rl_argv(out, synthetic_dir, "--max-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 users x 20 candidates = 40 traces per step" in result.stdout
    logged = rows(out)
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert [line.split()[:2] for line in result.stdout.splitlines() if line.startswith("step ")] == \
        [["step", "1"], ["step", "2"], ["step", "3"]]  # one line per step, as in metrics.jsonl
    for row in logged:
        assert {"reward", "ndcg@10_greedy", "head_loss", "approx_kl", "clip_frac", "ratio", "response_len", "step_time"} <= set(row)
        assert 0.0 <= row["reward"] <= 1.0 and 1.0 <= row["response_len"] <= 3.0
    # --keep-checkpoints 2 (the default): the two newest; no temporary folder left
    assert sorted(n for n in os.listdir(out) if n != runs.LOCK) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl"]
    checkpoint = out / "checkpoint-3"
    record = json.loads((checkpoint / "r2rank.json").read_text())
    assert record["step"] == 3 and record["args"]["max_new_tokens"] == 3
    assert record["files"] == {name: os.path.getsize(checkpoint / name) for name in os.listdir(checkpoint) if name != "r2rank.json"}
    # a plain transformers model and tokenizer, the weights those of model.safetensors, trained away from the start
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    weights = saved(out, 3)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    _, tiny_tokenizer = models.build_tiny()
    text = "Would the user like the Blue tent? <answer>"
    assert tokenizer(text).input_ids == tiny_tokenizer(text).input_ids
    start = untrained()
    assert any(not torch.equal(start[name], tensor) for name, tensor in weights.items())
    head = ScoreHead(model.config.hidden_size, 256)
    head.load_state_dict(load_file(str(checkpoint / "head.safetensors")))  # strict: every weight of the head, no other
    assert not same(saved(out, 2, "head"), saved(out, 3, "head")) and not same(saved(out, 2), weights)


def test_resume_after_a_stop_gives_the_uninterrupted_runs_rows_and_weights(tmp_path, synthetic_dir):
    """The oracle is the same command run without a stop. The stopped run is killed after step 3 was logged but
    before its save (a row, and a second one cut short, beyond checkpoint-2): --resume runs step 3 again."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    common = ["--save-every", "2", "--keep-checkpoints", "0"]
    assert run_cli(*rl_argv(whole, synthetic_dir, *common, "--max-steps", "4")).returncode == 0
    assert run_cli(*rl_argv(stopped, synthetic_dir, *common, "--max-steps", "2")).returncode == 0
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**rows(whole)[2], "reward": -1.0}) + "\n" + '{"step": 4, "rew')
    resumed = run_cli(*rl_argv(stopped, synthetic_dir, *common, "--max-steps", "4", "--resume"))
    assert resumed.returncode == 0 and f"resumed from {stopped}/checkpoint-2 at step 2" in resumed.stdout, resumed.stderr[-3000:]
    drop_time = lambda rs: [{k: v for k, v in row.items() if k != "step_time"} for row in rs]
    assert drop_time(rows(stopped)) == drop_time(rows(whole))
    for name in ("model", "head"):
        assert same(saved(stopped, 4, name), saved(whole, 4, name)), name
    optimizer = lambda out: torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(optimizer(stopped)["llm"]["state"][0].values(),
                                                 optimizer(whole)["llm"]["state"][0].values()))


def test_main_runs_twice_in_one_process_on_one_out(tmp_path, synthetic_dir):
    """r2rank.main called again in the same Python process (a notebook, a script), to resume: the first call's
    hold on --out must not refuse the second."""
    out = tmp_path / "run"
    r2rank.main(rl_argv(out, synthetic_dir, "--max-steps", "1"))
    r2rank.main(rl_argv(out, synthetic_dir, "--max-steps", "2", "--resume"))
    assert [row["step"] for row in rows(out)] == [1, 2]


@pytest.mark.parametrize("advantage", ["reward", "batch", "counterfactual"])
def test_each_advantage_trains_the_llm(advantage, tmp_path, synthetic_dir, monkeypatch):
    """The advantages handed to the PPO update, against each rule worked out from the step's rewards by hand;
    the LLM's weights move."""
    rewards, handed, ndcg, update = [], [], r2rank.ndcg_at_k, r2rank.ppo_update
    monkeypatch.setattr(r2rank, "ndcg_at_k", lambda *args: rewards.append(ndcg(*args)) or rewards[-1])  # phase 3: [U, S]
    monkeypatch.setattr(r2rank, "ppo_update", lambda model, opt, prompts, traces, adv, *args, **kw:
                        handed.append(adv.detach().clone()) or update(model, opt, prompts, traces, adv, *args, **kw))
    out = tmp_path / advantage
    r2rank.main(rl_argv(out, synthetic_dir, "--max-steps", "1", "--advantage", advantage, "--temperature", "1", "--lr", "1e-3"))
    (row,) = rows(out)
    (reward,), (given,) = rewards, handed  # [2 users, S], [2 users, K]
    means = reward.mean(1)
    if advantage == "reward":  # Eq. (6): every trace of a user gets the mean reward of its rankings
        torch.testing.assert_close(given, means[:, None].expand(2, 20))
    elif advantage == "batch":  # minus the other user's mean reward
        torch.testing.assert_close(given, torch.stack([means[0] - means[1], means[1] - means[0]])[:, None].expand(2, 20))
    else:  # one value per trace (exact values: test_ppo.py)
        assert given.shape == (2, 20) and (given.std(1) > 0).all()
    assert row["reward"] == pytest.approx(means.mean().item(), abs=1e-6)
    trained, start = saved(out, 1), untrained()
    assert any(not torch.equal(tensor, start[name]) for name, tensor in trained.items())


def test_freeze_llm_keeps_the_llm_and_trains_the_head(tmp_path, synthetic_dir):
    out = tmp_path / "mlp"
    r2rank.main(rl_argv(out, synthetic_dir, "--freeze-llm", "--max-steps", "2", "--keep-checkpoints", "0"))
    start = untrained()
    for step in (1, 2):
        assert all(torch.equal(tensor, start[name]) for name, tensor in saved(out, step).items())
    assert not same(saved(out, 1, "head"), saved(out, 2, "head"))
    assert not {"ratio", "clip_frac", "approx_kl", "ppo_loss"} & set(rows(out)[0])  # no PPO update, no PPO numbers


def test_head_lr_0_freezes_the_head_and_the_start_is_validated_as_step_0(tmp_path, synthetic_dir):
    """--max-new-tokens 0: the LLM learns through the score path alone (its h_k at the prompt's last token),
    the head stays; step 0's validation is recomputed by hand from plain forwards of the untrained model."""
    out = tmp_path / "run"
    r2rank.main(rl_argv(out, synthetic_dir, "--head-lr", "0", "--lr", "1e-3", "--max-steps", "2", "--max-new-tokens", "0",
                        "--eval-every", "2", "--eval-users", "3", "--keep-checkpoints", "0"))
    logged = rows(out)
    assert [row["step"] for row in logged] == [0, 1, 2] and set(logged[0]) == {"step", "valid_ndcg@10"}
    assert "valid_ndcg@10" in logged[2] and "valid_ndcg@10" not in logged[1]
    assert same(saved(out, 1, "head"), saved(out, 2, "head"))  # AdamW at lr 0: no step, no decay
    assert not same(saved(out, 1), saved(out, 2))  # while the LLM learns
    model, tokenizer = models.build_tiny(seed=0)
    head = ScoreHead(model.config.hidden_size, 256)
    head.load_state_dict(saved(out, 1, "head"))
    valid = data.load_split(synthetic_dir, "valid")[:3]
    with torch.no_grad():
        by_hand = [ndcg10_by_hand(head(prompt_hidden(model, tokenizer, inst, 2)).tolist(), inst["labels"]) for inst in valid]
    assert logged[0]["valid_ndcg@10"] == pytest.approx(sum(by_hand) / 3, abs=1e-6)


def test_no_trace_trains_the_head_on_the_prompts_last_hidden_state(tmp_path, synthetic_dir, monkeypatch):
    seen, rollout = [], r2rank.rollout
    monkeypatch.setattr(r2rank, "rollout", lambda model, tokenizer, prompts, *args:
                        seen.append(rollout(model, tokenizer, prompts, *args)) or seen[-1])
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))  # step 0's users, as the run draws them
    out = tmp_path / "run"
    r2rank.main(rl_argv(out, synthetic_dir, "--freeze-llm", "--max-steps", "2", "--max-new-tokens", "0", "--keep-checkpoints", "0"))
    traces, hidden = seen[0]
    assert traces == [[]] * 40
    model, tokenizer = models.build_tiny(seed=0)
    train = data.load_split(synthetic_dir, "train")
    expected = torch.cat([prompt_hidden(model, tokenizer, train[i], 2) for i in order[:2].tolist()])
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=0)
    assert [row["response_len"] for row in rows(out)] == [0.0, 0.0]
    assert not same(saved(out, 1, "head"), saved(out, 2, "head"))


def test_pl_std_reaches_the_plackett_luce_sampler(tmp_path, synthetic_dir, monkeypatch):
    seen, sample = [], plackett_luce.sample
    monkeypatch.setattr(plackett_luce, "sample", lambda scores, *args, **kw: seen.append(scores) or sample(scores, *args, **kw))
    out = tmp_path / "run"
    r2rank.main(rl_argv(out, synthetic_dir, "--freeze-llm", "--pl-std", "3", "--max-steps", "2", "--max-new-tokens", "1"))
    assert len(seen) == 2 and all(scores.shape == (2, 20) for scores in seen)
    for scores in seen:
        torch.testing.assert_close(scores.std(-1, correction=0), torch.full((2,), 3.0))
    assert all(abs(row["score_std"] - 3.0) > 1e-3 for row in rows(out))  # the head's own spread is logged


def test_a_checkpoint_given_as_model_brings_its_head(tmp_path, synthetic_dir):
    common = ["--freeze-llm", "--max-steps", "1", "--max-new-tokens", "1", "--head-width", "8"]
    r2rank.main(rl_argv(tmp_path / "first", synthetic_dir, *common, "--seed", "1"))  # a trained head
    source = str(tmp_path / "first" / "checkpoint-1")
    r2rank.main(rl_argv(tmp_path / "fresh", synthetic_dir, *common, "--head-lr", "0"))
    kept = rl_argv(tmp_path / "kept", synthetic_dir, *common, "--head-lr", "0")
    kept[kept.index("tiny")] = source
    r2rank.main(kept)
    heads = {name: saved(tmp_path / name, 1, "head") for name in ("first", "fresh", "kept")}
    assert same(heads["kept"], heads["first"]) and not same(heads["fresh"], heads["first"])


def test_model_tiny_alone_takes_the_quickstarts_defaults_and_builds_its_data(tmp_path):
    args = r2rank.parse_args(["--stage", "rl", "--model", "tiny"])
    assert {name: getattr(args, name) for name in r2rank.TINY_DEFAULTS} == r2rank.TINY_DEFAULTS
    assert r2rank.parse_args(["--model", "tiny", "--lr", "1e-4"]).lr == 1e-4  # a flag typed wins
    other = r2rank.parse_args(["--model", "Qwen/Qwen2.5-1.5B-Instruct"])  # another model keeps the general defaults
    assert all(getattr(other, name) != value for name, value in r2rank.TINY_DEFAULTS.items() if name != "max_steps")
    result = run_script(os.path.join(ROOT, "r2rank.py"), "--stage", "rl", "--model", "tiny", "--max-steps", "1",
                        "--eval-every", "0", cwd=tmp_path)  # short: test_quickstart.py runs the whole command
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / r2rank.TINY_DEFAULTS["out"]
    assert "8 users x 10 candidates = 80 traces per step (<= 1 tokens each), 32 rankings per user" in result.stdout
    assert [row["step"] for row in rows(out)] == [1]
    for split in ("train", "valid", "test"):  # pointwise: the positives are the camping items, and only they
        for inst in data.load_split(str(out / "data"), split):
            assert len(inst["candidates"]) == 10 and sum(inst["labels"]) >= 1
            assert [int("category: camping" in c["text"]) for c in inst["candidates"]] == inst["labels"]


# --------------------------------------------------------------------------- the pieces it is built of


def test_head_learns_to_rank_by_reinforce_through_plackett_luce():
    """Fixed per-candidate features; the relevant item is the one far out along a hidden direction u, on either
    side (|u . x|, which no linear score expresses). Trained only by REINFORCE through Plackett-Luce rankings
    with the NDCG@10 reward, the head lifts held-out NDCG@10 from about random (~0.23 for 1 + 19) above 0.8."""
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


def test_standardized_scores_by_hand():
    scores = torch.tensor([[0.0, 10.0, 20.0], [5.0, 5.0, 5.0]])
    # population std of (0, 10, 20) is sqrt(200 / 3) = 8.16497; 2 * 10 / 8.16497 = 2.44949
    torch.testing.assert_close(standardized(scores, 2.0), torch.tensor([[-2.44949, 0.0, 2.44949], [0.0, 0.0, 0.0]]))
    assert standardized(scores, 0.0) is scores  # off: the paper's raw scores


def one_user(synthetic_dir, candidates=4, max_new_tokens=6, temperature=1.0):
    """The tiny model, one training user with its first candidates, its prompts and sampled traces."""
    model, tokenizer = models.build_tiny(seed=0)
    instance = data.load_split(synthetic_dir, "train")[0]
    instance = dict(instance, candidates=instance["candidates"][:candidates], labels=instance["labels"][:candidates])
    prompts = [data.encode_user(tokenizer, instance, 3)]
    torch.manual_seed(0)
    traces, _ = r2rank.rollout(model, tokenizer, prompts, max_new_tokens, temperature)
    return model, prompts, [traces]


def ppo_args(**changes):
    return SimpleNamespace(**{"ppo_epochs": 1, "micro_batch": 3, "temperature": 1.0, "clip_eps": 0.2, "max_grad_norm": 1e9, **changes})


@pytest.mark.parametrize("whole_prompts", [False, True])
def test_ppo_update_moves_log_probs_with_the_sign_of_the_advantage(whole_prompts, synthetic_dir):
    model, prompts, traces = one_user(synthetic_dir)
    if whole_prompts:  # gradient checkpointing: the update feeds whole prompts instead of a prefix cache
        model.activation_checkpointing_enable()
    (prefix, suffixes), = prompts

    def total_logp():
        with torch.no_grad():
            logp, mask, _ = r2rank.forward_traces(model, prefix, suffixes, traces[0], 1.0)
        return (logp * mask).sum(-1)

    before = total_logp()
    r2rank.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1e-3), prompts, traces,
                      torch.tensor([[1.0, 1.0, -1.0, -1.0]]), ppo_args())
    after = total_logp()
    assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all(), (before, after)


def test_ppo_updates_first_epoch_has_ratio_1_and_minus_the_token_mean_advantage_as_loss(synthetic_dir):
    """theta_old is the update's own first forward: ratio exactly 1, no KL, and the loss minus the
    token-weighted mean advantage, by hand."""
    model, prompts, traces = one_user(synthetic_dir, candidates=3, max_new_tokens=5, temperature=0.8)
    advantages = torch.tensor([[1.0, -1.0, 0.5]])
    stats = r2rank.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.0), prompts, traces, advantages,
                              ppo_args(temperature=0.8, micro_batch=2))
    lengths = torch.tensor([len(t) for t in traces[0]], dtype=torch.float32)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-9) and stats["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    assert stats["ppo_loss"] == pytest.approx(-(advantages[0] * lengths).sum().item() / lengths.sum().item(), abs=1e-6)


def test_greedy_scores_do_not_depend_on_the_candidates_order(synthetic_dir):
    model, tokenizer = models.build_tiny(seed=0)
    args = r2rank.parse_args(["--model", "tiny", "--max-new-tokens", "5", "--max-history", "4"])
    instance = data.load_split(synthetic_dir, "train")[1]
    order = torch.randperm(len(instance["candidates"]), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = dict(instance, candidates=[instance["candidates"][i] for i in order], labels=[instance["labels"][i] for i in order])
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16)
    scores = r2rank.score_users(model, tokenizer, head, [instance], args, torch.float32)[0]
    shuffled_scores = r2rank.score_users(model, tokenizer, head, [shuffled], args, torch.float32)[0]
    torch.testing.assert_close(shuffled_scores, scores[order], atol=1e-5, rtol=0)


def test_a_reloaded_checkpoint_gives_the_same_scores(tmp_path, synthetic_dir):
    model, tokenizer = models.build_tiny(seed=3)
    args = r2rank.parse_args(["--model", "tiny", "--max-new-tokens", "5", "--max-history", "4", "--head-width", "16"])
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16)
    instances = data.load_split(synthetic_dir, "valid")[:2]
    expected = r2rank.score_users(model, tokenizer, head, instances, args, torch.float32)
    runs.save_checkpoint(str(tmp_path), 7, model, tokenizer, head, {"head": torch.optim.AdamW(head.parameters())}, args,
                         SimpleNamespace(fingerprint="-"))
    path = str(tmp_path / "checkpoint-7")
    assert runs.newest_whole_checkpoint(str(tmp_path)) == (path, 7)
    model2, tokenizer2 = r2rank.load_model(path, torch.device("cpu"))
    head2 = ScoreHead(model2.config.hidden_size, 16)
    runs.load_head(head2, path)
    torch.testing.assert_close(r2rank.score_users(model2, tokenizer2, head2, instances, args, torch.float32), expected)
