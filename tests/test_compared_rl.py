"""The compared RL systems (baselines/reczero.py, baselines/r2ec.py): their pure parts by hand or
against a plain forward pass, and each training command, then its eval method, through the CLI."""
import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import models
import r2rank
from baselines import r2ec, reczero
from conftest import ROOT, run_cli, run_script


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = r2rank.load_model("tiny", torch.device("cpu"))
    return model.eval(), tokenizer


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def full_logprob(model, ids, start):
    """Sum of log P(ids[t] | ids[:t]) for t >= start, one plain forward over the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logits[t - 1, ids[t]].item() for t in range(start, len(ids)))


# ------------------------------------------------------------------------------------- RecZero-style


def test_answer_reward_by_hand():
    right, wrong = f"... <answer>{data.RECOMMEND}</answer>", f"<answer>{data.NOT_RECOMMEND}</answer>"
    assert reczero.answer_reward(right, 1, log_odds=-5.0) == 1.0 + reczero.FORMAT_REWARD  # its own answer wins
    assert reczero.answer_reward(wrong, 1, log_odds=5.0) == reczero.FORMAT_REWARD
    assert reczero.answer_reward(wrong + " then " + right, 1, 0.0) == 1.0 + reczero.FORMAT_REWARD  # the last one
    assert reczero.answer_reward("no answer", 1, log_odds=0.3) == 1.0  # read out: Recommend
    assert reczero.answer_reward("no answer", 1, log_odds=-0.3) == 0.0
    assert reczero.answer_reward("no answer", 0, log_odds=-0.3) == 1.0
    assert reczero.reasoning_before_answer("think <answer>x</answer> more <answer>y") == "think <answer>x</answer> more "


def test_pairs_are_the_positive_then_distinct_negatives():
    instance = {"labels": [0, 0, 1, 0, 0, 0]}
    for seed in range(5):
        pairs = reczero.choose_pairs(instance, 3, torch.Generator().manual_seed(seed))
        assert pairs[0] == (2, 1) and len(pairs) == 4
        negatives = [k for k, label in pairs[1:]]
        assert len(set(negatives)) == 3 and all(instance["labels"][k] == 0 and label == 0 for k, label in pairs[1:])


def test_answer_log_odds_match_a_plain_forward(tiny, synthetic_dir):
    """The eval score: log P(yes) - log P(no) of the answer's deciding token after the reasoning and
    "<answer", against full-sequence forwards of prompt + reasoning + each answer up to that token."""
    model, tokenizer = tiny
    instance = data.load_split(synthetic_dir, "test")[0]
    prefix, suffixes = data.encode_user(tokenizer, instance, instructions=reczero.THINK_INSTRUCTIONS)
    texts = ["the user likes it", f"maybe not <answer>{data.RECOMMEND}</answer>", ""]
    got = reczero.answer_log_odds(model, tokenizer, prefix, suffixes[:3], texts, rows_per_forward=4)  # 6 rows: 2 forwards
    yes_ids, no_ids = reczero.deciding_tokens(tokenizer)
    assert tokenizer.decode(yes_ids) == "<answer>Recommend" and tokenizer.decode(no_ids) == "<answer>Not"  # tiny's vocabulary
    for k, text in enumerate(texts):
        context = prefix + suffixes[k] + encode(tokenizer, reczero.reasoning_before_answer(text))
        yes = full_logprob(model, context + yes_ids, len(context))
        no = full_logprob(model, context + no_ids, len(context))
        assert got[k].item() == pytest.approx(yes - no, abs=1e-4)


def test_draw_answers_ends_unanswered_traces_with_a_drawn_answer(tiny):
    """A trace without an answer gets one appended (its stop token dropped), drawn with P(Recommend) =
    sigmoid(log-odds); a trace with its own answer is kept as it is; the drawn decision is the sign of decision_odds."""
    model, tokenizer = tiny
    stops = model.generation_config.eos_token_id
    yes, no = encode(tokenizer, f"<answer>{data.RECOMMEND}</answer>"), encode(tokenizer, f"<answer>{data.NOT_RECOMMEND}</answer>")
    traces = [[5], [7, stops[0]], no]
    texts = [tokenizer.decode(trace, skip_special_tokens=True) for trace in traces]
    log_odds = torch.tensor([50.0, -50.0, 50.0])  # draws: surely Recommend, surely Not
    drawn, decision_odds = reczero.draw_answers(tokenizer, traces, texts, log_odds, stops, torch.Generator().manual_seed(0))
    assert drawn == [[5] + yes, [7] + no, no]
    assert decision_odds.tolist() == [1.0, -1.0, 50.0]
    # frequencies: P(Recommend) = sigmoid(0.8) = 0.690 over 2000 draws (5 binomial SE = 0.052)
    _, odds = reczero.draw_answers(tokenizer, [[5]] * 2000, [texts[0]] * 2000, torch.full((2000,), 0.8), stops,
                                   torch.Generator().manual_seed(1))
    assert (odds > 0).float().mean().item() == pytest.approx(1 / (1 + math.exp(-0.8)), abs=0.052)


def metric_rows(out):
    """metrics.jsonl without the wall-clock column."""
    return [{k: v for k, v in json.loads(line).items() if k != "step_time"} for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights_moved(checkpoint):
    """The largest change of a weight of checkpoint from the tiny model it started from."""
    start, saved = models.build_tiny(seed=0)[0].state_dict(), load_file(checkpoint / "model.safetensors")
    return max((saved[name] - start[name]).abs().max().item() for name in saved)


def assert_resume_matches_one_run(command, out, straight):
    """The oracle of --resume: 2 steps, then --resume to 3, write the rows of one 3-step run."""
    run = lambda *args: run_script(*command, *args, cwd=ROOT)
    resumed = run("--max-steps", "3", "--resume")
    assert resumed.returncode == 0 and f"resumed from {out}/checkpoint-2 at step 2" in resumed.stdout, resumed.stderr
    at_once = run("--max-steps", "3", "--out", str(straight))
    assert at_once.returncode == 0, at_once.stderr
    assert metric_rows(out) == metric_rows(straight) and [row["step"] for row in metric_rows(out)] == [1, 2, 3]


def test_reczero_trains_and_is_a_method_of_eval(synthetic_dir, tmp_path):
    out = tmp_path / "reczero"
    command = [f"{ROOT}/baselines/reczero.py", "--data", synthetic_dir, "--model", "tiny", "--out", str(out), "--threads", "1",
               "--max-steps", "2", "--group", "3", "--negatives", "2", "--max-new-tokens", "6", "--lr", "1e-3"]
    trained = run_script(*command, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr
    assert [row["step"] for row in metric_rows(out)] == [1, 2]
    assert "2 users x 3 pairs x 3 traces = 18 traces per step" in trained.stdout
    checkpoint = out / "checkpoint-2"
    saved = json.loads((checkpoint / "r2rank.json").read_text())["args"]
    assert saved["stage"] == "reczero" and saved["group"] == 3 and not (checkpoint / "head.safetensors").exists()
    assert weights_moved(checkpoint) > 1e-4  # lr 1e-3, rewards differ within some group of the two steps
    again = run_script(*command, cwd=ROOT)
    assert again.returncode == 1 and "holds another run (checkpoint-2, metrics.jsonl); pass --resume" in again.stderr
    assert_resume_matches_one_run(command, out, tmp_path / "straight")

    result = run_cli("--stage", "eval", "--model", str(checkpoint), "--data", synthetic_dir, "--methods", "reczero,random",
                     "--max-new-tokens", "6", "--out", str(tmp_path / "eval"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert len(report["methods"]["reczero"]["per_user"]) == 4 and "| RecZero-style, pointwise GRPO |" in result.stdout
    assert "note: reczero was trained" not in result.stdout  # the same trace settings as training


def test_reczero_sigterm_finishes_the_step_and_keeps_it(synthetic_dir, tmp_path):
    out = tmp_path / "reczero"
    process = subprocess.Popen([sys.executable, f"{ROOT}/baselines/reczero.py", "--data", synthetic_dir, "--model", "tiny",
                                "--out", str(out), "--max-steps", "100", "--save-every", "100", "--users-per-step", "1",
                                "--max-new-tokens", "40", "--group", "4", "--threads", "1"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # step 2 has begun
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr
    step = int(re.search(r"stopped by SIGTERM: steps 1-(\d+) kept in " + re.escape(f"{out}/checkpoint-") + r"\1;", stderr)[1])
    assert 2 <= step < 100 and [row["step"] for row in metric_rows(out)] == list(range(1, step + 1))
    assert (out / f"checkpoint-{step}" / "optimizer.pt").exists()


# ------------------------------------------------------------------------------------- R2ec-style


def test_rec_head_scores_by_hand():
    torch.manual_seed(0)
    hidden, items = torch.randn(2, 8), torch.randn(2, 5, 8)
    head = r2ec.RecHead(8)
    norm = lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = torch.einsum("gh,gkh->gk", norm(hidden), norm(items)) / math.sqrt(8)  # W = identity at the start
    torch.testing.assert_close(head(hidden, items), expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        head.project.weight.mul_(2.0)
    torch.testing.assert_close(head(hidden, items), 2 * expected, atol=1e-5, rtol=0)


def test_fused_reward_and_best_trace_loss_by_hand():
    labels = torch.tensor([0.0, 1.0, 0.0])
    scores = torch.tensor([[3.0, 2.0, 1.0],   # the positive second: NDCG = 1 / log2(3)
                           [0.0, 5.0, 1.0],   # first: NDCG = 1
                           [1.0, 1.0, 1.0]])  # all tied, pessimistic: last, 1 / log2(4) = 0.5
    softmax = lambda row: math.exp(row[1]) / sum(math.exp(v) for v in row)
    expected = [1 / math.log2(3) + 0.05 * softmax([3, 2, 1]), 1 + 0.05 * softmax([0, 5, 1]), 0.5 + 0.05 / 3]
    reward = r2ec.fused_reward(scores, labels, beta=0.05)
    torch.testing.assert_close(reward, torch.tensor(expected), atol=1e-6, rtol=0)
    # the head learns from the second trace only: the cross-entropy of the positive under its scores
    trainable = scores.clone().requires_grad_(True)
    loss = r2ec.best_trace_loss(trainable, labels, reward)
    assert loss.item() == pytest.approx(-math.log(softmax([0, 5, 1])), abs=1e-6)
    loss.backward()
    assert trainable.grad[[0, 2]].eq(0).all() and trainable.grad[1].abs().sum() > 0
    # a step's users at once, [U, G, K]: the mean of each user's loss
    both = torch.stack([scores, scores.flip(0)])
    assert r2ec.best_trace_loss(both, labels.expand(2, 3), r2ec.fused_reward(both, labels.expand(2, 3))).item() == pytest.approx(loss.item())


def test_item_embeddings_match_one_item_at_a_time_and_ride_in_the_head(tiny, tmp_path):
    """Batched with right padding = each item's line run alone, hidden state at its last token; a head saved with
    them gives them back (r2ec.load)."""
    model, tokenizer = tiny
    items = {"a": {"title": "A short one", "text": ""}, "b": {"title": "A much longer title", "text": "with some text too"}}
    batched = r2ec.item_embeddings(model, tokenizer, items)
    for item_id, item in items.items():
        ids = encode(tokenizer, data.candidate_text(item))
        with torch.no_grad():
            alone = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(batched[item_id], alone, atol=1e-5, rtol=0)
    from safetensors.torch import save_file
    save_file(r2ec.RecHead(64, {**batched, "ü-3": batched["a"]}).state_dict(), tmp_path / "head.safetensors")
    head, embeddings = r2ec.load(str(tmp_path), 64, torch.device("cpu"))
    assert list(embeddings) == ["a", "b", "ü-3"] and torch.equal(embeddings["b"], batched["b"])
    with pytest.raises(data.UsageError, match="not a checkpoint of baselines/r2ec.py"):
        r2ec.load(str(tmp_path / "nothing"), 64, torch.device("cpu"))


def test_r2ec_trains_and_is_a_method_of_eval(synthetic_dir, tmp_path):
    out = tmp_path / "r2ec"
    command = [f"{ROOT}/baselines/r2ec.py", "--data", synthetic_dir, "--model", "tiny", "--threads", "1",
               "--out", str(out), "--max-steps", "2", "--group", "3", "--max-new-tokens", "6"]
    trained = run_script(*command, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr
    assert [row["step"] for row in metric_rows(out)] == [1, 2]
    checkpoint = out / "checkpoint-2"
    assert json.loads((checkpoint / "r2rank.json").read_text())["args"]["stage"] == "r2ec"
    head, embeddings = r2ec.load(str(checkpoint), 64, torch.device("cpu"))
    assert (head.project.weight - torch.eye(64)).abs().max() > 1e-4  # the head was trained
    every_item = {item["item_id"] for split in data.SPLITS for inst in data.load_split(synthetic_dir, split)
                  for item in inst["history"] + inst["candidates"]}
    assert set(embeddings) == every_item
    assert_resume_matches_one_run(command, out, tmp_path / "straight")

    result = run_cli("--stage", "eval", "--model", str(checkpoint), "--data", synthetic_dir, "--methods", "r2ec,random",
                     "--max-new-tokens", "6", "--out", str(tmp_path / "eval"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert len(report["methods"]["r2ec"]["per_user"]) == 4 and report["methods"]["r2ec"]["items_embedded_at_eval"] == 0
    other_budget = run_cli("--stage", "eval", "--model", str(checkpoint), "--data", synthetic_dir, "--methods", "r2ec",
                           "--max-new-tokens", "4", "--out", str(tmp_path / "eval3"), "--threads", "1")
    assert "note: r2ec was trained with --max-new-tokens 6; this evaluation uses 4" in other_budget.stdout
    refused = run_cli("--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--methods", "r2ec,random",
                      "--out", str(tmp_path / "eval2"), "--threads", "1")
    assert refused.returncode == 1 and "error: --methods r2ec needs a checkpoint of baselines/r2ec.py" in refused.stderr


# ------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("precision", [[], ["--dtype", "bfloat16", "--device", "cpu"]], ids=["fp32", "bf16"])
@pytest.mark.parametrize("system", ["reczero", "r2ec"])
def test_trains_with_lora_and_gradient_checkpointing(system, precision, synthetic_dir, tmp_path):
    """One step, then --resume to a second (LoRA's adapters restored from lora.safetensors): the adapters and the
    merged weights moved."""
    out = tmp_path / system
    command = [f"{ROOT}/baselines/{system}.py", "--data", synthetic_dir, "--model", "tiny", "--out", str(out), "--threads", "1",
               "--group", "3", "--max-new-tokens", "4", "--lr", "1e-2", "--lora-rank", "4", "--gradient-checkpointing", *precision]
    first = run_script(*command, "--max-steps", "1", cwd=ROOT)
    assert first.returncode == 0, first.stderr
    second = run_script(*command, "--max-steps", "2", "--resume", cwd=ROOT)
    assert second.returncode == 0 and f"resumed from {out}/checkpoint-1 at step 1" in second.stdout, second.stderr
    assert [row["step"] for row in metric_rows(out)] == [1, 2]
    adapters = load_file(out / "checkpoint-2" / "lora.safetensors")
    assert max(t.abs().max().item() for name, t in adapters.items() if "lora_B" in name) > 0  # B starts at 0
    assert weights_moved(out / "checkpoint-2") > 1e-4


@pytest.mark.parametrize("system, flags, code, line", [
    ("reczero", ["--group", "1"], 2, "--group must be >= 2: GRPO's advantage compares the traces of a group"),
    ("r2ec", ["--temperature", "0"], 2, "--temperature 0 samples greedy traces, which have no policy gradient"),
    ("r2ec", ["--head-lr", "2"], 2, "--head-lr must be a finite number >= 0 and <= 1, got 2.0"),
    ("reczero", ["--negatives", "30"], 1, "error: --negatives 30: an instance of"),
    ("r2ec", ["--users-per-step", "1000"], 1, "error: --users-per-step 1000 is more than the 32 training users"),
])
def test_bad_input_is_one_line(system, flags, code, line, synthetic_dir, tmp_path):
    result = run_script(f"{ROOT}/baselines/{system}.py", "--data", synthetic_dir, "--model", "tiny", "--out", str(tmp_path / "x"),
                        *flags, cwd=ROOT)
    assert result.returncode == code and line in result.stderr and "Traceback" not in result.stderr, result.stderr
