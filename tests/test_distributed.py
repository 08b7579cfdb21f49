"""torchrun (distributed.py): two gloo processes on the CPU do what one process does, for the same users.

The gradients are compared directly, before any optimizer: AdamW is blind to a constant factor in
the gradient, so comparing weights alone would miss an average taken where a sum is due.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import data
from head import ScoreHead, score_traces
import plackett_luce
import r2rank
import rollout
from conftest import ROOT, run_cli
from metrics import ndcg_at_k
from ppo import leave_one_out_baseline, reinforce_loss
from machinery import config, datasets, distributed, models


class KeepGradients(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is given."""

    def __init__(self, parameters):
        super().__init__(parameters, {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])


def step_gradients(users, instances, total_users, total_tokens=None, sum_gradients=None):
    """The LLM's and the head's gradients of one RL step on `users` (their training positions): the
    same code path train_rl takes, with per-user generators."""
    model, tokenizer = models.build_tiny(seed=0)
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16)
    cfg = config.Config(model="tiny", max_new_tokens=5, max_history=3, micro_batch=3, temperature=1.0, ppo_epochs=1)
    generators = [r2rank.user_generator(0, 0, u, "cpu") for u in users]
    chosen = [instances[u] for u in users]
    traces, prompts = rollout.rollout_users(model, tokenizer, chosen, cfg, generators)
    scores = score_traces(head, traces)
    labels = torch.tensor([inst["labels"] for inst in chosen], dtype=torch.float32)
    rankings = torch.stack([plackett_luce.sample(scores[i].detach(), 4, g) for i, g in enumerate(generators)])
    reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), 10)
    optimizer = KeepGradients(model.parameters())
    rollout.ppo_update(model, optimizer, prompts, traces, reward.mean(1, keepdim=True).expand(-1, 20), cfg, True,
                       total_tokens, sum_gradients)
    head_loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, leave_one_out_baseline(reward))
    (head_loss * len(users) / total_users).backward()
    if sum_gradients:
        sum_gradients(head.parameters())
    return optimizer.seen[0], [p.grad for p in head.parameters()]


def rank_worker(rank, world, port, synthetic, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    instances = data.load_split(synthetic, "train")
    users = distributed.shard([3, 8, 1, 5, 12])  # uneven: 3 users on rank 0, 2 on rank 1
    model, tokenizer = models.build_tiny(seed=0)
    cfg = config.Config(model="tiny", max_new_tokens=5, max_history=3)
    traces, _ = rollout.rollout_users(model, tokenizer, [instances[u] for u in users], cfg,
                                       [r2rank.user_generator(0, 0, u, "cpu") for u in users])
    traces_tokens = distributed.total(sum(int(s.lengths.sum()) for s in traces))
    llm, head = step_gradients(users, instances, 5, traces_tokens, distributed.sum_gradients)
    if rank == 0:
        torch.save({"llm": llm, "head": head}, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_sum_to_the_single_process_gradient(synthetic_dir, tmp_path):
    instances = data.load_split(synthetic_dir, "train")
    single_llm, single_head = step_gradients([3, 8, 1, 5, 12], instances, 5)
    out = str(tmp_path / "grads.pt")
    mp.spawn(rank_worker, args=(2, free_port(), synthetic_dir, out), nprocs=2, join=True)
    both = torch.load(out, weights_only=True)
    assert len(both["llm"]) == len(single_llm)
    for got, want in zip(both["llm"] + both["head"], single_llm + single_head):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # an average instead of a sum would be half the size: the check above can tell
    assert max(g.abs().max().item() for g in single_llm) > 1e-4


def torchrun(*args, nproc=2):
    """torchrun with --standalone: a free port of its own, so two suites (or a suite and a run) on one
    machine do not meet on the default 29500 (a collision there aborted a rank with SIGABRT)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                           os.path.join(ROOT, "r2rank.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # gloo on CPUs, even on a GPU machine


def plain(*args):
    """The one-process reference, on the CPU like the gloo ranks (a forked run: conftest.run_cli)."""
    return run_cli(*args, "--device", "cpu")


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_torchrun_matches_one_process_and_resumes(synthetic_dir, tmp_path):
    """--advantage batch: the one advantage that reads the other ranks' rewards."""
    common = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--users-per-step", "3", "--max-new-tokens", "5",
              "--max-history", "3", "--lr", "1e-3", "--save-every", "2", "--advantage", "batch"]
    one, two, resumed = (str(tmp_path / name) for name in ("one", "two", "resumed"))
    assert plain(*common, "--max-steps", "3", "--out", one).returncode == 0
    result = torchrun(*common, "--max-steps", "3", "--out", two)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torchrun(*common, "--max-steps", "2", "--out", resumed).returncode == 0
    again = torchrun(*common, "--max-steps", "3", "--out", resumed, "--resume")
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    for other in (two, resumed):
        assert [row["step"] for row in rows(other)] == [1, 2, 3]
        for mine, theirs in zip(rows(one), rows(other)):
            for name, value in mine.items():
                if name != "step_time":
                    assert theirs[name] == pytest.approx(value, rel=1e-3, abs=1e-5), (other, mine["step"], name)
        start = models.build_tiny(seed=0)[0].state_dict()
        weights = load_file(os.path.join(other, "checkpoint-3", "model.safetensors"))
        reference = load_file(os.path.join(one, "checkpoint-3", "model.safetensors"))
        assert max((reference[n] - start[n]).abs().max().item() for n in reference) > 1e-3  # it moved
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=2e-5)


def test_torchrun_eval_gathers_every_user_once(synthetic_dir, tmp_path):
    common = ["--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--split", "train", "--eval-limit", "5",
              "--methods", "pointwise,random", "--bootstrap", "50"]
    assert plain(*common, "--out", str(tmp_path / "one")).returncode == 0
    result = torchrun(*common, "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((tmp_path / name / "eval-train.json").read_text())["methods"] for name in ("one", "two"))
    for method in ("pointwise", "random"):
        ids = [user["user_id"] for user in two[method]["per_user"]]
        assert ids == [user["user_id"] for user in one[method]["per_user"]] and len(set(ids)) == 5
        for mine, theirs in zip(one[method]["per_user"], two[method]["per_user"]):
            assert theirs["ndcg@10"] == pytest.approx(mine["ndcg@10"], abs=1e-6)
    bad = torchrun("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--users-per-step", "1", "--out", str(tmp_path / "b"))
    assert bad.returncode != 0 and "leaves some of the 2 ranks without a user" in bad.stderr


def test_a_slow_rank_0_validation_is_waited_for_within_the_timeout(tmp_path):
    """Rank 0 validates alone while rank 1 waits at the step's next collective: the process group's
    timeout (--dist-timeout) must cover it. Here validation takes several seconds (20 users' greedy
    400-token traces): a 3-second timeout kills the run with one line naming the flag (so the test can
    fail), the default (120 minutes) waits for it."""
    data_dir = str(tmp_path / "data")
    datasets.build_synthetic(data_dir, users=200, seed=0)  # 20 validation users
    common = ["--stage", "rl", "--model", "tiny", "--data", data_dir, "--users-per-step", "2", "--max-new-tokens", "400",
              "--max-steps", "1", "--eval-every", "1", "--eval-users", "20", "--max-history", "3"]
    short = torchrun(*common, "--dist-timeout", "0.05", "--out", str(tmp_path / "short"))
    assert short.returncode != 0 and "waited more than --dist-timeout 0.05 minutes" in short.stderr, short.stderr[-2000:]
    waited = torchrun(*common, "--out", str(tmp_path / "default"))
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert [row["step"] for row in rows(str(tmp_path / "default"))] == [0, 1]
