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
import os
import re
import sys
from collections import Counter

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import NOT_RECOMMEND, RECOMMEND, candidate_text, user_context_text  # noqa: E402
from r2rank import forward_traces, rollout  # noqa: E402

# The listwise answer gets min(--max-new-tokens, 8 K) new tokens: "[12] > " takes about 4 to 5 tokens.
LISTWISE_TOKENS_PER_ITEM = 8
LISTWISE_USERS_PER_CALL = 8  # listwise prompts generated together (one generate call)
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
def pointwise_scores(model, prefix_ids, suffix_ids_list, yes_ids, no_ids, rows_per_forward=40):
    """[K] fp32 on the CPU: log P(yes_ids | prompt k) - log P(no_ids | prompt k), prompt k = prefix_ids (the user
    context, shared by the K candidates) + suffix_ids_list[k], ending where the answer starts. The answers' common
    first tokens ("<answer>") have one log-prob under both, so they join the prompt: the differing tokens' log-ratio
    is the whole answers'. 2K rows through r2rank.forward_traces, rows_per_forward at a time (memory only)."""
    common = len(os.path.commonprefix([yes_ids, no_ids]))  # the shared first tokens (commonprefix takes lists too)
    suffixes = [suffix + yes_ids[:common] for suffix in suffix_ids_list for _ in range(2)]  # [2K], k-major
    answers = [yes_ids[common:], no_ids[common:]] * len(suffix_ids_list)
    logp = [forward_traces(model, prefix_ids, suffixes[i:i + rows_per_forward], answers[i:i + rows_per_forward], 1.0)[0]
            for i in range(0, len(suffixes), rows_per_forward)]  # [B, T] each, 0-padded
    totals = torch.cat([rows.sum(-1) for rows in logp]).view(-1, 2)  # [K, 2]: yes, no
    return (totals[:, 0] - totals[:, 1]).float().cpu()


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
    K = len(instances[0]["candidates"])
    answers = []
    for start in tqdm(range(0, len(instances), LISTWISE_USERS_PER_CALL), desc=desc, dynamic_ncols=True):
        prompts = []
        for instance in instances[start:start + LISTWISE_USERS_PER_CALL]:
            text = tokenizer.apply_chat_template(listwise_messages(instance, max_history, max_item_chars),
                                                 tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append((ids[:-1], [ids[-1:]]))  # one "candidate" per user: the whole prompt
        traces, _ = rollout(model, tokenizer, prompts, min(max_new_tokens, LISTWISE_TOKENS_PER_ITEM * K), temperature=0.0)
        answers += [tokenizer.decode(trace, skip_special_tokens=True) for trace in traces]
    orders, counts = zip(*(parse_ranking(answer, K) for answer in answers))
    totals = {"unparsable": sum(c["parsed"] == 0 for c in counts), "incomplete": sum(0 < c["parsed"] < K for c in counts),
              "appended": sum(c["missing"] for c in counts), "repeated": sum(c["repeated"] for c in counts),
              "out_of_range": sum(c["out_of_range"] for c in counts)}
    return torch.stack([scores_from_order(order) for order in orders]), {"parse": totals, "examples": [a[:300] for a in answers[:3]]}
