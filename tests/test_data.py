"""data.py: the protocol of Sec. 4.1.1 on tiny hand-written fixtures and bad inputs through the
real command line (the synthetic set is in test_synthetic.py). Every expectation is worked out by
hand from the fixture, not read back from the code."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

import data
from data import DataError
import datasets
import runs
import sources
from protocol import Protocol, build_instances
from sources import RawData

from conftest import read_only, run_script, terminal_sigint

DATA_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data.py")


def run_cli(*args):
    return run_script(DATA_PY, *args, timeout=60)


def millis(when):
    return int(datetime.fromisoformat(when).replace(tzinfo=timezone.utc).timestamp() * 1000)


def write_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    with (gzip.open(path, "wt", encoding="utf-8") if compress else open(path, "w", encoding="utf-8")) as f:
        f.write(text)
    return path


def read_all(out_dir):
    return {split: data.load_split(out_dir, split, allow_empty=True) for split in data.SPLITS}


def ids(items):
    return [item["item_id"] for item in items]


def positives(inst):
    return [c["item_id"] for c, label in zip(inst["candidates"], inst["labels"]) if label]


def negatives(inst):
    return [c["item_id"] for c, label in zip(inst["candidates"], inst["labels"]) if not label]


# ---------------------------------------------------------------- Amazon fixture

def review(user, item, when):
    return {"rating": 5.0, "title": "ok", "text": "fine", "user_id": user, "parent_asin": item,
            "asin": item, "timestamp": millis(when), "verified_purchase": True}


AMAZON_REVIEWS = [
    review("alice", "B01", "2021-09-30T23:59:59"),  # one second before the paper's window
    review("alice", "B02", "2021-10-01T00:00:00"),  # first second of the window
    review("alice", "B04", "2022-05-01T12:00:00"),  # tie with B03: B03 must come first (item id)
    review("alice", "B03", "2022-05-01T12:00:00"),
    review("alice", "NT", "2022-06-01T00:00:00"),  # item whose metadata has no title
    review("alice", "B05", "2023-10-31T23:59:59"),  # last second of the window: the positive
    review("alice", "B06", "2023-11-01T00:00:00"),  # just after the window
    review("bob", "B07", "2022-01-01T00:00:00"),  # one interaction only: no history
    review("carol", "C5", "2022-03-05T00:00:00"),  # out of file order on purpose
    *[review("carol", f"C{n}", f"2022-03-0{n}T00:00:00") for n in range(1, 5)],
    review("dave", "B10", "2022-02-01T00:00:00"),
    review("dave", "B11", "2022-02-02T00:00:00"),
    review("dave", "B10", "2022-02-03T00:00:00"),  # the same item again: only the first touch counts
    review("dave", "C1", "2021-01-01T00:00:00"),  # before the window, yet never a negative for dave
    review("erin", "MISSING", "2022-01-01T00:00:00"),  # item absent from the metadata file
    review("erin", "B12", "2022-01-02T00:00:00"),
    *[review("frank", f"F{n:02d}", f"2022-04-{n:02d}T00:00:00") for n in range(1, 13)],
]
AMAZON_ITEMS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B10", "B11", "B12",
                *[f"C{n}" for n in range(1, 6)], *[f"F{n:02d}" for n in range(1, 13)]]


def amazon_meta():
    records = [{"main_category": "Video Games", "title": f"Game {item}", "parent_asin": item, "store": "Acme",
                "categories": ["Video Games", "PC"], "features": ["fast"], "description": ["x" * 2000],
                "price": 9.99, "details": {}} for item in AMAZON_ITEMS]
    records.append({"main_category": "Video Games", "title": None, "parent_asin": "NT"})
    return records


@pytest.fixture
def amazon_files(tmp_path):
    reviews = write_jsonl(tmp_path / "Video_Games.jsonl.gz", AMAZON_REVIEWS, compress=True)
    meta = write_jsonl(tmp_path / "meta_Video_Games.jsonl", amazon_meta())
    return reviews, meta


def test_amazon_cli_applies_window_order_truncation_and_drops(amazon_files, tmp_path):
    reviews, meta = amazon_files
    out = tmp_path / "out"
    result = run_cli("amazon", "--reviews", reviews, "--meta", meta, "--out", out, "--history", 3, "--candidates", 4)
    assert result.returncode == 0, result.stderr
    instances = {inst["user_id"]: inst for split in read_all(out).values() for inst in split}
    assert set(instances) == {"alice", "carol", "dave", "frank"}  # bob, erin: no history left
    alice, carol, dave, frank = (instances[u] for u in ("alice", "carol", "dave", "frank"))
    assert ids(alice["history"]) == ["B02", "B03", "B04"] and positives(alice) == ["B05"]
    assert [h["timestamp"] for h in alice["history"]] == [millis(t) // 1000 for t in (
        "2021-10-01T00:00:00", "2022-05-01T12:00:00", "2022-05-01T12:00:00")]
    assert ids(carol["history"]) == ["C2", "C3", "C4"] and positives(carol) == ["C5"]  # cut to --history 3
    assert ids(dave["history"]) == ["B10"] and positives(dave) == ["B11"]
    assert ids(frank["history"]) == ["F09", "F10", "F11"] and positives(frank) == ["F12"]
    # Negatives avoid everything a user touched, even outside the window (alice's B01, B06; dave's C1).
    assert not {"B01", "B02", "B03", "B04", "B06"} & set(ids(alice["candidates"]))
    assert not {"B10", "C1"} & set(negatives(dave))
    pool = {"B02", "B03", "B04", "B05", "B10", "B11", *[f"C{n}" for n in range(1, 6)],
            *[f"F{n:02d}" for n in range(1, 13)]}
    for inst in instances.values():
        assert set(ids(inst["candidates"])) <= pool and len(set(ids(inst["candidates"]))) == 4
        assert inst["profile"] == ""
    item = alice["candidates"][alice["labels"].index(1)]
    assert item["title"] == "Game B05"
    assert item["text"].startswith("by Acme; Video Games > PC; price $9.99; fast; xxx")
    assert len(item["text"]) == sources.STORED_TEXT_CHARS and item["text"].endswith("...")

    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 23, 4 + 5 + 2 + 12)
    assert stats["interactions_in_instances"] == 4 + 4 + 2 + 4
    assert stats["dropped"] == {"interactions_outside_window": 3, "items_without_title": 2,
                                "interactions_with_untitled_item": 2, "users_without_history": 2,
                                "repeated_interactions": 1}
    assert stats["protocol"] == {"history": 3, "candidates": 4, "split": "8:1:1", "seed": 0,
                                 "start": "2021-10-01", "end": "2023-10-31"}
    # 4 users -> 8:1:1 gives 4/0/0, so every positive is a training positive.
    assert stats["instances"] == {"train": 4, "valid": 0, "test": 0}
    frequency = stats["train_positive_frequency"]
    assert set(frequency) == pool and sum(frequency.values()) == 4
    assert frequency["B05"] == frequency["C5"] == frequency["B11"] == frequency["F12"] == 1
    assert "users" in result.stdout and "dropped: users_without_history" in result.stdout


def test_amazon_explicit_window(amazon_files, tmp_path):
    reviews, meta = amazon_files
    assert datasets.main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "w"),
                      "--start", "2022-02-01", "--end", "2022-03-04", "--candidates", "4"]) == 0
    # In the window: dave's B10, B11, B10 again and carol's C1..C4 (C5, March 5 at 00:00, is just
    # outside). The pool is B10, B11, C1..C4. Carol touched all of C1..C5, so only B10 and B11 are left
    # for her 3 negatives: she is dropped. Dave touched C1 before the window: his negatives are C2..C4.
    (dave,) = read_all(tmp_path / "w")["train"]
    assert ids(dave["history"]) == ["B10"] and dave["history"][0]["timestamp"] == millis("2022-02-01") // 1000
    assert sorted(ids(dave["candidates"])) == ["B11", "C2", "C3", "C4"]
    assert dave["labels"][ids(dave["candidates"]).index("B11")] == 1
    stats = json.loads((tmp_path / "w" / "stats.json").read_text())
    assert stats["dropped"]["interactions_outside_window"] == len(AMAZON_REVIEWS) - 7
    assert stats["dropped"]["users_with_too_few_negatives"] == 1 and stats["users"] == 1


# ---------------------------------------------------------------- MovieLens fixtures (both layouts)

GENRE_FLAGS = {"Comedy": 5, "Drama": 8, "Action": 1}  # positions among the 19 u.item flags
MOVIES = {  # id: (title, year, genres); "unknown" is MovieLens's own placeholder for a missing title
    "1": ("Café", "1995", ["Comedy", "Drama"]), "2": ("Heat", "1995", ["Action"]),
    "3": ("Emma", "1996", ["Comedy"]), "4": ("Fargo", "1996", ["Drama"]), "5": ("Alien", "1979", ["Action"]),
    "6": ("Casino", "1995", ["Drama"]), "7": ("Ran", "1985", ["Drama"]), "8": ("Babe", "1995", ["Comedy"]),
    "9": ("unknown", "", []),
}
RATINGS = [("1", "1", 100), ("1", "3", 200), ("1", "2", 200), ("1", "4", 300),  # tie 2/3 at 200
           ("2", "5", 50), ("2", "9", 60),  # item 9 has no title: user 2 keeps one interaction
           ("3", "2", 10), ("3", "6", 20), ("3", "7", 30), ("4", "8", 5), ("4", "1", 6)]
USERS = [("1", "24", "M", "technician"), ("2", "53", "F", "other"), ("3", "23", "M", "writer"),
         ("4", "24", "F", "artist")]


def write_movielens_original(directory):
    directory.mkdir()
    (directory / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in RATINGS))
    lines = []
    for item, (title, year, genres) in MOVIES.items():
        flags = ["0"] * 19
        for genre in genres:
            flags[GENRE_FLAGS[genre]] = "1"
        if title == "unknown":
            flags[0] = "1"
        full_title = f"{title} ({year})" if year else title
        released = f"01-Jan-{year}" if year else ""
        lines.append("|".join([item, full_title, released, "", "http://x"] + flags) + "\n")
    (directory / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (directory / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|00000\n" for u, a, g, o in USERS))
    return directory


def write_movielens_recbole(directory):
    directory.mkdir()
    (directory / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in RATINGS))
    rows = [f"{i}\t{t if t != 'unknown' else 'unkonwn'}\t{y or 'unkonwn'}\t{' '.join(g) or 'unknown'}\n"
            for i, (t, y, g) in MOVIES.items()]
    (directory / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "".join(rows), encoding="utf-8")
    (directory / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t00000\n" for u, a, g, o in USERS))
    return directory


@pytest.mark.parametrize("layout", [write_movielens_original, write_movielens_recbole])
def test_movielens_both_layouts(layout, tmp_path):
    path = layout(tmp_path / "ml")
    out = tmp_path / "out"
    assert datasets.main(["movielens", "--path", str(path), "--out", str(out), "--candidates", "3"]) == 0
    instances = {inst["user_id"]: inst for split in read_all(out).values() for inst in split}
    assert set(instances) == {"1", "3", "4"}
    expected = {"1": (["1", "2", "3"], "4"), "3": (["2", "6"], "7"), "4": (["8"], "1")}
    for user, (history, positive) in expected.items():
        inst = instances[user]
        assert ids(inst["history"]) == history and positives(inst) == [positive]
    assert instances["1"]["profile"] == "Age 24, male, occupation: technician"
    assert instances["4"]["profile"] == "Age 24, female, occupation: artist"
    assert instances["4"]["history"][0] == {"item_id": "8", "title": "Babe", "text": "year 1995; genres: Comedy",
                                            "timestamp": 5}
    cafe = next(c for c in instances["4"]["candidates"] if c["item_id"] == "1")
    assert cafe == {"item_id": "1", "title": "Café", "text": "year 1995; genres: Comedy, Drama"}
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 7, 4 + 3 + 2)
    assert stats["dropped"] == {"items_without_title": 1, "interactions_with_untitled_item": 1,
                                "users_without_history": 1, "repeated_interactions": 0}
    assert stats["protocol"]["start"] is None and stats["protocol"]["end"] is None


@pytest.mark.parametrize("layout", [write_movielens_original, write_movielens_recbole])
def test_movielens_reads_gzipped_files(layout, tmp_path):
    """u.data.gz (or ml-100k.inter.gz) and the others gzipped make the same data set as the plain files."""
    plain = layout(tmp_path / "plain")
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in os.listdir(plain):
        (packed / (name + ".gz")).write_bytes(gzip.compress((plain / name).read_bytes()))
    for path, out in ((plain, tmp_path / "from-plain"), (packed, tmp_path / "from-gzip")):
        assert datasets.main(["movielens", "--path", str(path), "--out", str(out), "--candidates", "3"]) == 0
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (tmp_path / "from-gzip" / name).read_bytes() == (tmp_path / "from-plain" / name).read_bytes()
    inputs = json.loads((tmp_path / "from-gzip" / "stats.json").read_text())["inputs"]
    assert all(name.endswith(".gz") for name in inputs) and len(inputs) == 3


ML100K = os.environ.get("R2RANK_ML100K", os.path.join(os.path.dirname(DATA_PY), "data", "ml-100k"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(ML100K), reason="MovieLens-100K not found (set R2RANK_ML100K)")
def test_real_movielens_100k(tmp_path):
    assert datasets.main(["movielens", "--path", ML100K, "--out", str(tmp_path / "ml")]) == 0
    stats = json.loads((tmp_path / "ml" / "stats.json").read_text())
    # 943 users, 1,682 movies, 100,000 ratings; movie 267 is titled "unknown" and has 9 ratings.
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1681, 99991)
    assert stats["instances"] == {"train": 755, "valid": 94, "test": 94}
    for inst in data.load_split(tmp_path / "ml", "test"):
        assert len(inst["history"]) <= 20 and len(inst["candidates"]) == 20 and sum(inst["labels"]) == 1


def test_movielens_help_says_no_window(capsys):
    with pytest.raises(SystemExit):
        datasets.main(["movielens", "--help"])
    assert "no window" in capsys.readouterr().out


# ---------------------------------------------------------------- the protocol on many users


def many_users(count=500, items=60, per_user=4, seed=1):
    rng = random.Random(seed)
    raw = RawData([], {f"m{n:02d}": {"title": f"Movie {n}", "text": ""} for n in range(items)}, {}, ["test"])
    for number in range(count):
        for step, item in enumerate(rng.sample(sorted(raw.items), per_user)):
            raw.interactions.append((f"user{number:03d}", item, 1000 * step))
    return raw


def test_splits_are_disjoint_8_1_1_and_candidates_are_valid():
    raw = many_users()
    splits, stats = build_instances(raw, Protocol(history=20, candidates=10, seed=3))
    users = {split: [inst["user_id"] for inst in instances] for split, instances in splits.items()}
    assert [len(users[s]) for s in data.SPLITS] == [400, 50, 50]
    assert set(users["train"]) | set(users["valid"]) | set(users["test"]) == {f"user{n:03d}" for n in range(500)}
    assert not set(users["train"]) & set(users["valid"]) and not set(users["valid"]) & set(users["test"])
    touched = {}
    for user, item, _ in raw.interactions:
        touched.setdefault(user, set()).add(item)
    for instances in splits.values():
        for inst in instances:
            candidates = ids(inst["candidates"])
            assert len(candidates) == 10 and len(set(candidates)) == 10
            assert sum(inst["labels"]) == 1 and set(inst["labels"]) == {0, 1}
            assert not set(negatives(inst)) & touched[inst["user_id"]]
            assert len(inst["history"]) == 3
    # The positive is each user's last interaction, step 3 at 3000 s.
    last = {user: item for user, item, when in raw.interactions if when == 3000}
    assert all(positives(inst) == [last[inst["user_id"]]] for instances in splits.values() for inst in instances)
    assert sum(stats["train_positive_frequency"].values()) == 400


def test_positive_position_is_uniform_over_slots():
    splits, _ = build_instances(many_users(), Protocol(candidates=10, seed=0))
    slots = Counter(inst["labels"].index(1) for instances in splits.values() for inst in instances)
    assert set(slots) == set(range(10))  # every slot hit
    expected = 500 / 10
    chi_square = sum((slots[k] - expected) ** 2 / expected for k in range(10))
    assert chi_square < 27.88  # 9 degrees of freedom, p = 0.001


def test_same_seed_same_data_other_seed_other_data():
    first, _ = build_instances(many_users(), Protocol(candidates=10, seed=7))
    again, _ = build_instances(many_users(), Protocol(candidates=10, seed=7))
    other, _ = build_instances(many_users(), Protocol(candidates=10, seed=8))
    assert json.dumps(first) == json.dumps(again)
    assert [i["user_id"] for i in first["test"]] != [i["user_id"] for i in other["test"]]


def test_nobody_left_is_a_value_error_in_the_protocol_and_a_data_error_in_datasets():
    """protocol.py (standard library only) raises ValueError when no user survives; datasets.py turns it
    into the one-line DataError the command prints. Here: one user with one interaction, no history."""
    raw = RawData([("u", "m1", 0)], {"m1": {"title": "Movie 1", "text": ""}}, {}, ["toy.jsonl"])
    with pytest.raises(ValueError, match=r"^toy.jsonl: no user is left after the protocol .*users_without_history"):
        build_instances(raw, Protocol(candidates=2))
    with pytest.raises(DataError, match=r"^toy.jsonl: no user is left after the protocol"):
        datasets.build_instances(raw, Protocol(candidates=2))


# ---------------------------------------------------------------- bad inputs


def instance(user="u", k=3, positive=0):
    item = lambda i: {"item_id": f"i{i}", "title": f"Item {i}", "text": ""}
    return {"user_id": user, "profile": "", "history": [item(9)], "candidates": [item(i) for i in range(k)],
            "labels": [int(i == positive) for i in range(k)]}


def test_load_split_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(instance()) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        data.load_split(tmp_path, "train")
    (tmp_path / "valid.jsonl").write_text(json.dumps({k: v for k, v in instance().items() if k != "labels"}) + "\n")
    with pytest.raises(DataError, match=r"valid\.jsonl:1: missing required field 'labels'"):
        data.load_split(tmp_path, "valid")


def edited(change):
    record = instance("v")
    change(record)
    return record


@pytest.mark.parametrize("second, message", [
    (instance("v", k=4), r":2: 4 candidates, but the first instance has 3 \(K must be the same"),
    (edited(lambda r: r.update(labels=[0, 0, 0])), r":2: labels must be 0 or 1 \(integers\) with at least one 1"),
    (edited(lambda r: r.update(labels=["1", "0", "0"])), r":2: labels must be 0 or 1"),
    (edited(lambda r: r.update(labels=[True, False, False])), r":2: labels must be 0 or 1"),
    (edited(lambda r: r.update(labels=[2, 0, 0])), r":2: labels must be 0 or 1"),
    (edited(lambda r: r.update(labels=[1, 0])), r":2: 2 labels for 3 candidates"),
    (edited(lambda r: r["candidates"][1].pop("title")), r":2: candidates\[1\] has no title"),
    (edited(lambda r: r["candidates"][2].update(title="  ")), r":2: candidates\[2\] has no title"),
    (edited(lambda r: r["history"][0].pop("title")), r":2: history\[0\] has no title"),
    (edited(lambda r: r["candidates"][0].pop("item_id")), r":2: candidates\[0\] needs an 'item_id'"),
    (edited(lambda r: r.update(profile=3)), r":2: field 'profile' has the wrong type"),
    (instance("u"), r":2: user_id 'u' again \(first on line 1\)"),
    (edited(lambda r: r.update(labels=[1, 1, 1])), r":2: every candidate is labelled 1: an instance needs a negative"),
    (edited(lambda r: r["candidates"][2].update(item_id="i0")),  # labelled 0 here, 1 as candidates[0]
     r":2: candidates\[2\] repeats item_id 'i0' of candidates\[0\] \(each candidate once\)"),
])
def test_one_instance_validator_names_file_line_and_field(tmp_path, second, message):
    """load_split, which the RL, SFT and eval stages all read through, rejects each departure from the
    instance format on its line; the first, well-formed instance is line 1."""
    (tmp_path / "train.jsonl").write_text(json.dumps(instance()) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl" + message):
        data.load_split(tmp_path, "train")
    (tmp_path / "train.jsonl").write_text(json.dumps(instance()) + "\n" + json.dumps(instance("w", positive=2)) + "\n")
    assert [inst["user_id"] for inst in data.load_split(tmp_path, "train")] == ["u", "w"]


def test_an_empty_split_is_refused_unless_allowed(tmp_path):
    (tmp_path / "valid.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"valid\.jsonl: no instances"):
        data.load_split(tmp_path, "valid")
    assert data.load_split(tmp_path, "valid", allow_empty=True) == []


def corrupt(lines_of, index, raw_line):
    """Write the fixture with line `index` (0-based) replaced by raw bytes."""
    def write(path):
        lines = [json.dumps(record).encode() for record in lines_of()]
        lines[index] = raw_line
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path
    return write


def raw_bytes(content):
    def write(path):
        path.write_bytes(content)
        return path
    return write


LONG_LINE = json.dumps({"text": random.Random(0).randbytes(2000).hex()}).encode()  # > 60 bytes compressed
BAD_AMAZON = {  # name: (which file, how to write it, what the message must say)
    "malformed_json": ("reviews", corrupt(lambda: AMAZON_REVIEWS, 2, b'{"user_id": "x",'), ":3: malformed JSON"),
    "missing_field": ("reviews", corrupt(lambda: AMAZON_REVIEWS, 1, b'{"user_id": "x", "parent_asin": "B01"}'),
                      ":2: missing required field 'timestamp'"),
    "not_utf8": ("meta", corrupt(amazon_meta, 1, b'{"parent_asin": "B02", "title": "caf\xe9"}'), ":2: not valid utf-8"),
    "truncated_gzip": ("reviews", raw_bytes(gzip.compress(LONG_LINE)[:60]), ":1: cannot read"),
    "corrupt_gzip": ("reviews", raw_bytes(b"\x1f\x8b\x08" + b"\x00" * 7 + b"\xff" * 50), ":1: cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_AMAZON))
def test_bad_amazon_input_fails_cleanly(case, amazon_files, tmp_path):
    reviews, meta = amazon_files
    which, write, message = BAD_AMAZON[case]
    bad = write(tmp_path / f"bad_{which}.jsonl")
    assert bad.exists()
    files = {"reviews": reviews, "meta": meta, which: bad}
    assert_fails(run_cli("amazon", "--reviews", files["reviews"], "--meta", files["meta"], "--out", tmp_path / "o"),
                 f"{bad}", message, tmp_path / "o")


def assert_fails(result, file_name, message, out):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and file_name in result.stderr and message in result.stderr
    assert not out.exists() and not [n for n in os.listdir(out.parent) if ".tmp-" in n]


def test_unreadable_or_empty_inputs_fail_cleanly(amazon_files, tmp_path):
    reviews, meta = amazon_files
    out = tmp_path / "o"
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    for bad_reviews, message in [(tmp_path / "nope.jsonl", "cannot read file"), (tmp_path, "cannot read file"),
                                 (empty, "holds no interactions (an empty file?)")]:  # not a window that missed
        assert_fails(run_cli("amazon", "--reviews", bad_reviews, "--meta", meta, "--out", out),
                     str(bad_reviews), message, out)
    result = run_cli("amazon", "--reviews", reviews, "--meta", meta, "--out", out, "--start", "2030-01-01", "--end", "2030-12-31")
    assert_fails(result, str(reviews), "interactions is from 2030-01-01 to 2030-12-31 (--start / --end)", out)


def test_bad_movielens_files_fail_cleanly(tmp_path):
    original = write_movielens_original(tmp_path / "orig")
    with open(original / "u.data", "a") as f:
        f.write("5\t1\t3\n")  # line 12: three fields
    out = tmp_path / "o"
    assert_fails(run_cli("movielens", "--path", original, "--out", out), f"{original / 'u.data'}:12",
                 "expected 4 fields", out)
    recbole = write_movielens_recbole(tmp_path / "rb")
    text = (recbole / "ml-100k.user").read_text().replace("occupation:token", "job:token")
    (recbole / "ml-100k.user").write_text(text)
    assert_fails(run_cli("movielens", "--path", recbole, "--out", out), f"{recbole / 'ml-100k.user'}:1",
                 "occupation", out)
    assert_fails(run_cli("movielens", "--path", tmp_path, "--out", out), str(tmp_path),
                 "neither u.data (original layout) nor ml-100k.inter (RecBole layout), plain or .gz", out)


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError):  # not JSON-serializable, halfway through writing
        datasets.write_dataset(tmp_path / "o", {"train": [{"a": 1}], "valid": [{"a": object()}]}, {})
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o"
    assert run_cli("synthetic", "--users", 20, "--out", out).returncode == 0
    first = (out / "train.jsonl").read_text()
    result = run_cli("synthetic", "--users", 20, "--seed", 1, "--out", out)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "--overwrite" in result.stderr
    assert (out / "train.jsonl").read_text() == first
    assert run_cli("synthetic", "--users", 20, "--seed", 1, "--out", out, "--overwrite").returncode == 0
    assert sorted(os.listdir(out)) == ["stats.json", "test.jsonl", "train.jsonl", "valid.jsonl"]
    assert (out / "train.jsonl").read_text() != first


def tree(path):
    return sorted(os.path.relpath(os.path.join(folder, name), path) for folder, dirs, names in os.walk(path) for name in dirs + names)


@pytest.mark.parametrize("where", ["foreign file", "foreign folder", "cwd", "parent"])
def test_overwrite_deletes_nothing_but_a_data_sets_files(where, tmp_path):
    """--overwrite replaces train/valid/test.jsonl and stats.json; a --out holding anything else (a file,
    a folder, the current directory ".", a parent of other folders) is refused, naming it, and kept whole."""
    out, cwd = tmp_path / "o", None
    out.mkdir()
    (out / "train.jsonl").write_text("an old set\n")
    if where == "foreign file":
        (out / "notes.txt").write_text("mine")
        named = "notes.txt"
    elif where == "foreign folder":
        (out / "models").mkdir()
        (out / "models" / "weights.bin").write_text("mine")
        named = "models/"
    elif where == "cwd":
        (out / "README.md").write_text("mine")
        cwd, named = out, "README.md"
    else:
        (out / "sub").mkdir()
        (out / "sub" / "train.jsonl").write_text("a data set of its own\n")
        named = "sub/"
    before = tree(out)
    result = run_script(DATA_PY, "synthetic", "--users", 20, "--out", "." if cwd else out, "--overwrite", cwd=cwd, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and f"holds {named}," in result.stderr, result.stderr
    assert tree(out) == before and (out / "train.jsonl").read_text() == "an old set\n"
    assert tree(tmp_path) == sorted([os.path.relpath(os.path.join(str(out), name), tmp_path) for name in before] + ["o"])


def test_an_out_that_is_a_file_is_refused_and_kept(tmp_path):
    out = tmp_path / "o"
    out.write_text("mine")
    result = run_cli("synthetic", "--users", 20, "--out", out, "--overwrite")
    assert result.returncode == 1 and "exists and is not a directory" in result.stderr and out.read_text() == "mine"


def test_overwrite_into_the_current_directory_holding_a_data_set(tmp_path):
    assert run_script(DATA_PY, "synthetic", "--users", 20, "--out", ".", cwd=tmp_path, timeout=60).returncode == 0
    (tmp_path / "valid.jsonl").unlink()  # a set's file missing is still a set
    result = run_script(DATA_PY, "synthetic", "--users", 20, "--out", ".", "--overwrite", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["stats.json", "test.jsonl", "train.jsonl", "valid.jsonl"]


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path):
    """A real process (the signal must reach data.py itself): a large synthetic set, stopped while it is built.
    The signal is sent once data.py says it is building (a fixed 3 s sleep was flaky: under load the imports
    took longer, and the Ctrl-C came before data.py could handle it)."""
    import select

    process = subprocess.Popen([sys.executable, DATA_PY, "synthetic", "--users", "100000", "--out", str(tmp_path / "o")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    ready, _, _ = select.select([process.stdout], [], [], 300)  # a generous wait for the first line
    assert ready and process.stdout.readline().startswith("building the synthetic set from the generator into "), \
        process.stderr.read() if process.poll() is not None else "no line in 300 s"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == f"data.py: stopped by Ctrl-C; nothing written to {tmp_path / 'o'}"
    assert os.listdir(tmp_path) == []


def test_a_repeated_item_record_in_the_amazon_meta_is_counted_and_said(amazon_files, tmp_path):
    reviews, meta = amazon_files
    repeated = write_jsonl(tmp_path / "meta_repeated.jsonl", amazon_meta() + [{"title": "Game B05, again", "parent_asin": "B05"}])
    out = tmp_path / "out"
    result = run_cli("amazon", "--reviews", reviews, "--meta", repeated, "--out", out, "--history", 3, "--candidates", 4)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "stats.json").read_text())["dropped"]["repeated_item_records"] == 1
    assert "dropped: repeated_item_records" in result.stdout
    titles = {c["item_id"]: c["title"] for split in read_all(out).values() for inst in split for c in inst["candidates"]}
    assert titles.get("B05", "Game B05") == "Game B05"  # the first record is kept


@pytest.mark.parametrize("new", [False, True])
def test_a_read_only_out_is_refused_before_the_build_naming_its_flag(new, tmp_path, monkeypatch, capsys):
    """A read-only --out (chmod 555), or a new one inside it: one line naming --out, found before the raw data
    is read (an Amazon category takes minutes), not after; no temporary folder named or left."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    out, built = folder / "new" if new else folder, []
    monkeypatch.setattr(datasets, "synthetic_raw", lambda *args: built.append(args) or sources.synthetic_raw(*args))
    read_only(folder, monkeypatch)
    try:
        code = datasets.main(["synthetic", "--users", "20", "--out", str(out)])
    finally:
        monkeypatch.undo()
        os.chmod(folder, 0o755)
    err = capsys.readouterr().err
    assert code == 1 and err == f"data.py: error: --out {out}: cannot {'create' if new else 'write into'} it (Permission denied)\n"
    assert built == [] and os.listdir(folder) == []


def test_the_built_in_set_in_a_read_only_folder_names_the_users_out(tmp_path, monkeypatch):
    """r2rank.py without --data builds the synthetic set in <out>/data; when that folder is read-only the
    message names the --out the user gave (it named <out>/data as if it were --out)."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    read_only(out / "data", monkeypatch)
    try:
        with pytest.raises(DataError) as refused:
            runs.prepare_data(SimpleNamespace(data=None, out=str(out), model="tiny", seed=0))
    finally:
        monkeypatch.undo()
        os.chmod(out / "data", 0o755)
    assert str(refused.value) == f"--out {out} (its data/): cannot write into it (Permission denied)"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_new_out_gets_the_permissions_a_plain_mkdir_gives(umask, tmp_path):
    """A new --out was the temporary folder renamed, mode 0700 (mkdtemp's): a data set no one else could read
    (a shared machine, a team's folder). Now it has what os.mkdir gives under the same umask."""
    before = os.umask(umask)
    try:
        os.mkdir(tmp_path / "plain")
        datasets.build_synthetic(str(tmp_path / "built"), users=20)
    finally:
        os.umask(before)
    mode = lambda path: os.stat(path).st_mode & 0o777
    assert mode(tmp_path / "built") == mode(tmp_path / "plain") == 0o777 & ~umask


def test_window_flags_that_would_be_ignored_or_select_nothing_are_refused(tmp_path):
    ignored = run_cli("synthetic", "--users", 20, "--start", "2022-01-01", "--out", tmp_path / "a")
    assert ignored.returncode == 2 and ignored.stderr.strip().splitlines()[-1] == (
        "data.py: error: --start / --end: the synthetic set is generated without a time window, so they would "
        "be ignored; leave them out")
    backwards = run_cli("movielens", "--path", tmp_path, "--start", "2023-01-01", "--end", "2022-12-31", "--out", tmp_path / "b")
    assert backwards.returncode == 2 and backwards.stderr.strip().splitlines()[-1].endswith(
        "error: --start 2023-01-01 is after --end 2022-12-31: the window would hold no interaction")
    assert sorted(os.listdir(tmp_path)) == []


def test_a_split_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Notepad's "UTF-8" starts a file with a BOM (EF BB BF): it was refused as malformed JSON at line 1, column 1."""
    datasets.build_synthetic(str(tmp_path / "set"), users=20)
    text = (tmp_path / "set" / "train.jsonl").read_bytes()
    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"))
    assert data.load_split(str(tmp_path / "bom"), "train") == data.load_split(str(tmp_path / "set"), "train")


def test_sigterm_is_one_line_exit_143_and_leaves_nothing(tmp_path):
    """SIGTERM (a job's time limit, `timeout`) killed data.py where it stood: its temporary folder stayed beside
    --out, and a later --out there was refused for holding it. Now it stops as Ctrl-C does."""
    import select

    process = subprocess.Popen([sys.executable, DATA_PY, "synthetic", "--users", "100000", "--out", str(tmp_path / "o")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    ready, _, _ = select.select([process.stdout], [], [], 300)
    assert ready and process.stdout.readline().startswith("building the synthetic set")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip() == f"data.py: stopped by SIGTERM; nothing written to {tmp_path / 'o'}"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["the check of --out", "the clean-up after a replaced set"])
def test_a_stop_that_lands_while_a_temporary_folder_is_removed_still_removes_it(where, tmp_path, monkeypatch):
    """A SIGTERM that arrived as check_out_dir removed its probe folder (right after data.py's first line) stopped
    the run inside the removal, and the folder stayed. Here the first removal sends one before it starts."""
    def terminated(signum, frame):
        raise datasets.Terminated

    rmdir, sent = os.rmdir, []

    def stopped_first(path, *args, **kwargs):
        if not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler raises here, before rmdir runs
        rmdir(path, *args, **kwargs)

    out = tmp_path / "o"
    if where != "the check of --out":
        datasets.build_synthetic(str(out), users=20)
    previous = signal.signal(signal.SIGTERM, terminated)
    monkeypatch.setattr(os, "rmdir", stopped_first)
    try:
        with pytest.raises(datasets.Terminated):
            if where == "the check of --out":
                datasets.check_out_dir(str(out), False)
            else:
                datasets.build_synthetic(str(out), users=20, overwrite=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sent and sorted(os.listdir(tmp_path)) == ([] if where == "the check of --out" else ["o"])
    assert not [name for name in os.listdir(out) if name.startswith(".")] if out.exists() else True


def test_a_temporary_folder_left_by_a_killed_run_is_named_as_one(tmp_path):
    """kill -9 leaves write_dataset's temporary folder; it was refused as if it were the user's ("not a data set's
    file"), with no word of what it is or that it can go."""
    out = tmp_path / "o"
    assert run_cli("synthetic", "--users", 20, "--out", out).returncode == 0
    (out / f"{datasets.TMP_PREFIX}k1ll3d").mkdir()
    (out / f"{datasets.TMP_PREFIX}k1ll3d" / "train.jsonl").write_text("half a set\n")
    result = run_cli("synthetic", "--users", 20, "--out", out, "--overwrite")
    assert result.returncode == 1 and result.stderr.strip() == (
        f"data.py: error: --out {out}: holds {datasets.TMP_PREFIX}k1ll3d/, the temporary folder of a data.py that was killed "
        "(kill -9, a crash) or is still writing there; delete it once no data.py is running, then run this again")
    assert (out / f"{datasets.TMP_PREFIX}k1ll3d" / "train.jsonl").read_text() == "half a set\n"


def test_a_data_folder_that_is_no_data_set_is_said_to_be_one(tmp_path):
    """--data a file of the set, a missing folder, an empty folder: each said what it is (they were
    "X/train.jsonl: cannot read file (Not a directory / No such file or directory)")."""
    datasets.build_synthetic(str(tmp_path / "set"), users=20)
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "set" / "train.jsonl", "not a folder: a data set is the folder data.py writes (train, valid and "
              "test.jsonl in it), not one of its files"),
             (tmp_path / "none", f"no such folder; python data.py SOURCE --out {tmp_path / 'none'} builds one"),
             (tmp_path / "empty", None)]
    for folder, message in cases:
        with pytest.raises(DataError) as refused:
            data.load_split(str(folder), "train")
        assert str(refused.value) == (f"{folder}: {message}" if message else f"{folder}/train.jsonl: no such file ({folder} "
                                      "holds no .jsonl file); a data set of data.py has train.jsonl, valid.jsonl and test.jsonl")
