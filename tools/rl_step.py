"""One RL step of a model through the project's own code, timed and with its peak memory beside
machinery/memory.py's estimate; and --paper-scale, the ready GPU check. Run through benchmark.py:

    python tools/benchmark.py --rl-step random:qwen2.5-0.5b --new-tokens 64
    python tools/benchmark.py --paper-scale          # CUDA: the tests, then Qwen2.5-1.5B and 3B steps
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import rollout  # noqa: E402
from head import ScoreHead  # noqa: E402
from machinery import config, models, sources  # noqa: E402

from machinery.memory import estimate_memory  # noqa: E402


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def benchmark_instance(history, candidates, user=0):
    """A synthetic user (the `user`-th training user) with a full-length history (the synthetic set's
    are 4-10 items)."""
    raw = sources.synthetic_raw(users=50, seed=0)
    splits, _ = data.build_instances(raw, data.Protocol(candidates=candidates))
    instance = dict(splits["train"][user])
    pool = [item for inst in splits["train"] for item in inst["history"]]
    instance["history"] = (instance["history"] + pool)[:history]
    return instance


def rl_step(name, args, device):
    """One RL step of --model `name` through the project's own code (rollout_users, score_traces,
    ppo_update), AdamW states allocated first (a zero-gradient step), so the step is a steady-state one:
    time and peak memory of each phase, beside estimate_memory for the same settings."""
    dtype = getattr(torch, args.dtype)
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else rss_kib("VmRSS") * 1024
    model, tokenizer = models.load_policy(name, device, torch.float32, seed=0)
    cfg = config.Config(model=name, max_new_tokens=args.new_tokens, max_history=args.history, micro_batch=args.micro_batch,
                        users_per_step=args.users, lora_rank=args.lora_rank, temperature=1.0, ppo_epochs=args.ppo_epochs,
                        rollout_rows=getattr(args, "rows", 160))
    checkpointing = models.enable_checkpointing(model, args.checkpointing, device)
    shared = not checkpointing
    torch.manual_seed(0)
    trained = models.add_adapters(model, args.lora_rank) if args.lora_rank else list(model.parameters())
    models.hold_frozen_weights(model, dtype)  # LoRA's base in the compute dtype, as r2rank.py holds it
    # lr 1e-4: large enough that the second PPO epoch sees a policy that moved (approx_kl > 0), which
    # it would not if the step had left autocast's cached weights stale; speed and memory do not depend on it
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    for parameter in trained:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # allocates the AdamW states and changes nothing (zero gradients, no weight decay)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    head = ScoreHead(model.config.hidden_size, 256).to(device)
    instances = [dict(benchmark_instance(args.history, args.candidates, u), user_id=str(u)) for u in range(args.users)]
    prefix, suffixes = data.encode_user(tokenizer, instances[0], cfg.max_history, cfg.max_item_chars)
    prompt_tokens = len(prefix) + sum(map(len, suffixes)) // len(suffixes)
    print(f"\n== one RL step, {name}: {args.users} users x K = {len(suffixes)}, prompt {prompt_tokens} tokens ({len(prefix)} "
          f"shared), up to {args.new_tokens} new tokens, micro-batch {args.micro_batch}, rollout rows {cfg.rollout_rows}, {args.dtype} compute, checkpointing "
          f"{'on' if checkpointing else 'off (shared-prefix update)'}, {'LoRA r = ' + str(args.lora_rank) if args.lora_rank else 'all weights trained'} ==")

    def phase(fn, autocast=True):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak RSS restarts from the current RSS
        start = time.perf_counter()
        with models.mixed_precision(device, dtype if autocast else torch.float32):
            result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kib("VmHWM") * 1024
        return time.perf_counter() - start, peak - baseline, result

    generator = torch.Generator(device=device).manual_seed(0)
    seconds, rollout_peak, (traces, prompts) = phase(lambda: rollout.rollout_users(model, tokenizer, instances, cfg, generator))
    new = sum(int(s.lengths.sum()) for s in traces)
    advantages = torch.randn(args.users, len(suffixes), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head(torch.stack([s.final_hidden for s in traces]))
    score_grads = torch.randn(args.users, len(suffixes), generator=torch.Generator().manual_seed(1))  # the score path, on by default
    update_seconds, update_peak, stats = phase(lambda: rollout.ppo_update(model, optimizer, prompts, traces, advantages, cfg,
                                                                          shared, head=head, score_grads=score_grads, dtype=dtype),
                                               autocast=False)  # ppo_update autocasts its forwards, never its steps
    parts, peaks = estimate_memory(model.config, len(suffixes), prompt_tokens, args.new_tokens, args.micro_batch, checkpointing,
                                   dtype.itemsize, args.lora_rank, foreach=device.type == "cuda",
                                   shared_prefix_tokens=len(prefix) if shared else 0,
                                   rollout_rows=min(args.users * len(suffixes), cfg.rollout_rows))
    gib = 2**30
    print(f"rollout {seconds:8.1f} s  {new / seconds:8.1f} new tokens/s ({new} tokens)   peak {rollout_peak / gib:6.2f} GiB "
          f"(estimate {peaks['rollout'] / gib:6.2f}, ratio {rollout_peak / peaks['rollout']:.2f})")
    print(f"update  {update_seconds:8.1f} s  ({cfg.ppo_epochs} PPO epochs)                         peak {update_peak / gib:6.2f} GiB "
          f"(estimate {peaks['update'] / gib:6.2f}, ratio {update_peak / peaks['update']:.2f})")
    print("estimate by part: " + ", ".join(f"{part} {value / gib:.2f}" for part, value in parts.items()) + " GiB")
    # epoch 1's ratio is exactly 1 (theta_old is its own forward), so the mean over epochs times the epochs is the later ones'
    later_kl = stats["approx_kl"] * cfg.ppo_epochs / max(cfg.ppo_epochs - 1, 1)
    later = (f"PPO epochs 2..{cfg.ppo_epochs}: approx_kl {later_kl:.3g} (0 would mean stale autocast weights), clip_frac "
             f"{stats['clip_frac'] * cfg.ppo_epochs / (cfg.ppo_epochs - 1):.3f}; ") if cfg.ppo_epochs > 1 else ""
    print(f"{later}decode_logp_gap mean {stats['decode_logp_gap']:.4f}, max {stats['decode_logp_gap_max']:.3f} per token "
          f"(decode.py against the update's forward)")
    return {"approx_kl_later": later_kl, "decode_logp_gap": stats["decode_logp_gap"], "rollout_s": seconds,
            "update_s": update_seconds, "new_tokens": new, "peak_gib": max(rollout_peak, update_peak) / gib,
            "estimate_gib": peaks["peak"] / gib}


def paper_scale(args):
    """--paper-scale, on a CUDA machine: the test suite (its CLI runs pick CUDA), then one RL step of
    random Qwen2.5-1.5B and 3B at the paper's setting, all weights and LoRA."""
    if not torch.cuda.is_available():
        sys.exit("error: --paper-scale needs a CUDA GPU (this machine has none); --rl-step and --estimate run anywhere")
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    started = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"], cwd=root)
    print(f"test suite on {torch.cuda.get_device_name()}: exit {tests.returncode}, {time.perf_counter() - started:.0f} s")
    args.users, args.new_tokens, args.dtype, args.checkpointing, args.history, args.ppo_epochs = 4, 512, "bfloat16", "on", 20, 2
    for name in ("random:qwen2.5-1.5b", "random:qwen2.5-3b"):
        for rank in (0, 16):
            args.lora_rank = rank
            rl_step(name, args, torch.device("cuda"))
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - started:.0f} s")
