"""Several processes under torchrun (torch.distributed): a step's users split across ranks, the
gradients summed so that the update is the one a single process computes for the same users.

    torchrun --nproc-per-node 2 r2rank.py --stage rl ...     # gloo on CPUs, NCCL on GPUs
    python r2rank.py --stage rl ...                          # no process group: every call below is free

Each rank holds the whole model (data parallelism, as torch's DistributedDataParallel does) and
works on its share of the step's users: users[rank::world]. What makes N ranks equal one process:
- randomness per user: a user's traces and rankings come from a generator seeded by
  (seed, step, user), never from one stream shared by the users (rl_run.user_generator);
- every loss is a share of the step's global total (the PPO loss of the tokens of the whole step,
  the head's loss of all users' rankings), so the gradients are summed, not averaged, across ranks;
- rank 0 alone writes (metrics, checkpoints, eval files); every rank reads the same checkpoint.
"""
import datetime
import os

import torch
import torch.distributed as dist


def start(timeout_minutes=120.0):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns the CUDA device of
    this rank's GPU, or None. A plain run starts nothing. timeout_minutes (--dist-timeout): how long a
    rank waits in a collective for the others. Rank 0 validates and saves alone while the others wait
    at the step's next collective, so the default (torch's is 10 minutes for NCCL) must cover the
    longest validation and checkpoint save."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cuda and torch.cuda.device_count() < local_world:
        from protocol import UsageError

        raise UsageError(f"torchrun started {local_world} processes on this node, which has {torch.cuda.device_count()} "
                        "GPU(s): one process per GPU (--nproc-per-node), or CUDA_VISIBLE_DEVICES= for CPU processes")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return None


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def shard(items):
    """This rank's share of a list: items[rank::world]."""
    return items[rank()::world()]


def gather(items):
    """The lists of shard(all_items) from every rank, put back in the order of all_items."""
    parts = per_rank(list(items))
    merged = [None] * sum(map(len, parts))
    for r, part in enumerate(parts):
        merged[r::world()] = part
    return merged


def per_rank(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not active():
        return [obj]
    parts = [None] * world()
    dist.all_gather_object(parts, obj)
    return parts


def total(value, op="sum"):
    """A float summed (or "max") over the ranks."""
    if not active():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.item()


def sum_gradients(parameters):
    """Sum each parameter's .grad over the ranks (in place). Every rank's gradient is its share of
    the global loss, so the sum is the single-process gradient."""
    if not active():
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)


def barrier():
    if active():
        dist.barrier()


def stop():
    if active():
        dist.destroy_process_group()
