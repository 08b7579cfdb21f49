"""The data protocol of Sec. 4.1.1 of the R2Rank paper, applied to raw interactions: who becomes an
instance, its history, its K candidates (the positive and K - 1 negatives), and the 8:1:1 user split.
Standard library only: it copies into another project alone.

    splits, stats = build_instances(raw, Protocol(history=20, candidates=20, seed=0))

raw: any object with interactions [(user_id, item_id, unix seconds)], items {item_id: {"title",
"text"}} (titled items only), profiles {user_id: text}, inputs [file names], touched_outside
{user_id: items touched outside the time window}, dropped (a Counter of what the source dropped) and,
optionally, split_of {user_id: "train", "valid" or "test"} where the source fixes the split itself:
sources.RawData. data.py reads the instances and builds the prompt.

Departures 12-14 of the one list (the top of r2rank.py; details in data.py's docstring) are implemented here.
"""
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

SPLITS = ("train", "valid", "test")


def flag(default, text):
    return field(default=default, metadata={"help": text})


@dataclass
class Protocol:
    """The data protocol of Sec. 4.1.1; every field is a command-line flag."""
    history: int = flag(20, "history length L: at most this many interactions before the positive, the latest")
    candidates: int = flag(20, "candidates K per instance: the positive and K-1 negatives")
    split: str = flag("8:1:1", "train:valid:test ratio of the users")
    seed: int = flag(0, "seed of the user split and of the negatives")
    start: str | None = flag(None, "first day of the time window, YYYY-MM-DD, UTC")
    end: str | None = flag(None, "last day of the time window, included, YYYY-MM-DD, UTC")


# ---------------------------------------------------------------- the protocol


def split_sizes(users, ratio):
    """(train, valid, test) sizes for an "8:1:1"-style ratio; valid and test round down."""
    parts = [int(part) for part in ratio.split(":")]
    valid, test = users * parts[1] // sum(parts), users * parts[2] // sum(parts)
    return users - valid - test, valid, test


def build_instances(raw, protocol):
    """Apply the protocol (see the module docstring) to raw data. Returns ({split: instances}, stats)."""
    dropped = Counter(raw.dropped)
    by_user = defaultdict(list)
    for user, item, seconds in raw.interactions:
        if item in raw.items:
            by_user[user].append((seconds, item))
        else:
            dropped["interactions_with_untitled_item"] += 1
    sequences = {}
    for user in sorted(by_user):
        sequence = {}  # item -> seconds, in time order (ties by item id), the first touch only
        for seconds, item in sorted(by_user[user]):
            sequence.setdefault(item, seconds)
        dropped["repeated_interactions"] += len(by_user[user]) - len(sequence)
        if len(sequence) < 2:
            dropped["users_without_history"] += 1
        else:
            sequences[user] = list(sequence.items())
    pool = sorted({item for sequence in sequences.values() for item, _ in sequence})

    def entry(item, seconds=None):
        described = {"item_id": item, "title": raw.items[item]["title"], "text": raw.items[item]["text"]}
        return described if seconds is None else {**described, "timestamp": seconds}

    instances = {}
    for user, sequence in sequences.items():
        touched = {item for item, _ in sequence} | raw.touched_outside.get(user, set())
        if len(pool) - len(touched.intersection(pool)) < protocol.candidates - 1:
            dropped["users_with_too_few_negatives"] += 1
            continue
        rng = random.Random(f"{protocol.seed}/{user}")  # per user: a user's draw ignores the others
        positive, negatives = sequence[-1][0], []
        while len(negatives) < protocol.candidates - 1:  # rejection sampling: uniform, no replacement
            item = pool[rng.randrange(len(pool))]
            if item not in touched and item not in negatives:
                negatives.append(item)
        candidates = [positive] + negatives
        rng.shuffle(candidates)
        instances[user] = {"user_id": user, "profile": raw.profiles.get(user, ""),
                           "history": [entry(item, s) for item, s in sequence[-1 - protocol.history:-1]],
                           "candidates": [entry(item) for item in candidates],
                           "labels": [int(item == positive) for item in candidates]}
    if not instances:
        raise ValueError(f"{', '.join(raw.inputs)}: no user is left after the protocol ({dict(dropped)})")

    users = sorted(instances)
    split_of = getattr(raw, "split_of", None)
    if split_of:  # the source's own split (the pointwise synthetic set: new items for valid and test)
        groups = tuple([user for user in users if split_of[user] == name] for name in SPLITS)
    else:
        random.Random(protocol.seed).shuffle(users)
        n_train, n_valid, _ = split_sizes(len(users), protocol.split)
        groups = (users[:n_train], users[n_train:n_train + n_valid], users[n_train + n_valid:])
    splits = {name: [instances[user] for user in sorted(group)] for name, group in zip(SPLITS, groups)}
    frequency = Counter(inst["candidates"][inst["labels"].index(1)]["item_id"] for inst in splits["train"])
    stats = {"inputs": raw.inputs, "protocol": asdict(protocol), "users": len(users), "items": len(pool),
             "interactions": sum(len(sequences[user]) for user in users),
             "interactions_in_instances": sum(len(inst["history"]) + 1 for inst in instances.values()),
             "instances": {name: len(split) for name, split in splits.items()},
             "dropped": dict(sorted(dropped.items())),
             "train_positive_frequency": {item: frequency[item] for item in pool}}
    return splits, stats
