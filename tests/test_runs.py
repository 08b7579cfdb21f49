"""A training run's --out (runs.py): one run per directory, an honest resume, a clean stop.

Each bad input or fault tried as a new user would, and what it gets now (the tests below, test_cli.py's,
test_data.py's, test_sasrec.py's, test_compared_rl.py's and test_evaluate.py's check each row):

| input or fault | before | now |
|---|---|---|
| a numeric flag out of range (--keep-checkpoints -1, --lr -1, --micro-batch 0, ...) | traceback, NaN, or exit 0 with nothing kept | exit 2 before any work: "--flag must be ..., got ..." |
| --device cuda without CUDA, a missing --model | traceback | one line, exit 1, nothing written |
| an instance with another K, no positive, string labels, an item without a title, a repeated user_id | traceback or trained on | "file:line: ..." from the one validator every stage reads through |
| an empty train.jsonl / valid.jsonl (with --eval-every) | IndexError after the model loaded | "file: no instances", before the model loads |
| another run's --out without --resume | both runs mixed | refused; --overwrite replaces it |
| --resume with another --seed, --model, K, trace setting, or edited data | accepted silently | refused, each difference named |
| --resume with another --lr / --head-lr | ignored, but recorded as applied | applied to the restored optimizer, printed, kept in r2rank.json "changes" |
| kill, then --resume | re-run steps appended to metrics.jsonl again | metrics.jsonl cut back to the checkpoint's step, the dropped rows named |
| --resume with no checkpoint / at --max-steps / past it | silent fresh start / silent no-op | says so / says so, exit 0 / refused |
| a second eval into the same --out | eval-<split>.json silently replaced | refused; --overwrite replaces it |
| Round 2 (issue 29): | | |
| --seed 99999999999999999999 | OverflowError traceback | exit 2: "--seed must be in [0, 16777215]" (derived seeds must fit torch's 64 bits); sasrec/reczero/r2ec.py too |
| --lr inf / nan, any float flag (main CLI, baselines) | a step, then a multinomial traceback, a NaN row, no checkpoint; sasrec.py trained on | exit 2: "--lr must be a finite number, got inf" |
| --lr 1e6 | weights to 2.6e6, head score spread 9e-10, no word | exit 2: "--lr must be in [0, 1]"; a head spread under 1e-6 is warned about once |
| --temperature 1e-30 | greedy in all but name, trained on (token_logp 0) | exit 2: a nonzero temperature below 0.01 is refused, with the reason |
| --head-width 100000000 | out-of-memory traceback | exit 2: "--head-width must be in [1, 65536]"; any other out of memory: one line, exit 1 |
| --model fake.gguf (not GGUF, or cut short) | the message, then a traceback | "--model X: cannot read it as a GGUF model (...)", exit 1 |
| --resume: newest checkpoint without r2rank.json, with a truncated model.safetensors, or an empty checkpoint-99/ | traceback | each broken one named with its file ("model.safetensors is truncated (N of M bytes)"), resumed from the newest whole one; none whole: one line, exit 1 |
| --out on a read-only mount, with --data | found after the model loaded | "--out X: cannot create it / write into it (...)", before the model loads |
| a non-finite loss or weight during training (a NaN head here) | a NaN row, then a traceback at the next step | one line, exit 1; that step is neither logged nor saved (reczero/r2ec.py too) |
| baselines/sasrec.py into an --out holding a model | 200-epoch model replaced by a 1-epoch one, exit 0 | refused; --overwrite replaces; --resume continues its saved state (the same model as one run) |
| baselines/reczero.py, r2ec.py into another run's --out | their own rule; no --resume | the main CLI's: refused, --overwrite, --resume (the same rows as one uninterrupted run) |
| SASRec evaluated on a data set with none of its items | NDCG 0.000, exit 0 | refused: "knows none of the N candidates"; a partial overlap is noted |
| a second Ctrl-C | steps since the last checkpoint lost while the message spoke of one step; --resume then dropped their rows silently | the messages say what is kept; --resume names the rows it drops |
| SIGTERM or Ctrl-C during a long step | waited for the step to end (577 s in one case) | a rollout or validation in flight is dropped at once (here: under 3 s), the finished steps saved; an update in flight finishes first |
| Ctrl-C during eval | a message about --resume | "nothing was written" |
| a metrics.jsonl line cut short by a crash, then --resume | json traceback | the line dropped and counted |
| Round 3 (reliability): | | |
| --model runs/x/checkpoint-4 --out runs/x --overwrite (or --trace-cache, --data, sft's --traces inside a checkpoint of --out) | trained, after deleting the checkpoint it started from | refused in one line naming the flag; the "holds another run" refusal no longer suggests --overwrite then (rl, sft, reczero/r2ec.py) |
| a checkpoint save that fails (a full disk, `ulimit -f`) | .tmp-checkpoint-N left, a metrics row without its checkpoint, a traceback | the temporary directory removed, metrics.jsonl cut back to the checkpoint before it, which is kept; one line naming the cause (free space / the file-size limit) (rl, sft, reczero/r2ec.py; sasrec.py's state and model too) |
| two runs started at once on one --out | one died with FileNotFoundError, the other exited 0, their rows interleaved | the second refused: "<out> is in use by another run (pid N); wait for it or choose another --out"; a killed run's lock blocks nothing (rl, sft, sft-data, reczero/r2ec/sasrec.py) |
| sft --resume after traces.jsonl grew (8 traces, then 16) | resumed on other traces | refused: "--traces ... (its content differs from the checkpoint's)" (test_sft.py) |
| a stop during step 0's validation or step 1's rollout | "nothing was written but the data", yet the same command was then refused | nothing left in --out: the same command runs; an empty metrics.jsonl is not a run |
| --resume with no checkpoint, over earlier rows | (already started clean) | starts at step 0, names the files of the earlier start it removes |
| --resume --overwrite | resume won silently | refused in one line (every stage, the baselines, sasrec.py) |
| Ctrl-C / SIGTERM in baselines/sasrec.py | traceback, the epochs since the last check lost | the epoch in progress finishes, the state is saved, one line, exit 130 / 143; --resume gives the uninterrupted model (test_sasrec.py) |
| SIGTERM under torchrun | the stop line once per rank | once (rank 0); every rank exits 143 (torchrun itself still reports the signal and exits 1) |
| Round 4 (issue 44): | | |
| data.py --out DIR --overwrite, DIR holding other files or folders; --out .; --out a parent directory | all of DIR deleted (rmtree); the current directory emptied; sibling folders deleted | refused in one line naming the first foreign file or folder, nothing deleted: --overwrite replaces only a data set's train/valid/test.jsonl and stats.json, file by file (test_data.py) |
| r2rank.py --out X without --data, X/data holding the user's files | replaced by the synthetic set, no word | refused: "X/data holds FILE, not the synthetic set ...; pass --data, or choose another --out" |
| Ctrl-C during data.py | KeyboardInterrupt traceback | "data.py: stopped by Ctrl-C; nothing written to OUT", exit 130, no temporary folder left (test_data.py) |
| a full disk when the lock is written (rl, eval, sft-data start) | OSError traceback, an empty .r2rank-lock left | "--out X: cannot write .r2rank-lock there (No space left on device); ...", the file removed, an --out made for the run removed |
| --model a checkpoint whose model.safetensors (eval, rl) or head.safetensors (eval) is truncated | SafetensorError traceback | "--model X: model.safetensors is truncated (N of M bytes), so it is damaged; pass another checkpoint" |
| tools/report.py table on an eval file without per-user values | KeyError traceback | "FILE: method 'X' has no per-user values (...)", exit 1 (test_report.py) |
| tools/benchmark.py --rl-step nonexistent/model, --users 0, --new-tokens -5, --models foo | traceback; a run with 0 users or -5 tokens; foo ignored and a 10-minute sweep of the others | one line before any timing, exit 1 / 2 (test_cli.py) |
| a parent_asin repeated in the Amazon meta file | the first record kept, no word | kept, and counted in stats.json's dropped ("repeated_item_records"), which data.py prints (test_data.py) |
| --overwrite over a checkpoint-<step> that is a file or holds a folder; sasrec.py over a sasrec-log.json folder | deleted with the run | refused, naming it (sasrec: test_sasrec.py) |
| --model a checkpoint without tokenizer.json | a 3-token tokenizer, every prompt [], eval 0.300 for 0.762 | "--model X: its tokenizer encodes the prompt as 0 tokens ...; is tokenizer.json missing?" (test_models.py) |
| --max-new-tokens 5000 on the tiny model's 4,096 positions | generated past the context window | "--max-new-tokens 5000 does not fit the model's context window ..." in rl and eval (test_models.py) |
| --pl-std 1e30, --lr 1 --head-lr 1 | signal_share 0, the head learns nothing, no word | after 10 such steps, once: "warning: step 10: ... (signal_share 0) ... lower --pl-std if set, else --head-lr / --lr" (test_models.py) |
| --model /nonexistent, --model README.md, a directory without config.json | a hub lookup, then a repo-id, JSON or model_type error | one line each, no hub lookup (test_models.py, test_cli.py) |
| the disk check for a tiny model's checkpoints | "need 0.1 GB (2 of 0.0 GB at once) ... keep fewer" at --keep-checkpoints 1 too | sizes in MB / kB; "keep fewer" only above --keep-checkpoints 1 |
| an empty reviews file | "no interactions from 2021-10-01 to 2023-10-31" | "FILE: holds no interactions (an empty file?)" (test_data.py) |
| out of memory with --num-rankings 4096 | the hint named --micro-batch and others, not the cause | --num-rankings named first when S x users >= 1024 (test_cli.py) |
| the SFT teacher: 429 with Retry-After; 401 without $OPENAI_API_KEY | the backoff's 1 s; "HTTP 401" alone | Retry-After's seconds waited (at most 10 minutes); the 401 names the variable to set (test_sft.py) |
| --resume, the newest checkpoint's config.json cut mid-write | from_pretrained's traceback | skipped, naming the file, as other broken checkpoints are |
| SIGTERM during sft-data | exit 143, no word | Ctrl-C's line ("the pairs written so far are kept"), exit 143 (test_sft.py) |
| --out made read-only (chmod 555) while rl runs, so a checkpoint cannot be saved | a PermissionError traceback naming the temporary .tmp-checkpoint-N, then two more from the clean-up (metrics.jsonl, .r2rank-lock) | "step N: saving OUT/checkpoint-N failed (Permission denied: --out OUT cannot be written now; make it writable); kept ..."; a save error worded by safetensors or torch.save gives its cause, never the temporary file it names (.tmpXXXXXX) |
| data.py --out a read-only folder, or a new one inside it; r2rank.py without --data, <out>/data read-only | found after the build (minutes for an Amazon category); <out>/data named as if it were --out | found before the raw files are read: "--out X: cannot write into it / cannot create it (Permission denied)"; "--out X (X/data, where the synthetic set is built without --data): ..." (test_data.py) |
| an SFT teacher endpoint that never answers | 600 s per try, 6 tries: about an hour, then "timed out (gave up after 6 attempts)"; no flag | --teacher-timeout (seconds per request, default 120, in (0, 3600]); "URL: timed out (gave up after 6 attempts, 12 min 31 s in all; each waits at most --teacher-timeout 120 s for the reply)" (test_sft.py) |
| Ctrl-C under torchrun (each rank gets the terminal's SIGINT, then torchrun's copy of it) | the copy, when it came after the first was handled, read as a second Ctrl-C: "SIGINT again: stopping now" from every rank, the step in progress and its checkpoint lost ("no checkpoint ... nothing of the run is kept") | a SIGINT within 2 s of the first is taken as torchrun's copy: the step finishes and is saved, one line (rank 0), every rank exits 130; machinery/README.md says what torchrun adds (its ChildFailedError or SignalException traceback, its exit 1, its SIGKILL 30 s on) |
| tools/report.py table on the README's eval of the synthetic set (built into a folder called data) | the table's header said "data" where eval's said "synthetic" | the data set's name from the eval file's config ("dataset"); a file without it: evaluate.dataset_name of its folder (test_report.py) |
| tests/test_data.py's Ctrl-C test under load | SIGINT after a fixed 3 s: flaky when the imports took longer (the signal came before data.py could handle it) | data.py prints "building the <source> set from <input> into OUT ..." before the slow part (an Amazon category takes minutes without a word); the test waits for that line (up to 300 s), then sends SIGINT |
| Ctrl-C in data.py right after "building ..." (while it checks --out can be written) | a .data.py-tmp- folder left beside --out in 4 of 6 tries (mkdtemp's name is known only once it returns) | none left in 6 of 6: the probe's and write_dataset's folders are named before they are made, and their finally removes them (datasets.temporary_name) |
| the suite run from a background shell or nohup (SIGINT ignored, and inherited by every child) | two Ctrl-C tests failed: r2rank.py while torch imports trained into a 120 s timeout, data.py exited 0 | their children start with SIGINT at its default, as a terminal's do (conftest.terminal_sigint) |
| Faults tried beyond the issue (round 4): | | |
| data.py --out a new folder, the set then read by another user or a team's group | mode 0700 (the temporary folder's, renamed): "Permission denied" for everyone else | the mode a plain mkdir gives under the umask (test_data.py) |
| data.py --out /dev/null/x (a file where a parent folder should be) | "cannot write (File exists)" | "--out /dev/null/x: cannot create it (/dev/null is not a directory)", before the build |
| data.py synthetic --start / --end; --start after --end (any source) | accepted and ignored without a word; a backwards window read every file, then "none of its N interactions is from ..." | exit 2 before any work: "the synthetic set is generated without a time window ...; leave them out" / "--start X is after --end Y" (test_data.py) |
| a split file saved with a byte-order mark (Notepad's UTF-8), CRLF line ends | BOM: "malformed JSON (Unexpected UTF-8 BOM ...)" at line 1; CRLF read well | both read as the plain file (test_data.py) |
| SIGTERM during data.py (a job's time limit, `timeout`) | killed where it stood: its temporary folder left beside --out | "data.py: stopped by SIGTERM; nothing written to OUT", exit 143, nothing left (test_data.py) |
| data.py --out holding the temporary folder of a run killed with kill -9 | "holds .data.py-tmp-x/, which is not a data set's file" (as if the user's) | named as a killed data.py's temporary folder, to delete once no data.py runs; kept (test_data.py) |
| --data an empty folder, a missing folder, one of the set's files; a set without valid.jsonl (rl) or test.jsonl (eval) | "X/train.jsonl: cannot read file (No such file or directory / Not a directory)" | "X: not a folder: a data set is the folder data.py writes ..." / "X: no such folder; python data.py SOURCE --out X builds one" / "X/test.jsonl: no such file (X holds train.jsonl, valid.jsonl); a data set of data.py has ..." (test_data.py, test_evaluate.py) |
| eval --split foo | "X/foo.jsonl: cannot read file" | exit 2: "argument --split: invalid choice: 'foo' (choose from train, valid, test)" (test_evaluate.py) |
| --stage sft before --stage sft-data | "OUT/traces.jsonl: cannot read file (No such file or directory)" | "OUT/traces.jsonl: no such file; --stage sft-data writes it (with the same --out), or pass --traces FILE" (test_sft.py) |
| sft-data --traces in a read-only folder (a new file, one to continue, one in a new subfolder); --traces a folder | PermissionError / IsADirectoryError traceback; a file to continue was asked about every pair, then failed on the temporary traces.summary.json.tmp | "--traces X: cannot write there (Permission denied)" / "--traces X: a folder; pass a file, e.g. X/traces.jsonl", before the teacher loads (test_sft.py) |
| sft-data --teacher ./nope (a local teacher that is not there) | "--model ./nope: no such directory" (the wrong flag) | "--teacher ./nope: no such directory (a hub id is org/name)" (test_sft.py) |
| eval --methods sasrec --sasrec sasrec-log.json (the log beside the model), a stats.json, another torch file | torch.load's UnpicklingError traceback ("Weights only load failed ..."), or a KeyError | "--sasrec X: not a model of baselines/sasrec.py (the file it writes is OUT/sasrec.pt); ..." (test_sasrec.py) |
| rl --model a checkpoint copied without its r2rank.json, or with it cut short | FileNotFoundError / JSONDecodeError traceback (the head's width) | "--model X: r2rank.json is missing / unreadable (no head_width), so its head's width is unknown; pass another checkpoint, or --new-head ..." |
| python r2rank.py ... piped into head (or into less, then quit): the reader of the output goes | the next print's BrokenPipeError: a traceback, the run dead, its steps since the last checkpoint lost | the output goes to /dev/null with one note on stderr; the run goes on and ends as it would have |
| python tools/report.py table ... piped into head | BrokenPipeError traceback after head's lines | quiet, exit 141 (128 + SIGPIPE) (test_report.py) |
| a full disk while a metrics.jsonl row is appended (rl, sft; between checkpoints) | OSError traceback | "OUT/metrics.jsonl: cannot write step N's row (No space left on device); free space ..., then continue with --resume ..." (the file closed, so no second error at exit) |
| eval --analyses position (or history-order) with --methods random,popularity | "position": {} written to the eval file, no word | refused before any method runs: "--analyses position reruns the methods that read the prompt (...), and --methods ... has none of them" (test_evaluate.py) |
| tools/report.py curve on a run killed while it wrote a row (its last line cut short) | refused: "FILE:N: malformed JSON" | drawn without that row, with a note on stderr; a bad line elsewhere is still refused (test_report.py) |
| tools/compare.py --out a read-only place | os.makedirs's PermissionError traceback | "error: --out X: cannot create it (Permission denied)", before any run (test_cli.py) |
| Tried and handled well already (no change): | | |
| paths with spaces and non-ASCII letters (data.py --out, rl --out, eval --model / --data / --out, report.py table) | - | every file written and read; the table's header shows the name as it is |
| eval --methods "" / Random / "random,"; --analyses bogus; --eval-limit beyond the split's users | - | one line naming the flag and the choices / the trailing comma ignored / all the users evaluated |
| eval --out an existing file; eval-test.json a folder, with --overwrite | - | "--out X: exists and is not a directory" / "could not write X/eval-test.json (Is a directory); the results are in the table printed above" |
| train.jsonl cut mid-line; a corrupt stats.json in --data | - | "FILE:160: malformed JSON (...)" / eval names the set by its folder |
| --resume into an --out that does not exist; --out the same folder as --data | - | "--resume: no checkpoint in X, so the run starts at step 0" / the run's files beside the set, nothing replaced |
| kill -9 during eval, then eval again | - | nothing written but .r2rank-lock, which blocks nothing: the next eval runs and removes it |
| a hub id with a typo, without a network | - | "--model X: cannot load it (We couldn't connect to 'https://huggingface.co' ...)" |
| data.py --users 0 / -5, --categories-per-user 9, --candidates 1000, --out with a trailing slash | - | one line each ("--users must be >= 10 ...", "... 1 to 8", "no user is left after the protocol (... users_with_too_few_negatives: 200)"); the slash is fine |
| sft --traces a malformed or an empty file; sft-data --teacher-url without http:// | - | "FILE:1: malformed JSON (...)" / "FILE: no traces" / "URL: not an http:// or https:// URL" |
"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import ROOT, read_only, run_cli, terminal_sigint
from head import ScoreHead
from machinery import checkpoints, runs, stops
from protocol import UsageError


def rl(out, data_dir, *args):
    return run_cli("--stage", "rl", "--model", "tiny", "--data", data_dir, "--out", str(out), "--users-per-step", "1",
                   "--max-new-tokens", "4", "--max-history", "2", "--save-every", "1", "--lr", "1e-4", *args)


def steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def test_another_runs_out_is_refused_unless_resumed_or_overwritten(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    assert rl(out, synthetic_dir, "--max-steps", "2").returncode == 0
    again = rl(out, synthetic_dir, "--max-steps", "1")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "holds another run (checkpoint-1, checkpoint-2, metrics.jsonl); pass --resume" in last_line(again)
    assert steps(out) == [1, 2]
    replaced = rl(out, synthetic_dir, "--max-steps", "1", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert steps(out) == [1] and sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1"]


def test_the_built_in_data_never_replaces_a_users_folder(tmp_path):
    """--out X without --data builds the synthetic set in X/data only where nothing of the user's is:
    a X/data holding the user's own files is refused in one line that names one, and kept whole."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "my-reviews.jsonl").write_text("mine\n")
    result = run_cli("--stage", "rl", "--model", "tiny", "--out", str(out), "--max-steps", "1", "--users-per-step", "1",
                     "--max-new-tokens", "4")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds my-reviews.jsonl, not the synthetic set" in last_line(result) and "--data" in last_line(result)
    assert os.listdir(out / "data") == ["my-reviews.jsonl"] and (out / "data" / "my-reviews.jsonl").read_text() == "mine\n"


@pytest.mark.parametrize("kind", ["folder inside", "file"])
def test_overwrite_refuses_a_checkpoint_name_that_holds_what_a_run_does_not_write(kind, tmp_path, synthetic_dir):
    out = tmp_path / "run"
    if kind == "file":
        out.mkdir()
        (out / "checkpoint-1").write_text("mine\n")
    else:
        (out / "checkpoint-1" / "mine").mkdir(parents=True)
        (out / "checkpoint-1" / "mine" / "notes.txt").write_text("mine\n")
    result = rl(out, synthetic_dir, "--max-steps", "1", "--overwrite")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("checkpoint-1 holds mine" if kind == "folder inside" else "checkpoint-1 is not a folder") in last_line(result)
    assert "move it or choose another --out" in last_line(result)
    assert (out / "checkpoint-1" / "mine" / "notes.txt" if kind == "folder inside" else out / "checkpoint-1").read_text() == "mine\n"


def test_resume_refuses_other_defining_settings_and_applies_changed_ones(tmp_path, synthetic_dir):
    out, moved = tmp_path / "run", tmp_path / "moved-data"
    assert rl(out, synthetic_dir, "--max-steps", "2").returncode == 0
    for args, named in [(["--seed", "1"], "--seed 0 -> 1"), (["--max-new-tokens", "5"], "--max-new-tokens 4 -> 5"),
                        (["--advantage", "counterfactual"], "--advantage 'reward' -> 'counterfactual'")]:
        refused = rl(out, synthetic_dir, "--max-steps", "3", "--resume", *args)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr and named in last_line(refused), refused.stderr
    shutil.copytree(synthetic_dir, moved)  # the same data elsewhere is fine; edited data is not
    lines = (moved / "valid.jsonl").read_text().splitlines(True)
    (moved / "valid.jsonl").write_text("".join(lines[:-1]))
    edited = rl(out, str(moved), "--max-steps", "3", "--resume")
    assert edited.returncode == 1 and "the data (" in last_line(edited)
    (moved / "valid.jsonl").write_text("".join(lines))
    resumed = rl(out, str(moved), "--max-steps", "3", "--resume", "--lr", "1e-3", "--head-lr", "0.5")
    assert resumed.returncode == 0, resumed.stderr
    assert "resume at step 2, changed: --head-lr 0.001 -> 0.5, --lr 0.0001 -> 0.001" in resumed.stdout
    saved = os.path.join(out, "checkpoint-3")
    groups = {name: state["param_groups"] for name, state in torch.load(os.path.join(saved, "optimizer.pt"), weights_only=True).items()}
    assert {g["lr"] for g in groups["llm"]} == {1e-3} and {g["lr"] for g in groups["head"]} == {0.5}
    record = json.load(open(os.path.join(saved, "r2rank.json")))
    assert record["changes"] == [{"step": 2, "--head-lr": [1e-3, 0.5], "--lr": [1e-4, 1e-3], "--max-steps": [2, 3]}]
    assert record["config"]["lr"] == 1e-3


def test_resume_cuts_metrics_back_and_says_when_there_is_nothing_to_do(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    assert rl(out, synthetic_dir, "--max-steps", "3").returncode == 0
    shutil.rmtree(out / "checkpoint-3")  # as if killed after step 3 was logged, before its save
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # and in the middle of writing a row
    resumed = rl(out, synthetic_dir, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    assert f"metrics.jsonl rows of step 3 dropped: not in a checkpoint, so they run again from {out}/checkpoint-2" in resumed.stdout
    assert "--resume: 1 unreadable line(s) of metrics.jsonl dropped (cut short by a crash)" in resumed.stdout
    assert steps(out) == [1, 2, 3]  # not 1, 2, 3, 3
    done = rl(out, synthetic_dir, "--max-steps", "3", "--resume")
    assert done.returncode == 0 and "at --max-steps 3 already: nothing to train" in done.stdout
    past = rl(out, synthetic_dir, "--max-steps", "2", "--resume")
    assert past.returncode == 1 and "already past --max-steps 2" in last_line(past)
    fresh = rl(tmp_path / "new", synthetic_dir, "--max-steps", "1", "--resume")
    assert fresh.returncode == 0 and "--resume: no checkpoint in" in fresh.stdout and steps(tmp_path / "new") == [1]


def test_a_signal_keeps_every_finished_step_and_exits_with_one_line(tmp_path, synthetic_dir):
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signum.name
        process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "r2rank.py"), "--stage", "rl", "--model", "tiny", "--data", synthetic_dir,
             "--out", str(out), "--users-per-step", "1", "--max-new-tokens", "4", "--max-history", "2",
             "--max-steps", "1000", "--save-every", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics, deadline = out / "metrics.jsonl", time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
            time.sleep(0.2)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 128 + signum, stderr
        last = steps(out)[-1]
        kept = f"step {last}" if last == 1 else f"steps 1-{last}"
        assert "Traceback" not in stderr and f"{kept} kept in {out}/checkpoint-{last}; continue with --resume" in stderr, stderr
        assert os.path.isdir(out / f"checkpoint-{last}") and 2 <= last < 1000
    resumed = run_cli("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "1",
                      "--max-new-tokens", "4", "--max-history", "2", "--max-steps", str(last + 1), "--save-every", "1000", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert steps(out) == list(range(1, last + 2))


def test_resume_skips_a_checkpoint_whose_config_or_tokenizer_is_not_json(tmp_path, synthetic_dir):
    """The README says --resume skips broken checkpoints; one whose config.json was cut mid-write was not
    skipped (from_pretrained's traceback instead)."""
    out = tmp_path / "run"
    assert rl(out, synthetic_dir, "--max-steps", "3", "--keep-checkpoints", "0").returncode == 0
    (out / "checkpoint-3" / "config.json").write_text('{"architectures": ["Qwen2')
    (out / "checkpoint-2" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    resumed = rl(out, synthetic_dir, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    for step, name in ((3, "config.json"), (2, "tokenizer.json")):
        assert f"--resume: {out}/checkpoint-{step} is broken ({name} is unreadable (not JSON)), so it is skipped" in resumed.stdout
    assert f"resumed from {out}/checkpoint-1 at step 1" in resumed.stdout


def test_resume_skips_each_broken_checkpoint_and_names_its_broken_file(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    assert rl(out, synthetic_dir, "--max-steps", "3", "--keep-checkpoints", "0").returncode == 0  # checkpoint-1, -2, -3
    (out / "checkpoint-3" / "r2rank.json").unlink()
    weights = out / "checkpoint-2" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 100)
    (out / "checkpoint-9").mkdir()  # a crash mid-save, on a file system without atomic rename
    resumed = rl(out, synthetic_dir, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    for step, problem in [(9, "r2rank.json is missing or unreadable"), (3, "r2rank.json is missing or unreadable"),
                          (2, f"model.safetensors is truncated ({size - 100} of {size} bytes)")]:
        assert f"--resume: {out}/checkpoint-{step} is broken ({problem}), so it is skipped" in resumed.stdout
    assert f"resumed from {out}/checkpoint-1 at step 1" in resumed.stdout and steps(out) == [1, 2, 3]
    # --keep-checkpoints 2 (the default) kept the two it wrote, not the broken checkpoint-9 above them
    assert runs.checkpoint_steps(out) == [2, 3, 9]
    for step in (2, 3):
        os.truncate(out / f"checkpoint-{step}" / "optimizer.pt", 1000)
    none_whole = rl(out, synthetic_dir, "--max-steps", "3", "--resume")
    assert none_whole.returncode == 1 and "optimizer.pt is missing or truncated" in none_whole.stdout
    assert last_line(none_whole) == f"error: --resume: no checkpoint in {out} is whole (each is named above); --overwrite starts the run again"


def test_a_damaged_checkpoint_given_as_model_names_its_file(tmp_path, synthetic_dir):
    """--model a checkpoint whose model.safetensors (eval, rl) or head.safetensors (eval) is cut short:
    one line naming the file, before any work (--resume skips such a checkpoint; --model has no other)."""
    assert rl(tmp_path / "run", synthetic_dir, "--max-steps", "1").returncode == 0
    for broken in ("model.safetensors", "head.safetensors"):
        checkpoint = tmp_path / broken / "checkpoint-1"
        shutil.copytree(tmp_path / "run" / "checkpoint-1", checkpoint)
        size = (checkpoint / broken).stat().st_size
        os.truncate(checkpoint / broken, size - 50)
        stages = [["--stage", "eval", "--methods", "r2rank", "--no-baseline", "--max-new-tokens", "4"]]
        stages += [["--stage", "rl", "--max-steps", "1", "--users-per-step", "1", "--max-new-tokens", "4"]] * (broken == "model.safetensors")
        for stage in stages:
            result = run_cli(*stage, "--model", str(checkpoint), "--data", synthetic_dir, "--out", str(tmp_path / f"out-{broken}"))
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert f"{broken} is truncated ({size - 50} of {size} bytes)" in last_line(result) and str(checkpoint) in last_line(result)


def test_the_safetensors_check_agrees_with_the_safetensors_loader(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.arange(5)}, str(path))
    whole = path.read_bytes()
    assert runs.safetensors_problem(str(path)) is None and set(load_file(str(path))) == {"a", "b"}
    for cut in (4, 20, len(whole) - 60, len(whole) - 1):  # inside the length, the header, the data
        path.write_bytes(whole[:cut])
        with pytest.raises(Exception):
            load_file(str(path))
        assert runs.safetensors_problem(str(path)) is not None
    assert runs.safetensors_problem(str(tmp_path / "none.safetensors")) == "none.safetensors is missing"


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, synthetic_dir):
    # /sys cannot be written even by root; a missing --model shows that the check comes before the model loads
    for out, message in [("/sys/r2rank-out", "cannot create it"), ("/sys/kernel", "cannot write into it")]:
        refused = run_cli("--stage", "rl", "--model", str(tmp_path / "no-model"), "--data", synthetic_dir, "--out", out)
        assert refused.returncode == 1 and refused.stderr.startswith(f"error: --out {out}: {message} ("), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_non_finite_numbers_or_weights_are_found():
    head = torch.nn.Linear(2, 1)
    optimizers = {"head": torch.optim.AdamW(head.parameters())}
    assert runs.non_finite({"step": 1, "reward": 0.5}, optimizers) is None
    assert runs.non_finite({"step": 1, "reward": float("nan"), "head_loss": float("inf")}, optimizers) == "non-finite reward, head_loss"
    with torch.no_grad():
        head.weight[0, 1] = float("inf")
    assert runs.non_finite({"step": 1, "reward": 0.5}, optimizers) == "non-finite weights (head)"


def test_non_finite_weights_stop_the_run_before_the_step_is_written(tmp_path, synthetic_dir):
    from safetensors.torch import load_file, save_file

    first = tmp_path / "first"
    assert rl(first, synthetic_dir, "--max-steps", "1").returncode == 0
    head_file = str(first / "checkpoint-1" / "head.safetensors")
    weights = load_file(head_file)
    weights["net.3.weight"][0, 0] = float("nan")  # as a learning rate too high would leave it
    save_file(weights, head_file)
    out = tmp_path / "second"
    stopped = rl(out, synthetic_dir, "--max-steps", "2", "--model", str(first / "checkpoint-1"))
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert last_line(stopped).startswith("error: step 1: non-finite ") and "so the run stops without writing this step" in last_line(stopped)
    assert (out / "metrics.jsonl").read_text() == "" and not runs.checkpoint_steps(out)


def test_stop_on_signal_drops_abandonable_work_at_once_and_a_second_ctrl_c_stops_now():
    before = signal.getsignal(signal.SIGTERM)
    with stops.StopOnSignal("checkpoint-7") as stop:
        started = time.time()
        with pytest.raises(stops.Abandoned):
            with stop.abandonable():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this at once
        assert time.time() - started < 2 and stop.requested == signal.SIGTERM
        with pytest.raises(stops.Abandoned):  # a stop already asked for: the next abandonable work does not start
            with stop.abandonable():
                pass
        with stop.abandonable(allowed=False):  # under torchrun: the work finishes
            pass
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back


def test_sigterm_during_a_long_rollout_stops_at_once_and_keeps_the_finished_steps(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "r2rank.py"), "--stage", "rl", "--model", "tiny", "--data", synthetic_dir,
         "--out", str(out), "--users-per-step", "1", "--max-new-tokens", "400", "--max-history", "2", "--threads", "1",
         "--max-steps", "1000", "--save-every", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    started = time.time()  # step 1 is logged; step 2's rollout (400 tokens for each of 20 traces) has begun
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    stopped_in, step_1 = time.time() - started, json.loads(metrics.read_text().splitlines()[0])["step_time"]
    # waiting for step 2's rollout would take about as long as step 1's: a quarter of it (at least 3 s) is "at once",
    # on a quiet machine as under load
    assert process.returncode == 143 and stopped_in < max(3.0, step_1 / 4), (stopped_in, step_1, stderr)
    assert f"stopped by SIGTERM: step 2 was still rolling out and is dropped; step 1 kept in {out}/checkpoint-1; " \
           "continue with --resume" in stderr, stderr
    assert steps(out) == [1] and runs.checkpoint_steps(out) == [1] and runs.checkpoint_problem(out / "checkpoint-1") is None


def test_a_collapsed_score_spread_is_warned_about_once(tmp_path, synthetic_dir, monkeypatch, capsys):
    import r2rank

    score = r2rank.score_traces  # scores 1e-9 times the head's: a spread like that of a head blown up by a huge --lr
    monkeypatch.setattr(r2rank, "score_traces", lambda head, traces: score(head, traces) * 1e-9)
    r2rank.main(["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(tmp_path / "run"), "--users-per-step",
                 "1", "--max-new-tokens", "2", "--max-history", "2", "--max-steps", "2", "--freeze-llm"])
    printed = capsys.readouterr().out
    assert printed.count("the head's scores have collapsed") == 1 and "warning: step 1:" in printed


def test_out_of_memory_and_an_interrupted_eval_are_one_line(tmp_path, monkeypatch, capsys):
    import evaluate
    import r2rank

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(r2rank, "train_rl", out_of_memory)
    monkeypatch.setattr(evaluate, "run_eval", interrupted)
    for stage, status, message in [("rl", 1, "error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower"),
                                   ("eval", 130, "interrupted: the evaluation stopped before writing its results; nothing was written")]:
        with pytest.raises(SystemExit) as stopped:
            r2rank.main(["--stage", stage, "--model", "tiny", "--out", str(tmp_path / stage)])
        err = capsys.readouterr().err
        assert stopped.value.code == status and err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_saves_and_checkpoints_on_disk_counted_by_hand():
    assert checkpoints.saves_planned(0, 500, 50) == 10  # 50, 100, ..., 500
    assert checkpoints.saves_planned(0, 100, 30) == 4  # 30, 60, 90 and the end, 100
    assert checkpoints.saves_planned(45, 100, 30) == 3  # resumed at 45: 60, 90, 100
    assert checkpoints.saves_planned(90, 100, 30) == 1  # 100
    assert checkpoints.saves_planned(0, 7, 50) == 1  # only the end
    assert checkpoints.saves_planned(100, 100, 30) == 0  # nothing to train
    assert checkpoints.checkpoints_at_once(10, 0) == 10  # keep all
    assert checkpoints.checkpoints_at_once(10, 2) == 3  # 2 kept while the 3rd is written, then the oldest pruned
    assert checkpoints.checkpoints_at_once(2, 2) == 2 and checkpoints.checkpoints_at_once(1, 5) == 1  # never more than the saves
    assert checkpoints.checkpoints_at_once(10, 2, existing=2) == 3  # a resume: one more than the two there
    assert checkpoints.checkpoints_at_once(10, 2, existing=5) == 6  # 5 from a keep-all run: the first save prunes them to 2
    assert checkpoints.checkpoints_at_once(10, 3, existing=1) == 4  # 1 there, 2 more, and the 4th being written
    assert checkpoints.checkpoints_at_once(0, 2, existing=4) == 4


def test_check_disk_refuses_what_does_not_fit_and_counts_what_a_run_already_holds(tmp_path, monkeypatch):
    asked, free = [], {"bytes": 0}
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: asked.append(path) or types.SimpleNamespace(free=free["bytes"]))
    gb = 10 ** 9
    out = tmp_path / "not" / "yet" / "run"
    free["bytes"] = 56 * gb  # 3 checkpoints of 18.5 GB at once (--keep-checkpoints 2) = 55.5 GB
    assert checkpoints.check_disk(str(out), int(18.5 * gb), 10, 2) == int(18.5 * gb) * 3
    assert asked == [str(tmp_path)]  # the nearest parent that exists: out is created there
    free["bytes"] = 55 * gb
    with pytest.raises(UsageError) as refused:
        checkpoints.check_disk(str(out), int(18.5 * gb), 10, 2)
    assert str(refused.value) == (f"--out {out}: the checkpoints need 55.5 GB (3 of 18.5 GB at once: 10 saves, --keep-checkpoints 2 "
                                  "plus the one being written) but 55.0 GB are free there; keep fewer (--keep-checkpoints), save "
                                  "fewer (--save-every / --max-steps), train LoRA adapters (--lora-rank), or choose another --out")
    free["bytes"] = 184 * gb  # keep all: 10 x 18.5 = 185 GB
    with pytest.raises(UsageError, match=r"need 185\.0 GB \(10 of 18\.5 GB at once: 10 saves, all kept"):
        checkpoints.check_disk(str(out), int(18.5 * gb), 10, 0)
    # a resume into a run holding 2 checkpoints adds only the one being written; --overwrite frees what is there
    for step in (1, 2):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"0" * 1000)
    free["bytes"] = 1000
    assert checkpoints.check_disk(str(out), 1000, 10, 2) == 1000
    with pytest.raises(UsageError, match=r"need 1 kB \(1 of 1 kB at once: .*\) but 1 kB are free there; keep fewer"):
        checkpoints.check_disk(str(out), 1001, 10, 2)
    # sizes a person reads (a tiny model's checkpoint was "0.0 GB"), and no "keep fewer" at --keep-checkpoints 1
    with pytest.raises(UsageError) as refused:
        checkpoints.check_disk(str(tmp_path / "other"), 93 * 10 ** 6, 10, 1)
    assert "need 186 MB (2 of 93 MB at once: 10 saves, --keep-checkpoints 1 plus the one being written) but 1 kB" in str(refused.value)
    assert "keep fewer" not in str(refused.value) and "; save fewer" in str(refused.value)
    assert checkpoints.check_disk(str(out), 1000, 3, 0, overwrite=True) == 3000  # 1000 free + the 2000 removed
    with pytest.raises(UsageError):
        checkpoints.check_disk(str(out), 1000, 4, 0, overwrite=True)


def test_checkpoint_bytes_of_the_tiny_model_by_hand():
    from machinery import models

    model, tokenizer = models.build_tiny()
    vocab, hidden, ffn, layers, kv = len(tokenizer), 64, 256, 2, 32  # 2 key-value heads of 16
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden  # q, k, v with biases; o
    per_layer = attention + 3 * hidden * ffn + 2 * hidden  # gate, up, down; two RMSNorms
    weights = vocab * hidden + layers * per_layer + hidden  # the embedding, tied to lm_head: once
    head = ScoreHead(hidden, 8)
    head_weights = sum(p.numel() for p in head.parameters())
    full = {"llm": torch.optim.AdamW(model.parameters()), "head": torch.optim.AdamW(head.parameters())}
    assert checkpoints.checkpoint_bytes(model, full, head) == 4 * weights + 8 * (weights + head_weights) + 4 * head_weights \
        + checkpoints.TOKENIZER_BYTES
    adapters = models.add_adapters(model, 4)  # rank 4: A [4, in], B [out, 4] beside q, k, v, o, gate, up, down
    lora = layers * 4 * ((hidden + hidden) + 2 * (hidden + kv) + (hidden + hidden) + 2 * (hidden + ffn) + (ffn + hidden))
    assert sum(p.numel() for p in adapters) == lora
    assert checkpoints.checkpoint_bytes(model, {"llm": torch.optim.AdamW(adapters)}) == 4 * (weights + lora) + 8 * lora \
        + checkpoints.TOKENIZER_BYTES


def test_checkpoint_bytes_bounds_a_saved_checkpoint(tmp_path):
    from machinery import config, models

    model, tokenizer = models.build_tiny()
    head = ScoreHead(64, 8)
    optimizers = {"llm": torch.optim.AdamW(model.parameters()), "head": torch.optim.AdamW(head.parameters())}
    (model(torch.tensor([[1, 2, 3]])).logits.sum() + head(torch.randn(2, 64)).sum()).backward()
    for optimizer in optimizers.values():  # AdamW makes its states at the first step
        optimizer.step()
    saved = checkpoints.save_checkpoint(str(tmp_path), 1, model, tokenizer, head, optimizers, config.Config())
    estimate = checkpoints.checkpoint_bytes(model, optimizers, head) - checkpoints.TOKENIZER_BYTES
    written = checkpoints.tree_bytes(saved) - sum(os.path.getsize(os.path.join(saved, name)) for name in os.listdir(saved)
                                           if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")))
    assert 0.95 * estimate < written < estimate + 100_000, (written, estimate)  # headers, pickling, JSON


# ------------------------------------------------------------------------------------- round 3


def test_overwrite_never_deletes_what_the_run_reads(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    assert rl(out, synthetic_dir, "--max-steps", "2").returncode == 0
    start = str(out / "checkpoint-2")
    for extra, refusal in [(["--overwrite"], f"error: --overwrite would delete --model {start}, which this run reads; "
                            "start the new run in another --out"),
                           ([], f"error: {out}: holds another run (checkpoint-1, checkpoint-2, metrics.jsonl); pass --resume to "
                            f"continue it, or another --out (--overwrite would delete --model {start}, which this run reads)"),
                           (["--overwrite", "--resume"], "error: --resume continues the run in --out and --overwrite replaces it: "
                            "pass one of them")]:
        refused = rl(out, synthetic_dir, "--max-steps", "1", "--model", start, *extra)
        assert refused.returncode == 1 and refused.stderr.strip() == refusal, refused.stderr
    assert runs.checkpoint_steps(out) == [1, 2] and steps(out) == [1, 2]  # nothing was deleted
    elsewhere = rl(tmp_path / "next", synthetic_dir, "--max-steps", "1", "--model", start)
    assert elsewhere.returncode == 0, elsewhere.stderr
    # the baselines' rule (runs.plan_command): --model, --data inside a checkpoint of --out; --resume with --overwrite
    settings = {"out": str(out), "resume": False, "overwrite": True, "model": "tiny", "data": synthetic_dir}
    for name, path in [("model", start), ("data", str(out / "checkpoint-1"))]:
        with pytest.raises(UsageError, match=f"--overwrite would delete --{name} {path}, which this run reads"):
            runs.plan_command({**settings, name: path}, path if name == "data" else synthetic_dir, 3)
    with pytest.raises(UsageError, match="--resume continues the run in --out and --overwrite replaces it"):
        runs.plan_command({**settings, "resume": True}, synthetic_dir, 3)
    assert runs.plan_command(settings, synthetic_dir, 3).overwrite  # --model tiny: nothing in --out is read


def test_a_failed_save_keeps_the_checkpoint_before_it_and_says_so_in_one_line(tmp_path, synthetic_dir, monkeypatch, capsys):
    import r2rank
    import transformers

    save_pretrained = transformers.PreTrainedModel.save_pretrained

    def full_at_step_2(model, directory, *args, **kwargs):
        save_pretrained(model, directory, *args, **kwargs)  # part of the checkpoint is written, then the disk is full
        if directory.endswith("checkpoint-2"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_at_step_2)
    out = tmp_path / "run"
    argv = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "1",
            "--max-new-tokens", "4", "--max-history", "2", "--save-every", "1", "--max-steps", "3", "--threads", "1"]
    with pytest.raises(SystemExit) as stopped:
        r2rank.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 1 and err.startswith(f"error: step 2: saving {out}/checkpoint-2 failed (No space left on device: ")
    assert re.search(r"\d (GB|MB|kB|bytes) free there; free space, keep fewer checkpoints \(--keep-checkpoints\) or choose "
                     "another --out", err), err  # the free space in units a person reads (checkpoints.size_text)
    assert err.endswith(f"kept {out}/checkpoint-1 and metrics.jsonl up to step 1; then continue with --resume"), err
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl"]  # no .tmp-checkpoint-2, no lock left
    assert steps(out) == [1] and runs.checkpoint_problem(str(out / "checkpoint-1")) is None
    monkeypatch.undo()
    resumed = rl(out, synthetic_dir, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0 and f"resumed from {out}/checkpoint-1 at step 1" in resumed.stdout, resumed.stderr
    assert steps(out) == [1, 2, 3]


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, synthetic_dir):
    from conftest import run_script

    out = tmp_path / "run"
    held = f"error: {out} is in use by another run (pid {os.getpid()}); wait for it or choose another --out"
    with stops.claim(str(out)):  # as a run started before would hold it (in another process)
        assert (out / stops.LOCK).read_text().split()[0] == str(os.getpid())
        for result in [rl(out, synthetic_dir, "--max-steps", "1"),
                       run_script(f"{ROOT}/baselines/sasrec.py", "--data", synthetic_dir, "--out", str(out), "--epochs", "1", cwd=ROOT),
                       run_script(f"{ROOT}/baselines/reczero.py", "--data", synthetic_dir, "--model", "tiny", "--out", str(out), cwd=ROOT)]:
            assert result.returncode == 1 and result.stderr.strip() == held, result.stderr
        assert os.listdir(out) == [stops.LOCK]  # nothing written
    assert not out.exists()  # let go; made for the claim, and left empty: removed
    # a run killed with SIGKILL leaves its lock file, with no lock on it: it blocks nothing
    out.mkdir()
    (out / stops.LOCK).write_text("4194303 some-host\n")
    assert rl(out, synthetic_dir, "--max-steps", "1").returncode == 0
    assert steps(out) == [1] and not (out / stops.LOCK).exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock_file(existing, tmp_path, monkeypatch):
    """ENOSPC on writing .r2rank-lock (the first write of rl, eval and sft-data): a UsageError naming the
    file, no empty lock file left, and an --out made for the run removed again."""
    out = tmp_path / "run"
    if existing:
        out.mkdir()

    def full(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "ftruncate", full)
    with pytest.raises(UsageError, match=rf"^--out {out}: cannot write \.r2rank-lock there \(No space left on device\)"):
        stops.claim(str(out))
    assert (os.listdir(out) == []) if existing else not out.exists()


def test_a_stop_before_any_step_is_kept_leaves_nothing_that_refuses_the_same_command(tmp_path, synthetic_dir, monkeypatch, capsys):
    import r2rank
    import rollout
    from machinery import rl_run

    def stop_inside(function, skip):
        calls = []

        def stopped(*args, **kwargs):
            calls.append(1)
            if len(calls) > skip:  # the rollout: after step 0's validation (which rolls out too) was logged
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while it runs, as a Ctrl-C would
                time.sleep(5)
            return function(*args, **kwargs)
        return stopped

    out = tmp_path / "run"
    argv = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "1",
            "--max-new-tokens", "4", "--max-history", "2", "--max-steps", "1", "--eval-every", "1", "--eval-users", "1"]
    for target, name, skip, message in [(rl_run, "validate", 0, "stopped before step 1; nothing was written but the data"),
                                        (rollout, "rollout_users", 1, "step 1 was still rolling out and is dropped; no step "
                                         "had finished, so nothing was written but the data")]:
        with monkeypatch.context() as patch:
            patch.setattr(target, name, stop_inside(getattr(target, name), skip))
            with pytest.raises(SystemExit) as stopped:
                r2rank.main(argv)
        assert stopped.value.code == 143 and f"stopped by SIGTERM: {message}\n" in capsys.readouterr().err
        assert runs.run_files(out) == [] and not (out / "metrics.jsonl").exists()
    again = rl(out, synthetic_dir, "--max-steps", "1")  # the same command, not refused
    assert again.returncode == 0 and steps(out) == [1], again.stderr
    # --resume with no checkpoint starts again at step 0, without the rows of the earlier start
    shutil.rmtree(out / "checkpoint-1")
    resumed = rl(out, synthetic_dir, "--max-steps", "2", "--resume")
    assert resumed.returncode == 0 and f"--resume: no checkpoint in {out}, so the run starts at step 0 (metrics.jsonl of the " \
        "earlier start removed)" in resumed.stdout
    assert steps(out) == [1, 2]
    empty = tmp_path / "crashed"  # an empty metrics.jsonl (a crash before the first row) is not a run
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert runs.run_files(empty) == []


def test_sigterm_under_torchrun_stops_every_rank_with_one_line(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "r2rank.py"), "--stage", "rl",
         "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "2", "--max-new-tokens", "4",
         "--max-history", "2", "--max-steps", "1000", "--save-every", "1000"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.1)
    for rank in open(f"/proc/{process.pid}/task/{process.pid}/children").read().split():  # the two ranks
        os.kill(int(rank), signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    last = steps(out)[-1]
    line = f"stopped by SIGTERM: {runs.steps_text(1, last)} kept in {out}/checkpoint-{last}; continue with --resume"
    assert stderr.count("stopped by SIGTERM") == 1 and line in stderr, stderr[-3000:]
    assert stderr.count("exitcode  : 143") == 2, stderr[-3000:]  # torchrun's report: both ranks stopped with 128 + 15
    assert runs.checkpoint_steps(out) == [last] and runs.checkpoint_problem(str(out / f"checkpoint-{last}")) is None


# ------------------------------------------------------------------------------------- round 4


@pytest.mark.parametrize("fails_at", [1, 2])
def test_an_out_made_read_only_during_a_run_is_named_by_its_flag(fails_at, tmp_path, synthetic_dir, monkeypatch, capsys):
    """--out turned read-only (chmod 555) while rl runs, so checkpoint-<fails_at> cannot be saved: one line
    naming --out and the cause, not the temporary .tmp-checkpoint-<step> (before: a PermissionError traceback
    naming it, then two more from the clean-up, metrics.jsonl and .r2rank-lock); the checkpoint before it kept."""
    import r2rank
    import transformers

    save_pretrained, out = transformers.PreTrainedModel.save_pretrained, tmp_path / "run"

    def read_only_at_the_save(model, directory, *args, **kwargs):
        if directory.endswith(f"checkpoint-{fails_at}"):
            read_only(out, monkeypatch)
        return save_pretrained(model, directory, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", read_only_at_the_save)
    argv = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "1",
            "--max-new-tokens", "1", "--max-history", "0", "--save-every", "1", "--max-steps", "3", "--threads", "1"]
    try:
        with pytest.raises(SystemExit) as stopped:
            r2rank.main(argv)
    finally:
        monkeypatch.undo()
        os.chmod(out, 0o755)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err and ".tmp" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: step {fails_at}: saving {out}/checkpoint-{fails_at} failed (Permission denied: --out {out} cannot be "
        "written now; make it writable); " + (f"kept {out}/checkpoint-1 and metrics.jsonl up to step 1; then continue with "
                                              "--resume" if fails_at == 2 else "no earlier checkpoint, so nothing is kept "
                                              "(metrics.jsonl as it is); then run it again with --overwrite"))
    assert runs.checkpoint_steps(out) == ([1] if fails_at == 2 else []) and not (out / f".tmp-checkpoint-{fails_at}").exists()


@pytest.mark.parametrize("stage", ["rl", "eval", "sft-data"])
def test_a_read_only_out_is_refused_naming_its_flag_before_any_work(stage, tmp_path, synthetic_dir, monkeypatch, capsys):
    """A read-only --out (chmod 555), or a new --out inside one: one line naming --out, before the model loads."""
    import r2rank

    folder = tmp_path / "read-only"
    folder.mkdir()
    for out, message in [(folder, "cannot write into it"), (folder / "new", "cannot create it")]:
        read_only(folder, monkeypatch)
        try:
            with pytest.raises(SystemExit) as stopped:
                r2rank.main(["--stage", stage, "--model", str(tmp_path / "no-model"), "--teacher", "tiny", "--data",
                             synthetic_dir, "--out", str(out), "--threads", "1"])
        finally:
            monkeypatch.undo()
            os.chmod(folder, 0o755)
        err = capsys.readouterr().err
        assert stopped.value.code == 1 and err == f"error: --out {out}: {message} (Permission denied)\n", err
        assert os.listdir(folder) == []


def test_a_failed_write_is_told_by_its_cause_without_the_temporary_path(tmp_path):
    """The errors a failed save raises, as safetensors and torch.save word them (seen as a user without write
    permission): the cause, not the temporary file they name (safetensors writes into .tmpXXXXXX beside the file)."""
    from safetensors import SafetensorError

    out = str(tmp_path)
    denied = [OSError(errno.EACCES, "Permission denied", f"{out}/.tmp-checkpoint-2"),
              SafetensorError(f'Error while serializing: I/O error: Permission denied (os error 13) at path "{out}/.tmpGpWxj3"'),
              RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Permission denied"),
              OSError(errno.EROFS, "Read-only file system", f"{out}/.tmp-checkpoint-2")]
    for error in denied:
        text = checkpoints.write_failure(out, error)
        assert text.endswith(f": --out {out} cannot be written now; make it writable") and ".tmp" not in text, text
        assert text.startswith(("Permission denied:", "Read-only file system:")), text
    full = checkpoints.write_failure(out, SafetensorError(f'I/O error: No space left on device (os error 28) at path "{out}/.tmpAb"'))
    assert full.startswith("No space left on device: ") and "free there; free space" in full and ".tmp" not in full


def test_ctrl_c_under_torchrun_keeps_the_step_and_every_rank_exits_130(tmp_path, synthetic_dir):
    """A terminal's Ctrl-C reaches every process of the group, torchrun included, and torchrun sends each rank
    the SIGINT it got: each rank gets the same Ctrl-C twice. When the copy came after the first was handled,
    it read as a second Ctrl-C ("stopping now"): the step in progress and its checkpoint were lost, and every
    rank printed it. Here the ranks get SIGINT, then the copy 0.3 s later; torchrun reports each rank's status."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "r2rank.py"),
         "--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "2",
         "--max-new-tokens", "4", "--max-history", "2", "--max-steps", "1000", "--save-every", "1000"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        preexec_fn=terminal_sigint)  # as from a terminal, also when the suite runs in the background
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.1)
    ranks = [int(pid) for pid in open(f"/proc/{process.pid}/task/{process.pid}/children").read().split()]
    for copy in range(2):  # the terminal's SIGINT, then torchrun's copy of it
        for rank in ranks:
            os.kill(rank, signal.SIGINT)
        time.sleep(0.3)
    _, stderr = process.communicate(timeout=300)
    last = steps(out)[-1]
    line = f"stopped by SIGINT: {runs.steps_text(1, last)} kept in {out}/checkpoint-{last}; continue with --resume"
    assert stderr.count("stopped by SIGINT") == 1 and line in stderr and "SIGINT again" not in stderr, stderr[-3000:]
    assert stderr.count("exitcode  : 130") == 2, stderr[-3000:]  # torchrun's report: both ranks stopped with 128 + 2
    assert runs.checkpoint_steps(out) == [last] and runs.checkpoint_problem(str(out / f"checkpoint-{last}")) is None


def test_a_checkpoint_without_its_r2rank_json_as_model_is_one_line(tmp_path, synthetic_dir):
    """--model a checkpoint whose r2rank.json is missing or cut short (copied in part), for rl: it was
    FileNotFoundError's or JSONDecodeError's traceback from reading the head's width. --new-head starts a new
    head on its model instead."""
    assert rl(tmp_path / "run", synthetic_dir, "--max-steps", "1").returncode == 0
    checkpoint = tmp_path / "copy"
    shutil.copytree(tmp_path / "run" / "checkpoint-1", checkpoint)
    for damage, reason in [(lambda: (checkpoint / "r2rank.json").write_text('{"step": 1, "conf'), "unreadable (no head_width)"),
                           (lambda: (checkpoint / "r2rank.json").unlink(), "missing")]:
        damage()
        result = rl(tmp_path / f"out-{reason[:7]}", synthetic_dir, "--max-steps", "1", "--model", str(checkpoint))
        assert result.returncode == 1 and last_line(result) == (
            f"error: --model {checkpoint}: r2rank.json is {reason}, so its head's width is unknown; pass another checkpoint, "
            "or --new-head to start a new head on this model"), result.stderr
    fresh = rl(tmp_path / "new-head", synthetic_dir, "--max-steps", "1", "--model", str(checkpoint), "--new-head")
    assert fresh.returncode == 0 and steps(tmp_path / "new-head") == [1], fresh.stderr


def test_a_run_outlives_the_reader_of_its_output(tmp_path, synthetic_dir):
    """`python r2rank.py ... | head -1` (or quitting `| less`): the next print raised BrokenPipeError and the run
    died with a traceback, its steps since the last checkpoint lost. Now it goes on without printing, says so
    once, and ends as it would have."""
    out = tmp_path / "run"
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before the first line (head -0; or head -1 a line later)
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "r2rank.py"), "--stage", "rl", "--model", "tiny", "--data", synthetic_dir,
         "--out", str(out), "--users-per-step", "1", "--max-new-tokens", "1", "--max-history", "0", "--max-steps", "20",
         "--save-every", "10", "--threads", "1"], cwd=ROOT, stdout=writer, stderr=subprocess.PIPE, text=True)
    os.close(writer)
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("note: the reader of this output has gone") == 1
    assert steps(out) == list(range(1, 21)) and runs.checkpoint_steps(out) == [10, 20]


def test_a_full_disk_at_a_metrics_row_is_one_line(tmp_path, synthetic_dir, monkeypatch, capsys):
    """The disk fills while step 2's row is appended to metrics.jsonl (between checkpoints): it was the OSError's
    traceback. One line naming the file; --resume then continues from checkpoint-1."""
    import io

    import r2rank
    from machinery import rl_run

    class FillsAtStep2(io.StringIO):
        def __init__(self, real):
            super().__init__()
            self.real, self.name = real, real.name

        def write(self, text):
            if '"step": 2' in text:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.real.write(text)

        def flush(self):
            self.real.flush()

        def close(self):
            self.real.close()

    opened = rl_run.Bookkeeper.__init__

    def with_a_disk_that_fills(book, *args):
        opened(book, *args)
        book.metrics_file = FillsAtStep2(book.metrics_file)

    monkeypatch.setattr(rl_run.Bookkeeper, "__init__", with_a_disk_that_fills)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        r2rank.main(["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", str(out), "--users-per-step", "1",
                     "--max-new-tokens", "1", "--max-history", "0", "--save-every", "1", "--max-steps", "3"])
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: {out}/metrics.jsonl: cannot write step 2's row (No space left on device); "
                                            "free space (or make --out writable), then continue with --resume from the newest "
                                            "checkpoint")
    monkeypatch.undo()
    resumed = rl(out, synthetic_dir, "--max-steps", "3", "--resume", "--max-new-tokens", "1", "--max-history", "0")
    assert resumed.returncode == 0 and f"resumed from {out}/checkpoint-1 at step 1" in resumed.stdout and steps(out) == [1, 2, 3]
