"""SASRec (baselines/sasrec.py): causality, the unknown-item fallback, and training + eval end to end."""
import json

import torch

from baselines import sasrec
from conftest import ROOT, run_cli, run_script


def test_a_later_item_does_not_change_an_earlier_position():
    torch.manual_seed(0)
    model = sasrec.SASRec(num_items=30, dim=16, blocks=2, heads=2, dropout=0.0).eval()
    sequence = torch.tensor([[0, 0, 4, 9, 2, 7, 11]])
    changed = sequence.clone()
    changed[0, 5] = 21  # position 5 changes
    before, after = model(sequence), model(changed)
    torch.testing.assert_close(after[:, :5], before[:, :5])  # positions 0-4 see nothing of it
    assert (after[:, 5:] - before[:, 5:]).abs().max() > 1e-3  # positions 5 and 6 do


def test_scores_are_dot_products_and_unknown_items_rank_last():
    torch.manual_seed(0)
    model = sasrec.SASRec(num_items=10, dim=8, dropout=0.0).eval()
    index = {f"i{n}": n for n in range(1, 11)}
    instance = {"history": [{"item_id": "i3"}, {"item_id": "never-seen"}, {"item_id": "i5"}],
                "candidates": [{"item_id": "i1"}, {"item_id": "unknown"}, {"item_id": "i7"}]}
    scores = sasrec.candidate_scores(model, [instance], index)
    assert sasrec.encode(["i3", "never-seen", "i5"], index)[-3:] == [0, 3, 5]  # the unseen history item is left out
    last = model(torch.tensor([sasrec.encode(["i3", "i5"], index)]))[0, -1]
    by_hand = torch.stack([last @ model.items.weight[1], last @ model.items.weight[7]])
    torch.testing.assert_close(scores[0, [0, 2]], by_hand.detach())
    assert scores[0, 1] < scores[0, [0, 2]].min()


def test_trains_and_is_a_method_of_eval(synthetic_dir, tmp_path):
    out = tmp_path / "sasrec"
    trained = run_script(f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(out),
                         "--epochs", "10", "--dim", "16", cwd=ROOT)
    assert trained.returncode == 0, trained.stderr
    assert "best validation NDCG@10" in trained.stdout
    log = json.loads((out / "sasrec-log.json").read_text())
    assert [row["epoch"] for row in log] == [5, 10] and log[0]["loss"] > log[1]["loss"]  # the loss goes down
    result = run_cli("--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--methods", "sasrec,random",
                     "--sasrec", str(out / "sasrec.pt"), "--out", str(tmp_path / "eval"), "--bootstrap", "50")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert len(report["methods"]["sasrec"]["per_user"]) == 4 and "| SASRec |" in result.stdout
    missing = run_cli("--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--methods", "sasrec", "--out", str(tmp_path / "e2"))
    assert missing.returncode == 1 and "--methods sasrec needs --sasrec FILE" in missing.stderr
