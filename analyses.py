"""The eval stage's analyses (Sec. 4.4 and 4.5 of the R2Rank paper): cold start (Fig. 3), history
length (Fig. 4), the positive's position (Fig. 5) and the history's order (Table 7).

    python r2rank.py --stage eval --model runs/r2rank/checkpoint-100 --analyses cold-start,position

evaluate.run_eval runs them after Table 2: cold_start_analysis and history_length_analysis regroup its per-user
results, position_analysis and history_order_analysis run its rankers (evaluate.make_rankers) on changed inputs.

Where this departs from the paper, which leaves these points open unless said (the numbers of the one list,
at the top of r2rank.py):
29. Cold start (Fig. 3): users sorted by the training frequency of their positive, cut into four
    equal-size bins; when more than half of the positives never were a training positive, the paper's
    industrial tiers 0 / 1-5 / >5 instead.
30. History length (Fig. 4): four equal-width buckets of the history length shown (1..--max-history);
    the paper's second variant (cutting 20-item histories to their last k) is not implemented.
31. History order (Table 7): the shown history (its last --max-history items) is shuffled R = 5 times per
    user. "std" and "range" are each user's spread of NDCG@10 over the R shuffles, averaged over users;
    the spread of the split's mean over the shuffles is reported beside them.
32. Position (Fig. 5): the positive moves to the first, middle and last position, the other candidates
    keeping their order. Only the methods that read the prompt are checked (R2Rank, pointwise,
    listwise, reczero, r2ec); for the per-candidate ones the positive's rank must not move, and the
    share of users where it does is reported with the largest change of any candidate's score.
"""
import json
import math
import os
import random

import numpy as np
import torch

import data
from metrics import ndcg_from_scores, positive_ranks
from r2rank import labels_of
from stats import bootstrap_ci


# ------------------------------------------------------------- the rankers again, on changed inputs


def move_positive(instance, index):
    """(copy of instance with its positive at candidate position index, the others in their order,
    order): order[j] is the original position of the new candidate j."""
    labels = instance["labels"]
    positive = labels.index(max(labels))
    order = [k for k in range(len(labels)) if k != positive]
    order.insert(index, positive)
    return {**instance, "candidates": [instance["candidates"][k] for k in order], "labels": [labels[k] for k in order]}, order


def shuffle_history(instance, max_history, seed):
    """Copy of instance whose shown history (its last max_history items) is shuffled, seeded."""
    shown = list(instance["history"][-max_history:] if max_history > 0 else [])
    random.Random(seed).shuffle(shown)
    return {**instance, "history": shown}


def position_analysis(rankers, names, instances):
    """Fig. 5: the positive's rank when it is shown first, in the middle and last."""
    K = len(instances[0]["candidates"])
    placements = {"first": 0, "middle": (K + 1) // 2 - 1, "last": K - 1}
    out = {}
    for name in names:
        out[name], ranks, item_scores = {}, [], []
        for where, index in placements.items():
            moved = [move_positive(inst, index) for inst in instances]
            scores, _ = rankers[name]([inst for inst, _ in moved], f"{name}, positive {where}")
            rank = positive_ranks(scores, labels_of([inst for inst, _ in moved]))  # [U]
            ranks.append(rank)  # and each candidate's score, back in the original order: [U, K]
            item_scores.append(torch.empty_like(scores).scatter_(1, torch.tensor([order for _, order in moved]), scores))
            out[name][where] = {"position": index + 1, "mean_rank": rank.float().mean().item(),
                                "rank_counts": torch.bincount(rank - 1, minlength=K).tolist()}
        ranks, item_scores = torch.stack(ranks), torch.stack(item_scores)  # [3, U], [3, U, K]
        out[name]["rank_changed_share"] = (ranks != ranks[0]).any(0).float().mean().item()
        out[name]["max_score_change"] = (item_scores - item_scores[0]).abs().max().item()
    return out


def history_order_analysis(rankers, names, instances, results, shown, seed=0, shuffles=5):
    """Table 7: NDCG@10 over `shuffles` shuffles of each user's shown history. shown: {name: the history
    length that method is shown} (a trained method keeps its training's, evaluate.trained_args)."""
    labels, out = labels_of(instances), {}
    for name in names:
        values = []
        for r in range(shuffles):
            shuffled = [shuffle_history(inst, shown[name], f"{seed}/{r}/{inst['user_id']}") for inst in instances]
            scores, _ = rankers[name](shuffled, f"{name}, history shuffle {r + 1}/{shuffles}")
            values.append(ndcg_from_scores(scores, labels, 10))
        values = torch.stack(values).double()  # [R, U]
        split_means = values.mean(1)
        out[name] = {"avg": values.mean().item(), "std": values.std(0).mean().item(),
                     "range": (values.max(0).values - values.min(0).values).mean().item(), "original_avg": results[name]["ndcg@10"],
                     "split_mean_per_shuffle": split_means.tolist(), "split_mean_std": split_means.std().item(),
                     "split_mean_range": (split_means.max() - split_means.min()).item()}
    return out


# --------------------------------------------------------------------- Table 2's results, regrouped


def grouped(results, groups, resamples, seed):
    """[{"group", "users", method: {"ndcg@10", "ci95"}}] for groups [(label, user indices)], the empty ones left out."""
    def cell(result, users):
        values = np.asarray([user["ndcg@10"] for user in result["per_user"]])[users]
        return {"ndcg@10": float(values.mean()), "ci95": list(bootstrap_ci(values, resamples, seed))}
    return [{"group": label, "users": len(users), **{name: cell(result, users) for name, result in results.items()}}
            for label, users in groups if len(users)]


def read_frequency(data_dir):
    """Each item's count as a training positive, from the stats.json that data.py writes."""
    path = os.path.join(data_dir, "stats.json")
    try:
        with open(path) as f:
            return json.load(f)["train_positive_frequency"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise data.DataError(f"{path}: cannot read train_positive_frequency ({error!r}); data.py writes it") from None


def cold_start_analysis(results, instances, frequency, resamples, seed):
    """Fig. 3: NDCG@10 by the positive's frequency as a training positive."""
    counts = np.array([frequency.get(inst["candidates"][inst["labels"].index(max(inst["labels"]))]["item_id"], 0)
                       for inst in instances])
    if (counts == 0).mean() > 0.5:
        tiering = "0 / 1-5 / >5 (most positives were never a training positive)"
        groups = [("0", np.flatnonzero(counts == 0)), ("1-5", np.flatnonzero((counts >= 1) & (counts <= 5))),
                  (">5", np.flatnonzero(counts > 5))]
    else:
        tiering = "four equal-size bins of users sorted by frequency"
        bins = np.array_split(np.argsort(counts, kind="stable"), 4)
        groups = [(f"{counts[b].min()}-{counts[b].max()}", b) for b in bins if len(b)]
    return {"tiering": tiering, "tiers": grouped(results, groups, resamples, seed)}


def history_length_analysis(results, instances, max_history, resamples, seed):
    """Fig. 4: NDCG@10 (mean and 95% interval) by the history length shown."""
    shown = np.array([min(len(inst["history"]), max_history) for inst in instances])
    width = max(1, math.ceil(max_history / 4))
    groups = [("0", np.flatnonzero(shown == 0))]
    groups += [(f"{lo}-{min(lo + width - 1, max_history)}", np.flatnonzero((shown >= lo) & (shown < lo + width)))
               for lo in range(1, max_history + 1, width)]
    return {"buckets": grouped(results, groups, resamples, seed)}


# ------------------------------------------------------------------------------------------- report


def analysis_lines(analyses):
    """One printed line per method and analysis (the JSON holds the details)."""
    lines = []
    for name, found in analyses.get("position", {}).items():
        where = ", ".join(f"{w} {found[w]['mean_rank']:.2f}" for w in ("first", "middle", "last"))
        lines.append(f"position, {name}: mean rank of the positive shown {where}; its rank moved for "
                     f"{100 * found['rank_changed_share']:.0f}% of users (largest score change {found['max_score_change']:.2g})")
    for name, found in analyses.get("history-order", {}).items():
        lines.append(f"history order, {name}: NDCG@10 avg {found['avg']:.3f}, per-user std {found['std']:.3f}, "
                     f"range {found['range']:.3f} (split mean std {found['split_mean_std']:.3f}); original {found['original_avg']:.3f}")
    rows = [("cold start, positive's training frequency", row) for row in analyses.get("cold-start", {}).get("tiers", [])]
    rows += [("history length", row) for row in analyses.get("history-length", {}).get("buckets", [])]
    for title, row in rows:
        means = ", ".join(f"{name} {row[name]['ndcg@10']:.3f}" for name in row if name not in ("group", "users"))
        lines.append(f"{title} {row['group']} ({row['users']} users): NDCG@10 {means}")
    return lines
