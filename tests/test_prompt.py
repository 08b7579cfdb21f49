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
