"""Datasets for R2Rank under the paper's protocol (Sec. 4.1.1), and the self-check prompt (Fig. 2) that
shows one (user, candidate) pair of an instance to the LLM. The raw sources are in sources.py.

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
(the synthetic set adds "category_match_ndcg@10", the best NDCG@10 a ranker can expect on each split,
and "candidates_new_to_training", the share of valid and test candidates no training user touched).

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
6. A synthetic source (not in the paper, see sources.py) gives a small set whose labels only the
   history reveals; --pointwise, one whose labels the candidate's own text reveals (the quickstart's).
7. The self-check prompt of Fig. 2 is reworded (INSTRUCTIONS), with the same three parts in the same
   order and the same two answers, a system line of its own, and the context labelled USER CONTEXT and
   CANDIDATE ITEM; as in Fig. 2 the candidate comes last, so the K prompts of a user share every token
   before it (their KV cache is computed once). --prompt answer-only is Table 5's
   "Without CoT": the decision alone.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, fields
from datetime import date

from protocol import SPLITS, DataError, Protocol, UsageError, build_instances, split_sizes  # noqa: F401 (data.X for callers)
from sources import POINTWISE_CATEGORY, category_match_ndcg, load_amazon, load_movielens, read_jsonl, require, shorten, synthetic_raw

AMAZON_WINDOW = ("2021-10-01", "2023-10-31")


# ---------------------------------------------------------------- writing and loading


DATASET_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "stats.json")  # all that write_dataset puts in --out
TMP_PREFIX = ".data.py-tmp-"  # write_dataset's temporary directory, beside --out or in it


def foreign_entry(out_dir, ignore=()):
    """The first entry of directory out_dir that is not a data set's file (a regular file named in
    DATASET_FILES), as "name" or "name/" for a folder, or None: what --overwrite must not delete."""
    for name in sorted(set(os.listdir(out_dir)) - set(ignore)):
        path = os.path.join(out_dir, name)
        if name not in DATASET_FILES or os.path.islink(path) or not os.path.isfile(path):
            return name + ("/" if os.path.isdir(path) and not os.path.islink(path) else "")
    return None


def check_out_dir(out_dir, overwrite, ignore=()):
    """A DataError (one line) unless out_dir is missing, empty, or holds a data set and overwrite is set.
    --overwrite replaces a data set, recognised by its files: nothing but train/valid/test.jsonl and
    stats.json (DATASET_FILES). A directory holding anything else (a file or folder this module did not
    write: "." or a parent directory, say) is refused whatever the flags, naming it, and nothing is deleted."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir}: exists and is not a directory; choose another --out")
    if (foreign := foreign_entry(out_dir, ignore)) is not None:
        raise DataError(f"--out {out_dir}: holds {foreign}, which is not a data set's file; --overwrite replaces only "
                        "train/valid/test.jsonl and stats.json, so choose a new or empty --out")
    if set(os.listdir(out_dir)) - set(ignore) and not overwrite:
        raise DataError(f"--out {out_dir}: a data set exists there; pass --overwrite to replace it, or another --out")


def write_dataset(out_dir, splits, stats, overwrite=False):
    """Write <split>.jsonl and stats.json into a temporary directory, then move them to out_dir, so a
    failure leaves nothing behind: a new out_dir is the temporary one renamed; an existing one (empty,
    or a data set and overwrite, check_out_dir) gets each file renamed into it, the old set's other files
    removed, stats.json last. Nothing else in out_dir is ever touched."""
    check_out_dir(out_dir, overwrite)
    exists, tmp = os.path.isdir(out_dir), None
    try:
        where = out_dir if exists else os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(where, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=where)
        for name, instances in splits.items():
            with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(inst, ensure_ascii=False) + "\n" for inst in instances)
        with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1)
        if not exists:
            os.rename(tmp, out_dir)
            return
        check_out_dir(out_dir, overwrite, ignore=[os.path.basename(tmp)])  # again: the build may have taken minutes
        written = sorted(os.listdir(tmp), key=lambda name: name == "stats.json")
        for name in set(DATASET_FILES) - set(written):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, name))
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    except OSError as e:
        raise DataError(f"--out {out_dir}: cannot write ({e.strerror})") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def build_synthetic(out_dir, users=200, seed=0, overwrite=False, categories_per_user=2, pointwise=False, **protocol):
    """Build the synthetic set (pointwise: its pointwise variant, sources.py) into out_dir (missing, empty,
    or a data set and overwrite: check_out_dir) and return its stats; `protocol` takes Protocol's other fields (history, candidates, split).
    stats.json adds "category_match_ndcg@10", the best NDCG@10 a ranker can expect on each split
    (sources.category_match_ndcg; 1 on the pointwise set)."""
    check_out_dir(out_dir, overwrite)
    protocol = Protocol(seed=seed, **protocol)
    if users < fewest_users(protocol.split):
        raise UsageError(f"--users must be >= {fewest_users(protocol.split)}, the fewest that give every split of "
                         f"--split {protocol.split} a user, got {users}")
    splits, stats = build_instances(synthetic_raw(users, seed, categories_per_user, pointwise, protocol.split), protocol)
    best = POINTWISE_CATEGORY if pointwise else None
    seen = {c["item_id"] for inst in splits["train"] for c in inst["candidates"] + inst["history"]}
    stats["candidates_new_to_training"] = {name: round(sum(c["item_id"] not in seen for inst in split for c in inst["candidates"])
                                                       / max(1, sum(len(inst["candidates"]) for inst in split)), 4)
                                           for name, split in splits.items() if name != "train"}
    stats["category_match_ndcg@10"] = {name: round(category_match_ndcg(split, 10, best), 4)
                                       for name, split in splits.items() if split}
    write_dataset(out_dir, splits, stats, overwrite)
    return stats


def fewest_users(split):
    """The fewest users that give every split with a non-zero share of a "8:1:1"-style ratio at least one
    (valid and test round down, train takes the rest): 10 for 8:1:1."""
    parts = [int(part) for part in split.split(":")]
    return max([1] + [-(-sum(parts) // part) for part in parts[1:] if part])


def check_instance(inst, path, lineno):
    """The instance format of the module docstring, as every stage reads it; a DataError names file and
    line. labels are 0/1 integers, one per candidate, with at least one 1 and one 0 (the protocol has
    exactly one 1: NDCG also works with several; with no 0, or no 1, every ranking gets the same reward and
    nothing is learnt); the candidates' item_ids are distinct (an item listed twice could be labelled
    both ways); every item has a non-empty title (the prompt's line for it)."""
    for name, kind in (("user_id", str), ("history", list), ("candidates", list), ("labels", list)):
        require(inst, name, kind, path, lineno)
    if not isinstance(inst.get("profile", ""), (str, type(None))):
        raise DataError(f"{path}:{lineno}: field 'profile' has the wrong type ({type(inst['profile']).__name__})")
    for where in ("history", "candidates"):
        for i, item in enumerate(inst[where]):
            if not isinstance(item, dict) or not isinstance(item.get("title"), str) or not item["title"].strip():
                raise DataError(f"{path}:{lineno}: {where}[{i}] has no title (every item needs a non-empty 'title')")
            if not isinstance(item.get("text", ""), (str, type(None))) or not isinstance(item.get("item_id"), (str, int)):
                raise DataError(f"{path}:{lineno}: {where}[{i}] needs an 'item_id' (string) and a string 'text' if any")
    labels = inst["labels"]
    if len(labels) != len(inst["candidates"]) or len(labels) < 2:
        raise DataError(f"{path}:{lineno}: {len(labels)} labels for {len(inst['candidates'])} candidates "
                        "(one label per candidate, at least 2 candidates)")
    if any(type(label) is not int or label not in (0, 1) for label in labels) or 1 not in labels:
        raise DataError(f"{path}:{lineno}: labels must be 0 or 1 (integers) with at least one 1, got {labels}")
    if 0 not in labels:
        raise DataError(f"{path}:{lineno}: every candidate is labelled 1: an instance needs a negative (a 0), or every "
                        "ranking gets the same reward")
    first = {}
    for k, item in enumerate(inst["candidates"]):
        if first.setdefault(item["item_id"], k) != k:
            raise DataError(f"{path}:{lineno}: candidates[{k}] repeats item_id {item['item_id']!r} of "
                            f"candidates[{first[item['item_id']]}] (each candidate once)")


def load_split(data_dir, split, allow_empty=False):
    """Instances of <data_dir>/<split>.jsonl, each checked by check_instance, all with the same number
    of candidates K and distinct user_ids; a DataError names the file and line of a bad record."""
    path, instances, first_line = os.path.join(data_dir, f"{split}.jsonl"), [], {}
    for lineno, inst in read_jsonl(path):
        check_instance(inst, path, lineno)
        if instances and len(inst["candidates"]) != len(instances[0]["candidates"]):
            raise DataError(f"{path}:{lineno}: {len(inst['candidates'])} candidates, but the first instance has "
                            f"{len(instances[0]['candidates'])} (K must be the same across a split)")
        if inst["user_id"] in first_line:
            raise DataError(f"{path}:{lineno}: user_id {inst['user_id']!r} again (first on line {first_line[inst['user_id']]})")
        first_line[inst["user_id"]] = lineno
        instances.append(inst)
    if not instances and not allow_empty:
        raise DataError(f"{path}: no instances")
    return instances


# ---------------------------------------------------------------- command line


def prepare_data(data_dir, out, seed=0):
    """data_dir when given; otherwise the built-in synthetic set in <out>/data, built once. A <out>/data
    without train.jsonl is built into only when it holds nothing but a data set's files (check_out_dir):
    a folder of the user's there is refused in one line, never replaced."""
    if data_dir:
        return data_dir
    path = os.path.join(out, "data")
    if not os.path.exists(os.path.join(path, "train.jsonl")):
        if os.path.isdir(path) and (foreign := foreign_entry(path)) is not None:
            raise DataError(f"--out {out}: {path} holds {foreign}, not the synthetic set that is built there when "
                            "--data is not given; pass --data, or choose another --out")
        build_synthetic(path, seed=seed, overwrite=True)
    return path


# ---------------------------------------------------------------- the prompt (Fig. 2)


# The self-check prompt of Sec. 3.4 / Fig. 2: one chat per (user, candidate).
#     self_check_messages(instance, k)  -> [system, user] chat messages about candidate k
#     self_check_parts(instance, k)     -> (system, prefix shared by all K candidates, candidate text)
#     parse_answer(text)                -> 1 Recommend / 0 Not Recommend / None
#     encode_user(tokenizer, instance)  -> token ids: (prefix shared by the K prompts, [suffix_k])
# Length budget: every item is one line "title - text" cut to max_item_chars characters (default 200,
# "..." marks a cut), the profile is cut likewise, and the history keeps its most recent max_history
# items (default 20), oldest first. At the defaults a prompt stays under ~5,000 characters.
# Timestamps are left out, to keep prompts short.

RECOMMEND = "Recommend"
NOT_RECOMMEND = "Not Recommend"

SYSTEM_PROMPT = "You are a recommendation assistant. You judge one candidate item at a time for one user."
INSTRUCTIONS = (
    "Decide whether to recommend the candidate item below to this user. "
    "Answer in three parts, in this order.\n"
    "# Initial reasoning: weigh what the user context says about this user's tastes against what the "
    "candidate item offers.\n"
    "# Self-check: re-read your initial reasoning and look for errors, claims the context does not "
    "support, doubts, and signals you leaned on too heavily.\n"
    "# Final conclusion: state the deciding reasons in a few sentences.\n"
    f"End with exactly one of <answer>{RECOMMEND}</answer> or <answer>{NOT_RECOMMEND}</answer>.")
# Table 5's "Without CoT": the same pipeline, the prompt asking for the decision alone (PPO then acts on
# the decision's tokens; give it a few, e.g. --max-new-tokens 8).
ANSWER_ONLY_INSTRUCTIONS = (
    "Decide whether to recommend the candidate item below to this user. "
    f"Reply with exactly one of <answer>{RECOMMEND}</answer> or <answer>{NOT_RECOMMEND}</answer> and nothing else.")
PROMPTS = {"self-check": INSTRUCTIONS, "answer-only": ANSWER_ONLY_INSTRUCTIONS}  # --prompt
ANSWER_PATTERN = re.compile(r"<answer>\s*(not\s+recommend|recommend)\s*</answer>", re.IGNORECASE)


def candidate_text(candidate, max_item_chars=200):
    """One item as one line, "title - text", cut to max_item_chars."""
    line = f"{candidate['title']} - {candidate['text']}" if candidate.get("text") else candidate["title"]
    return shorten(" ".join(line.split()), max_item_chars)


def user_context_text(instance, max_history=20, max_item_chars=200):
    """The profile and the numbered history, oldest first, cut to its most recent max_history items."""
    history = instance["history"][-max_history:] if max_history > 0 else []
    lines = [f"Profile: {shorten(instance.get('profile') or 'not available', max_item_chars)}",
             "History, oldest first:" if history else "History: none"]
    lines += [f"{number}. {candidate_text(item, max_item_chars)}" for number, item in enumerate(history, 1)]
    return "\n".join(lines)


def self_check_parts(instance, k, max_history=20, max_item_chars=200, instructions=INSTRUCTIONS):
    """(system text, user-message prefix shared by all K candidates, candidate k's text). The prefix
    ends with a newline, so tokenizers split there and its KV cache can serve all K candidates.
    instructions: the task text at the top (a compared system's template, e.g. baselines/reczero.py)."""
    context = user_context_text(instance, max_history, max_item_chars)
    prefix = f"{instructions}\n\nUSER CONTEXT\n{context}\n\nCANDIDATE ITEM\n"
    return SYSTEM_PROMPT, prefix, candidate_text(instance["candidates"][k], max_item_chars)


def self_check_messages(instance, k, max_history=20, max_item_chars=200, instructions=INSTRUCTIONS):
    """Chat messages asking for the self-check reasoning about candidate k (Fig. 2 of the paper)."""
    system, prefix, candidate = self_check_parts(instance, k, max_history, max_item_chars, instructions)
    return [{"role": "system", "content": system}, {"role": "user", "content": prefix + candidate}]


def parse_answer(text):
    """1 if the last <answer> tag says Recommend, 0 if it says Not Recommend, None if there is none."""
    answers = ANSWER_PATTERN.findall(text)
    return int(not answers[-1].lower().startswith("not")) if answers else None



def encode_user(tokenizer, instance, max_history=20, max_item_chars=200, response_prefix="", instructions=INSTRUCTIONS):
    """Token ids of the prompt prefix shared by the user's K candidates, and of each candidate's suffix.

    Prompt k is the chat template of self_check_messages(instance, k) with the assistant turn opened,
    followed by response_prefix (text every reply is forced to start with; empty by default). It is
    always prefix + suffix_k (tokenized separately, also when nothing is shared), so the shared-prefix
    rollout and the update see exactly the same tokens.
    """
    texts = [tokenizer.apply_chat_template(self_check_messages(instance, k, max_history, max_item_chars, instructions),
                                           tokenize=False, add_generation_prompt=True) + response_prefix
             for k in range(len(instance["candidates"]))]
    _, shared, _ = self_check_parts(instance, 0, max_history, max_item_chars, instructions)
    cut = texts[0].index(shared) + len(shared)  # the prefix ends after the shared part of the user message
    assert all(text[:cut] == texts[0][:cut] for text in texts)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode(texts[0][:cut]), [encode(text[cut:]) for text in texts]


# ---------------------------------------------------------------- the command line


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
    parser.add_argument("--out", required=True, help="output directory; new or empty (or a data set, with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the data set in --out: its "
                        "train/valid/test.jsonl and stats.json; a --out holding anything else is refused")


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
                           ".item, .user, plain or gzipped (get them: pip download --no-deps recbole, unzip dataset_example/ml-100k)")
    add_protocol_args(movielens, (None, None), "no window, every interaction is kept")
    synthetic = sources.add_parser("synthetic", help="a small generated set whose labels need the history")
    synthetic.add_argument("--users", type=int, default=200, help="number of users (default: 200)")
    synthetic.add_argument("--categories-per-user", type=int, default=2, help="categories each user's history and "
                           "positive come from, 1 to 8; fewer make the task easier (default: 2)")
    synthetic.add_argument("--pointwise", action="store_true", help=f"every positive a {POINTWISE_CATEGORY} item and no "
                           "negative: the candidate's text decides its label, the history is no use (the quickstart's set)")
    add_protocol_args(synthetic, (None, None), "no window")
    args = parser.parse_args(argv)
    protocol = Protocol(**{f.name: getattr(args, f.name) for f in fields(Protocol)})
    if (not re.fullmatch(r"\d+:\d+:\d+", protocol.split) or not any(int(part) for part in protocol.split.split(":"))
            or protocol.history < 1 or protocol.candidates < 2):
        parser.error("need --history >= 1, --candidates >= 2 and a --split like 8:1:1")
    try:
        check_out_dir(args.out, args.overwrite)  # before the slow part
        if args.source == "synthetic":
            stats = build_synthetic(args.out, args.users, overwrite=args.overwrite,
                                    categories_per_user=args.categories_per_user, pointwise=args.pointwise,
                                    **asdict(protocol))
        else:
            raw = (load_amazon(args.reviews, args.meta, protocol) if args.source == "amazon" else
                   load_movielens(args.path, protocol))
            splits, stats = build_instances(raw, protocol)
            write_dataset(args.out, splits, stats, args.overwrite)
    except UsageError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # write_dataset's temporary files are gone; only its last few renames could be cut
        print(f"data.py: stopped by Ctrl-C; nothing written to {args.out}", file=sys.stderr)
        return 130
    rows = [(name, stats[name]) for name in ("users", "items", "interactions", "interactions_in_instances")]
    rows += [(f"{name} instances", count) for name, count in stats["instances"].items()]
    rows += [(f"dropped: {reason}", count) for reason, count in stats["dropped"].items()]
    rows += [(f"category-match NDCG@10, {name}", value) for name, value in stats.get("category_match_ndcg@10", {}).items()]
    rows += [(f"candidates new to training, {name}", value) for name, value in stats.get("candidates_new_to_training", {}).items()]
    print(f"wrote {args.out}\n" + "\n".join(f"  {name:<40} {count:>10,}" for name, count in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
