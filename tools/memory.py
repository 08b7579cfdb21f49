"""Peak memory of one RL step of r2rank.py, estimated by part from a Qwen2 config (no model is built):

    python tools/memory.py            # the table for Qwen2.5 0.5B-7B, full and LoRA (tools/benchmark.py --estimate)
    estimate_memory(config, K=20, prompt_tokens=700, new_tokens=512)

The layouts are r2rank.py's: the rollout decodes all the step's users at once (users x K rows, each
user's prefix cache repeated K times); the update runs micro-batches of --micro-batch traces through
a user's prefix cache repeated per trace (the shared-prefix layout), or whole prompts with
--gradient-checkpointing (a checkpointed layer keeps no cache). tools/benchmark.py --rl-step measures
one step beside this estimate.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import r2rank  # noqa: E402

DEFAULTS = r2rank.parse_args([])  # the CLI's defaults: what a run uses unless told (micro-batch, users per step)
# A candidate's own part of the prompt (its item line of <= --max-item-chars 200 characters, about 50 tokens,
# and the chat template's end), rounded up: the rest of the prompt is shared by the user's K traces.
CANDIDATE_TOKENS = 200


def parameter_count(config, lora_rank=0):
    """(base parameters, LoRA adapter parameters) of a Qwen2 config, tied embeddings counted once."""
    H, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)  # key / value width
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H  # q, k, v (with bias), o, MLP, 2 norms
    base = V * H * (1 if config.tie_word_embeddings else 2) + L * layer + H
    adapters = L * lora_rank * ((H + H) + 2 * (H + kv) + (H + H) + 2 * (H + I) + (I + H))  # r (in + out) each
    return base, adapters


def estimate_memory(config, K=20, prompt_tokens=700, new_tokens=512, micro_batch=DEFAULTS.micro_batch, checkpointing=True,
                    compute_bytes=2, lora_rank=0, fused=True, shared_prefix_tokens=0, rollout_rows=None):
    """Peak memory in bytes of one steady-state RL step (AdamW states already allocated), by part, and the
    peaks {"rollout", "update", "peak"}.

    compute_bytes: 2 under bf16 autocast, 4 in fp32. Weights: trained ones in fp32; with LoRA under autocast
    the frozen base of every nn.Linear (lm_head included, and with it a tied embedding) is held in the
    compute dtype (lora.hold_frozen_weights), and autocast caches a bf16 copy of each trained weight.
    fused: AdamW's fused or multi-tensor step (CUDA) holds one temporary as large as the trained
    parameters; the CPU's per-tensor step, one as large as the largest. shared_prefix_tokens: the
    update's shared-prefix layout (the prefix run once per micro-batch, its keys and values repeated per
    trace); 0 with checkpointing (whole prompts). rollout_rows: traces decoded in one generate call (the
    step's users x K), each holding keys and values of its whole prompt in the compute dtype (the prefix
    cache is repeated per row). Per token and layer, the saved activations of the update, counted from
    what a Qwen2 layer keeps for backward (fp32 RMSNorm in and out, the inputs of the projections, each
    cast separately under autocast, q and k before and after rope, SDPA's q, k, v and output, the MLP's
    four I-wide tensors). The tied-embedding term was found by measurement (an embedding and a tied
    lm_head alone: peak 1.69 GiB against 1.18 untied at V = 151,936, H = 896).
    """
    H, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    c, autocast = compute_bytes, compute_bytes < 4
    rows = rollout_rows or K
    base, adapters = parameter_count(config, lora_rank)
    trained = adapters if lora_rank else base
    linears = L * ((H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I) + V * H  # q, k, v, o, MLP; lm_head
    held_in_compute = linears if lora_rank and autocast else 0  # frozen, so held in bf16 once
    per_token_layer = (16 * H + c * ((3 if autocast else 1) * H + H + 2 * (H + kv) + 4 * H + (2 if autocast else 1) * H)
                       + 4 * c * I)
    own = prompt_tokens - shared_prefix_tokens + new_tokens  # a trace's tokens beyond the shared prefix
    tokens = shared_prefix_tokens + micro_batch * own  # through the model at once
    if checkpointing:  # each layer's input (the fp32 residual stream), and one layer recomputed in backward
        activations = L * tokens * 4 * H + tokens * per_token_layer
    else:  # every layer's, and the prefix's keys and values repeated for each trace of the micro-batch
        activations = L * tokens * per_token_layer + micro_batch * shared_prefix_tokens * L * 2 * kv * c
    parts = {
        "weights": c * held_in_compute + 4 * (base - held_in_compute + adapters),
        # autocast keeps a bf16 copy of every trained fp32 weight it casts (all linears, lm_head's tied embedding)
        "autocast weight copies": 2 * (trained - (0 if lora_rank else (0 if config.tie_word_embeddings else V * H))) if autocast else 0,
        "gradients (fp32)": 4 * trained,
        "AdamW states (fp32)": 8 * trained,
        "activations (one micro-batch)": activations,
        "trace logits (one micro-batch)": micro_batch * new_tokens * V * (12 + c),
        "KV cache (rollout)": rows * (prompt_tokens + new_tokens) * L * 2 * kv * c,
        "optimizer step temporary": 4 * (trained if fused else min(V * H, trained)),
        # a tied embedding's gradient arrives twice (embedding, lm_head) and is summed: two V x H temporaries
        "tied-embedding gradient temporaries": 2 * 4 * V * H if config.tie_word_embeddings and not lora_rank else 0,
    }
    static = parts["weights"] + parts["autocast weight copies"] + parts["AdamW states (fp32)"]
    backward = static + sum(parts[name] for name in ("gradients (fp32)", "activations (one micro-batch)",
                                                     "trace logits (one micro-batch)", "tied-embedding gradient temporaries"))
    step = static + parts["gradients (fp32)"] + parts["optimizer step temporary"]
    rollout_peak = static + parts["KV cache (rollout)"] + 3 * 4 * rows * V  # and [rows, V] fp32 logits per token
    return parts, {"rollout": rollout_peak, "update": max(backward, step), "peak": max(rollout_peak, backward, step)}


def print_estimates(candidates=20, prompt_tokens=700, new_tokens=512, micro_batch=DEFAULTS.micro_batch,
                    users=DEFAULTS.users_per_step):
    """The estimate for the four Qwen2.5 sizes, all weights and LoRA r = 16, bf16 autocast on CUDA: with
    --gradient-checkpointing (whole prompts), and without it (the shared-prefix update: the prompt less
    CANDIDATE_TOKENS is shared)."""
    rows, shared = users * candidates, max(prompt_tokens - CANDIDATE_TOKENS, 0)
    print(f"\n== estimated peak memory of one RL step: K = {candidates}, {prompt_tokens}-token prompts, {new_tokens} new "
          f"tokens, micro-batch {micro_batch}, {users} users ({rows} rows) decoded together, bf16 autocast, CUDA; before "
          "allocator margins ==")
    print("| model | parameters | all weights, checkpointing | LoRA r = 16, checkpointing | all weights, shared prefix "
          f"({shared} tokens) | LoRA r = 16, shared prefix |\n|---|---:|---:|---:|---:|---:|")
    for name in models.QWEN25:
        config = models.qwen25_config(name)
        gib = [estimate_memory(config, candidates, prompt_tokens, new_tokens, micro_batch, checkpointing, lora_rank=rank,
                               shared_prefix_tokens=0 if checkpointing else shared, rollout_rows=rows)[1]["peak"] / 2**30
               for checkpointing in (True, False) for rank in (0, 16)]
        print(f"| Qwen2.5-{name.split('-')[1].upper()} | {parameter_count(config)[0] / 1e9:.2f} B | "
              + " | ".join(f"{g:.1f} GiB" for g in gib) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=20, help="K")
    parser.add_argument("--prompt-tokens", type=int, default=700, help="a prompt's tokens")
    parser.add_argument("--new-tokens", type=int, default=512, help="a trace's tokens")
    parser.add_argument("--micro-batch", type=int, default=DEFAULTS.micro_batch, help="traces per forward/backward")
    parser.add_argument("--users", type=int, default=DEFAULTS.users_per_step, help="users per step")
    args = parser.parse_args()
    print_estimates(args.candidates, args.prompt_tokens, args.new_tokens, args.micro_batch, args.users)
