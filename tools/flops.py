"""How far each phase of an RL step is from the machine's limit: FLOPs counted from the model's shape,
and a matrix-multiply peak measured on the same device in the same process.

    peak = matmul_peak(device, dtype)                       # FLOP/s of a large square product
    skinny = matmul_peak(device, dtype, rows=20, inner=576, cols=1536)   # the decode's shape
    forward_flops(config, tokens=..., attended=..., logit_rows=...)

Counted (useful work only): 2 FLOPs per multiply-add of every linear layer for each token through the
model, the two attention products (q k^T and p v) over the keys each token attends to, the LM head
where logits are taken. Backward counts twice its forward. Not counted: norms, activations, softmax
(a few per cent of a layer), and work spent on padding or on rows that have already finished. So a
phase's share of the peak is a lower bound on how busy the multiply units were, and its distance
from 100% is what better code could still win.
"""
import time

import torch


def linear_parameters(config):
    """Weights of one token's pass through every decoder layer's linear layers (q, k, v, o, MLP)."""
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return L * (H * q + 2 * H * kv + q * H + 3 * H * I)


def forward_flops(config, tokens, attended, logit_rows):
    """FLOPs of a forward pass: `tokens` through the layers, `attended` (query, key) pairs summed over
    tokens (per layer and head), `logit_rows` rows through the LM head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * attended
    return 2 * tokens * linear_parameters(config) + attention + 2 * logit_rows * config.vocab_size * config.hidden_size


def causal_pairs(context, new):
    """(query, key) pairs of `new` tokens appended causally after `context` earlier ones."""
    return new * context + new * (new + 1) // 2


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, rows=None, inner=None, cols=None, seconds=1.0, clock=time.perf_counter):
    """Best FLOP/s of [rows, inner] @ [inner, cols] over repeated runs of about `seconds` in all.
    Without sizes: a square product large enough to reach the device's peak (2048 on CPU, 8192 on GPU)."""
    if rows is None:
        rows = inner = cols = 8192 if device.type == "cuda" else 2048
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    flops, best, spent = 2 * rows * inner * cols, 0.0, 0.0
    a @ b  # warm-up
    while spent < seconds:
        synchronize(device)
        start = clock()
        for _ in range(5):
            a @ b
        synchronize(device)
        elapsed = clock() - start
        spent += elapsed
        best = max(best, 5 * flops / elapsed)
    return best


def print_table(rows, peak, peak_label):
    """rows: (phase, seconds, flops, own peak or None, note). One line each: achieved FLOP/s and the share
    of `peak` (and of the phase's own-shape peak where given)."""
    print(f"| phase | s | GFLOP | GFLOP/s | share of {peak_label} | note |")
    print("|---|---:|---:|---:|---:|---|")
    for phase, seconds, flops, own_peak, note in rows:
        rate = flops / seconds
        share = f"{100 * rate / peak:.0f}%"
        if own_peak:
            share += f" ({100 * rate / own_peak:.0f}% of {own_peak / 1e9:.0f} at its shape)"
        print(f"| {phase} | {seconds:.2f} | {flops / 1e9:.1f} | {rate / 1e9:.1f} | {share} | {note} |")
