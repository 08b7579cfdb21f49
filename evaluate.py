"""Evaluation of R2Rank (Sec. 4.1.1 and 4.2 of the R2Rank paper): Table 2, R2Rank against the baselines.

    python r2rank.py --stage eval --model runs/r2rank/checkpoint-100 --data data/ml100k
    python r2rank.py --stage eval --model tiny --methods random,popularity,pointwise --analyses position

    run_eval(cfg)   every method on the same candidates -> <out>/eval-<split>.json, Table 2, then --analyses

NDCG@k, the Wilcoxon test and the bootstrap intervals are in metrics.py; the baselines in baselines/untrained.py;
the analyses of Sec. 4.4 and 4.5 (Fig. 3-5, Table 7) in analyses.py.

Where this departs from the paper, which leaves these points open unless said (the numbers of the one list,
at the top of r2rank.py):
24. Baselines: random, popularity, SASRec (trained by baselines/sasrec.py), zero-shot prompts of the
    same LLM, and two RL systems trained by their own commands (baselines/reczero.py, baselines/r2ec.py);
    not the paper's other trained recommenders.
25. R2Rank is scored from greedy traces by default, so a run is deterministic; --eval-sample samples
    them at --temperature. A model without a trained head (head.safetensors) skips R2Rank when it comes
    from the default --methods; a trained method named in --methods that --model is no checkpoint of
    (R2Rank without head.safetensors, reczero on an R2ec checkpoint, ...) is refused.
26. Markers: in each column the best method is bold and marked by its test against the runner-up in
    that column; the JSON holds the test of every pair of methods on NDCG@1, @5 and @10. A method most of
    whose answers were unparsable (listwise: scored in the candidates' input order) is never bold, and
    its row says how many were.
27. Wilcoxon: zero differences are dropped (see metrics.py).
28. A trained method (r2rank, reczero, r2ec) runs with the trace settings its checkpoint was trained
    with (max_new_tokens, max_history, max_item_chars, response_prefix, prompt), except those given on
    the command line, each noted; the other methods use the command line's.
"""
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

import analyses
import data
from baselines import r2ec, reczero, sasrec, untrained
from protocol import UsageError
import rollout
from head import score_traces
from metrics import bootstrap_ci, ndcg_from_scores, positive_ranks, significance_marker, wilcoxon_signed_rank
from machinery import datasets, distributed, eval_methods, models, runs, stops


# --------------------------------------------------------------------------------- per-user results

KS = (1, 5, 10)
METHODS = ("r2rank", "random", "popularity", "sasrec", "pointwise", "listwise", "reczero", "r2ec")
PROMPTED = ("r2rank", "pointwise", "listwise", "reczero", "r2ec")  # the methods that read the prompt (and need the LLM)
ANALYSES = ("position", "history-order", "cold-start", "history-length")
TITLES = {"r2rank": "R2Rank", "random": "Random", "popularity": "Popularity", "sasrec": "SASRec",
          "pointwise": "Pointwise, zero-shot", "listwise": "Listwise, zero-shot",
          "reczero": "RecZero-style, pointwise GRPO", "r2ec": "R2ec-style, dual head"}


def summarize(scores, instances, resamples, seed):
    """NDCG@1/5/10 means, their 95% bootstrap intervals and the per-user values of one method."""
    labels = torch.tensor([inst["labels"] for inst in instances], dtype=torch.float32)  # [U, K]
    per_user = {f"ndcg@{k}": ndcg_from_scores(scores, labels, k).tolist() for k in KS}
    ranks = positive_ranks(scores, labels).tolist()
    return {**{metric: float(np.mean(values)) for metric, values in per_user.items()},
            "ci95": {metric: list(bootstrap_ci(values, resamples, seed)) for metric, values in per_user.items()},
            "per_user": [{"user_id": inst["user_id"], **{metric: values[i] for metric, values in per_user.items()},
                          "positive_rank": ranks[i]} for i, inst in enumerate(instances)]}


def metric_values(result, metric):
    return [user[metric] for user in result["per_user"]]


def pairwise_tests(results):
    """Wilcoxon test of every pair of methods on every NDCG@k, paired by user."""
    pairs = {}
    for a, b in itertools.combinations(results, 2):
        pairs[f"{a} vs {b}"] = {}
        for metric in (f"ndcg@{k}" for k in KS):
            x, y = metric_values(results[a], metric), metric_values(results[b], metric)
            statistic, p_value = wilcoxon_signed_rank(x, y)
            pairs[f"{a} vs {b}"][metric] = {"statistic": statistic, "p_value": p_value,
                                            "nonzero": int(np.count_nonzero(np.round(np.subtract(x, y), 12)))}
    return {"test": "two-sided paired Wilcoxon signed-rank on per-user values, zero differences dropped",
            "markers": "† p < 0.05, ‡ p < 0.01, § p < 0.001", "pairs": pairs}


def pair_test(tests, a, b, metric):
    return (tests["pairs"].get(f"{a} vs {b}") or tests["pairs"][f"{b} vs {a}"])[metric]


# ------------------------------------------------------------------------------------------ rankers


def make_rankers(cfg, model, tokenizer, head, counts, sasrec_model=None, r2ec_model=None, trained_cfg=None):
    """name -> rank(instances, desc) -> (scores [U, K] fp32 on the CPU, info dict).

    Every ranker scores the candidates of each instance in the order given, so the analyses
    (analyses.py) can run the same ranker on reordered candidates or shuffled histories.
    trained_cfg: the trace settings of the method the checkpoint was trained for (r2rank, reczero or
    r2ec: eval_methods.method_settings), which that method's ranker reads; the others read cfg's.
    """
    own = trained_cfg or cfg

    def rank_r2rank(instances, desc):
        # greedy traces by default; sampled ones from a generator seeded by (seed, user), the same for every call
        samples = []
        for instance in tqdm(instances, desc=desc, dynamic_ncols=True, disable=not distributed.is_main()):
            generator = (torch.Generator(device=model.device).manual_seed(cfg.seed * 1_000_003 + zlib.crc32(
                instance["user_id"].encode())) if cfg.eval_sample else None)
            samples += rollout.rollout_users(model, tokenizer, [instance], own, generator,
                                            temperature=cfg.temperature if cfg.eval_sample else 0.0)[0]
        with torch.no_grad():
            scores = score_traces(head, samples)
        return scores.float().cpu(), rollout.trace_stats(samples, tokenizer)

    def rank_pointwise(instances, desc):
        encode_user = lambda instance: data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars,
                                                          cfg.response_prefix)  # the self-check prompt
        return untrained.rank_pointwise(model, tokenizer, instances, encode_user, desc), {}

    def rank_listwise(instances, desc):
        return untrained.rank_listwise(model, tokenizer, instances, cfg.max_history, cfg.max_item_chars,
                                       cfg.max_new_tokens, desc)

    def rank_random(instances, desc):
        return untrained.random_scores(len(instances), len(instances[0]["candidates"]), cfg.seed), {}

    def rank_popularity(instances, desc):
        return untrained.popularity_scores(instances, counts), {}

    def rank_sasrec(instances, desc):
        sasrec_net, item_index = sasrec_model
        return sasrec.candidate_scores(sasrec_net, instances, item_index), {}

    def rank_reczero(instances, desc):
        return reczero.rank(model, tokenizer, instances, own.max_history, own.max_item_chars, own.max_new_tokens, desc)

    def rank_r2ec(instances, desc):
        rec_head, embeddings = r2ec_model
        return r2ec.rank(model, tokenizer, rec_head, embeddings, instances, own.max_history, own.max_item_chars,
                         own.max_new_tokens, desc)

    return {"r2rank": sharded(rank_r2rank), "random": rank_random, "popularity": rank_popularity, "sasrec": rank_sasrec,
            "pointwise": sharded(rank_pointwise), "listwise": sharded(rank_listwise), "reczero": sharded(rank_reczero),
            "r2ec": sharded(rank_r2ec)}


def sharded(rank):
    """A ranker that, under torchrun, scores this rank's share of the users and returns every rank's
    scores in the users' order (counts in its info summed, means weighted by users); alone, rank itself."""
    def merge(infos):  # [(users, info)] -> info
        merged = {}
        for key, value in infos[0][1].items():
            values = [(n, info[key]) for n, info in infos]
            if isinstance(value, dict):
                merged[key] = merge(values)
            elif isinstance(value, int):
                merged[key] = sum(v for _, v in values)
            else:
                merged[key] = sum(n * v for n, v in values) / max(sum(n for n, _ in values), 1)
        return merged

    def rank_all(instances, desc):
        if distributed.world() == 1:
            return rank(instances, desc)
        mine = distributed.shard(instances)
        scores, info = rank(mine, desc) if mine else (torch.zeros(0, len(instances[0]["candidates"])), None)
        rows = distributed.gather(scores.tolist())
        infos = [(n, part) for n, part in distributed.per_rank((len(mine), info)) if part is not None]
        return torch.tensor(rows, dtype=torch.float32), merge(infos)
    return rank_all


# ------------------------------------------------------------------------------------------- report


def default_groups(model_name):
    """The rows of Table 2 for the methods of one evaluation: [(group title, [(method, row title)])]."""
    return [("Baselines", [(name, TITLES[name]) for name in ("random", "popularity", "sasrec")]),
            (f"Prompted LLM: {model_name}", [("pointwise", TITLES["pointwise"]), ("listwise", TITLES["listwise"])]),
            (f"Compared RL systems: {model_name}", [("reczero", TITLES["reczero"]), ("r2ec", TITLES["r2ec"])]),
            (f"Ours: {model_name}", [("r2rank", TITLES["r2rank"])])]


def unparsable(result):
    """(users whose answer named no candidate, users) of one method's result: listwise scores those
    users in the candidates' input order (untrained.rank_listwise); (0, users) for methods that parse nothing."""
    return (result.get("parse") or {}).get("unparsable", 0), len(result["per_user"])


def rankable(result):
    """False when most of a method's answers were unparsable: its scores are then the input order's, so
    it is never marked best."""
    failed, users = unparsable(result)
    return 2 * failed <= users


def markdown_table(results, tests, dataset, groups):
    """Table 2's layout: a row per method in groups, NDCG@1/5/10; each column's best is bold and
    marked by its test against the column's runner-up. groups: [(group title, [(method, row title)])];
    methods missing from results are left out. A method with unparsable answers says how many in its
    row, and when they are most of them it is left out of the bold and the test (rankable)."""
    cells = {name: {} for name in results}
    for metric in (f"ndcg@{k}" for k in KS):
        ranked = sorted((name for name in results if rankable(results[name])),
                        key=lambda name: results[name][metric], reverse=True)
        for name in results:
            cells[name][metric] = f"{results[name][metric]:.3f}"
        if len(ranked) > 1 and results[ranked[0]][metric] > results[ranked[1]][metric]:
            marker = significance_marker(pair_test(tests, ranked[0], ranked[1], metric)["p_value"])
            cells[ranked[0]][metric] = f"**{cells[ranked[0]][metric]}**{marker}"
    lines = [f"| Method | {dataset} @1 | @5 | @10 |", "|---|---:|---:|---:|"]
    for group, rows in groups:
        rows = [(name, title) for name, title in rows if name in results]
        if rows:
            lines.append(f"| *{group}* | | | |")
            for name, title in rows:
                failed, users = unparsable(results[name])
                if failed:
                    title += f" ({failed} of {users} answers unparsable" + ("; not marked best)" if not rankable(results[name]) else ")")
                lines.append(f"| {title} | " + " | ".join(cells[name].values()) + " |")
    return "\n".join(lines)


def dataset_name(data_dir):
    """The data set's name in the table's header: its directory's name, unless that is the generic "data"
    (the synthetic set built into <out>/data, or a layout like vg/data): then "synthetic" when its
    stats.json says it was built from the synthetic source, else the parent directory's name."""
    path = os.path.abspath(data_dir)
    name = os.path.basename(path)
    if name != "data":
        return name
    try:
        with open(os.path.join(path, "stats.json")) as f:
            if json.load(f).get("inputs") == ["synthetic"]:
                return "synthetic"
    except (OSError, ValueError, AttributeError):
        pass  # no readable stats.json: the parent's name will do
    return os.path.basename(os.path.dirname(path)) or name


def print_report(results, tests, found, dataset, model_name):
    """Table 2, the intervals and parse counts per method, r2rank's test against the best other method,
    and one line per analysis: everything a reader needs, printed before the JSON is written."""
    print("\n" + markdown_table(results, tests, dataset, default_groups(model_name)) + "\n")
    print(f"{tests['markers']}; bold: best in the column, tested against the runner-up ({tests['test']}).")
    for name, result in results.items():
        low, high = result["ci95"]["ndcg@10"]
        extra = "".join(f", {key} {value}" for key, value in result.get("parse", {}).items())
        print(f"{name}: NDCG@10 {result['ndcg@10']:.3f}, 95% CI [{low:.3f}, {high:.3f}], {result['seconds']:.1f} s{extra}")
        failed, users = unparsable(result)
        if failed:
            print(f"{name}: {failed} of {users} answers unparsable: those users' scores are the candidates' input "
                  "order (a default, not a ranking)" + ("; so it is not marked best" if not rankable(result) else ""))
    others = [name for name in results if name != "r2rank" and rankable(results[name])]
    if "r2rank" in results and others:
        best = max(others, key=lambda name: results[name]["ndcg@10"])
        test = pair_test(tests, "r2rank", best, "ndcg@10")
        print(f"r2rank vs the best other method ({best}) on NDCG@10: T = {test['statistic']:g}, p = {test['p_value']:.3g}")
    for line in analyses.analysis_lines(found):
        print(line)


def write_results(path, report):
    """report as JSON at path, whole or not at all: written beside it, then renamed into place, so a crash,
    a full disk or a signal never leaves half a file (nor the temporary one). A failed write (no space, a
    file-size limit, a permission) is a UsageError saying where the numbers still are."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, path)
    except OSError as error:
        raise UsageError(f"could not write {path} ({error.strerror or error}); the results are in the table "
                              "printed above (the per-user values and the tests of every pair are lost)") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # gone already after the rename


# ---------------------------------------------------------------------------------------- the stage


def chosen(text, allowed, flag):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


INTERRUPTED = "interrupted: the evaluation stopped before writing its results; nothing was written"


def run_eval(cfg, rank_device=None):
    """--stage eval: every method of --methods on the same instances of --split, then --analyses.
    Under torchrun (rank_device: this rank's GPU, if any) the prompted methods split the users
    across ranks (sharded) and rank 0 writes the results. SIGTERM stops it as Ctrl-C does."""
    with stops.stop_on_sigterm(INTERRUPTED), stops.claim(cfg.out):  # one run per --out at a time; every rank calls it
        return evaluate_and_write(cfg, rank_device)


def evaluate_and_write(cfg, rank_device):
    """run_eval's work: check, load, rank, test, analyse; print the table, then write the JSON."""
    methods, wanted = chosen(cfg.methods, METHODS, "--methods"), chosen(cfg.analyses, ANALYSES, "--analyses")
    if "history-order" in wanted and cfg.history_shuffles < 2:
        raise UsageError("--history-shuffles must be >= 2 for the history-order analysis")
    data_dir = datasets.prepare_data(cfg.data, cfg.out, cfg.seed)
    instances = data.load_split(data_dir, cfg.split)[: cfg.eval_limit or None]  # checked: K the same, a positive each
    K = len(instances[0]["candidates"])
    path = os.path.join(cfg.out, f"eval-{cfg.split}.json")
    runs.check_writable(cfg.out)  # before any model loads or any method runs
    if os.path.exists(path) and not cfg.overwrite:
        raise UsageError(f"{path}: an earlier evaluation is there; pass --overwrite to replace it, or another --out")
    chosen_now = eval_methods.chosen_settings(cfg)
    methods = eval_methods.servable(methods, cfg.model, named="methods" in chosen_now)
    if not methods:
        raise UsageError("--methods: nothing left to evaluate")
    for name in [name for name in ("position", "history-order") if name in wanted]:  # before any method runs
        if not any(method in PROMPTED for method in methods):
            raise UsageError(f"--analyses {name} reruns the methods that read the prompt ({', '.join(PROMPTED)}), and "
                             f"--methods {','.join(methods)} has none of them: add one, or leave {name} out")
    kind = eval_methods.checkpoint_kind(cfg.model)  # the trained method that runs, if any: with the trace settings of its training
    trained_cfg = (eval_methods.method_settings(cfg, kind, chosen_now, any(name in PROMPTED and name != kind for name in methods))
                   if kind in methods else cfg)
    if "history-length" in wanted and trained_cfg.max_history != cfg.max_history:
        print(f"note: the history-length analysis groups users by the history the other methods are shown "
              f"(--max-history {cfg.max_history}); {kind} is shown at most {trained_cfg.max_history} items")
    if "sasrec" in methods and not cfg.sasrec:
        raise UsageError("--methods sasrec needs --sasrec FILE (python baselines/sasrec.py --data DIR --out OUT writes OUT/sasrec.pt)")
    sasrec_model = sasrec.load(cfg.sasrec) if "sasrec" in methods else None  # (model, item index)
    if sasrec_model is not None:  # a model of another data set knows none of these items: its scores would be ties
        known, total = sasrec.known_candidates(instances, sasrec_model[1])
        if known == 0:
            raise data.DataError(f"--sasrec {cfg.sasrec}: knows none of the {total} candidates of {data_dir}/{cfg.split}.jsonl "
                                 "(trained on another data set?)")
        if known < total:
            print(f"note: SASRec knows {known} of the {total} candidates ({known / total:.0%}); the others rank last")

    device = rank_device if rank_device is not None and cfg.device == "auto" else models.pick_device(cfg.device)
    dtype = models.pick_dtype(cfg.dtype, device)
    model = tokenizer = head = None
    if any(name in PROMPTED for name in methods):
        model, tokenizer = models.load_policy(cfg.model, device, dtype, cfg.seed)  # a UsageError if it cannot
        models.check_context(model, cfg.max_new_tokens)
        model.eval()
        if "r2rank" in methods:
            head = models.load_head(cfg.model, model.config.hidden_size, device).eval()
    r2ec_model = r2ec.load(cfg.model, model.config.hidden_size, device) if "r2ec" in methods else None
    frequency = analyses.read_frequency(data_dir) if "cold-start" in wanted else None  # the paper's tiers: training positives
    counts = untrained.interaction_counts(data.load_split(data_dir, "train")) if "popularity" in methods else None
    rankers = make_rankers(cfg, model, tokenizer, head, counts, sasrec_model, r2ec_model, trained_cfg)
    traces = "sampled" if cfg.eval_sample else "greedy"
    print(f"{len(instances)} users x {K} candidates of {data_dir}/{cfg.split}.jsonl; methods {', '.join(methods)}; "
          + (f"R2Rank: {len(instances) * K} {traces} traces of <= {trained_cfg.max_new_tokens} tokens; " if "r2rank" in methods else "")
          + f"device {device}, {dtype}")

    results = {}
    for name in methods:
        started = time.time()
        scores, info = rankers[name](instances, name)
        results[name] = {**summarize(scores, instances, cfg.bootstrap, cfg.seed), **info, "seconds": time.time() - started}
    tests = pairwise_tests(results)

    found, prompted = {}, [name for name in methods if name in PROMPTED]
    if "position" in wanted:  # only the methods that read the prompt; none run: an empty result
        found["position"] = analyses.position_analysis(rankers, prompted, instances)
    if "history-order" in wanted:
        shown = {name: (trained_cfg if name == kind else cfg).max_history for name in prompted}
        found["history-order"] = analyses.history_order_analysis(rankers, prompted, instances, results, cfg, shown)
    if "cold-start" in wanted:
        found["cold-start"] = analyses.cold_start_analysis(results, instances, frequency, cfg.bootstrap, cfg.seed)
    if "history-length" in wanted:
        found["history-length"] = analyses.history_length_analysis(results, instances, cfg.max_history, cfg.bootstrap, cfg.seed)

    if not distributed.is_main():
        return path  # rank 0 reports and writes
    dataset = dataset_name(data_dir)
    print_report(results, tests, found, dataset, os.path.basename(os.path.normpath(cfg.model)))  # first: a failed write loses no number
    config_record = {**dataclasses.asdict(cfg), "data_dir": data_dir, "dataset": dataset, "users": len(instances),
                     "candidates": K, "device": str(device), "dtype": str(dtype), "traces": traces}
    if kind in results:  # the trace settings the trained method ran with (its training's, unless given)
        config_record["trace_settings"] = {kind: {setting: getattr(trained_cfg, setting) for setting in eval_methods.TRACE_SETTINGS}}
    write_results(path, {"methods": results, "tests": tests, "analyses": found, "config": config_record})
    print(f"wrote {path}")
    return path
