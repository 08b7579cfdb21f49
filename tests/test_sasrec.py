"""SASRec (baselines/sasrec.py): causality, the unknown-item fallback, and training + eval end to end."""
import json

import pytest
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
                     "--sasrec", str(out / "sasrec.pt"), "--out", str(tmp_path / "eval"), "--threads", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert len(report["methods"]["sasrec"]["per_user"]) == 4 and "| SASRec |" in result.stdout
    missing = run_cli("--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--methods", "sasrec", "--out", str(tmp_path / "e2"),
                      "--threads", "1")
    assert missing.returncode == 1 and "--methods sasrec needs --sasrec FILE" in missing.stderr
    other = tmp_path / "other-data"  # the same users, every item renamed: a data set the model never saw
    other.mkdir()
    for split in ("train", "valid", "test"):
        text = open(f"{synthetic_dir}/{split}.jsonl").read()
        (other / f"{split}.jsonl").write_text(text.replace('"item_id": "', '"item_id": "renamed-'))
    unknown = run_cli("--stage", "eval", "--model", "tiny", "--data", str(other), "--methods", "sasrec", "--sasrec",
                      str(out / "sasrec.pt"), "--out", str(tmp_path / "e3"), "--threads", "1")
    assert unknown.returncode == 1 and "knows none of the 80 candidates" in unknown.stderr, unknown.stderr


def test_out_holding_a_model_is_refused_unless_overwritten(synthetic_dir, tmp_path):
    out = tmp_path / "sasrec"
    train = lambda *args: run_script(f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(out),
                                     "--epochs", "1", "--dim", "8", *args, cwd=ROOT)
    assert train().returncode == 0
    first = (out / "sasrec.pt").read_bytes()
    again = train("--seed", "1")
    assert again.returncode == 1 and again.stderr.strip() == f"error: {out}: holds another model (sasrec.pt, sasrec-log.json, " \
        "sasrec-state.pt); pass --resume to continue it, --overwrite to replace it, or another --out"
    assert (out / "sasrec.pt").read_bytes() == first
    other = train("--resume", "--seed", "1")
    assert other.returncode == 1 and "--resume needs every setting but --epochs unchanged; these differ: --seed 0 -> 1" in other.stderr
    for args, message in [(["--lr", "nan"], "--lr must be in (0, 1], got nan"), (["--seed", "99999999999999999999"], "--seed must be in [0, 4294967295]")]:
        refused = train(*args)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    replaced = train("--seed", "1", "--overwrite")
    assert replaced.returncode == 0 and (out / "sasrec.pt").read_bytes() != first
    (out / "sasrec-log.json").unlink()
    (out / "sasrec-log.json").mkdir()  # a name the script writes, holding what it does not: refused, kept
    (out / "sasrec-log.json" / "mine.txt").write_text("mine")
    refused = train("--overwrite")
    assert refused.returncode == 1 and "sasrec-log.json is not a file this script wrote" in refused.stderr, refused.stderr
    assert (out / "sasrec-log.json" / "mine.txt").read_text() == "mine"


def test_resume_writes_what_one_uninterrupted_run_writes(synthetic_dir, tmp_path):
    train = lambda out, *args: run_script(f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(out),
                                          "--dim", "8", *args, cwd=ROOT)
    assert train(tmp_path / "straight", "--epochs", "10").returncode == 0
    assert train(tmp_path / "stopped", "--epochs", "5").returncode == 0
    resumed = train(tmp_path / "stopped", "--epochs", "10", "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "at epoch 5" in resumed.stdout, resumed.stderr
    logs = [json.loads((tmp_path / run / "sasrec-log.json").read_text()) for run in ("straight", "stopped")]
    assert logs[0] == logs[1] and [row["epoch"] for row in logs[0]] == [5, 10]
    models = [torch.load(tmp_path / run / "sasrec.pt", weights_only=True)["state"] for run in ("straight", "stopped")]
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, atol=0, rtol=0)


def test_padding_changes_nothing_at_the_real_positions():
    # oracle: the same items with no padding at all. Position embeddings are zeroed, so left-padding
    # shifts nothing else; unmasked padding keys (bias-only keys) would draw attention and change the output.
    torch.manual_seed(0)
    model = sasrec.SASRec(num_items=30, dim=16, blocks=2, heads=2, dropout=0.0).eval()
    with torch.no_grad():
        model.positions.weight.zero_()
        for attention in model.attentions:
            attention.in_proj_bias.normal_()  # padding keys get bias-only keys: large ones if unmasked
    padded, bare = model(torch.tensor([[0, 0, 0, 4, 9, 2]])), model(torch.tensor([[4, 9, 2]]))
    torch.testing.assert_close(padded[:, 3:], bare)
    assert torch.isfinite(padded).all()


def test_a_signal_keeps_the_finished_epochs_and_resume_gives_the_uninterrupted_model(synthetic_dir, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from baselines.sasrec import epochs_text

    for signum in (signal.SIGINT, signal.SIGTERM):
        stopped = tmp_path / "stopped"
        shutil.rmtree(stopped, ignore_errors=True)
        process = subprocess.Popen([sys.executable, f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(stopped),
                                    "--dim", "8", "--epochs", "100000"], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # as run_script's
        state, deadline = stopped / "sasrec-state.pt", time.time() + 300
        while not state.exists() and time.time() < deadline:  # epoch 5's check is saved: training is under way
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
        epoch = torch.load(state, weights_only=True)["epoch"]
        assert process.returncode == 128 + signum and "Traceback" not in stderr, stderr
        assert f"stopped by {signum.name}: {epochs_text(epoch)} kept in {state}; continue with --resume\n" in stderr, stderr
    train = lambda out, *args: run_script(f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(out), "--dim", "8",
                                          "--epochs", str(epoch + 3), *args, cwd=ROOT)
    resumed = train(stopped, "--resume")
    assert resumed.returncode == 0 and f"at epoch {epoch}" in resumed.stdout, resumed.stderr
    assert train(tmp_path / "straight").returncode == 0
    logs = [json.loads((tmp_path / run / "sasrec-log.json").read_text()) for run in ("straight", "stopped")]
    assert logs[0] == logs[1]
    models = [torch.load(tmp_path / run / "sasrec.pt", weights_only=True)["state"] for run in ("straight", "stopped")]
    for name, tensor in models[0].items():
        torch.testing.assert_close(models[1][name], tensor, atol=0, rtol=0)
    refused = run_script(f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(stopped), "--resume", "--overwrite", cwd=ROOT)
    assert refused.returncode == 1 and refused.stderr.strip() == "error: --resume continues the model in --out and --overwrite " \
        "replaces it: pass one of them"
    assert os.path.isfile(stopped / "sasrec.pt")


def test_a_failed_save_keeps_the_earlier_file_and_says_so(tmp_path, monkeypatch):
    import errno

    from data import UsageError

    path = tmp_path / "sasrec-state.pt"
    sasrec.write_whole(str(path), {"epoch": 5})

    def full(obj, target):
        open(target, "wb").write(b"half")  # part of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UsageError) as refused:
        sasrec.write_whole(str(path), {"epoch": 10})
    message = str(refused.value)
    assert message == f"saving {path} failed (No space left on device); the earlier sasrec-state.pt is kept"
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 5} and [p.name for p in tmp_path.iterdir()] == ["sasrec-state.pt"]


def test_a_sasrec_file_that_is_no_sasrec_model_is_one_line(synthetic_dir, tmp_path):
    """--sasrec given sasrec-log.json (the log beside the model), a stats.json, or a torch file of something else:
    one line, not torch.load's UnpicklingError traceback or a KeyError."""
    log, other = tmp_path / "sasrec-log.json", tmp_path / "optimizer.pt"
    log.write_text(json.dumps({"epochs": [{"epoch": 1, "loss": 0.5}]}))
    torch.save({"llm": {"state": {}}}, other)
    for path in (log, other, f"{synthetic_dir}/stats.json"):
        result = run_cli("--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--out", str(tmp_path / "eval"),
                         "--methods", "sasrec", "--sasrec", str(path), "--threads", "1")
        assert result.returncode == 1 and result.stderr == (
            f"error: --sasrec {path}: not a model of baselines/sasrec.py (the file it writes is OUT/sasrec.pt); train one "
            "with python baselines/sasrec.py --data DIR --out OUT\n"), result.stderr
