"""Peak memory of one RL step, estimated by part from a Qwen2 config (no model is built), and the
update's layout chosen by it (--gradient-checkpointing auto):

    python tools/benchmark.py --estimate          # the table for Qwen2.5 0.5B-7B, full and LoRA
    estimate_memory(config, K=20, prompt_tokens=700, new_tokens=512)   # micro-batch: config.py's default
    choose_checkpointing("auto", device, config, K, prompt_tokens, shared_tokens, new_tokens, ...)

tools/benchmark.py --rl-step measures one step beside this estimate.
"""
import torch

from machinery import config as cli_config
from machinery import models
import rollout

MICRO_BATCH = cli_config.Config().micro_batch  # the CLI's --micro-batch default: what a run uses unless told
USERS_PER_STEP = cli_config.Config().users_per_step
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


def estimate_memory(config, K=20, prompt_tokens=700, new_tokens=512, micro_batch=MICRO_BATCH, checkpointing=True,
                    compute_bytes=2, lora_rank=0, foreach=True, shared_prefix_tokens=0, rollout_rows=None):
    """Peak memory in bytes of one steady-state RL step (AdamW states already allocated), by part.

    compute_bytes: 2 under bf16 autocast, 4 in fp32. Weights: trained ones in fp32; with LoRA under
    autocast the frozen base of every nn.Linear (lm_head included, and with it a tied embedding: one
    tensor) is held in the compute dtype (models.hold_frozen_weights), the norms and an untied input
    embedding stay fp32, and autocast caches a bf16 copy of each trained weight (the adapters). foreach:
    AdamW's multi-tensor step (the CUDA default) holds one temporary as large as the trained parameters;
    the CPU's per-tensor step, one as large as the largest. shared_prefix_tokens: the update's
    shared-prefix path (prefix run once per micro-batch), 0 for the per-candidate one. rollout_rows: the
    traces decoded as one batch (rollout.rollout_users: users x K up to --rollout-rows; default K), each
    holding its keys in fp32 and its values in the compute dtype (decode.py), counted over the whole
    prompt (an upper bound: the shared prefix is held once per user). Per token and
    layer, the saved activations of the update, counted from what a Qwen2 layer keeps for backward (fp32
    RMSNorm in and out, the inputs of the projections, each cast separately under autocast, q and k
    before and after rope, SDPA's q, k, v and output, the MLP's four I-wide tensors). The tied-embedding
    term was found by measurement (an embedding and a tied lm_head alone: peak 1.69 GiB against 1.18
    untied at V = 151,936, H = 896).
    """
    H, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    c, autocast = compute_bytes, compute_bytes < 4
    rows = rollout_rows or K
    base, adapters = parameter_count(config, lora_rank)
    trained = adapters if lora_rank else base
    linears = L * ((H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I) + V * H  # q, k, v, o, MLP; lm_head
    held_in_compute = linears if lora_rank and autocast else 0  # frozen, so held in bf16 once
    largest = V * H
    per_token_layer = (16 * H + c * ((3 if autocast else 1) * H + H + 2 * (H + kv) + 4 * H + (2 if autocast else 1) * H)
                       + 4 * c * I)
    tokens = (shared_prefix_tokens + micro_batch * (prompt_tokens - shared_prefix_tokens + new_tokens)
              if shared_prefix_tokens else micro_batch * (prompt_tokens + new_tokens))  # through the model at once
    if checkpointing:  # each layer's input (the fp32 residual stream), and one layer recomputed in backward
        activations = L * tokens * 4 * H + tokens * per_token_layer
    else:
        activations = L * tokens * per_token_layer
    parts = {
        "weights": c * held_in_compute + 4 * (base - held_in_compute + adapters),
        # autocast keeps a bf16 copy of every trained fp32 weight it casts (all linears, lm_head's tied embedding)
        "autocast weight copies": 2 * (trained - (0 if lora_rank else (0 if config.tie_word_embeddings else V * H))) if autocast else 0,
        "gradients (fp32)": 4 * trained,
        "AdamW states (fp32)": 8 * trained,
        "activations (one micro-batch)": activations,
        "trace logits (one micro-batch)": micro_batch * new_tokens * V * (12 + c),
        "KV cache (rollout, one decode batch)": rows * (prompt_tokens + new_tokens) * L * kv * (4 + c),
        "optimizer step temporary": 4 * (trained if foreach else min(largest, trained)),
        # a tied embedding's gradient arrives twice (embedding, lm_head) and is summed: two V x H temporaries
        "tied-embedding gradient temporaries": 2 * 4 * V * H if config.tie_word_embeddings and not lora_rank else 0,
    }
    static = parts["weights"] + parts["autocast weight copies"] + parts["AdamW states (fp32)"]
    backward = static + sum(parts[name] for name in ("gradients (fp32)", "activations (one micro-batch)",
                                                     "trace logits (one micro-batch)", "tied-embedding gradient temporaries"))
    step = static + parts["gradients (fp32)"] + parts["optimizer step temporary"]
    rollout_peak = static + parts["KV cache (rollout, one decode batch)"] + 3 * 4 * rows * V  # and [rows, V] logits per token
    return parts, {"rollout": rollout_peak, "update": max(backward, step), "peak": max(rollout_peak, backward, step)}


def print_estimates(args):
    """The estimate for the four Qwen2.5 sizes, full fine-tuning and LoRA r = 16, bf16 autocast on CUDA:
    with gradient checkpointing (the GPU default), and without it, with the shared-prefix update (which
    --shared-prefix-update auto picks then; the prompt less CANDIDATE_TOKENS is shared).
    args: candidates, prompt_tokens, new_tokens, and micro_batch (None or absent: MICRO_BATCH)."""
    micro_batch = getattr(args, "micro_batch", None) or MICRO_BATCH
    rows = min(USERS_PER_STEP * args.candidates, getattr(cli_config.Config(), "rollout_rows", rollout.ROLLOUT_ROWS))
    shared = max(args.prompt_tokens - CANDIDATE_TOKENS, 0)
    print(f"\n== estimated peak memory of one RL step: K = {args.candidates}, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens, micro-batch {micro_batch}, the rollout's {rows} rows decoded together, bf16 autocast, "
          "CUDA; before allocator margins ==")
    print("| model | parameters | full, checkpointing | LoRA r = 16, checkpointing | full, shared prefix "
          f"({shared} tokens), no checkpointing | LoRA r = 16, shared prefix, no checkpointing |\n|---|---:|---:|---:|---:|---:|")
    for name in models.QWEN25:
        config = models.qwen25_config(name)
        gib = [estimate_memory(config, args.candidates, args.prompt_tokens, args.new_tokens, micro_batch, checkpointing,
                               lora_rank=rank, shared_prefix_tokens=0 if checkpointing else shared,
                               rollout_rows=rows)[1]["peak"] / 2**30
               for checkpointing in (True, False) for rank in (0, 16)]
        print(f"| Qwen2.5-{name.split('-')[1].upper()} | {parameter_count(config)[0] / 1e9:.2f} B | "
              + " | ".join(f"{g:.1f} GiB" for g in gib) + " |")


# Measured peaks were 1.17-1.20 times the estimate (RESULTS.md, Qwen2.5-0.5B's shape on the CPU).
ESTIMATE_MARGIN = 1.25


def choose_checkpointing(setting, device, config, K, prompt_tokens, shared_tokens, new_tokens, micro_batch,
                         compute_bytes, lora_rank, available_bytes=None):
    """--gradient-checkpointing as (on, why). "on" and "off" are taken as given. "auto" is off on a CPU
    or MPS (host memory; recomputing only costs time there) and on CUDA off when the shared-prefix
    update without checkpointing (a user's prompt prefix run once per micro-batch; checkpointing would
    recompute it for every trace) is estimated to fit, with ESTIMATE_MARGIN, in the memory available to
    this process (free plus what it holds already: the weights are in the estimate); on otherwise, or
    for a model whose config the estimate cannot read. available_bytes: instead of asking CUDA."""
    if setting != "auto":
        return setting == "on", "as given"
    if device.type != "cuda":
        return False, f"auto: off on {device.type}"
    try:
        peak = estimate_memory(config, K, prompt_tokens, new_tokens, micro_batch, False, compute_bytes, lora_rank,
                               foreach=True, shared_prefix_tokens=shared_tokens)[1]["peak"]
    except AttributeError:  # not a Qwen2-shaped config
        return True, "auto: the memory of this architecture is not estimated"
    if available_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        available_bytes = free + torch.cuda.memory_allocated(device)
    fits = peak * ESTIMATE_MARGIN <= available_bytes
    return not fits, (f"auto: the shared-prefix update needs about {peak / 2**30:.1f} GiB (x{ESTIMATE_MARGIN:g}) "
                      f"of {available_bytes / 2**30:.1f} GiB available")
