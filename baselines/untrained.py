"""Baseline rankers for R2Rank's evaluation, scoring the same K candidates R2Rank scores.

    random_scores(num_users, num_items, seed)                  -> [U, K]  seeded uniform noise
    interaction_counts(train_instances)                        -> {item_id: count} over training interactions
    popularity_scores(instances, counts)                       -> [U, K]  each candidate's count
    pointwise_scores(model, prefix_ids, suffix_ids_list, yes_ids, no_ids) -> [K]
        log P(<answer>Recommend</answer>) - log P(<answer>Not Recommend</answer>), teacher-forced
    listwise_messages(instance, ...), parse_ranking(text, K), scores_from_order(order)
        all K candidates numbered in one prompt; the model writes a ranked list of the numbers
    rank_pointwise(model, tokenizer, instances, encode_user)   -> [U, K]  with a progress bar over users
    rank_listwise(model, tokenizer, instances, ...)            -> [U, K], parse counts (greedy answers)

Every ranker returns scores, so every method is ranked the same way, by metrics.ndcg_from_scores
(ties pessimistic: a ranker gains nothing from the order the candidates came in).

Where these depart from the paper's baselines (Sec. 4.1.2 of the R2Rank paper; departure 24 of the one list, at
the top of r2rank.py, in detail):
- The paper compares with trained recommenders (SASRec, BERT4Rec, LightGCN, TALLRec, R2EC, ...) and
  with DeepSeek-R1 asked for a ranked list. Here the baselines need no training and no other model:
  random, popularity, and two zero-shot prompts of the evaluated LLM itself: pointwise (the
  self-check prompt of Fig. 2, judged by the likelihood of its two answers, no reasoning generated)
  and listwise (the paper's DeepSeek-R1 protocol, on the same backbone).
- Listwise: an output that names no candidate falls back to the input order, and candidates it
  leaves out are appended in input order; parse_ranking counts both, so failures stay visible.
"""
import copy
import re
from collections import Counter

import torch
from tqdm import tqdm

from data import NOT_RECOMMEND, RECOMMEND, candidate_text, user_context_text
from rollout import cache_kwargs, positions_from_mask, prefill, sample_traces
from sampling import token_logprobs

# The listwise answer gets min(--max-new-tokens, 8 K) new tokens: "[12] > " takes about 4 to 5 tokens.
LISTWISE_TOKENS_PER_ITEM = 8
LISTWISE_SYSTEM = "You are a recommendation assistant. You rank candidate items for one user."


def random_scores(num_users, num_items, seed):
    """[U, K] uniform noise from a seeded generator: the same seed gives the same ranking."""
    return torch.rand(num_users, num_items, generator=torch.Generator().manual_seed(seed))


def interaction_counts(train_instances):
    """{item_id: how often the training users interacted with it}: every item of each training user's
    history and its positive (the usual most-popular count; the positives alone leave most items at 0)."""
    counts = Counter()
    for inst in train_instances:
        counts.update(item["item_id"] for item in inst["history"])
        counts.update(c["item_id"] for c, label in zip(inst["candidates"], inst["labels"]) if label > 0)
    return counts


def popularity_scores(instances, counts):
    """[U, K] each candidate's count in `counts` (interaction_counts; items never seen count 0). Equal
    counts tie, and ties are broken pessimistically."""
    return torch.tensor([[float(counts.get(c["item_id"], 0)) for c in inst["candidates"]] for inst in instances])


@torch.no_grad()
def pointwise_scores(model, prefix_ids, suffix_ids_list, yes_ids, no_ids, rows_per_forward=16):
    """Zero-shot pointwise scores: log P(yes answer | prompt k) - log P(no answer | prompt k), per candidate.

    prefix_ids:      prompt tokens shared by the K candidates (user context), run through the model once
    suffix_ids_list: K lists; prompt k = prefix_ids + suffix_ids_list[k], ending where the answer starts
    yes_ids, no_ids: the two answers, e.g. "<answer>Recommend</answer>" and "<answer>Not Recommend</answer>"
    returns:         [K] fp32 on the CPU.

    The answers' common first tokens ("<answer>") have the same log-prob under both, so only the
    tokens after them are scored: the difference of the summed log-probs of the differing tokens is
    the log-likelihood ratio of the two whole answers. The 2K rows (candidate k with each answer)
    continue a copy of the prefix's KV cache, rows_per_forward at a time (memory only; same scores).
    """
    common = 0
    while common < min(len(yes_ids), len(no_ids)) and yes_ids[common] == no_ids[common]:
        common += 1
    rows = [suffix + answer for suffix in suffix_ids_list for answer in (yes_ids, no_ids)]  # [2K], k-major
    scored = torch.tensor([len(yes_ids) - common, len(no_ids) - common] * len(suffix_ids_list))  # [2K]
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = lm_head.weight.device
    P = len(prefix_ids)
    prefix_cache = prefill(decoder, prefix_ids, 1, device)
    totals = []
    for start in range(0, len(rows), rows_per_forward):
        batch, counts = rows[start:start + rows_per_forward], scored[start:start + rows_per_forward]
        B, L, T = len(batch), max(len(r) for r in batch), int(counts.max())
        assert P + L > T, "nothing precedes the answer"
        # [B, L] left-padded (prefix | pad | suffix + answer), so every answer ends in the last column
        block = torch.zeros((B, L), dtype=torch.long, device=device)
        block_mask = torch.zeros((B, L), dtype=torch.long, device=device)
        for i, row in enumerate(batch):
            block[i, L - len(row):] = torch.tensor(row, device=device)
            block_mask[i, L - len(row):] = 1
        attention_mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=device), block_mask], dim=1)
        cache = None
        if P:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(B)
        hidden = decoder(input_ids=block, attention_mask=attention_mask,
                         position_ids=positions_from_mask(attention_mask)[:, P:],
                         **cache_kwargs(decoder, cache)).last_hidden_state  # [B, L, H]
        # Column t predicts token t + 1: the last T columns' tokens are predicted by the T before them.
        logp = token_logprobs(lm_head(hidden[:, L - T - 1:L - 1]), block[:, L - T:])  # [B, T]
        keep = torch.arange(T, device=device)[None, :] >= T - counts.to(device)[:, None]  # each row's own tokens
        totals.append((logp * keep).sum(-1))
    totals = torch.cat(totals).view(-1, 2)  # [K, 2]: yes, no
    return (totals[:, 0] - totals[:, 1]).cpu()


def listwise_messages(instance, max_history=20, max_item_chars=200):
    """Chat messages with the user context and all K candidates numbered [1]..[K], in the instance's
    order, asking for the numbers ranked best first (the DeepSeek-R1 protocol of Sec. 4.1.2)."""
    K = len(instance["candidates"])
    listed = "\n".join(f"[{k}] {candidate_text(c, max_item_chars)}" for k, c in enumerate(instance["candidates"], 1))
    prompt = (f"Rank the {K} candidate items below by how likely this user is to choose each one next.\n\n"
              f"USER CONTEXT\n{user_context_text(instance, max_history, max_item_chars)}\n\n"
              f"CANDIDATE ITEMS\n{listed}\n\n"
              f"Answer with all {K} numbers, most likely first, in the form [3] > [1] > [2], and nothing else.")
    return [{"role": "system", "content": LISTWISE_SYSTEM}, {"role": "user", "content": prompt}]


def parse_ranking(text, num_items):
    """A listwise answer -> (order, counts): order is a permutation of range(num_items), best first.

    Numbers in brackets ("[3] > [1] > [2]") are read if there are any, else every integer ("3, 1, 2").
    Numbers outside 1..num_items and repeats are skipped; candidates never named are appended in input
    order (all of them when nothing parses). counts: {"parsed", "missing", "repeated", "out_of_range"}.
    """
    numbers = re.findall(r"\[\s*(\d+)\s*\]", text) or re.findall(r"\d+", text)
    order, repeated, out_of_range = [], 0, 0
    for number in map(int, numbers):
        if not 1 <= number <= num_items:
            out_of_range += 1
        elif number - 1 in order:
            repeated += 1
        else:
            order.append(number - 1)
    missing = [k for k in range(num_items) if k not in order]
    return order + missing, {"parsed": len(order), "missing": len(missing), "repeated": repeated,
                             "out_of_range": out_of_range}


def scores_from_order(order):
    """A ranking (item indices, best first) -> [K] scores that sort into it: K for the first, 1 for the last."""
    scores = torch.empty(len(order))
    scores[torch.tensor(order)] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return scores


def rank_pointwise(model, tokenizer, instances, encode_user, desc="pointwise"):
    """[U, K] pointwise scores of every instance; encode_user(instance) -> (prefix_ids, suffix_ids_list)
    splits the self-check prompt (data.encode_user), whose assistant turn the answers continue."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    yes_ids, no_ids = encode(f"<answer>{RECOMMEND}</answer>"), encode(f"<answer>{NOT_RECOMMEND}</answer>")
    return torch.stack([pointwise_scores(model, *encode_user(instance), yes_ids, no_ids)
                        for instance in tqdm(instances, desc=desc, dynamic_ncols=True)])


def rank_listwise(model, tokenizer, instances, max_history, max_item_chars, max_new_tokens, desc="listwise"):
    """[U, K] listwise scores of every instance from a greedy answer, and what parsing it found:
    {"parse": {"unparsable", "incomplete", "appended", "repeated", "out_of_range"}, "examples": [...]}
    (users with no usable number, users with some candidates missing, candidates appended, ...)."""
    scores, examples = [], []
    totals = dict.fromkeys(["unparsable", "incomplete", "appended", "repeated", "out_of_range"], 0)
    for instance in tqdm(instances, desc=desc, dynamic_ncols=True):
        K = len(instance["candidates"])
        text = tokenizer.apply_chat_template(listwise_messages(instance, max_history, max_item_chars),
                                             tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        budget = min(max_new_tokens, LISTWISE_TOKENS_PER_ITEM * K)
        sample = sample_traces(model, tokenizer, [], [prompt], budget, temperature=0.0)
        answer = tokenizer.decode(sample.token_lists()[0], skip_special_tokens=True)
        order, counts = parse_ranking(answer, K)
        scores.append(scores_from_order(order))
        totals["unparsable"] += counts["parsed"] == 0
        totals["incomplete"] += 0 < counts["parsed"] < K
        totals["appended"] += counts["missing"]
        totals["repeated"] += counts["repeated"]
        totals["out_of_range"] += counts["out_of_range"]
        if len(examples) < 3:
            examples.append(answer[:300])
    return torch.stack(scores), {"parse": totals, "examples": examples}
