"""data.py's self-check prompt of Fig. 2 on a hand-made instance, and the answer parser."""
import pytest

import data


def instance_with(history_count, text="short"):
    history = [{"item_id": str(n), "title": f"Title{n}", "text": text, "timestamp": n} for n in range(history_count)]
    candidates = [{"item_id": "a", "title": "Alpha", "text": "x" * 500}, {"item_id": "b", "title": "Beta", "text": "y"}]
    return {"user_id": "u", "profile": "Age 30", "history": history, "candidates": candidates, "labels": [1, 0]}


def test_candidates_of_one_user_differ_only_in_a_suffix():
    inst = instance_with(25)
    first, second = data.self_check_messages(inst, 0), data.self_check_messages(inst, 1)
    assert [m["role"] for m in first] == ["system", "user"] and first[0] == second[0]
    system, prefix, block = data.self_check_parts(inst, 1)
    assert second[1]["content"] == prefix + block and block == "Beta - y"
    assert first[1]["content"].startswith(prefix) and not first[1]["content"].endswith("Beta - y")
    assert prefix.endswith("\n") and "Alpha" not in prefix and "Beta" not in prefix


def test_prompt_keeps_recent_history_in_order_and_cuts_long_texts():
    context = data.user_context_text(instance_with(25), max_history=20)
    lines = context.splitlines()
    assert lines[0] == "Profile: Age 30"
    assert lines[2:] == [f"{n + 1}. Title{n + 5} - short" for n in range(20)]  # items 5..24, oldest first
    assert "Title4 " not in context
    cut = data.candidate_text({"title": "Alpha", "text": "x" * 500}, max_item_chars=200)
    assert len(cut) == 200 and cut.startswith("Alpha - xxx") and cut.endswith("...")
    assert data.candidate_text({"title": "Beta", "text": ""}) == "Beta"
    assert "History: none" in data.user_context_text(instance_with(0))
    user = data.self_check_messages(instance_with(3), 0, max_item_chars=50)[1]["content"]
    for part in ("Initial reasoning", "Self-check", "Final conclusion", "<answer>Recommend</answer>",
                 "<answer>Not Recommend</answer>", "USER CONTEXT", "CANDIDATE ITEM"):
        assert part in user
    assert user.endswith("Alpha - " + "x" * 39 + "...")


@pytest.mark.parametrize("text, expected", [
    ("... so <answer>Recommend</answer>", 1),
    ("<answer>Not Recommend</answer>", 0),
    ("<answer> not   RECOMMEND </answer>", 0),
    ("<ANSWER>\nrecommend\n</ANSWER>", 1),
    ("first <answer>Recommend</answer> then <answer>Not Recommend</answer>", 0),
    ("first <answer>Not Recommend</answer> then <answer>Recommend</answer>", 1),
    ("I would Recommend it", None),
    ("<answer>Maybe</answer>", None),
    ("", None),
])
def test_parse_answer(text, expected):
    assert data.parse_answer(text) == expected


def test_answer_only_asks_for_the_decision_alone_with_the_same_context():
    """Table 5's "Without CoT": only the instructions change; the user context and candidate are the same."""
    inst = instance_with(3)
    with_cot = data.self_check_messages(inst, 0)[1]["content"]
    without = data.self_check_messages(inst, 0, instructions=data.PROMPTS["answer-only"])[1]["content"]
    assert data.PROMPTS["self-check"] == data.INSTRUCTIONS
    for part in ("Initial reasoning", "Self-check", "Final conclusion"):
        assert part in with_cot and part not in without
    assert "<answer>Recommend</answer>" in without and "nothing else" in without
    context = with_cot[with_cot.index("USER CONTEXT"):]
    assert without.endswith(context)


def test_the_rl_stage_runs_answer_only_and_records_it(synthetic_dir, tmp_path):
    import json

    from conftest import run_cli

    out = tmp_path / "no-cot"
    result = run_cli("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--prompt", "answer-only",
                     "--max-new-tokens", 8, "--max-steps", 1, "--users-per-step", 1, "--device", "cpu", "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "checkpoint-1" / "r2rank.json").read_text())["args"]["prompt"] == "answer-only"
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step": 1,' in line]
    assert row["response_len"] > 0 and "approx_kl" in row  # PPO acted on the decision's tokens


def test_prompt_tokens_use_the_chosen_prompt(synthetic_dir):
    import r2rank

    _, tokenizer = r2rank.load_model("tiny", "cpu")
    instance = data.load_split(synthetic_dir, "train")[0]
    for prompt, marker, absent in (("answer-only", "nothing else", "Self-check"), ("self-check", "Self-check", "nothing else")):
        args = r2rank.parse_args(["--model", "tiny", "--prompt", prompt])
        [(prefix, suffixes)] = r2rank.prompt_tokens(tokenizer, [instance], args)
        assert marker in tokenizer.decode(prefix) and absent not in tokenizer.decode(prefix)
        assert len(suffixes) == len(instance["candidates"])
