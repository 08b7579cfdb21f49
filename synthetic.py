"""The built-in synthetic set (not in the paper): a small generated set whose labels only the history
reveals. data.py turns it into instances (`python data.py synthetic --out data/synthetic`).

    generate(users, seed, categories_per_user)  -> (items, profiles, interactions)
    category_match_ndcg(instances, k)           -> the best NDCG@k any ranker can expect on instances

96 items, "<Color> <noun>" with the text "category: <c>; color: <color>", in 8 categories of 3 nouns
x 4 colours. Each user favours `categories_per_user` categories drawn uniformly; the history (4-10
items) and the positive come from them, so an item's text alone says nothing about its label but the
history does: the positive's category always occurs in the history. The profile carries no signal.
"""
import math
import random
from collections import defaultdict
from datetime import datetime, timezone

CATEGORIES = {
    "camping": ["tent", "lantern", "sleeping bag"], "cooking": ["skillet", "chef knife", "spice rack"],
    "music": ["ukulele", "metronome", "guitar strap"], "gardening": ["trowel", "watering can", "seed kit"],
    "fitness": ["yoga mat", "kettlebell", "jump rope"], "painting": ["easel", "brush set", "canvas pad"],
    "reading": ["book light", "bookend", "reading stand"], "gaming": ["gamepad", "headset", "racing wheel"],
}
COLORS = ["red", "blue", "green", "black"]
START = int(datetime(2022, 1, 1, tzinfo=timezone.utc).timestamp())  # the first user's first interaction


def generate(users=200, seed=0, categories_per_user=2):
    """(items {item_id: {"title", "text"}}, profiles {user_id: text}, interactions [(user_id, item_id,
    unix seconds)]), deterministic for a seed; the positive is each user's last interaction."""
    if not 1 <= categories_per_user <= len(CATEGORIES):
        raise ValueError(f"--categories-per-user must be 1 to {len(CATEGORIES)}, not {categories_per_user}")
    rng = random.Random(f"synthetic/{seed}")
    items, profiles, interactions = {}, {}, []
    by_category, category_of = defaultdict(list), {}
    for name, nouns in CATEGORIES.items():
        for noun in nouns:
            for color in COLORS:
                item = f"i{len(items):03d}"
                items[item] = {"title": f"{color.capitalize()} {noun}", "text": f"category: {name}; color: {color}"}
                by_category[name].append(item)
                category_of[item] = name
    for number in range(users):
        user = f"u{number:04d}"
        profiles[user] = f"Age {rng.randint(18, 70)}"  # no signal in it
        favoured = rng.sample(sorted(by_category), categories_per_user)
        history = rng.sample([item for name in favoured for item in by_category[name]], rng.randint(4, 10))
        shown = sorted({category_of[item] for item in history})
        positive = rng.choice([i for name in shown for i in by_category[name] if i not in history])
        for step, item in enumerate(history + [positive]):
            interactions.append((user, item, START + 86400 * (number + step)))
    return items, profiles, interactions


def category(item):
    """The category written in a synthetic item's text."""
    return item["text"].split(";")[0].removeprefix("category: ")


def category_match_ndcg(instances, k=10):
    """Expected NDCG@k of ranking first the candidates whose category occurs in the history, ties at
    random. With the whole history shown this is the best any ranker can expect: given the candidates,
    each of those is equally likely to be the positive (a uniform draw from the unseen items of the
    history's categories) and no other candidate can be. For m such candidates out of n, the positive's
    rank is uniform over 1..m if it is one of them, else over m+1..n."""
    total = 0.0
    for inst in instances:
        seen = {category(item) for item in inst["history"]}
        matches = [category(item) in seen for item in inst["candidates"]]
        m, n = sum(matches), len(matches)
        ranks = range(1, m + 1) if matches[inst["labels"].index(1)] else range(m + 1, n + 1)
        total += sum(1 / math.log2(rank + 1) for rank in ranks if rank <= k) / len(ranks)
    return total / len(instances)
