"""A hand-written forward pass for decoding Llama-family LLMs (Llama, Qwen2, SmolLM2): the shared
prompt prefix's keys and values kept once, each row's own in a cache allocated once and written in place.

    cache = decode.RowCache(decoder, rows=K, capacity=L + max_new_tokens, prefix=decode.prefix_cache(decoder, prefix_ids))
    hidden = decode.forward(decoder, cache, input_ids, positions, valid)   # [K, T, H], after the final norm

Several users at once (U users x K rows, one read of the weights per step for all of them): rows
u*K .. u*K + K - 1 are user u's, and each attends to its own user's prefix.

    prefix = decode.stack_prefixes([decode.prefix_cache(decoder, ids) for ids in prefix_ids_per_user])
    cache = decode.RowCache(decoder, rows=U * K, capacity=L + max_new_tokens, prefix=prefix)

Why (rollout.sample_traces uses it; measured with tools/benchmark.py): transformers' DynamicCache
concatenates every layer's keys and values with each new token, so a decode step copies the whole cache
(K rows x the prompt and the trace so far), and a prefix shared by the K rows is stored, copied and
attended to K times. Here the prefix's keys and values exist once, [kv_heads, P, head_dim], and the K
rows attend to them through one matrix product per key-value head, with the K rows' queries stacked
(rows x query heads per key head x new tokens along the product's M dimension); each row's own keys
and values (its suffix and its trace) go into a buffer of fixed capacity at their slot. Same function
as the model's forward: the tests compare the tokens with `generate` and the log-probs with a plain
forward.

The layers' own modules are called (projections, norms, MLP, rotary embedding), so LoRA adapters
and autocast apply as in the model's forward; only the attention and the cache are written here.
`supported(model)` says whether a model has this layout; rollout falls back to transformers' cache
for any other.

Attention rounds as PyTorch's SDPA does (its flash and memory-efficient kernels): q and k are cast
to the projections' dtype (bf16 under autocast), the scores q k^T are computed and kept in fp32 (a
product of two bf16 numbers is exact in fp32), the softmax is taken in fp32, and only the
probabilities are cast to the values' dtype for the product with the values. So the keys are stored
in fp32 (holding bf16 values under autocast), the values in the projections' dtype. What still differs
in bf16: the kernels round exp(score - max) and divide by the row's sum at the end, in one fp32
accumulator; here the normalized probabilities are rounded, and the prefix's and the row's products
are each rounded to bf16 before their sum.
"""
import torch

ARCHITECTURES = ("llama", "qwen2")  # q/k/v/o projections, RoPE, RMSNorm, a gated MLP, no per-head norms


def supported(model):
    """True for a Llama or Qwen2 decoder with full attention in every layer (no sliding window)."""
    config = model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (config.model_type in ARCHITECTURES and set(layer_types) == {"full_attention"}
            and not getattr(config, "use_sliding_window", False))


class RowCache:
    """The keys and values one decode of N rows attends to, per layer:
    prefix: (keys, values) [kv_heads, P, head_dim], shared by all rows (None: no shared prefix); or,
            for U users (stack_prefixes), (keys, values) [U, kv_heads, P, head_dim], valid [U, P]
            (None: no padding) and the shortest prefix's length, the N rows in U equal blocks, block u
            attending to user u's prefix;
    rows:   (keys, values) [N, kv_heads, capacity, head_dim], each row's own tokens at slots 0, 1, ...
    valid:  [N, capacity] bool, which written slots hold a real token (pads and finished rows: False).
    Buffers are allocated on the first write: keys in fp32, as attention() multiplies them in fp32
    (stored once, not cast again at every step); values in their own dtype (bf16 under autocast)."""

    def __init__(self, decoder, rows, capacity, prefix=None):
        self.rows, self.capacity, self.prefix, self.length = rows, capacity, prefix, 0
        self.keys, self.values = [None] * len(decoder.layers), [None] * len(decoder.layers)
        self.valid = torch.zeros((rows, capacity), dtype=torch.bool, device=decoder.embed_tokens.weight.device)

    def write(self, layer, keys, values):
        """keys, values [N, kv_heads, T, head_dim] of the new tokens, into slots length .. length + T - 1."""
        if self.keys[layer] is None:
            shape = (self.rows, keys.shape[1], self.capacity, keys.shape[3])
            self.keys[layer] = keys.new_empty(shape, dtype=torch.float32)
            self.values[layer] = values.new_empty(shape)
        end = self.length + keys.shape[2]
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # views, no copy


def rotate(x, cos, sin):
    """RoPE on x [N, heads, T, head_dim] with cos, sin [N, T, head_dim] (the rotary module's output)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(query, keys, values, allowed, prefix):
    """softmax(q k^T * scale) v over [prefix keys | row keys], computed as two products (the prefix's
    keys are never repeated per row).

    query [N, kv_heads, G, T, d] (already scaled; G query heads share one key-value head),
    keys, values [N, kv_heads, S, d]; allowed [N, 1, 1, T, S] bool; prefix: None, or (keys, values)
    [kv_heads, P, d] shared by all N rows, or (keys, values) [U, kv_heads, P, d] with an optional
    valid [U, P] bool (False: padding) and the first slot any user pads (stack_prefixes' outputs), the N
    rows in U equal blocks, block u attending to user u's.
    The scores and the softmax are in fp32 whatever the inputs' dtype (as SDPA's kernels accumulate
    q k^T in fp32); the probabilities are cast to the values' dtype for the products with the values.
    returns [N, kv_heads, G, T, d].
    """
    N, kv_heads, G, T, d = query.shape
    query = query.float()
    # fp32 products even under autocast, which would round the scores to bf16: a product of two bf16
    # numbers is exact in fp32, so these are the fp32-accumulated scores of SDPA's kernels.
    with torch.autocast(query.device.type, enabled=False):
        scores = query.reshape(N, kv_heads, G * T, d) @ keys.float().transpose(-1, -2)  # [N, kv_heads, G*T, S]
    scores = scores.view(N, kv_heads, G, T, -1).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if prefix is None:
        return (scores.softmax(-1).to(values.dtype).view(N, kv_heads, G * T, -1) @ values).view(N, kv_heads, G, T, d)
    prefix_keys, prefix_values = prefix[0], prefix[1]
    if prefix_keys.dim() == 3:  # one prefix for all rows
        prefix_keys, prefix_values = prefix_keys[None], prefix_values[None]
    U, P, S = prefix_keys.shape[0], prefix_keys.shape[2], scores.shape[-1]
    K = N // U  # rows per user: the K candidates
    # Each user's rows' queries against its one copy: [U, kv_heads, K*G*T, d] @ [U, kv_heads, d, P]
    stacked = query.view(U, K, kv_heads, G, T, d).transpose(1, 2).reshape(U, kv_heads, K * G * T, d)
    with torch.autocast(query.device.type, enabled=False):
        prefix_scores = (stacked @ prefix_keys.float().transpose(-1, -2)).view(U, kv_heads, K, G, T, P)
    if len(prefix) > 2 and prefix[2] is not None:  # a shorter prefix's padding, all of it past the shortest prefix
        start = prefix[3] if len(prefix) > 3 else 0
        prefix_scores[..., start:].masked_fill_(~prefix[2][:, None, None, None, None, start:], torch.finfo(torch.float32).min)
    # The softmax in the prefix's layout, [U, kv_heads, K, G, T, P + S]: only the rows' S scores move (P >> S).
    row_scores = scores.view(U, K, kv_heads, G, T, S).transpose(1, 2)
    probs = torch.cat([prefix_scores, row_scores], dim=-1).softmax(-1).to(values.dtype)
    from_prefix = probs[..., :P].reshape(U, kv_heads, K * G * T, P) @ prefix_values  # [U, kv_heads, K*G*T, d]
    from_rows = probs[..., P:].transpose(1, 2).reshape(N, kv_heads, G * T, S) @ values  # [N, kv_heads, G*T, d]
    return (from_prefix.view(U, kv_heads, K, G, T, d).transpose(1, 2).reshape(N, kv_heads, G, T, d)
            + from_rows.view(N, kv_heads, G, T, d))


def forward(decoder, cache, input_ids, positions, valid):
    """Run T new tokens per row through the decoder, reading and extending `cache`.

    input_ids, positions [N, T] (positions count real tokens from the prompt's start, prefix included);
    valid [N, T] bool (False: a pad or a finished row's filler; it is written but no later token sees it).
    Token t of a row attends to the whole prefix, its row's valid earlier slots, and itself.
    returns: last_hidden_state [N, T, H] after the final norm (what the LM head reads).
    """
    N, T = input_ids.shape
    start = cache.length
    cache.valid[:, start:start + T] = valid
    slots = torch.arange(start + T, device=input_ids.device)
    causal = slots[None, :] <= slots[start:, None]  # [T, S]: new token t sees slots up to its own
    allowed = (cache.valid[:, None, :start + T] & causal)[:, None, None]  # [N, 1, 1, T, S]
    allowed = allowed | (slots[None, :] == slots[start:, None])[None, None, None]  # a pad sees itself: no empty softmax

    hidden = decoder.embed_tokens(input_ids)
    cos, sin = decoder.rotary_emb(hidden, positions)
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        d = attn.head_dim
        query = attn.q_proj(hidden).view(N, T, -1, d).transpose(1, 2)  # [N, heads, T, d]
        key = attn.k_proj(hidden).view(N, T, -1, d).transpose(1, 2)  # [N, kv_heads, T, d]
        value = attn.v_proj(hidden).view(N, T, -1, d).transpose(1, 2)
        # RoPE returns fp32 under autocast (cos, sin are fp32): cast q and k to the values' dtype, as
        # autocast casts SDPA's inputs; scale q in fp32 (SDPA scales the fp32 scores: the same up to
        # fp32 rounding).
        query, key = rotate(query, cos, sin).to(value.dtype), rotate(key, cos, sin).to(value.dtype)
        keys, values = cache.write(index, key, value)
        kv_heads = key.shape[1]
        query = (query.float() * attn.scaling).view(N, kv_heads, -1, T, d)
        prefix = None if cache.prefix is None else (cache.prefix[0][index], cache.prefix[1][index], *cache.prefix[2:])
        out = attention(query, keys, values, allowed, prefix)  # [N, kv_heads, G, T, d]
        out = out.reshape(N, -1, T, d).transpose(1, 2).reshape(N, T, -1)  # heads in the model's order
        hidden = residual + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    cache.length = start + T
    return decoder.norm(hidden)


def prefix_cache(decoder, prefix_ids):
    """The shared prefix run once: per layer its keys and values [kv_heads, P, head_dim], as lists
    (keys, values) for RowCache(prefix=...); None for an empty prefix."""
    if not prefix_ids:
        return None
    device = decoder.embed_tokens.weight.device
    ids = torch.tensor([prefix_ids], device=device)
    cache = RowCache(decoder, 1, len(prefix_ids))
    forward(decoder, cache, ids, torch.arange(len(prefix_ids), device=device)[None], torch.ones_like(ids, dtype=torch.bool))
    return [k[0] for k in cache.keys], [v[0] for v in cache.values]


def stack_prefixes(prefixes):
    """Several users' prefix caches (prefix_cache's outputs, None for an empty prefix) as one, for
    RowCache(prefix=...) over their rows: per layer keys, values [U, kv_heads, P, head_dim], padded at
    the end to the longest prefix P, valid [U, P] (None when no prefix is padded), and the shortest
    prefix's length (the slots before it are valid in every user: attention masks only the rest). One
    user's is returned as it is; None when every prefix is empty."""
    if len(prefixes) == 1 or all(p is None for p in prefixes):
        return prefixes[0]
    some = next(p for p in prefixes if p is not None)
    lengths = [0 if p is None else p[0][0].shape[1] for p in prefixes]
    P = max(lengths)
    stacked = []
    for part in (0, 1):  # keys, then values
        layers = []
        for layer, like in enumerate(some[part]):
            kv_heads, _, d = like.shape
            out = like.new_zeros((len(prefixes), kv_heads, P, d))
            for user, p in enumerate(prefixes):
                if p is not None:
                    out[user, :, :lengths[user]] = p[part][layer]
            layers.append(out)
        stacked.append(layers)
    valid = None
    if min(lengths) < P:
        valid = torch.arange(P, device=some[0][0].device)[None, :] < torch.tensor(lengths, device=some[0][0].device)[:, None]
    return stacked[0], stacked[1], valid, min(lengths)
