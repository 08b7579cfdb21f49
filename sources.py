"""Where R2Rank's data comes from, before the protocol of data.py: input files read with errors that name
the file and line, the Amazon Reviews 2023 and MovieLens-100K sources, and the built-in synthetic set.

    load_amazon(reviews, meta, protocol), load_movielens(path, protocol), synthetic_raw(...)  -> RawData
    category_match_ndcg(instances, k, category)   the best NDCG@k any ranker can expect on synthetic instances

The synthetic set (not in the paper): a small generated set whose labels only the history reveals.
96 items, "<Color> <noun>" with the text "category: <c>; color: <color>", in 8 categories of 3 nouns
x 4 colours. Each user favours `categories_per_user` categories drawn uniformly; the history (4-10
items) and the positive come from them, so an item's text alone says nothing about its label but the
history does: the positive's category always occurs in the history. The profile carries no signal.
The pointwise variant (--pointwise) is the quickstart's: every positive is a camping item and no
negative is, so a candidate's own text decides its label and the history is no use. Its valid and
test users meet only new items: half of each category's 12 colour-noun pairs (is_new_item: a
checkerboard over nouns and colours, so every noun and every colour occurs on both sides) belong to
them, the other half to the training users, so no valid or test candidate was ever seen in training.
Counting what training users liked (popularity) cannot rank them; reading "camping" can.
"""
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

from data import DataError, read_jsonl, read_lines, require, shorten
from protocol import SPLITS, split_sizes

STORED_TEXT_CHARS = 500  # Amazon item texts are cut to this when the dataset is built (prompts cut further)
MOVIELENS_GENRES = ("unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
                    "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western").split()


# ------------------------------------------------------------------- input files


def read_rows(path, sep, count=None, encoding="utf-8"):
    """Yield (line_number, fields) of a delimited file, `count` fields a row (default: the first row's)."""
    for lineno, text in read_lines(path, encoding):
        if text.strip():
            values = text.split(sep)
            count = count or len(values)
            if len(values) != count:
                raise DataError(f"{path}:{lineno}: expected {count} fields split by {sep!r}, got {len(values)}")
            yield lineno, values


def read_atomic(path, required):
    """Yield (line_number, {column: value}) of a RecBole atomic file (tab-separated, "name:type" header)."""
    rows = read_rows(path, "\t")
    columns = [name.split(":")[0] for name in next(rows, (1, []))[1]]
    if missing := [name for name in required if name not in columns]:
        raise DataError(f"{path}:1: the header lacks column(s) {', '.join(missing)}")
    for lineno, values in rows:
        yield lineno, dict(zip(columns, values))


def as_int(text, path, lineno):
    try:
        return int(float(text))
    except ValueError:
        raise DataError(f"{path}:{lineno}: not a number: {text!r}") from None


# ------------------------------------------------------------------- Amazon, MovieLens


@dataclass
class RawData:
    """What a source hands to the protocol."""
    interactions: list  # (user_id, item_id, unix seconds), inside the window
    items: dict  # item_id -> {"title", "text"}, titled items only
    profiles: dict  # user_id -> profile text
    inputs: list  # file names, for messages and stats.json
    touched_outside: dict = field(default_factory=dict)  # user_id -> items touched outside the window
    split_of: dict = field(default_factory=dict)  # user_id -> its split, where the source fixes it (else a seeded shuffle)
    dropped: Counter = field(default_factory=Counter)


def clean(value):
    """A text-ish JSON value (string, number, list of them) as one line of single-spaced text."""
    if isinstance(value, list):
        value = " ".join(clean(v) for v in value)
    return " ".join(str(value).split()) if value is not None else ""


def window_seconds(protocol):
    """[lo, hi) in Unix seconds, days at UTC midnight; the end day is included."""
    day = lambda text: datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()
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
    if not raw.interactions:  # a window that missed, or an empty file
        outside = raw.dropped["interactions_outside_window"]
        window = f"from {protocol.start or 'the start'} to {protocol.end or 'the end'}"
        raise DataError(f"{path}: none of its {outside:,} interactions is {window} (--start / --end)" if outside
                        else f"{path}: holds no interactions (an empty file?)")


def amazon_reviews(path):
    for lineno, review in read_jsonl(path):
        user, item = require(review, "user_id", str, path, lineno), require(review, "parent_asin", str, path, lineno)
        yield user, item, int(require(review, "timestamp", (int, float), path, lineno) // 1000)  # ms -> s


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
        if item in needed and item in raw.items:  # the item's first titled record is kept, the others counted
            raw.dropped["repeated_item_records"] += 1
        elif item in needed and clean(record.get("title")):
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


def plain_or_gzip(folder, name):
    """folder/name, or folder/name.gz when only that one exists (read_lines reads both)."""
    plain = os.path.join(folder, name)
    return plain + ".gz" if not os.path.exists(plain) and os.path.exists(plain + ".gz") else plain


def load_movielens(path, protocol):
    """MovieLens-100K in its original layout (u.data, u.item, u.user) or as RecBole atomic files, each
    plain or gzipped (u.data.gz)."""
    original = os.path.exists(plain_or_gzip(path, "u.data"))
    if not original and not os.path.exists(plain_or_gzip(path, "ml-100k.inter")):
        raise DataError(f"{path}: holds neither u.data (original layout) nor ml-100k.inter (RecBole layout), plain or .gz")
    names = ("u.data", "u.item", "u.user") if original else ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
    inter, item_file, user_file = files = [plain_or_gzip(path, name) for name in names]
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
    raw.profiles = {user: f"Age {age}, {({'M': 'male', 'F': 'female'}).get(gender, gender)}, occupation: {occupation}"
                    for user, age, gender, occupation in users}
    return raw


def synthetic_raw(users=200, seed=0, categories_per_user=2, pointwise=False, split="8:1:1"):
    """The synthetic set (generate_synthetic) as RawData. Pointwise: `split`'s valid and test users are drawn here
    (raw.split_of fixes them) and meet only new items (is_new_item), the training users only the others; every camping
    item and every item of the other side is touched outside the window, so the protocol draws no negative of them."""
    held_out, split_of = None, {}
    if pointwise:
        order = list(range(users))
        random.Random(f"synthetic-split/{seed}").shuffle(order)
        n_train, n_valid, _ = split_sizes(users, split)
        for position, number in enumerate(order):
            split_of[f"u{number:04d}"] = SPLITS[(position >= n_train) + (position >= n_train + n_valid)]
        held_out = set(order[n_train:])
    items, profiles, interactions = generate_synthetic(users, seed, categories_per_user, held_out)
    raw = RawData(interactions, items, profiles, ["synthetic"], split_of=split_of)
    if pointwise:
        new = {item for item, it in items.items() if is_new_item(it)}
        liked = {item for item, it in items.items() if item_category(it) == POINTWISE_CATEGORY}
        raw.touched_outside = {f"u{n:04d}": liked | (set(items) - new if n in held_out else new) for n in range(users)}
    return raw


# ------------------------------------------------------------------- the synthetic set


CATEGORIES = {
    "camping": ["tent", "lantern", "sleeping bag"], "cooking": ["skillet", "chef knife", "spice rack"],
    "music": ["ukulele", "metronome", "guitar strap"], "gardening": ["trowel", "watering can", "seed kit"],
    "fitness": ["yoga mat", "kettlebell", "jump rope"], "painting": ["easel", "brush set", "canvas pad"],
    "reading": ["book light", "bookend", "reading stand"], "gaming": ["gamepad", "headset", "racing wheel"],
}
COLORS = ["red", "blue", "green", "black"]
POINTWISE_CATEGORY = "camping"  # --pointwise: every user's positive
START = int(datetime(2022, 1, 1, tzinfo=timezone.utc).timestamp())  # the first user's first interaction


def generate_synthetic(users=200, seed=0, categories_per_user=2, held_out=None):
    """(items {item_id: {"title", "text"}}, profiles {user_id: text}, interactions [(user_id, item_id, unix seconds)]),
    seeded; a user's positive is its last interaction. held_out None: the history-based set; a set of user numbers:
    the pointwise set (positive: a camping item), whose held_out users touch only new items, the others the rest."""
    if not 1 <= categories_per_user <= len(CATEGORIES):
        raise DataError(f"--categories-per-user must be 1 to {len(CATEGORIES)}, not {categories_per_user}")
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
        if held_out is None:
            history = rng.sample([item for name in favoured for item in by_category[name]], rng.randint(4, 10))
            shown = sorted({category_of[item] for item in history})
            positive = rng.choice([i for name in shown for i in by_category[name] if i not in history])
        else:  # the positive first, so that a history of camping items always leaves one to like
            new = number in held_out
            mine = [item for item in items if is_new_item(items[item]) == new]  # this side's items
            positive = rng.choice([item for item in mine if category_of[item] == POINTWISE_CATEGORY])
            pool = [item for item in mine if category_of[item] in favoured and item != positive]
            history = rng.sample(pool, min(rng.randint(4, 10), len(pool)))
        for step, item in enumerate(history + [positive]):
            interactions.append((user, item, START + 86400 * (number + step)))
    return items, profiles, interactions


def is_new_item(item):
    """Whether a synthetic item is one of the pointwise set's valid and test items: its noun's and colour's places in
    CATEGORIES and COLORS add up to an odd number ("Blue tent", "Red lantern"; not "Red tent", "Blue lantern")."""
    color, noun = item["title"].split(" ", 1)
    return (COLORS.index(color.lower()) + CATEGORIES[item_category(item)].index(noun)) % 2 == 1


def item_category(item):
    """The category written in a synthetic item's text."""
    return item["text"].split(";")[0].removeprefix("category: ")


def category_match_ndcg(instances, k=10, category=None):
    """Expected NDCG@k of ranking first the candidates whose category occurs in the history (or is `category`: the
    pointwise set's), ties at random: with the whole history shown the best any ranker can expect, since each of those
    is equally likely to be the positive and no other can be. For m such candidates out of n, the positive's rank is
    uniform over 1..m if it is one of them, else over m+1..n. On the pointwise set m = 1: it is 1."""
    total = 0.0
    for inst in instances:
        seen = {category} if category else {item_category(item) for item in inst["history"]}
        matches = [item_category(item) in seen for item in inst["candidates"]]
        m, n = sum(matches), len(matches)
        ranks = range(1, m + 1) if matches[inst["labels"].index(1)] else range(m + 1, n + 1)
        total += sum(1 / math.log2(rank + 1) for rank in ranks if rank <= k) / len(ranks)
    return total / len(instances)
