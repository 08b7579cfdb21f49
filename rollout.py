"""The policy side of R2Rank: sample reasoning traces with a KV cache, and their token log-probs.

    sample_traces(model, tokenizer, prefix_ids, suffix_ids_list, ...)  -> Traces       (Eq. 1)
    sample_users(model, tokenizer, prompts, ...)                      -> Traces per user, all users' rows in one batch
    rollout_users(model, tokenizer, instances, cfg, generator)        -> Traces and prompts per user
    trace_logprobs(model, prompts, traces)                            -> logp, mask   (Eq. 6's pi_theta)
    trace_logprobs_shared(model, prefix_ids, suffix_ids_list, traces) -> the same, prefix run once
    trace_stats(traces, tokenizer)                                    -> health of the traces, for the log
    ppo_update(model, optimizer, prompts, traces, advantages, cfg)    -> theta updated (loss: ppo.llm_loss)
    decode_agrees(model, tokenizer, instance, cfg, dtype)             -> decode.py checked against the forward

All K prompts of one user share their beginning (instructions + user context) and differ only in the
candidate at the end. sample_traces runs that shared prefix through the model once, and then continues
with the K candidate suffixes and the decoding loop, all K rows attending to one copy of the prefix's
keys and values (decode.py). With an empty prefix it is plain batched sampling of whole prompts.
sample_users decodes several users' rows as one batch (each user's prefix still kept once), so a
decode step reads the model's weights once for all of them; rollout_users uses it.

Every function takes any transformers causal LM with the usual `get_decoder()` / `get_output_embeddings()`
(Qwen2, Llama, ...). The decoder's last hidden state is taken after the final norm, i.e. exactly
what the LM head reads; logits are computed only where they are needed, by calling the LM head
directly (so models whose forward post-processes logits, such as Gemma's soft-capping, would need
that step added here).
"""
import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

import data
import decode
from ppo import llm_loss
from sampling import next_tokens, token_logprobs


def positions_from_mask(attention_mask):
    """[B, T] 0/1 -> [B, T] position ids counting real tokens only (pads get 0).

    A manual forward with padding must pass these: the model's forward numbers positions from the
    cache length, not from the mask (only `generate` derives them from the mask).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwargs(decoder, cache):
    """The decoder's keywords for a KV cache: `cache` from transformers 5.24 on, `past_key_values`
    before (5.24 still takes the old name, with a warning, until 5.40 removes it)."""
    return {_cache_keyword(type(decoder)): cache, "use_cache": cache is not None}


@functools.cache
def _cache_keyword(decoder_class):
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def prefill(decoder, prefix_ids, copies, device):
    """KV cache of prefix_ids run once (batch 1), repeated `copies` times along the batch: the part
    of a user's K prompts that they share. Differentiable when called with gradient enabled.
    An empty prefix gives an empty cache."""
    cache = DynamicCache(config=decoder.config)
    if prefix_ids:
        decoder(input_ids=torch.tensor([prefix_ids], device=device), **cache_kwargs(decoder, cache))
        cache.batch_repeat_interleave(copies)  # [1, kv_heads, P, head_dim] -> [copies, ...]
    return cache


def stop_token_ids(model, tokenizer):
    """Ids that end a trace: the generation config's eos (an int or a list) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class Traces:
    """One user's K reasoning traces y_k (Eq. 1), as sampled: their tokens, log-probs and the head's input h_k."""
    tokens: torch.Tensor  # [K, T] each trace's token ids, pad after the end
    logprobs: torch.Tensor  # [K, T] fp32 log-prob of each token under the sampling distribution, 0 after the end
    mask: torch.Tensor  # [K, T] bool, True on real trace tokens (including a final eos)
    lengths: torch.Tensor  # [K] real tokens per trace
    finished: torch.Tensor  # [K] bool, the trace ended with an eos (False: cut at the token limit)
    final_hidden: torch.Tensor  # [K, H] last-layer hidden state at the trace's final token

    def token_lists(self):
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def logprob_lists(self):
        return [row[:n].tolist() for row, n in zip(self.logprobs, self.lengths)]


def _decode_feed(decoder, prefixes, rows, capacity):
    """decode.py's forward: each user's prefix's keys and values once (the rows in len(prefixes) equal
    blocks, one per user), each row's in a buffer of `capacity` slots."""
    prefix = decode.stack_prefixes([decode.prefix_cache(decoder, prefix_ids) for prefix_ids in prefixes])
    cache = decode.RowCache(decoder, rows, capacity, prefix)
    return lambda ids, valid, positions: decode.forward(decoder, cache, ids, positions, valid)


def _transformers_feed(decoder, prefix_ids, rows, device):
    """The model's own forward and DynamicCache: the prefix's cache copied per row, and an attention mask
    over cache + new tokens grown by each call. Works for any architecture."""
    cache = prefill(decoder, prefix_ids, rows, device)
    masks = [torch.ones((rows, len(prefix_ids)), dtype=torch.long, device=device)]

    def feed(ids, valid, positions):
        masks.append(valid.long())
        return decoder(input_ids=ids, attention_mask=torch.cat(masks, dim=1), position_ids=positions,
                       **cache_kwargs(decoder, cache)).last_hidden_state
    return feed


# Decode steps between two looks at which users' rows have all ended. A look reads a tensor on the host,
# which on a GPU waits for every queued kernel; the steps run after every row has ended (at most this
# many minus one) are the price, and they change no token and no generator (sample_users sets it back).
STOP_CHECK_EVERY = 8
# Rows (users x K traces) decoded as one batch when the config does not say (--rollout-rows).
ROLLOUT_ROWS = 160


@torch.no_grad()
def sample_traces(model, tokenizer, prefix_ids, suffix_ids_list, max_new_tokens, temperature=1.0, top_p=1.0,
                  generator=None, fast_decode=True):
    """Sample one trace for each prompt prefix_ids + suffix_ids_list[k], sharing the prefix's KV cache.

    1. the prefix goes through the model once (batch 1);
    2. the K suffixes go through in one batch, left-padded inside the suffix block
       (prefix | pad | suffix), so every row's last prompt token is in the last column;
    3. decoding feeds one token per row per step; a row stops at an eos or at max_new_tokens.
    The token that ends a trace is fed too: its hidden state is the scoring head's input. With
    max_new_tokens 0 there is no trace, and the head's input is the hidden state at the prompt's last
    token (a no-reasoning control).
    Log-probs are those of the distribution each token was drawn from, softmax(logits / temperature)
    (token_logprobs), what trace_logprobs recomputes at the same temperature.
    fast_decode: decode.py's forward (one copy of the prefix's keys and values, a per-row cache written
    in place) for the architectures it supports; False, or another architecture: the model's own
    forward with its cache repeated K times. Both compute the same function.
    sample_users does the same for several users in one batch.
    """
    return sample_users(model, tokenizer, [(prefix_ids, suffix_ids_list)], max_new_tokens, temperature, top_p,
                        [generator], fast_decode)[0]


@torch.no_grad()
def sample_users(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, generators=None,
                 fast_decode=True):
    """sample_traces for U users at once: prompts per user (prefix_ids, [suffix_ids] * K), the same K for
    every user; generators: one per user (or None). Returns per-user Traces.

    The U x K rows are decoded as one batch, so a decode step reads the weights once for all of them;
    each user's prefix is run and kept once, and its K rows attend to it alone (decode.stack_prefixes).
    A user's tokens are those sample_traces draws for it alone: its rows are drawn with its own
    generator, and the generator is left as the user alone leaves it, one draw of its K rows per step
    up to the step its last row ends (draws made after that, until a look sees it, are undone by
    set_back; not with one generator shared by several users, or None). Log-probs and hidden states
    may differ from the user's alone in the last bits (the padding to the longest prefix changes the
    order of the attention's sums), so a sampled token could differ only where a draw falls within
    that rounding of a boundary; greedy tokens, only where two logits tie within it.
    No host sync per token: the final hidden states are kept with torch.where, and whether every row has
    ended is read every STOP_CHECK_EVERY steps. On transformers' cache (fast_decode False, or an
    architecture decode.py does not support) the users are decoded one after another.
    """
    U, K = len(prompts), len(prompts[0][1])
    generators = [None] * U if generators is None else generators
    if any(len(suffixes) != K for _, suffixes in prompts):
        raise ValueError("sample_users needs the same number of candidates for every user (rollout_users groups them)")
    fast = fast_decode and decode.supported(model)
    if not fast and U > 1:  # transformers' cache holds one prefix
        return [sample_users(model, tokenizer, [prompt], max_new_tokens, temperature, top_p, [generator], False)[0]
                for prompt, generator in zip(prompts, generators)]
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = lm_head.weight.device
    stop_ids = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id
    N = U * K  # rows: user u's candidates are rows u*K .. u*K + K - 1
    suffix_ids_list = [suffix for _, suffixes in prompts for suffix in suffixes]
    prefix_lengths = torch.tensor([len(prefix) for prefix, _ in prompts], device=device).repeat_interleave(K)  # [N]
    suffix_lengths = torch.tensor([len(s) for s in suffix_ids_list], device=device)  # [N]
    L = max(len(s) for s in suffix_ids_list)
    was_training = model.training
    model.eval()

    # 1) each user's shared prefix, once
    if fast:
        feed = _decode_feed(decoder, [prefix for prefix, _ in prompts], N, L + max_new_tokens)
    else:
        feed = _transformers_feed(decoder, prompts[0][0], K, device)

    # 2) the suffixes, [N, L], left-padded
    block = torch.full((N, L), pad_id, device=device)
    block_valid = torch.zeros((N, L), dtype=torch.bool, device=device)
    for k, suffix in enumerate(suffix_ids_list):
        block[k, L - len(suffix):] = torch.tensor(suffix, device=device)
        block_valid[k, L - len(suffix):] = True
    position_ids = prefix_lengths[:, None] + positions_from_mask(block_valid)  # suffix token i of a row sits at P + i
    hidden = feed(block, block_valid, position_ids)[:, -1]  # [N, H]
    logits = lm_head(hidden).float()  # [N, V]
    position = prefix_lengths + suffix_lengths  # [N] position of the next token

    # 3) decode
    tokens = torch.full((N, max_new_tokens), pad_id, device=device)
    logprobs = torch.zeros((N, max_new_tokens), device=device)
    final_hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32), copy=True)  # kept only with no trace
    done = torch.zeros(N, dtype=torch.bool, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    drawing = [True] * U  # users with a row still going, as last seen: only they draw from their generator
    own_streams = temperature > 0 and None not in generators and len({id(g) for g in generators}) == U
    states = [{} for _ in range(U)]  # per user, since the last look: step -> its generator's state after that step's draw
    for step in range(max_new_tokens):
        alive = ~done
        token = next_tokens(logits, temperature, top_p, generators, drawing).masked_fill(done, pad_id)  # [N]
        if own_streams:
            for user, generator in enumerate(generators):
                if drawing[user]:
                    states[user][step] = generator.get_state()  # host memory only, no sync
        tokens[:, step] = token
        logprobs[:, step] = token_logprobs(logits, token, temperature).masked_fill(done, 0.0)
        lengths += alive.long()
        is_stop = alive & torch.isin(token, stop_ids)
        ends_here = is_stop | (alive & (step == max_new_tokens - 1))
        finished |= is_stop
        # Feed the token (rows already done feed a masked pad): next logits, and the hidden state at it.
        hidden = feed(token[:, None], alive[:, None], position[:, None])[:, -1]  # [N, H]
        final_hidden = torch.where(ends_here[:, None], hidden, final_hidden)  # no boolean indexing: no sync
        done |= ends_here
        if step == max_new_tokens - 1:
            break
        if (step + 1) % STOP_CHECK_EVERY == 0:
            # the host sync, once every STOP_CHECK_EVERY steps: each user's last step if all its rows have ended, else -1
            last_steps = torch.where(done.view(U, K).all(1), lengths.view(U, K).amax(1) - 1, -1).tolist()
            drawing = [last < 0 for last in last_steps]
            set_back(generators if own_streams else [], states, last_steps)
            if not any(drawing):
                break
        logits = lm_head(hidden).float()
        position = position + 1

    model.train(was_training)
    widths = lengths.view(U, K).amax(1).tolist()
    set_back(generators if own_streams else [], states, [width - 1 for width in widths])
    traces = []
    for user, width in enumerate(widths):
        rows = slice(user * K, (user + 1) * K)
        mask = torch.arange(width, device=device)[None, :] < lengths[rows, None]
        # clones: a view would keep (and torch.save would write) the whole batch's tensors
        traces.append(Traces(tokens[rows, :width].clone(), logprobs[rows, :width].clone(), mask, lengths[rows].clone(),
                               finished[rows].clone(), final_hidden[rows].float().clone()))
    return traces


def set_back(generators, states, last_steps):
    """Each user's generator set to its state after the draw of the user's last step (when that step's
    state was kept: the user has ended since the last look); the kept states dropped."""
    for generator, kept, last in zip(generators, states, last_steps):
        if last in kept:
            generator.set_state(kept[last])
    for kept in states:
        kept.clear()


def user_groups(rows_per_user, max_rows):
    """Consecutive users, as lists of their indices, decoded together: the same number of rows (K) in a
    group, at most max_rows rows in all, at least one user."""
    groups = []
    for user, rows in enumerate(rows_per_user):
        group = groups[-1] if groups else None
        if group and rows_per_user[group[0]] == rows and (len(group) + 1) * rows <= max_rows:
            group.append(user)
        else:
            groups.append([user])
    return groups


@torch.no_grad()
def rollout_users(model, tokenizer, instances, cfg, generator, temperature=None, fast_decode=True):
    """Phase 1 of an RL step: one reasoning trace per candidate of every user (Eq. 1), each user's
    shared prompt prefix computed once. cfg supplies the prompt settings (max_history,
    max_item_chars, response_prefix, prompt), the sampling ones (max_new_tokens, temperature, top_p) and
    rollout_rows: the users are decoded together (sample_users), in groups of at most that many rows
    (users x K). temperature overrides cfg's (0 = greedy). generator: a list with one torch.Generator
    per user (a user's tokens are then its own, whichever users share its batch), or one for all users
    (their draws then interleave step by step, so a user's tokens depend on its group). fast_decode as
    in sample_traces. Returns per-user Traces and per-user prompts as (prefix_ids, [suffix_ids] * K)."""
    prompts = [data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix,
                                data.PROMPTS[cfg.prompt]) for instance in instances]
    generators = generator if isinstance(generator, list) else [generator] * len(instances)
    traces = []
    for group in user_groups([len(suffixes) for _, suffixes in prompts], getattr(cfg, "rollout_rows", ROLLOUT_ROWS)):
        traces += sample_users(model, tokenizer, [prompts[u] for u in group], cfg.max_new_tokens,
                                cfg.temperature if temperature is None else temperature, cfg.top_p,
                                [generators[u] for u in group], fast_decode)
    return traces, prompts


def trace_stats(traces, tokenizer):
    """Share of traces with a parsable <answer>, share cut at the token limit (no eos), mean length;
    and two signs of a collapsing policy: the share of a user's K traces that are distinct texts, and
    the mean log-prob of the sampled tokens (near 0 when the policy has stopped exploring)."""
    texts = [[tokenizer.decode(ids, skip_special_tokens=True) for ids in s.token_lists()] for s in traces]
    flat = [text for user in texts for text in user]
    lengths = torch.cat([s.lengths for s in traces]).float()
    return {
        "answer_share": sum(data.parse_answer(t) is not None for t in flat) / len(flat),
        "truncated_share": (~torch.cat([s.finished for s in traces])).float().mean().item(),
        "response_len": lengths.mean().item(),
        "distinct_share": sum(len(set(user)) / len(user) for user in texts) / len(texts),
        "token_logp": (sum(s.logprobs[s.mask].sum().item() for s in traces) / max(lengths.sum().item(), 1)),
    }


def trace_logprobs(model, prompts, traces, temperature=1.0, return_hidden=False):
    """Teacher-forced log pi_theta of every trace token, in one forward, with gradient.

    prompts, traces: lists of B token-id lists. The batch is laid out as
    [left pad | prompt | trace | right pad], so every trace starts in the same column C, and
    logits are computed only for the T columns that predict trace tokens (never the full
    vocabulary over the prompt). Log-probs are in fp32 whatever the model's dtype, under
    softmax(logits / temperature), the distribution the traces were sampled from (token_logprobs).
    returns: logp [B, T] (0 on padding), mask [B, T] bool; with return_hidden also h [B, H], the last
    hidden state (after the final norm, with gradient) at each trace's final token, or at the
    prompt's last token for an empty trace: where sample_traces reads the scoring head's input.
    """
    device = model.get_output_embeddings().weight.device
    B, C = len(prompts), max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in traces))
    input_ids = torch.full((B, C + T), 0, dtype=torch.long, device=device)
    attention_mask = torch.zeros((B, C + T), dtype=torch.long, device=device)
    for i, (prompt, trace) in enumerate(zip(prompts, traces)):
        input_ids[i, C - len(prompt):C + len(trace)] = torch.tensor(prompt + trace, device=device)
        attention_mask[i, C - len(prompt):C + len(trace)] = 1
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
    # Column t predicts token t + 1: columns C-1 .. C+T-2 predict the trace.
    logits = model.get_output_embeddings()(hidden[:, C - 1:C + T - 1])  # [B, T, V]
    logp = token_logprobs(logits, input_ids[:, C:], temperature)  # [B, T]
    mask = attention_mask[:, C:].bool()
    if not return_hidden:
        return logp.masked_fill(~mask, 0.0), mask
    final = C - 1 + torch.tensor([len(r) for r in traces], device=device)  # a trace's last token, or the prompt's
    return logp.masked_fill(~mask, 0.0), mask, hidden[torch.arange(B, device=device), final]


def trace_logprobs_shared(model, prefix_ids, suffix_ids_list, traces, temperature=1.0, return_hidden=False):
    """trace_logprobs for the K prompts prefix + suffix_k, running the shared prefix only once.

    The prefix goes through the model once (with gradient); its KV cache is repeated K times and the
    K blocks [left pad | suffix | trace | right pad] attend to it, so the gradients of all K
    traces flow back into the one prefix computation. Same result as
    trace_logprobs(model, [prefix + s for s in suffixes], traces), for ~K times fewer prefix tokens.

    Not usable with transformers' gradient checkpointing: a checkpointed layer drops the cache
    (it would be written twice when the backward pass recomputes the layer), so with checkpointing on
    use trace_logprobs.
    returns: logp [K, T] (0 on padding), mask [K, T] bool; with return_hidden also h [K, H], as there.
    """
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = lm_head.weight.device
    K, P = len(suffix_ids_list), len(prefix_ids)
    L = max(len(s) for s in suffix_ids_list)
    T = max(1, max(len(r) for r in traces))
    cache = prefill(decoder, prefix_ids, K, device)  # with gradient: all K traces flow back into it
    block = torch.zeros((K, L + T), dtype=torch.long, device=device)
    attention_mask = torch.zeros((K, P + L + T), dtype=torch.long, device=device)
    attention_mask[:, :P] = 1
    for k, (suffix, trace) in enumerate(zip(suffix_ids_list, traces)):
        block[k, L - len(suffix):L + len(trace)] = torch.tensor(suffix + trace, device=device)
        attention_mask[k, P + L - len(suffix):P + L + len(trace)] = 1
    hidden = decoder(input_ids=block, attention_mask=attention_mask, **cache_kwargs(decoder, cache),
                     position_ids=positions_from_mask(attention_mask)[:, P:]).last_hidden_state  # [K, L + T, H]
    logits = lm_head(hidden[:, L - 1:L + T - 1])  # [K, T, V]: column L - 1 predicts the 1st trace token
    logp = token_logprobs(logits, block[:, L:], temperature)
    mask = attention_mask[:, P + L:].bool()
    if not return_hidden:
        return logp.masked_fill(~mask, 0.0), mask
    final = L - 1 + torch.tensor([len(r) for r in traces], device=device)
    return logp.masked_fill(~mask, 0.0), mask, hidden[torch.arange(K, device=device), final]


def ppo_update(model, optimizer, prompts, traces, advantages, cfg, shared_prefix=False, total_tokens=None,
               sum_gradients=None, head=None, score_grads=None, total_traces=None, dtype=torch.float32):
    """Phase 4 of an RL step for theta: cfg.ppo_epochs passes of clipped PPO (Eq. 6) over all
    traces, in micro-batches of cfg.micro_batch traces; cfg.temperature, clip_eps, max_grad_norm too.
    With head and score_grads, the first epoch adds the score path (below).

    prompts: per user (prefix_ids, [suffix_ids] * K); traces: per-user Traces; advantages: [U, K].
    A micro-batch holds up to --micro-batch traces of one user. With shared_prefix the user's prompt
    prefix is run once per micro-batch instead of once per trace (trace_logprobs_shared).
    The loss of each micro-batch is ppo.llm_loss (Eq. 6 and the score path's term, divided by the
    step's token count), so the accumulated gradient equals that of the per-token mean over the whole
    step (ppo.clipped_token_loss).
    Under torchrun, traces are this rank's users: total_tokens (and total_traces) are the whole
    step's counts and sum_gradients(parameters) adds up every rank's gradient before clipping; the
    statistics returned are this rank's shares of the step's means (and its maxima), for the caller to add up.

    The score path: score_grads [U, K] is g = dV/ds (ppo.score_gradient), and the loss gets
    - sum_k g_k f_phi(h_k(theta)) / D, with h_k from this forward, at the token sample_traces read it
    (so the gradient reaches theta through the hidden state, not only the sampled tokens). D is the
    same divisor as the token term's, the step's token count (departure 4 in r2rank.py), or its trace
    count when the traces are empty (--max-new-tokens 0), so the two terms add up to one estimate of grad J / D:
    grad J = E[sum_k A_k grad log pi(y_k)] + E[sum_k dV/ds_k grad s_k]. It is added in the first
    epoch only, where the forward is at theta_old, the parameters the scores were computed with; a
    later epoch reuses the tokens under the clipped ratio, and with no tokens there is no later epoch
    (a step on a zero gradient would still move AdamW). The head enters with its weights detached:
    phi learns from Eq. 5 (r2rank.py). decode_score_gap: max |s_k here - s_k from the rollout's h_k|.

    theta_old (departure 5 in r2rank.py): the first epoch's own log-probs, detached, so its ratio is exactly 1 and
    later epochs compare against the same forward pass (code path, precision, train mode) as the
    gradient. The log-probs recorded while decoding only measure how far the two paths differ.

    dtype: the compute dtype. Each micro-batch's forward and loss run under their own autocast
    context, and the backward and the optimizer step outside any: autocast keeps its bf16 copy of a
    trained weight until the outermost context exits, so a step taken inside one would leave every
    later epoch computing with the weights of before the step (ratio 1, approx_kl 0, the first
    epoch's gradient applied again). Calling this inside autocast is therefore refused.
    """
    device = model.get_output_embeddings().weight.device
    if torch.is_autocast_enabled(device.type):
        raise RuntimeError("ppo_update steps the optimizer, so it must be called outside autocast (a step inside it "
                           "leaves the cached bf16 weights stale); pass dtype= and it autocasts its own forward passes")
    total_tokens = total_tokens if total_tokens is not None else sum(int(s.lengths.sum()) for s in traces)
    total_traces = total_traces or sum(len(s.lengths) for s in traces)
    score_path = head is not None and score_grads is not None
    divisor = total_tokens or (total_traces if score_path else 1)
    epochs = cfg.ppo_epochs if total_tokens else 1
    stats = {"clip_frac": 0.0, "approx_kl": 0.0, "ratio": 0.0, "ppo_loss": 0.0}
    gap_sum, gap_max, score_gap, old_logps = 0.0, 0.0, 0.0, {}
    if score_path:  # the head with its weights detached: the gradient goes through it into h_k, not into phi
        weights = {name: p.detach() for name, p in head.named_parameters()}

        def frozen_head(hidden):
            return torch.func.functional_call(head, weights, (hidden,))
    model.train()
    for epoch in range(epochs):
        for user, ((prefix, suffixes), user_traces, user_advantages) in enumerate(zip(prompts, traces, advantages)):
            trace_tokens = user_traces.token_lists()
            for start in range(0, len(suffixes), cfg.micro_batch):
                batch = slice(start, start + cfg.micro_batch)
                with_hidden = score_path and epoch == 0
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):  # forward and loss only
                    if shared_prefix:
                        out = trace_logprobs_shared(model, prefix, suffixes[batch], trace_tokens[batch], cfg.temperature,
                                                       return_hidden=with_hidden)
                    else:
                        out = trace_logprobs(model, [prefix + s for s in suffixes[batch]], trace_tokens[batch],
                                                cfg.temperature, return_hidden=with_hidden)
                    logp, mask = out[:2]
                    if epoch == 0:
                        old_logps[user, start] = logp.detach()
                        if mask.any():  # empty traces (--max-new-tokens 0) have no token to compare
                            decoded = user_traces.logprobs[batch, :logp.shape[1]].to(logp.device)  # [B, T]
                            gap = (logp.detach() - decoded).abs()[mask]
                            gap_sum, gap_max = gap_sum + gap.sum().item(), max(gap_max, gap.max().item())
                    scores, g = None, None
                    if with_hidden:
                        scores = frozen_head(out[2])  # [B], f_phi(h_k(theta)), fp32: the head turns autocast off
                        g = score_grads[user, batch].to(scores.device)
                        decoded_scores = frozen_head(user_traces.final_hidden[batch].to(scores.device))
                        score_gap = max(score_gap, (scores.detach() - decoded_scores).abs().max().item())
                    loss, mb_stats = llm_loss(logp, old_logps[user, start], user_advantages[batch].to(logp.device), mask,
                                              divisor, cfg.clip_eps, scores, g)
                loss.backward()  # outside autocast, as the optimizer step below
                token_share = mask.sum().item() / divisor  # mb_stats are means over this micro-batch's tokens
                for name, value in mb_stats.items():
                    stats[name] += value * token_share / epochs
        if sum_gradients:
            sum_gradients(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()  # outside every autocast context: the next epoch's forward casts the new weights
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    # the means are this process's shares (its tokens over the step's count): under torchrun the caller
    # sums them over the ranks, and takes the maxima of decode_logp_gap_max and decode_score_gap (r2rank.update_llm)
    if total_tokens:  # the whole step's count, the same on every rank
        stats = {**stats, "decode_logp_gap": gap_sum / total_tokens, "decode_logp_gap_max": gap_max}
    else:  # no token in the step (--max-new-tokens 0): a mean over no tokens is undefined, so it is left out, not logged as 0
        stats = {}
    return {**stats, "decode_score_gap": score_gap} if score_path else stats


def decode_agrees(model, tokenizer, instance, cfg, dtype, rows=4, new_tokens=32):
    """A start-up check of decode.py against the model's own forward, on the first few candidates of
    one user: greedy traces decoded by decode.py, their tokens' log-probs recomputed by
    trace_logprobs, both under autocast to dtype. r2rank.py runs it on CUDA, where decode.py's
    kernels are not the ones the CPU tests exercised. Returns (agrees, mean |gap| per token):
    agrees when the mean gap is within DECODE_TOLERANCE of dtype (rounding, not a wrong forward)."""
    if not decode.supported(model) or cfg.max_new_tokens == 0:
        return True, 0.0
    device = model.get_output_embeddings().weight.device
    prefix, suffixes = data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix,
                                        data.PROMPTS[cfg.prompt])
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        decoded = sample_traces(model, tokenizer, prefix, suffixes[:rows], min(new_tokens, cfg.max_new_tokens), temperature=0.0)
        logp, mask = trace_logprobs(model, [prefix + s for s in suffixes[:rows]], decoded.token_lists())
    gap = (logp - decoded.logprobs[:, :logp.shape[1]]).abs()[mask].mean().item()
    return gap <= DECODE_TOLERANCE[dtype], gap


# The mean per-token |log-prob gap| between decode.py and the model's forward that rounding explains:
# in bf16 the two paths round differently (measured: see RESULTS.md); past it, decode.py is wrong.
DECODE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.15}
