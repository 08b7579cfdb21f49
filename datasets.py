"""Building R2Rank's data sets: the command line of `python data.py` (data.py's __main__ hands over here),
the writing of a set so that a failure leaves nothing behind, and the built-in synthetic set. The format of an
instance and its reading are data.py's, the protocol is protocol.py's, the raw files are read by sources.py.

    write_dataset(out_dir, splits, stats)   {train,valid,test}.jsonl and stats.json, all or nothing
    build_synthetic(out_dir, ...)           the synthetic set (sources.synthetic_raw) under the protocol
    main(argv)                              python data.py amazon | movielens | synthetic ...
"""
import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
from dataclasses import asdict, fields
from datetime import date

from data import SPLITS, DataError, UsageError
from protocol import Protocol
from protocol import build_instances as protocol_instances
from sources import POINTWISE_CATEGORY, category_match_ndcg, load_amazon, load_movielens, synthetic_raw

AMAZON_WINDOW = ("2021-10-01", "2023-10-31")
DATASET_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "stats.json")  # all that write_dataset puts in --out
TMP_PREFIX = ".data.py-tmp-"  # write_dataset's temporary directory, beside --out or in it


class Terminated(BaseException):
    """Raised by data.py's SIGTERM handler, so that write_dataset's clean-up runs as it does on Ctrl-C."""


def check_out_dir(out_dir, overwrite, ignore=(), named=None):
    """A DataError (one line, naming out_dir as `named`: its flag) unless out_dir is missing, empty, or holds a data
    set and overwrite is set, and a folder can be made there. A data set is nothing but DATASET_FILES: a directory
    holding anything else ("." or a parent, say) is refused whatever the flags, naming it, and nothing is deleted."""
    named = named or f"--out {out_dir}"
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{named}: exists and is not a directory; choose another --out")
    entries = sorted(set(os.listdir(out_dir)) - set(ignore)) if os.path.lexists(out_dir) else []
    for name in entries:
        path = os.path.join(out_dir, name)
        if name not in DATASET_FILES or os.path.islink(path) or not os.path.isfile(path):
            name += "/" if os.path.isdir(path) and not os.path.islink(path) else ""
            if name.startswith(TMP_PREFIX):
                raise DataError(f"{named}: holds {name}, the temporary folder of a data.py that was killed (kill -9, a "
                                "crash) or is still writing there; delete it once no data.py is running, then run this again")
            raise DataError(f"{named}: holds {name}, which is not a data set's file; --overwrite replaces only "
                            "train/valid/test.jsonl and stats.json, so choose a new or empty --out")
    if entries and not overwrite:
        raise DataError(f"{named}: a data set exists there; pass --overwrite to replace it, or another --out")
    where = os.path.abspath(out_dir)  # a read-only --out is found before the slow part: a folder made there, removed
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise DataError(f"{named}: cannot create it ({where} is not a directory)")
    probe = temporary_name(where)
    try:
        os.mkdir(probe)
    except OSError as error:
        raise DataError(f"{named}: cannot {'write into' if where == os.path.abspath(out_dir) else 'create'} it "
                        f"({error.strerror or type(error).__name__})") from None
    finally:  # also after a Ctrl-C that lands right after the mkdir
        remove_folder(probe)


def remove_folder(path):
    """shutil.rmtree, finished when a Ctrl-C or SIGTERM lands inside it (a Python handler raises between any two
    bytecodes, and the folder would stay): the folder goes, then the stop goes on."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except (KeyboardInterrupt, Terminated):
        shutil.rmtree(path, ignore_errors=True)
        raise


def temporary_name(where):
    """A new folder name in `where`, known before os.mkdir makes it (with a plain mkdir's mode; mkdtemp's is 0700), so
    a `finally` removes the folder even when a Ctrl-C lands right after its creation."""
    return os.path.join(where, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")


def write_dataset(out_dir, splits, stats, overwrite=False, named=None):
    """<split>.jsonl and stats.json into out_dir, all or nothing: written into a temporary folder that becomes a new
    out_dir, or whose files replace an existing set's (check_out_dir), stats.json last; nothing else is touched."""
    check_out_dir(out_dir, overwrite, named=named)
    exists = os.path.isdir(out_dir)
    where = out_dir if exists else os.path.dirname(os.path.abspath(out_dir))
    tmp = temporary_name(where)
    try:
        os.makedirs(where, exist_ok=True)
        os.mkdir(tmp)
        for name, instances in splits.items():
            with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(inst, ensure_ascii=False) + "\n" for inst in instances)
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        if not exists:
            os.rename(tmp, out_dir)
            return
        check_out_dir(out_dir, overwrite, ignore=[os.path.basename(tmp)], named=named)  # again: the build may have taken minutes
        written = sorted(os.listdir(tmp), key=lambda name: name == "stats.json")
        for name in set(DATASET_FILES) - set(written):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    except OSError as e:
        raise DataError(f"{named or f'--out {out_dir}'}: cannot write ({e.strerror or type(e).__name__})") from None
    finally:
        remove_folder(tmp)


def build_synthetic(out_dir, users=200, seed=0, overwrite=False, categories_per_user=2, pointwise=False, named=None, **protocol):
    """Build the synthetic set (pointwise: its pointwise variant, sources.py) into out_dir (check_out_dir) and return
    its stats; `protocol`: Protocol's other fields. stats.json adds "category_match_ndcg@10", the best NDCG@10 a
    ranker can expect on each split (sources.category_match_ndcg; 1 on the pointwise set)."""
    check_out_dir(out_dir, overwrite, named=named)
    protocol = Protocol(seed=seed, **protocol)
    if users < fewest_users(protocol.split):
        raise UsageError(f"--users must be >= {fewest_users(protocol.split)}, the fewest that give every split of "
                         f"--split {protocol.split} a user, got {users}")
    splits, stats = build_instances(synthetic_raw(users, seed, categories_per_user, pointwise, protocol.split), protocol)
    seen = {c["item_id"] for inst in splits["train"] for c in inst["candidates"] + inst["history"]}
    stats["candidates_new_to_training"] = {name: round(sum(c["item_id"] not in seen for inst in split for c in inst["candidates"])
                                                       / max(1, sum(len(inst["candidates"]) for inst in split)), 4)
                                           for name, split in splits.items() if name != "train"}
    stats["category_match_ndcg@10"] = {name: round(category_match_ndcg(split, 10, POINTWISE_CATEGORY if pointwise else None), 4)
                                       for name, split in splits.items() if split}
    write_dataset(out_dir, splits, stats, overwrite, named)
    return stats


def build_instances(raw, protocol):
    """protocol.build_instances, with "no user is left" as a DataError (one line)."""
    try:
        return protocol_instances(raw, protocol)
    except ValueError as error:
        raise DataError(str(error)) from None


def fewest_users(split):
    """The fewest users that give every non-zero share of an "8:1:1"-style --split a user (valid, test round down): 10."""
    parts = [int(part) for part in split.split(":")]
    return max([1] + [-(-sum(parts) // part) for part in parts[1:] if part])


def day_arg(text):
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def add_protocol_args(parser, window, no_window_note):
    for f in fields(Protocol):
        default = dict(zip(("start", "end"), window)).get(f.name, f.default)
        shown = (f"{default}, the paper's" if default else no_window_note) if f.name in ("start", "end") else default
        parser.add_argument(f"--{f.name}", type=type(f.default) if f.default is not None else day_arg,
                            default=default, help=f"{f.metadata['help']} (default: {shown})")
    parser.add_argument("--out", required=True, help="output directory; new or empty (or a data set, with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the data set in --out (nothing else it holds)")


def main(argv=None):
    """python data.py SOURCE ...: the data set into --out; 0, or 1 / 130 / 143 after one line (2: a bad flag)."""
    parser = argparse.ArgumentParser(description="Build R2Rank's instances under the paper's protocol (Sec. 4.1.1).")
    sources = parser.add_subparsers(dest="source", required=True)
    amazon = sources.add_parser("amazon", help="Amazon Reviews 2023, one category")
    amazon.add_argument("--reviews", required=True, help="the <Category>.jsonl or .jsonl.gz review file")
    amazon.add_argument("--meta", required=True, help="the meta_<Category>.jsonl or .jsonl.gz item file")
    add_protocol_args(amazon, AMAZON_WINDOW, "")
    movielens = sources.add_parser("movielens", help="MovieLens-100K, original or RecBole layout")
    movielens.add_argument("--path", required=True, help="folder of u.data, u.item, u.user or ml-100k.inter, .item, .user")
    add_protocol_args(movielens, (None, None), "no window, every interaction is kept")
    synthetic = sources.add_parser("synthetic", help="a small generated set whose labels need the history")
    synthetic.add_argument("--users", type=int, default=200, help="number of users (default: 200)")
    synthetic.add_argument("--categories-per-user", type=int, default=2, help="categories a user likes, 1 to 8 (default: 2)")
    synthetic.add_argument("--pointwise", action="store_true", help="labels that the candidate's text decides (the quickstart's)")
    add_protocol_args(synthetic, (None, None), "no window")
    args = parser.parse_args(argv)
    protocol = Protocol(**{f.name: getattr(args, f.name) for f in fields(Protocol)})
    if (not re.fullmatch(r"\d+:\d+:\d+", protocol.split) or not any(int(part) for part in protocol.split.split(":"))
            or protocol.history < 1 or protocol.candidates < 2):
        parser.error("need --history >= 1, --candidates >= 2 and a --split like 8:1:1")
    if empty := [name for name, share in zip(SPLITS, protocol.split.split(":")) if not int(share)]:
        parser.error(f"--split {protocol.split} leaves {' and '.join(empty)} empty; the RL stage trains on train and "
                     "validates on valid, and eval reads test")
    if args.source == "synthetic" and (protocol.start or protocol.end):
        parser.error("--start / --end: the synthetic set is generated without a time window, so they would be ignored; "
                     "leave them out")
    if protocol.start and protocol.end and protocol.start > protocol.end:
        parser.error(f"--start {protocol.start} is after --end {protocol.end}: the window would hold no interaction")

    def terminated(signum, frame):  # SIGTERM (a job's time limit, `timeout`, kill) stops as Ctrl-C does
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)  # given back below (main is also called in-process)
    try:
        check_out_dir(args.out, args.overwrite)  # before the slow part
        reading = f"{args.reviews} and {args.meta}" if args.source == "amazon" else getattr(args, "path", "the generator")
        with contextlib.suppress(OSError):  # no reader left (`| true`), a full device: the set is built all the same
            print(f"building the {args.source} set from {reading} into {args.out} ...", flush=True)  # an Amazon category: minutes
        if args.source == "synthetic":
            stats = build_synthetic(args.out, args.users, overwrite=args.overwrite, categories_per_user=args.categories_per_user,
                                    pointwise=args.pointwise, **asdict(protocol))
        else:
            raw = load_amazon(args.reviews, args.meta, protocol) if args.source == "amazon" else load_movielens(args.path, protocol)
            splits, stats = build_instances(raw, protocol)
            write_dataset(args.out, splits, stats, args.overwrite)
    except UsageError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:  # write_dataset's temporary files are gone; only its last few renames could be cut
        print(f"data.py: stopped by {'Ctrl-C' if isinstance(stop, KeyboardInterrupt) else 'SIGTERM'}; nothing written to "
              f"{args.out}", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = [(name, stats[name]) for name in ("users", "items", "interactions", "interactions_in_instances")]
    rows += [(f"{name} instances", count) for name, count in stats["instances"].items()]
    rows += [(f"dropped: {reason}", count) for reason, count in stats["dropped"].items()]
    rows += [(f"category-match NDCG@10, {name}", value) for name, value in stats.get("category_match_ndcg@10", {}).items()]
    rows += [(f"candidates new to training, {name}", value) for name, value in stats.get("candidates_new_to_training", {}).items()]
    print(f"wrote {args.out}\n" + "\n".join(f"  {name:<40} {count:>10,}" for name, count in rows))
    return 0
