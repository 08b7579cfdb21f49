"""Time and peak memory of one RL step of r2rank.py, phase by phase, beside tools/memory.py's estimate.

    python tools/benchmark.py                                        # the tiny model, 1 user
    python tools/benchmark.py --rl-step $SMOL --users 4 --new-tokens 32 --threads 1 --cpu-time
    python tools/benchmark.py --rl-step random:qwen2.5-0.5b --new-tokens 64 --gradient-checkpointing
    python tools/benchmark.py --estimate      # the estimated memory of Qwen2.5 0.5B-7B (tools/memory.py)
    python tools/benchmark.py --paper-scale   # CUDA: random Qwen2.5-1.5B at the paper's setting

The step is r2rank.py's own functions, in train_rl's order: 1) rollout (one generate call for all users),
2) the head's scores, 4) ppo_update (--ppo-epochs passes of forward, backward and AdamW step, the score
path on). AdamW's states are allocated first (a zero-gradient step), so the step is a steady-state one.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on a CPU the growth of the process's peak RSS in
the phase (reset through /proc/self/clear_refs) over the RSS before the model was built, which also
counts what the allocator keeps after freeing. Figures to read, not assertions: not collected by pytest.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import lora  # noqa: E402
import r2rank  # noqa: E402
import runs  # noqa: E402
import sources  # noqa: E402
from data import UsageError  # noqa: E402
from head import ScoreHead  # noqa: E402
from protocol import Protocol  # noqa: E402

import memory  # noqa: E402  (tools/memory.py, beside this file)

GIB = 2**30


def rss_bytes(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def benchmark_users(users, history, candidates):
    """`users` training users of the synthetic set, each with a full `history` (the set's own are 4-10 items)."""
    splits, _ = datasets.build_instances(sources.synthetic_raw(users=max(50, 2 * users), seed=0), Protocol(candidates=candidates))
    pool = [item for inst in splits["train"] for item in inst["history"]]
    return [dict(inst, history=(inst["history"] + pool)[:history]) for inst in splits["train"][:users]]


def rl_step(name, args, device):
    """One RL step of --model `name`: seconds and peak memory of each phase, beside memory.estimate_memory."""
    dtype = getattr(torch, args.dtype)
    clock = time.process_time if args.cpu_time and device.type == "cpu" else time.perf_counter
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes("VmRSS")
    model, tokenizer = r2rank.load_model(name, device, torch.float32, seed=0)  # fp32 master weights, as train_rl
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers' own switch, as train_rl
    torch.manual_seed(0)
    trained = lora.add_adapters(model, args.lora_rank) if args.lora_rank else list(model.parameters())
    lora.hold_frozen_weights(model, dtype)
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    for parameter in trained:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # allocates AdamW's states and changes nothing (zero gradients, no weight decay)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    head = ScoreHead(model.config.hidden_size, 256).to(device)
    run_args = r2rank.parse_args(["--model", name, "--max-history", str(args.history), "--micro-batch", str(args.micro_batch),
                                  "--ppo-epochs", str(args.ppo_epochs), "--temperature", "1", "--threads", str(args.threads)])
    instances = benchmark_users(args.users, args.history, args.candidates)
    prompts = r2rank.prompt_tokens(tokenizer, instances, run_args)
    K, prefix = len(prompts[0][1]), len(prompts[0][0])
    prompt = prefix + sum(map(len, prompts[0][1])) // K
    print(f"\n== one RL step, {name}: {args.users} users x K = {K}, prompt {prompt} tokens ({prefix} shared), up to "
          f"{args.new_tokens} new tokens, micro-batch {args.micro_batch}, {args.ppo_epochs} PPO epochs, {args.dtype} compute, "
          f"{'gradient checkpointing (whole prompts)' if args.gradient_checkpointing else 'shared-prefix update'}, "
          f"{'LoRA r = ' + str(args.lora_rank) if args.lora_rank else 'all weights trained'}, "
          f"{'CPU' if clock is time.process_time else 'wall'} time ==")

    def phase(fn):
        """(seconds, peak bytes over the baseline, fn())"""
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak RSS restarts from the current RSS
        start = clock()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes("VmHWM")
        return clock() - start, peak - baseline, result

    def sample():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return r2rank.rollout(model, tokenizer, prompts, args.new_tokens, 1.0)

    rollout_s, rollout_peak, (flat, hidden) = phase(sample)
    new = sum(map(len, flat))
    score_s, _, scores = phase(lambda: head(hidden.view(args.users, K, -1)))
    traces = [flat[u * K:(u + 1) * K] for u in range(args.users)]
    advantages = torch.randn(args.users, K, generator=torch.Generator().manual_seed(0)).to(device)
    score_grads = torch.randn(args.users, K, generator=torch.Generator().manual_seed(1)).to(device)
    update_s, update_peak, stats = phase(lambda: r2rank.ppo_update(model, optimizer, prompts, traces, advantages, run_args,
                                                                   head, score_grads, dtype))
    parts, peaks = memory.estimate_memory(model.config, K, prompt, args.new_tokens, args.micro_batch, args.gradient_checkpointing,
                                          dtype.itemsize, args.lora_rank, fused=device.type == "cuda",
                                          shared_prefix_tokens=0 if args.gradient_checkpointing else prefix,
                                          rollout_rows=args.users * K)
    print(f"| phase | s | peak GiB | estimate GiB | peak / estimate | note |\n|---|---:|---:|---:|---:|---|")
    print(f"| 1 rollout | {rollout_s:.2f} | {rollout_peak / GIB:.2f} | {peaks['rollout'] / GIB:.2f} | "
          f"{rollout_peak / peaks['rollout']:.2f} | {new} new tokens, {new / rollout_s:.1f} tokens/s |")
    print(f"| 2 scores | {score_s:.4f} | | | | the head over {args.users * K} hidden states |")
    print(f"| 4 update | {update_s:.2f} | {update_peak / GIB:.2f} | {peaks['update'] / GIB:.2f} | "
          f"{update_peak / peaks['update']:.2f} | {args.ppo_epochs} x (forward, backward, AdamW step) |")
    print("estimate by part: " + ", ".join(f"{part} {value / GIB:.2f}" for part, value in parts.items()) + " GiB")
    # epoch 1's ratio is exactly 1 (theta_old is its own forward): the later epochs' KL is the mean times E / (E - 1)
    if args.ppo_epochs > 1:
        print(f"PPO epochs 2..{args.ppo_epochs}: approx_kl {stats['approx_kl'] * args.ppo_epochs / (args.ppo_epochs - 1):.3g} "
              "(0 would mean the update left autocast's weights stale)")
    return {"rollout_s": rollout_s, "update_s": update_s, "new_tokens": new, "peak_gib": max(rollout_peak, update_peak) / GIB,
            "estimate_gib": peaks["peak"] / GIB}


def paper_scale(args):
    """--paper-scale: one RL step of random Qwen2.5-1.5B at the paper's setting, on CUDA."""
    if not torch.cuda.is_available():
        sys.exit("error: --paper-scale needs a CUDA GPU (this machine has none); --rl-step and --estimate run anywhere")
    args.users, args.candidates, args.new_tokens, args.history = 4, 20, 512, 20
    args.dtype, args.gradient_checkpointing, args.lora_rank, args.ppo_epochs = "bfloat16", True, 0, 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rl_step("random:qwen2.5-1.5b", args, torch.device("cuda"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rl-step", default="tiny", metavar="MODEL", help="the model of the step, as r2rank.py's --model")
    parser.add_argument("--users", type=int, default=1, help="users in the step")
    parser.add_argument("--candidates", type=int, default=20, help="K")
    parser.add_argument("--new-tokens", type=int, default=64, help="a trace's token budget")
    parser.add_argument("--history", type=int, default=20, help="history items in the prompt")
    parser.add_argument("--micro-batch", type=int, default=8, help="traces per forward/backward of the update")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="PPO epochs (time scales with them, memory not)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute precision (autocast)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="the update on whole prompts, checkpointed")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: all weights)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true", help="on a CPU, time by the process's CPU seconds: on a "
                        "shared machine wall time counts the waits for a core")
    parser.add_argument("--estimate", action="store_true", help="print the estimated memory of Qwen2.5 0.5B-7B and stop")
    parser.add_argument("--prompt-tokens", type=int, default=700, help="--estimate: a prompt's tokens")
    parser.add_argument("--paper-scale", action="store_true", help="CUDA: one step of random Qwen2.5-1.5B, 4 users, K 20, "
                        "512 new tokens, bf16, gradient checkpointing")
    args = parser.parse_args(argv)
    for name in ("users", "new_tokens", "candidates", "micro_batch", "ppo_epochs", "prompt_tokens"):
        if getattr(args, name) < 1 + (name == "candidates"):
            parser.error(f"--{name.replace('_', '-')} must be >= {1 + (name == 'candidates')}, got {getattr(args, name)}")
    if args.history < 0 or args.threads < 0 or args.lora_rank < 0:
        parser.error("--history, --threads and --lora-rank must be >= 0")
    if args.estimate:  # the paper's trace budget unless told otherwise
        new_tokens = args.new_tokens if "--new-tokens" in (argv or sys.argv[1:]) else 512
        return memory.print_estimates(args.candidates, args.prompt_tokens, new_tokens, args.micro_batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.paper_scale:
            return paper_scale(args)
        rl_step(args.rl_step, args, runs.pick_device("auto"))
    except UsageError as error:  # a model that cannot be loaded
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
