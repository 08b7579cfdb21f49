"""Datasets for R2Rank under the paper's protocol (Sec. 4.1.1), and the self-check prompt (Fig. 2) that
shows one (user, candidate) pair of an instance to the LLM. The raw sources are read by sources.py and
the sets written by datasets.py, which runs this file's command.

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

Where this departs from the paper, which leaves these points open (the numbers of the one list, at the
top of r2rank.py; 12-14 are implemented in protocol.py):
12. A user who touched the same item twice keeps the first time only, so the positive is never also
    in its own history.
13. Negatives avoid every item the user touched, inside or outside the window; the item pool is
    every titled item that a kept user touched in the window.
14. stats.json's "items" and "interactions" count the data before the history is cut to --history
    ("interactions_in_instances" counts what the model is shown).
15. MovieLens has no time window by default (its 1997-98 dates all fall outside the Amazon one), and
    its placeholder title "unknown" counts as no title.
16. Timestamps are stored (Unix seconds) but left out of the prompt.
17. A synthetic source (not in the paper, see sources.py) gives a small set whose labels only the
    history reveals; --pointwise, one whose labels the candidate's own text reveals (the quickstart's).
18. The self-check prompt of Fig. 2 is reworded (INSTRUCTIONS), with the same three parts in the same
    order and the same two answers, a system line of its own, and the context labelled USER CONTEXT and
    CANDIDATE ITEM; as in Fig. 2 the candidate comes last, so the K prompts of a user share every token
    before it (their KV cache is computed once). --prompt answer-only is Table 5's
    "Without CoT": the decision alone.
"""
import errno
import gzip
import json
import os
import re
import sys
import zlib

from tqdm import tqdm

SPLITS = ("train", "valid", "test")


class UsageError(Exception):
    """A run cannot go on for a reason its user can act on (a flag, a file, a setting): one line naming what to
    change, which the command line prints without a traceback."""


class DataError(UsageError):
    """A data set or data file that cannot be used; the message names the file and, where there is one, the line."""


# ---------------------------------------------------------------- reading


def read_lines(path, encoding="utf-8"):
    """Yield (line_number, text) of a plain or gzip file, streamed, with a tqdm bar over its bytes."""
    try:
        raw = open(path, "rb")
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None
    lineno = 0
    bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=os.path.basename(path),
               disable=None, leave=False)
    with raw, bar:
        try:
            for lineno, line in enumerate(gzip.GzipFile(fileobj=raw) if is_gzip else raw, 1):
                if lineno % 8192 == 0:
                    bar.update(raw.tell() - bar.n)
                try:
                    text = line.decode(encoding)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid {encoding} (byte {e.start + 1})") from None
                yield lineno, text.rstrip("\r\n").removeprefix("\ufeff" if lineno == 1 else "")  # a BOM (Notepad's UTF-8)
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip
            raise DataError(f"{path}:{lineno + 1}: cannot read ({e})") from None


def read_jsonl(path):
    """Yield (line_number, dict) for each non-blank line of a JSON-lines file."""
    for lineno, text in read_lines(path):
        if text.strip():
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def require(record, name, kinds, path, lineno):
    value = record.get(name)
    if value is None:
        raise DataError(f"{path}:{lineno}: missing required field '{name}'")
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"{path}:{lineno}: field '{name}' has the wrong type ({type(value).__name__})")
    return value


def shorten(text, max_chars):
    """text cut to at most max_chars characters, "..." marking the cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars - 3].rstrip() + "..." if max_chars > 3 else text[:max_chars]


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
    of candidates K and distinct user_ids; a DataError names the file and line of a bad record, or says what
    data_dir is when it is no data set (a file, a missing folder, a folder without that split)."""
    path, instances, first_line = os.path.join(data_dir, f"{split}.jsonl"), [], {}
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: " + ("not a folder: a data set is the folder data.py writes (train, valid and test.jsonl "
                                           "in it), not one of its files" if os.path.exists(data_dir) else
                                           f"no such folder; python data.py SOURCE --out {data_dir} builds one"))
    if not os.path.exists(path):
        there = sorted(name for name in os.listdir(data_dir) if name.endswith(".jsonl"))
        raise DataError(f"{path}: no such file ({data_dir} holds {', '.join(there) if there else 'no .jsonl file'}); "
                        "a data set of data.py has train.jsonl, valid.jsonl and test.jsonl")
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
    """Chat messages asking for the self-check trace about candidate k (Fig. 2 of the paper)."""
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

if __name__ == "__main__":  # building a data set: datasets.py (this file stays its command)
    import datasets

    try:
        sys.exit(datasets.main())
    except OSError as error:  # standard output: `| head` read what it wanted, or `> /dev/full`
        if error.errno not in (errno.EPIPE, errno.ENOSPC):  # (writes to --out are write_dataset's one-line errors)
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if error.errno == errno.ENOSPC:  # the summary, printed after the set was written, found the device full
            print(f"data.py: the data set is written; its summary could not be printed ({error.strerror})", file=sys.stderr)
        sys.exit(0)
