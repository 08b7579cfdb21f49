"""Evaluation of R2Rank (Sec. 4.1.1 and 4.2 of the R2Rank paper): Table 2, R2Rank against the baselines.

    python r2rank.py --stage eval --model runs/r2rank/checkpoint-100 --data data/ml100k
    python r2rank.py --stage eval --model tiny --methods random,popularity,pointwise --analyses position

run_eval(args): every method on the same users -> Table 2, <out>/eval-<split>.json; then analyses.py's --analyses.

Where this departs from the paper, which leaves these points open unless said (the numbers of the one list,
at the top of r2rank.py):
24. Baselines: random, popularity, SASRec (trained by baselines/sasrec.py), zero-shot prompts of the
    same LLM, and two RL systems trained by their own commands (baselines/reczero.py, baselines/r2ec.py);
    not the paper's other trained recommenders.
25. R2Rank is scored from greedy traces, so a run is deterministic. A --model that is no checkpoint of
    --stage rl (no trained head) skips R2Rank when it comes from the default --methods; a trained method
    named in --methods that --model is no checkpoint of (its r2rank.json names the stage that wrote it:
    R2Rank on a bare model, reczero on an R2ec checkpoint, ...) is refused.
26. Markers: in each column the best method is bold and marked by its test against the runner-up in
    that column; the JSON holds the test of every pair of methods on NDCG@1, @5 and @10. A method most of
    whose answers were unparsable (listwise: scored in the candidates' input order) is never bold, and
    its row says how many were. A terminal that cannot show the paper's markers gets +, ++, +++.
27. Wilcoxon: zero differences are dropped (see stats.py); intervals from 1000 bootstrap resamples.
28. A trained method (r2rank, reczero, r2ec) runs with the trace settings its checkpoint was trained
    with (max_new_tokens, max_history, max_item_chars, prompt), except those given on the command line,
    each noted; the other methods use the command line's.
"""
import contextlib
import itertools
import json
import os
import shlex
import sys
import time
from argparse import Namespace

import numpy as np
import torch
import torch.distributed as dist

import analyses
import data
import r2rank
import runs
from baselines import r2ec, reczero, sasrec, untrained
from data import UsageError
from head import ScoreHead
from metrics import ndcg_from_scores, positive_ranks
from stats import bootstrap_ci, significance_marker, wilcoxon_signed_rank

KS = (1, 5, 10)
RESAMPLES = 1000  # bootstrap resamples of every 95% interval
METHODS = ("r2rank", "random", "popularity", "sasrec", "pointwise", "listwise", "reczero", "r2ec")
PROMPTED = ("r2rank", "pointwise", "listwise", "reczero", "r2ec")  # the methods that read the prompt (and need the LLM)
ANALYSES = ("position", "history-order", "cold-start", "history-length")
GROUPS = {"Baselines": {"random": "Random", "popularity": "Popularity", "sasrec": "SASRec"},  # Table 2's rows
          "Prompted LLM": {"pointwise": "Pointwise, zero-shot", "listwise": "Listwise, zero-shot"},
          "Compared RL systems": {"reczero": "RecZero-style, pointwise GRPO", "r2ec": "R2ec-style, dual head"},
          "Ours": {"r2rank": "R2Rank"}}


def summarize(scores, instances, seed):
    """NDCG@1/5/10 means, their 95% bootstrap intervals and the per-user values of one method."""
    labels = r2rank.labels_of(instances)  # [U, K]
    per_user = {f"ndcg@{k}": ndcg_from_scores(scores, labels, k).tolist() for k in KS}
    ranks = positive_ranks(scores, labels).tolist()
    return {**{metric: float(np.mean(values)) for metric, values in per_user.items()},
            "ci95": {metric: list(bootstrap_ci(values, RESAMPLES, seed)) for metric, values in per_user.items()},
            "per_user": [{"user_id": inst["user_id"], **{metric: values[i] for metric, values in per_user.items()},
                          "positive_rank": ranks[i]} for i, inst in enumerate(instances)]}


def pairwise_tests(results):
    """Wilcoxon test of every pair of methods on every NDCG@k, paired by user."""
    pairs = {}
    for a, b in itertools.combinations(results, 2):
        for metric in (f"ndcg@{k}" for k in KS):
            x, y = ([user[metric] for user in results[name]["per_user"]] for name in (a, b))
            statistic, p_value = wilcoxon_signed_rank(x, y)
            pairs.setdefault(f"{a} vs {b}", {})[metric] = {"statistic": statistic, "p_value": p_value,
                                                           "nonzero": int(np.count_nonzero(np.round(np.subtract(x, y), 12)))}
    return {"test": "two-sided paired Wilcoxon signed-rank on per-user values, zero differences dropped",
            "markers": "† p < 0.05, ‡ p < 0.01, § p < 0.001", "pairs": pairs}


def pair_test(tests, a, b, metric):
    return (tests["pairs"].get(f"{a} vs {b}") or tests["pairs"][f"{b} vs {a}"])[metric]


# ------------------------------------------- what --model is a checkpoint of: its r2rank.json names the stage

TRAINED = {"rl": "r2rank", "reczero": "reczero", "r2ec": "r2ec"}  # that stage -> the method
TRAINED_BY = {"r2rank": "a checkpoint of --stage rl", "reczero": "a checkpoint of baselines/reczero.py",
              "r2ec": "a checkpoint of baselines/r2ec.py",
              None: "not the checkpoint of a trained method (its r2rank.json names no stage rl, reczero or r2ec)"}
TRACE_SETTINGS = ("max_new_tokens", "max_history", "max_item_chars", "prompt")


def checkpoint_record(model):
    """The flags a checkpoint of this project was trained with (its r2rank.json "args"); {} for anything else."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(os.path.join(model, "r2rank.json")) as f:
        return dict(json.load(f)["args"])
    return {}


def servable(methods, args):
    """(methods less the trained ones --model is no checkpoint of, its kind). One named in --methods is refused (reczero
    on an R2ec checkpoint would be reported as RecZero's); r2rank from the default --methods is skipped (noted later)."""
    kind = TRAINED.get(checkpoint_record(args.model).get("stage"))  # None: a hub id, tiny, a bare or SFT model
    for name in [name for name in methods if name in TRAINED_BY and name != kind]:
        if "methods" in args.given:
            fix = f"evaluate it with --methods {kind}" if kind else f"leave {name} out of --methods"
            raise UsageError(f"--methods {name} needs {TRAINED_BY[name]}; --model {args.model} is {TRAINED_BY[kind]}: {fix}")
        methods.remove(name)
    return methods, kind


def as_flag(setting, value):
    return f"--{setting.replace('_', '-')} " + (shlex.quote(value) if isinstance(value, str) else str(value))


def trained_args(args, kind, others):
    """args for the trained method `kind`: the trace settings of its r2rank.json but those given on the command line,
    each difference noted. others: whether other methods read the prompt (and keep args')."""
    record = checkpoint_record(args.model)
    trained = {setting: record[setting] for setting in TRACE_SETTINGS if setting in record}
    for setting, value in trained.items():
        if setting in args.given and value != getattr(args, setting):
            print(f"note: {kind} was trained with {as_flag(setting, value)}; this evaluation uses "
                  f"{as_flag(setting, getattr(args, setting)).split(' ', 1)[1]}, as given")
    taken = {setting: value for setting, value in trained.items() if setting not in args.given and value != getattr(args, setting)}
    if taken:
        print(f"note: {kind} runs with the trace settings it was trained with (r2rank.json): "
              + ", ".join(as_flag(setting, value) for setting, value in taken.items())
              + ("; the other methods with " + ", ".join(as_flag(setting, getattr(args, setting)) for setting in taken)
                 if others else ""))
    return Namespace(**{**vars(args), **taken})


# ------------------------------------------------------------------------------------------ rankers


def make_rankers(args, own, model, tokenizer, dtype, head=None, counts=None, sasrec_model=None, r2ec_model=None):
    """name -> rank(instances, desc) -> (scores [U, K] fp32 on the CPU, info dict), candidates scored in the order
    given (the analyses reorder them). own: the args of the trained method (trained_args); the others read args."""
    self_check = lambda inst: data.encode_user(tokenizer, inst, args.max_history, args.max_item_chars)  # Fig. 2's prompt
    rankers = {
        "r2rank": lambda instances, desc: (r2rank.score_users(model, tokenizer, head, instances, own, dtype), {}),
        "random": lambda instances, desc: (untrained.random_scores(len(instances), len(instances[0]["candidates"]), args.seed), {}),
        "popularity": lambda instances, desc: (untrained.popularity_scores(instances, counts), {}),
        "sasrec": lambda instances, desc: (sasrec.candidate_scores(sasrec_model[0], instances, sasrec_model[1]), {}),
        "pointwise": lambda instances, desc: (untrained.rank_pointwise(model, tokenizer, instances, self_check, desc), {}),
        "listwise": lambda instances, desc: untrained.rank_listwise(model, tokenizer, instances, args.max_history,
                                                                    args.max_item_chars, args.max_new_tokens, desc),
        "reczero": lambda instances, desc: reczero.rank(model, tokenizer, instances, own.max_history, own.max_item_chars,
                                                        own.max_new_tokens, desc),
        "r2ec": lambda instances, desc: r2ec.rank(model, tokenizer, *r2ec_model, instances, own.max_history, own.max_item_chars,
                                                  own.max_new_tokens, desc),
    }
    return {name: sharded(rank, model, dtype) if name in PROMPTED else rank for name, rank in rankers.items()}


def sharded(rank_users, model, dtype):
    """A prompted ranker, under autocast at dtype on the model's device. Under torchrun each process scores
    users[rank::world]; every process gets all users' scores, in their order, and one info (merged)."""
    def rank_all(instances, desc):
        mine, K = instances[runs.rank()::runs.world()], len(instances[0]["candidates"])
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
            scores, info = rank_users(mine, desc) if mine else (torch.zeros(0, K), {})
        if runs.world() == 1:
            return scores, info
        parts = [None] * runs.world()
        dist.all_gather_object(parts, (scores.tolist(), len(mine), info))
        rows = [parts[i % len(parts)][0][i // len(parts)] for i in range(len(instances))]  # process r had users[r::world]
        return torch.tensor(rows, dtype=torch.float32), merged([(n, info) for _, n, info in parts if n])
    return rank_all


def merged(infos):
    """[(users, info)] of the processes -> one info: counts summed, shares weighted by users, the rest rank 0's."""
    users = sum(n for n, _ in infos)
    return {key: merged([(n, info[key]) for n, info in infos]) if isinstance(value, dict)
            else sum(info[key] for _, info in infos) if isinstance(value, int)
            else sum(n * info[key] for n, info in infos) / users if isinstance(value, float) else value
            for key, value in infos[0][1].items()}


# ------------------------------------------------------------------------------------------- report


def unparsable(result):
    """Users whose answer named no candidate (listwise scores them in the input order); 0 for methods that parse none."""
    return (result.get("parse") or {}).get("unparsable", 0)


def rankable(result):
    """False when most of a method's answers were unparsable: its scores are then the input order's."""
    return 2 * unparsable(result) <= len(result["per_user"])


def markdown_table(results, tests, dataset, model_name, rows=None):
    """Table 2, NDCG@1/5/10: rows [(group title, key of results, row title)], by default one per method of GROUPS
    (tools/report.py passes several trained rows). Each column's best is bold and marked by its test against the
    runner-up. A row says how many answers were unparsable; when most, it is never bold (rankable)."""
    rows = rows or [(group if group == "Baselines" else f"{group}: {model_name}", name, title)
                    for group, titles in GROUPS.items() for name, title in titles.items() if name in results]
    cells = {name: {f"ndcg@{k}": f"{result[f'ndcg@{k}']:.3f}" for k in KS} for name, result in results.items()}
    for metric in (f"ndcg@{k}" for k in KS):
        ranked = sorted((name for name in results if rankable(results[name])), key=lambda name: results[name][metric], reverse=True)
        if len(ranked) > 1 and results[ranked[0]][metric] > results[ranked[1]][metric]:
            marker = significance_marker(pair_test(tests, ranked[0], ranked[1], metric)["p_value"])
            cells[ranked[0]][metric] = f"**{cells[ranked[0]][metric]}**{marker}"
    lines = [f"| Method | {dataset} @1 | @5 | @10 |", "|---|---:|---:|---:|"]
    for index, (group, name, title) in enumerate(rows):
        if index == 0 or rows[index - 1][0] != group:
            lines.append(f"| *{group}* | | | |")
        if failed := unparsable(results[name]):
            title += f" ({failed} of {len(results[name]['per_user'])} answers unparsable" + ("; not marked best)" if not rankable(results[name]) else ")")
        lines.append(f"| {title} | " + " | ".join(cells[name].values()) + " |")
    return "\n".join(lines)


def dataset_name(data_dir):
    """The data set's name in the table's header: its folder's name, or for a folder named "data" (<out>/data, vg/data)
    "synthetic" when its stats.json says it was built from the synthetic source, else the parent folder's name."""
    path = os.path.abspath(data_dir)
    if os.path.basename(path) != "data":
        return os.path.basename(path)
    with contextlib.suppress(OSError, ValueError, AttributeError), open(os.path.join(path, "stats.json")) as f:
        if json.load(f).get("inputs") == ["synthetic"]:
            return "synthetic"
    return os.path.basename(os.path.dirname(path)) or "data"


def show(text):
    """print, with the paper's markers as +, ++, +++ where stdout cannot encode them (an ASCII locale)."""
    encoding = sys.stdout.encoding or "ascii"
    if "†‡§".encode(encoding, "replace").decode(encoding) != "†‡§":
        text = text.translate(str.maketrans({"†": "+", "‡": "++", "§": "+++"}))
    print(text.encode(encoding, "replace").decode(encoding))


def print_report(results, tests, found, dataset, model_name):
    """Table 2, each method's interval and parse counts, r2rank's test against the best other, the analyses."""
    show("\n" + markdown_table(results, tests, dataset, model_name) + "\n")
    show(f"{tests['markers']}; bold: best in the column, tested against the runner-up ({tests['test']}).")
    for name, result in results.items():
        low, high = result["ci95"]["ndcg@10"]
        extra = "".join(f", {key} {value}" for key, value in result.get("parse", {}).items())
        show(f"{name}: NDCG@10 {result['ndcg@10']:.3f}, 95% CI [{low:.3f}, {high:.3f}], {result['seconds']:.1f} s{extra}")
        if failed := unparsable(result):
            show(f"{name}: {failed} of {len(result['per_user'])} answers unparsable: those users' scores are the candidates' input "
                 "order (a default, not a ranking)" + ("; so it is not marked best" if not rankable(result) else ""))
    others = [name for name in results if name != "r2rank" and rankable(results[name])]
    if "r2rank" in results and others:
        best = max(others, key=lambda name: results[name]["ndcg@10"])
        test = pair_test(tests, "r2rank", best, "ndcg@10")
        show(f"r2rank vs the best other method ({best}) on NDCG@10: T = {test['statistic']:g}, p = {test['p_value']:.3g}")
    for line in analyses.analysis_lines(found):
        show(line)


# ---------------------------------------------------------------------------------------- the stage

def chosen(text, allowed, flag):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in names if name not in allowed]:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def run_eval(args):
    """--stage eval: every method of --methods on the same users of --split, then --analyses; returns the path of
    eval-<split>.json. Checks, loads, ranks, tests, analyses; prints the table, then writes the JSON (rank 0), so a
    stop before the end (r2rank.run_stage's line) writes nothing."""
    methods, wanted = chosen(args.methods, METHODS, "--methods"), chosen(args.analyses, ANALYSES, "--analyses")
    methods, kind = servable(methods, args)  # before anything is written
    if not methods:
        raise UsageError("--methods: nothing left to evaluate")
    if kind in methods and (problem := runs.checkpoint_problem(args.model)):
        raise UsageError(f"--model {args.model}: {problem}, so the checkpoint is damaged; pass another one")
    if unread := [name for name in ("position", "history-order") if name in wanted and not set(methods) & set(PROMPTED)]:
        raise UsageError(f"--analyses {unread[0]} reruns the methods that read the prompt ({', '.join(PROMPTED)}), and "
                         f"--methods {','.join(methods)} has none of them: add one, or leave {unread[0]} out")
    if "sasrec" in methods and not args.sasrec:
        raise UsageError("--methods sasrec needs --sasrec FILE (python baselines/sasrec.py --data DIR --out OUT writes OUT/sasrec.pt)")
    if runs.rank() == 0:
        runs.claim(args.out)  # one run per --out at a time
    path = os.path.join(args.out, f"eval-{args.split}.json")
    if os.path.exists(path) and not args.overwrite:
        raise UsageError(f"{path}: an earlier evaluation is there; pass --overwrite to replace it, or another --out")
    data_dir = runs.prepare_data(args)
    instances = data.load_split(data_dir, args.split)[:args.eval_limit or None]  # checked: K the same, a positive each
    K = len(instances[0]["candidates"])
    own = trained_args(args, kind, any(m in PROMPTED and m != kind for m in methods)) if kind in methods else args
    sasrec_model = sasrec.load(args.sasrec, instances, f"{data_dir}/{args.split}.jsonl") if "sasrec" in methods else None

    device = runs.pick_device(args.device)
    dtype = runs.pick_dtype(args.dtype, device)
    model = tokenizer = head = r2ec_model = None
    if any(name in PROMPTED for name in methods):
        model, tokenizer = r2rank.load_model(args.model, device, torch.float32, args.seed)  # autocast computes at dtype
        model.eval()
    if "methods" not in args.given and kind != "r2rank":  # skipped by servable; said after --model's own errors
        print(f"note: {args.model} is no checkpoint of --stage rl, so it has no trained scoring head: r2rank is skipped")
    if "r2rank" in methods:  # the head's width is the checkpoint's
        head = ScoreHead(model.config.hidden_size, checkpoint_record(args.model)["head_width"]).to(device).eval()
        runs.load_head(head, args.model)
    if "r2ec" in methods:
        r2ec_model = r2ec.load(args.model, model.config.hidden_size, device)
    frequency = analyses.read_frequency(data_dir) if "cold-start" in wanted else None  # the paper's tiers: training positives
    counts = untrained.interaction_counts(data.load_split(data_dir, "train")) if "popularity" in methods else None
    rankers = make_rankers(args, own, model, tokenizer, dtype, head, counts, sasrec_model, r2ec_model)
    print(f"{len(instances)} users x {K} candidates of {data_dir}/{args.split}.jsonl; methods {', '.join(methods)}; "
          + (f"R2Rank: {len(instances) * K} greedy traces of <= {own.max_new_tokens} tokens; " if "r2rank" in methods else "")
          + f"{runs.world()} process(es) on {device}, {dtype}")

    results = {}
    for name in methods:
        started = time.time()
        scores, info = rankers[name](instances, name)
        results[name] = {**summarize(scores, instances, args.seed), **info, "seconds": time.time() - started}
    tests = pairwise_tests(results)

    found, prompted = {}, [name for name in methods if name in PROMPTED]
    if "position" in wanted:  # only the methods that read the prompt
        found["position"] = analyses.position_analysis(rankers, prompted, instances)
    if "history-order" in wanted:
        shown = {name: (own if name == kind else args).max_history for name in prompted}
        found["history-order"] = analyses.history_order_analysis(rankers, prompted, instances, results, shown, args.seed)
    if "cold-start" in wanted:
        found["cold-start"] = analyses.cold_start_analysis(results, instances, frequency, RESAMPLES, args.seed)
    if "history-length" in wanted:
        found["history-length"] = analyses.history_length_analysis(results, instances, args.max_history, RESAMPLES, args.seed)

    if runs.rank() > 0:
        return path  # rank 0 reports and writes
    dataset = dataset_name(data_dir)
    print_report(results, tests, found, dataset, os.path.basename(os.path.normpath(args.model)))  # first: a failed write loses no number
    config = {**{k: v for k, v in vars(args).items() if k != "given"}, "data_dir": data_dir, "dataset": dataset,
              "users": len(instances), "candidates": K, "device": str(device), "dtype": str(dtype), "traces": "greedy"}
    if kind in results:  # the trace settings the trained method ran with (its training's, unless given)
        config["trace_settings"] = {kind: {setting: getattr(own, setting) for setting in TRACE_SETTINGS}}
    try:  # whole or not at all: written beside it, then renamed into place
        with open(path + ".tmp", "w") as f:
            json.dump({"methods": results, "tests": tests, "analyses": found, "config": config}, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as error:  # no space, a file-size limit, a permission
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UsageError(f"could not write {path} ({error.strerror or error}); the results are in the table printed "
                         "above (the per-user values and the tests of every pair are lost)") from None
    print(f"wrote {path}")
    return path
