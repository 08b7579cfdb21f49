"""torchrun: two gloo processes on the CPU do what one process does.

The update is checked against its exact oracle: r2rank.ppo_update on all users in one process, and on each
process's share of the same fixed traces in a 2-process group. The gradients are compared before the
optimizer (AdamW is blind to a constant factor, so weights alone would miss a mean taken where a sum is due),
then the weights after two epochs. The CLI under torchrun is checked for what it writes (rank 0 alone) and
for --resume, whose oracle is the uninterrupted torchrun run."""
import json
import os
import socket
import subprocess
import sys
import traceback
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import data
import models
import r2rank
from conftest import ROOT, _forkserver
from head import ScoreHead

USERS, K = 5, 4  # 5 users: 3 on rank 0, 2 on rank 1


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of each step."""

    def __init__(self, parameters, lr):
        super().__init__(parameters, lr=lr)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def fixed_update(data_dir, users):
    """ppo_update with the score path on `users` (indices into 5 fixed users of K candidates): fixed traces of
    0 to 5 tokens, advantages and dV/ds. Returns (gradients of each epoch, final weights, stats)."""
    model, tokenizer = models.build_tiny(seed=0)
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16)
    instances = [dict(inst, candidates=inst["candidates"][:K], labels=inst["labels"][:K])
                 for inst in data.load_split(data_dir, "train")[:USERS]]
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 6, (USERS, K), generator=generator).tolist()
    traces = [[torch.randint(10, 600, (n,), generator=generator).tolist() for n in user] for user in lengths]
    advantages = torch.randn(USERS, K, generator=generator)
    score_grads = torch.randn(USERS, K, generator=generator)
    prompts = [data.encode_user(tokenizer, inst, 2) for inst in instances]
    args = SimpleNamespace(ppo_epochs=2, micro_batch=3, temperature=0.7, clip_eps=0.2, max_grad_norm=1e9)
    optimizer = RecordingSGD(model.parameters(), lr=0.5)
    stats = r2rank.ppo_update(model, optimizer, [prompts[u] for u in users], [traces[u] for u in users],
                              advantages[users], args, head, score_grads[users])
    return optimizer.seen, {name: p.detach().clone() for name, p in model.named_parameters()}, stats


def rank_worker(rank, port, data_dir, out):
    """One process of the group: its share of the users, as train_rl deals them (users[rank::world])."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        result = fixed_update(data_dir, list(range(USERS))[rank::2])
        if rank == 0:
            torch.save(result, out)
        dist.destroy_process_group()
    except Exception:
        with open(f"{out}.{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_sum_to_the_one_process_update(synthetic_dir, tmp_path):
    grads, weights, stats = fixed_update(synthetic_dir, list(range(USERS)))
    out, port = str(tmp_path / "rank0.pt"), free_port()
    workers = [_forkserver().Process(target=rank_worker, args=(rank, port, synthetic_dir, out)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    errors = "".join(open(f"{out}.{r}.err").read() for r in range(2) if os.path.exists(f"{out}.{r}.err"))
    if "init_process_group" in errors and not os.path.exists(out):
        pytest.skip(f"no gloo process group here: {errors.strip().splitlines()[-1]}")
    assert [w.exitcode for w in workers] == [0, 0], errors
    both_grads, both_weights, both_stats = torch.load(out, weights_only=False)
    assert len(both_grads) == len(grads) == 2  # one optimizer step per epoch
    for epoch, (got, want) in enumerate(zip(both_grads, grads)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=f"epoch {epoch + 1}")
    assert max(g.abs().max().item() for g in grads[0]) > 1e-3  # half of it (a mean) would show
    for name, tensor in weights.items():
        torch.testing.assert_close(both_weights[name], tensor, rtol=1e-4, atol=1e-6)
    assert both_stats.keys() == stats.keys() and "ratio" in stats
    for name, value in stats.items():
        assert both_stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def torchrun(*args):
    """torchrun --standalone (a free port of its own) with 2 gloo processes on the CPU."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(ROOT, "r2rank.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_torchrun_trains_rank_0_alone_writes_and_it_resumes(synthetic_dir, tmp_path):
    """--advantage batch: the one advantage that reads the other process's rewards."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--users-per-step", "4", "--max-new-tokens", "3",
              "--max-history", "2", "--eval-every", "0", "--save-every", "1", "--advantage", "batch"]
    first = torchrun(*common, "--max-steps", "2", "--out", str(resumed))
    ran = 'r2rank.py", line' in first.stderr or "traces per step" in first.stdout  # a process of the group ran r2rank.py
    if first.returncode != 0 and (not ran or "init_process_group" in first.stderr and "traces per step" not in first.stdout):
        pytest.skip(f"torchrun cannot start here: {(first.stderr.strip().splitlines() or ['?'])[-1]}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 users x 20 candidates = 80 traces per step" in first.stdout and "2 process(es) on cpu" in first.stdout
    for step in (1, 2):  # one line per step: rank 1 prints nothing
        assert sum(line.startswith(f"step {step} ") for line in first.stdout.splitlines()) == 1, first.stdout
    assert [row["step"] for row in rows(resumed)] == [1, 2]  # one row per step: rank 1 writes nothing
    assert sorted(os.listdir(resumed)) == sorted(["checkpoint-1", "checkpoint-2", "metrics.jsonl", ".r2rank-lock"])
    start = models.build_tiny(seed=0)[0].state_dict()
    trained = load_file(str(resumed / "checkpoint-2" / "model.safetensors"))
    assert max((trained[name] - start[name]).abs().max().item() for name in trained) > 1e-4
    again = torchrun(*common, "--max-steps", "3", "--out", str(resumed), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(f"resumed from {resumed}/checkpoint-2 at step 2") == 1, again.stdout
    assert torchrun(*common, "--max-steps", "3", "--out", str(whole)).returncode == 0
    drop_time = lambda rs: [{k: v for k, v in row.items() if k != "step_time"} for row in rs]
    assert drop_time(rows(resumed)) == drop_time(rows(whole))
    for name in ("model", "head"):
        a, b = (load_file(str(out / "checkpoint-3" / f"{name}.safetensors")) for out in (resumed, whole))
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_ctrl_c_under_torchrun_keeps_the_step_in_progress(synthetic_dir, tmp_path):
    """A terminal's Ctrl-C reaches torchrun and every rank, and torchrun then relays a SIGINT of its own to each rank:
    that copy must not count as a second Ctrl-C (which stops at once). Every rank finishes its step; rank 0 saves
    it, says so once, and --resume goes on from it."""
    import signal
    import time

    out = tmp_path / "run"
    common = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--users-per-step", "4", "--max-new-tokens", "3",
              "--max-history", "2", "--eval-every", "0", "--save-every", "1000", "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                os.path.join(ROOT, "r2rank.py"), *common, "--max-steps", "1000"], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isfile(out / "metrics.jsonl") and os.path.getsize(out / "metrics.jsonl")):
        time.sleep(0.2)
    if process.poll() is not None or time.time() >= deadline:
        process.kill()
        pytest.skip(f"torchrun did not reach a step here: {process.communicate()[1].strip().splitlines()[-1:]}")
    os.killpg(process.pid, signal.SIGINT)  # the terminal's Ctrl-C: to the whole process group
    stdout, stderr = process.communicate(timeout=120)
    assert stderr.count("stopped by SIGINT: steps 1-") == 1, stderr[-3000:]  # rank 0 alone says it
    assert "SIGINT again" not in stderr and "interrupted:" not in stderr, stderr[-3000:]  # the relay is no second Ctrl-C
    last = rows(out)[-1]["step"]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == [f"checkpoint-{last}"]
    again = torchrun(*common, "--max-steps", str(last + 1), "--resume")
    assert again.returncode == 0 and [row["step"] for row in rows(out)] == list(range(1, last + 2)), again.stderr[-3000:]
