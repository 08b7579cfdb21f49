"""The policy side of R2Rank: sample reasoning traces with a KV cache, and their token log-probs.

    sample_traces(model, tokenizer, prefix_ids, suffix_ids_list, ...)  -> Samples      (Eq. 1)
    response_logprobs(model, prompts, responses)                      -> logp, mask   (Eq. 6's pi_theta)

All K prompts of one user share their beginning (instructions + user context) and differ only in the
candidate at the end. sample_traces runs that shared prefix through the model once, copies its KV
cache K times, and then continues with the K candidate suffixes and the decoding loop. With an empty
prefix it is plain batched sampling of whole prompts.

Both functions take any transformers causal LM with the usual `get_decoder()` / `get_output_embeddings()`
(Qwen2, Llama, ...). The decoder's last hidden state is taken after the final norm, i.e. exactly
what the LM head reads; logits are computed only where they are needed, by calling the LM head
directly (so models whose forward post-processes logits, such as Gemma's soft-capping, would need
that step added here).
"""
from dataclasses import dataclass

import torch
from transformers import DynamicCache


def positions_from_mask(attention_mask):
    """[B, T] 0/1 -> [B, T] position ids counting real tokens only (pads get 0).

    A manual forward with padding must pass these: the model's forward numbers positions from the
    cache length, not from the mask (only `generate` derives them from the mask).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def stop_token_ids(model, tokenizer):
    """Ids that end a trace: the generation config's eos (an int or a list) and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class Samples:
    tokens: torch.Tensor  # [K, R] response ids, pad after the end
    logprobs: torch.Tensor  # [K, R] fp32 log pi(token | state) under the temperature-1 model, 0 after the end
    mask: torch.Tensor  # [K, R] bool, True on real response tokens (including a final eos)
    lengths: torch.Tensor  # [K] real response tokens per trace
    finished: torch.Tensor  # [K] bool, the trace ended with an eos (False: cut at the token limit)
    final_hidden: torch.Tensor  # [K, H] last-layer hidden state at the trace's final token

    def token_lists(self):
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def logprob_lists(self):
        return [row[:n].tolist() for row, n in zip(self.logprobs, self.lengths)]


def next_tokens(logits, temperature, top_p, generator):
    """[K, V] fp32 logits -> [K] ids. temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (always at least one).
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_traces(model, tokenizer, prefix_ids, suffix_ids_list, max_new_tokens, temperature=1.0, top_p=1.0,
                  generator=None):
    """Sample one response to each prompt prefix_ids + suffix_ids_list[k], sharing the prefix's KV cache.

    1. the prefix goes through the model once (batch 1), and its cache is copied K times;
    2. the K suffixes go through in one batch, left-padded inside the suffix block
       (prefix | pad | suffix), so every row's last prompt token is in the last column;
    3. decoding feeds one token per row per step; a row stops at an eos or at max_new_tokens.
    The token that ends a trace is fed too: its hidden state is the scoring head's input. With
    max_new_tokens 0 there is no trace, and the head's input is the hidden state at the prompt's last
    token (a no-reasoning control).
    Log-probs are those of the temperature-1 model (what response_logprobs recomputes).
    """
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = lm_head.weight.device
    stop_ids = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id
    K, P = len(suffix_ids_list), len(prefix_ids)
    suffix_lengths = torch.tensor([len(s) for s in suffix_ids_list], device=device)  # [K]
    L = int(suffix_lengths.max())
    was_training = model.training
    model.eval()

    # 1) the shared prefix, once; then its cache per layer [1, kv_heads, P, head_dim] -> [K, ...]
    cache = DynamicCache(config=model.config)
    if P:
        decoder(input_ids=torch.tensor([prefix_ids], device=device), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(K)

    # 2) the suffixes, [K, L], left-padded; the mask always spans cache + new tokens
    block = torch.full((K, L), pad_id, device=device)
    block_mask = torch.zeros((K, L), dtype=torch.long, device=device)
    for k, suffix in enumerate(suffix_ids_list):
        block[k, L - len(suffix):] = torch.tensor(suffix, device=device)
        block_mask[k, L - len(suffix):] = 1
    attention_mask = torch.cat([torch.ones((K, P), dtype=torch.long, device=device), block_mask], dim=1)
    position_ids = positions_from_mask(attention_mask)[:, P:]  # suffix token i of a row sits at P + i
    out = decoder(input_ids=block, attention_mask=attention_mask, position_ids=position_ids,
                  past_key_values=cache, use_cache=True)
    logits = lm_head(out.last_hidden_state[:, -1]).float()  # [K, V]
    position = P + suffix_lengths  # [K] position of the next token

    # 3) decode
    tokens = torch.full((K, max_new_tokens), pad_id, device=device)
    logprobs = torch.zeros((K, max_new_tokens), device=device)
    final_hidden = out.last_hidden_state[:, -1].to(lm_head.weight.dtype, copy=True)  # kept only with no trace
    done = torch.zeros(K, dtype=torch.bool, device=device)
    finished = torch.zeros(K, dtype=torch.bool, device=device)
    lengths = torch.zeros(K, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        alive = ~done
        token = next_tokens(logits, temperature, top_p, generator).masked_fill(done, pad_id)  # [K]
        tokens[:, step] = token
        logprobs[:, step] = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1).masked_fill(done, 0.0)
        lengths += alive.long()
        is_stop = alive & torch.isin(token, stop_ids)
        ends_here = is_stop | (alive & (step == max_new_tokens - 1))
        finished |= is_stop
        # Feed the token (rows already done feed a masked pad): next logits, and the hidden state at it.
        attention_mask = torch.cat([attention_mask, alive[:, None].long()], dim=1)
        out = decoder(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position[:, None],
                      past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]  # [K, H]
        final_hidden[ends_here] = hidden[ends_here]
        done |= ends_here
        if done.all():
            break
        logits = lm_head(hidden).float()
        position = position + 1

    model.train(was_training)
    width = int(lengths.max())
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    return Samples(tokens[:, :width], logprobs[:, :width], mask, lengths, finished, final_hidden.float())


def pad_right(rows, width, value, device, dtype=torch.float32):
    """List of lists -> [len(rows), width] tensor, each row padded (or cut) on the right."""
    out = torch.full((len(rows), width), value, dtype=dtype, device=device)
    for i, row in enumerate(rows):
        row = row[:width]
        out[i, :len(row)] = torch.tensor(row, dtype=dtype, device=device)
    return out


def response_logprobs(model, prompts, responses):
    """Teacher-forced log pi_theta of every response token, in one forward, with gradient.

    prompts, responses: lists of B token-id lists. The batch is laid out as
    [left pad | prompt | response | right pad], so every response starts in the same column C, and
    logits are computed only for the R columns that predict response tokens (never the full
    vocabulary over the prompt). Log-probs are in fp32 whatever the model's dtype.
    returns: logp [B, R] (0 on padding), mask [B, R] bool.
    """
    device = model.get_output_embeddings().weight.device
    B, C = len(prompts), max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    input_ids = torch.full((B, C + R), 0, dtype=torch.long, device=device)
    attention_mask = torch.zeros((B, C + R), dtype=torch.long, device=device)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[i, C - len(prompt):C + len(response)] = torch.tensor(prompt + response, device=device)
        attention_mask[i, C - len(prompt):C + len(response)] = 1
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
    # Column t predicts token t + 1: columns C-1 .. C+R-2 predict the response.
    logits = model.get_output_embeddings()(hidden[:, C - 1:C + R - 1]).float()  # [B, R, V]
    targets = input_ids[:, C:]  # [B, R]
    # log softmax at the target only: gather minus logsumexp, without a second [B, R, V] tensor
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    mask = attention_mask[:, C:].bool()
    return logp.masked_fill(~mask, 0.0), mask


def response_logprobs_shared(model, prefix_ids, suffix_ids_list, responses):
    """response_logprobs for the K prompts prefix + suffix_k, running the shared prefix only once.

    The prefix goes through the model once (with gradient); its KV cache is repeated K times and the
    K blocks [left pad | suffix | response | right pad] attend to it, so the gradients of all K
    responses flow back into the one prefix computation. Same result as
    response_logprobs(model, [prefix + s for s in suffixes], responses), for ~K times fewer prefix tokens.

    Not usable with transformers' gradient checkpointing: a checkpointed layer drops the cache
    (it would be written twice when the backward pass recomputes the layer), so with checkpointing on
    use response_logprobs.
    returns: logp [K, R] (0 on padding), mask [K, R] bool.
    """
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = lm_head.weight.device
    K, P = len(suffix_ids_list), len(prefix_ids)
    L = max(len(s) for s in suffix_ids_list)
    R = max(1, max(len(r) for r in responses))
    cache = DynamicCache(config=model.config)
    decoder(input_ids=torch.tensor([prefix_ids], device=device), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(K)  # [1, kv_heads, P, head_dim] -> [K, ...], differentiable
    block = torch.zeros((K, L + R), dtype=torch.long, device=device)
    attention_mask = torch.zeros((K, P + L + R), dtype=torch.long, device=device)
    attention_mask[:, :P] = 1
    for k, (suffix, response) in enumerate(zip(suffix_ids_list, responses)):
        block[k, L - len(suffix):L + len(response)] = torch.tensor(suffix + response, device=device)
        attention_mask[k, P + L - len(suffix):P + L + len(response)] = 1
    hidden = decoder(input_ids=block, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                     position_ids=positions_from_mask(attention_mask)[:, P:]).last_hidden_state  # [K, L + R, H]
    logits = lm_head(hidden[:, L - 1:L + R - 1]).float()  # [K, R, V]: column L - 1 predicts the 1st response token
    targets = block[:, L:]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    mask = attention_mask[:, P + L:].bool()
    return logp.masked_fill(~mask, 0.0), mask
