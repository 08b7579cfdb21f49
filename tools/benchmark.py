"""Time and peak memory of one RL step of r2rank.py, phase by phase, beside an estimate by part.
(r2rank.py's own functions, AdamW's states allocated first; peak: CUDA's max_memory_allocated, or the CPU's peak RSS.)

    python tools/benchmark.py --estimate      # estimated memory of Qwen2.5 0.5B-7B on CUDA (no model is built)
    python tools/benchmark.py --rl-step random:qwen2.5-0.5b --new-tokens 64 --gradient-checkpointing --threads 2
    python tools/benchmark.py --paper-scale   # CUDA: random Qwen2.5-1.5B at the paper's setting
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import models  # noqa: E402
import r2rank  # noqa: E402
import runs  # noqa: E402
import sources  # noqa: E402
from data import UsageError  # noqa: E402
from head import ScoreHead  # noqa: E402
from protocol import Protocol  # noqa: E402

GIB, MARGIN, DEFAULTS = 2**30, 1.25, r2rank.parse_args([])  # DEFAULTS: what a run uses unless told (micro-batch, users per step)


def estimate_memory(config, K=20, prompt_tokens=700, new_tokens=512, micro_batch=DEFAULTS.micro_batch, checkpointing=True,
                    compute_bytes=2, lora_rank=0, fused=True, shared_prefix_tokens=0, rollout_rows=None):
    """(bytes by part, peaks {"rollout", "update", "peak"}) of one steady-state RL step in r2rank.py's layouts.
    compute_bytes: 2 under bf16 autocast, 4 in fp32; fused: AdamW's fused CUDA step (r2rank.py's); shared_prefix_tokens: 0 with
    checkpointing (whole prompts); rollout_rows: users x K in one generate call. Activations per token and layer:
    what a Qwen2 layer keeps for backward; the tied-embedding term was measured (1.69 GiB tied, 1.18 untied)."""
    H, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv, tied = config.num_key_value_heads * (H // config.num_attention_heads), config.tie_word_embeddings  # kv: key / value width
    c, autocast, rows = compute_bytes, compute_bytes < 4, rollout_rows or K
    linears = L * ((H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I) + V * H  # q, k, v (with bias), o, MLP; lm_head
    base = linears + (0 if tied else V * H) + L * 2 * H + H  # the embedding unless tied, the norms
    adapters = L * lora_rank * ((H + H) + 2 * (H + kv) + (H + H) + 2 * (H + I) + (I + H))  # r (in + out) each
    trained, held_in_compute = (adapters, linears if autocast else 0) if lora_rank else (base, 0)  # frozen: in bf16
    per_token_layer = 16 * H + c * ((3 if autocast else 1) * H + H + 2 * (H + kv) + 4 * H + (2 if autocast else 1) * H) + 4 * c * I
    tokens = shared_prefix_tokens + micro_batch * (prompt_tokens - shared_prefix_tokens + new_tokens)  # through the model at once
    if checkpointing:  # each layer's input (the fp32 residual stream), and one layer recomputed in backward
        activations = L * tokens * 4 * H + tokens * per_token_layer
    else:  # every layer's, and the prefix's keys and values repeated for each trace of the micro-batch
        activations = L * tokens * per_token_layer + micro_batch * shared_prefix_tokens * L * 2 * kv * c
    parts = {"weights": c * held_in_compute + 4 * (base - held_in_compute + adapters),
             "autocast weight copies": 2 * (trained - (0 if lora_rank or tied else V * H)) if autocast else 0,
             "gradients (fp32)": 4 * trained, "AdamW states (fp32)": 8 * trained,
             "activations (one micro-batch)": activations,
             "trace logits (one micro-batch)": micro_batch * new_tokens * V * (12 + c),
             "KV cache (rollout)": rows * (prompt_tokens + new_tokens) * L * 2 * kv * c,
             "optimizer step temporary": 0 if fused else 4 * trained,  # foreach AdamW: one as large as the weights
             "tied-embedding gradient temporaries": 2 * 4 * V * H if tied and not lora_rank else 0}  # arrives twice, summed
    static = parts["weights"] + parts["autocast weight copies"] + parts["AdamW states (fp32)"]
    backward = static + sum(parts[name] for name in ("gradients (fp32)", "activations (one micro-batch)",
                                                     "trace logits (one micro-batch)", "tied-embedding gradient temporaries"))
    step = static + parts["gradients (fp32)"] + parts["optimizer step temporary"]
    rollout = static + parts["KV cache (rollout)"] + 3 * 4 * rows * V  # and [rows, V] fp32 logits per token
    return parts, {"rollout": rollout, "update": max(backward, step), "peak": max(rollout, backward, step)}


def print_estimates(candidates, prompt_tokens, new_tokens, micro_batch, users):
    """The estimate for the Qwen2.5 sizes, all weights and LoRA r = 16, bf16 autocast on CUDA, with checkpointing
    (whole prompts) and without (shared prefix: all but a candidate's own ~200 tokens)."""
    rows, shared = users * candidates, max(prompt_tokens - 200, 0)
    print(f"\n== estimated peak memory of one RL step: K = {candidates}, {prompt_tokens}-token prompts, {new_tokens} new tokens, "
          f"micro-batch {micro_batch}, {users} users ({rows} rows) decoded together, bf16 autocast, CUDA; before allocator margins ==")
    print("| model | parameters | all weights, checkpointing | LoRA r = 16, checkpointing | all weights, shared prefix "
          f"({shared} tokens) | LoRA r = 16, shared prefix |\n|---|---:|---:|---:|---:|---:|")
    for name in models.QWEN25:
        found = [estimate_memory(models.qwen25_config(name), candidates, prompt_tokens, new_tokens, micro_batch, checkpointing,
                                 lora_rank=rank, shared_prefix_tokens=0 if checkpointing else shared, rollout_rows=rows)
                 for checkpointing in (True, False) for rank in (0, 16)]
        print(f"| Qwen2.5-{name.split('-')[1].upper()} | {found[0][0]['weights'] / 4e9:.2f} B | "  # fp32 weights, 4 bytes each
              + " | ".join(f"{peaks['peak'] / GIB:.1f} GiB" for _, peaks in found) + " |")
    print(f"\n== what fits: the estimate x {MARGIN} (peaks measured on the CPU ran 1.17-1.21 times it) against a card ==\n"
          "| model | setting | needs | 24 GB | 40 GB | 80 GB |\n|---|---|---:|:-:|:-:|:-:|")
    for name in ("qwen2.5-1.5b", "qwen2.5-3b"):
        for rank, checkpointing in ((0, True), (0, False), (16, True), (16, False)):
            need = MARGIN * estimate_memory(models.qwen25_config(name), candidates, prompt_tokens, new_tokens, micro_batch, checkpointing,
                                            lora_rank=rank, shared_prefix_tokens=0 if checkpointing else shared, rollout_rows=rows)[1]["peak"] / GIB
            setting = f"{'--lora-rank 16' if rank else 'all weights'}{', --gradient-checkpointing' if checkpointing else ''}"
            print(f"| {name} | {setting} | {need:.1f} GiB | " + " | ".join("yes" if need <= card else "-" for card in (24, 40, 80)) + " |")


def rss_bytes(field):  # VmRSS (now) or VmHWM (the peak since the last reset) of this process
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) * 1024


def rl_step(args, device):
    """One RL step of --rl-step MODEL on args.users synthetic users: seconds and peak memory of each phase."""
    dtype, cuda = getattr(torch, args.dtype), device.type == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    model, tokenizer = r2rank.load_model(args.rl_step, device, torch.float32, seed=0)  # fp32 master weights, as train_rl
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=cuda)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # allocates AdamW's states and changes nothing (zero gradients, no weight decay)
    optimizer.zero_grad(set_to_none=True)
    head = ScoreHead(model.config.hidden_size, 256).to(device)
    run_args = r2rank.parse_args(["--max-history", str(args.history), "--micro-batch", str(args.micro_batch), "--temperature", "1"])
    splits, _ = datasets.build_instances(sources.synthetic_raw(users=max(50, 2 * args.users), seed=0), Protocol(candidates=args.candidates))
    pool = [item for inst in splits["train"] for item in inst["history"]]  # every user gets a full --history
    prompts = r2rank.prompt_tokens(tokenizer, [dict(inst, history=(inst["history"] + pool)[:args.history])
                                               for inst in splits["train"][:args.users]], run_args)
    K, prefix, epochs = len(prompts[0][1]), len(prompts[0][0]), run_args.ppo_epochs
    prompt = prefix + sum(map(len, prompts[0][1])) // K
    print(f"\n== one RL step, {args.rl_step} on {torch.cuda.get_device_name() if cuda else device}: {args.users} users x K = {K}, "
          f"prompt {prompt} tokens ({prefix} shared), up to {args.new_tokens} new tokens, micro-batch {args.micro_batch}, "
          f"{epochs} PPO epochs, {args.dtype}, {'gradient checkpointing' if args.gradient_checkpointing else 'shared-prefix update'} ==")

    def phase(fn):
        """(seconds, peak bytes over the baseline, fn())"""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            open("/proc/self/clear_refs", "w").write("5")  # the peak RSS restarts from the current RSS
        start, result = time.perf_counter(), fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - baseline, result

    model.eval()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        rollout_s, rollout_peak, (flat, _) = phase(lambda: r2rank.rollout(model, tokenizer, prompts, args.new_tokens, 1.0))
    new, traces = sum(map(len, flat)), [flat[u * K:(u + 1) * K] for u in range(args.users)]
    advantages, score_grads = (torch.randn(args.users, K, generator=torch.Generator().manual_seed(s)).to(device) for s in (0, 1))
    update_s, update_peak, stats = phase(lambda: r2rank.ppo_update(model, optimizer, prompts, traces, advantages, run_args,
                                                                   head, score_grads, dtype))
    parts, peaks = estimate_memory(model.config, K, prompt, args.new_tokens, args.micro_batch, args.gradient_checkpointing,
                                   dtype.itemsize, 0, cuda, 0 if args.gradient_checkpointing else prefix, args.users * K)
    print("| phase | s | peak GiB | estimate GiB | peak / estimate | note |\n|---|---:|---:|---:|---:|---|")
    for title, seconds, peak, estimate, note in (
            ("1 rollout", rollout_s, rollout_peak, peaks["rollout"], f"{new} new tokens, {new / rollout_s:.1f} tokens/s"),
            ("4 update", update_s, update_peak, peaks["update"], f"{epochs} x (forward, backward, AdamW step)")):
        print(f"| {title} | {seconds:.2f} | {peak / GIB:.2f} | {estimate / GIB:.2f} | {peak / estimate:.2f} | {note} |")
    print("estimate by part: " + ", ".join(f"{part} {value / GIB:.2f}" for part, value in parts.items()) + " GiB")
    # epoch 1's ratio is exactly 1, so the later epochs' KL is the mean times E / (E - 1); 0: autocast's weights stale
    print(f"PPO epochs 2..{epochs}: approx_kl {stats['approx_kl'] * epochs / (epochs - 1):.3g}" if epochs > 1 else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rl-step", default="tiny", metavar="MODEL", help="the model of the step, as r2rank.py's --model")
    parser.add_argument("--estimate", action="store_true", help="print the estimated memory of Qwen2.5 0.5B-7B and stop")
    parser.add_argument("--paper-scale", action="store_true", help="CUDA: random Qwen2.5-1.5B, 4 users, K 20, 512 new tokens, bf16, checkpointing")
    parser.add_argument("--users", type=int, help="users in the step (default 1; --estimate: r2rank.py's --users-per-step)")
    parser.add_argument("--candidates", type=int, default=20, help="K")
    parser.add_argument("--new-tokens", type=int, help="a trace's token budget (default 64; --estimate: 512)")
    parser.add_argument("--history", type=int, default=20, help="history items in the prompt (--estimate: 700-token prompts)")
    parser.add_argument("--micro-batch", type=int, default=DEFAULTS.micro_batch, help="traces per forward/backward of the update")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute precision (autocast)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="the update on whole prompts, checkpointed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    args = parser.parse_args(argv)
    for name, low in (("users", 1), ("new_tokens", 1), ("candidates", 2), ("micro_batch", 1), ("history", 0), ("threads", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.estimate:
        return print_estimates(args.candidates, 700, args.new_tokens or 512, args.micro_batch, args.users or DEFAULTS.users_per_step)
    if args.paper_scale and not torch.cuda.is_available():
        sys.exit("error: --paper-scale needs a CUDA GPU (this machine has none); --rl-step and --estimate run anywhere")
    if args.paper_scale:
        vars(args).update(rl_step="random:qwen2.5-1.5b", users=4, candidates=20, new_tokens=512, history=20, dtype="bfloat16",
                          gradient_checkpointing=True)
    args.users, args.new_tokens = args.users or 1, args.new_tokens or 64
    torch.set_num_threads(args.threads or torch.get_num_threads())
    try:
        rl_step(args, runs.pick_device("auto"))
    except UsageError as error:  # a model that cannot be loaded
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
