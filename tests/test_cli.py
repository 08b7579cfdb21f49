"""The command line: every numeric flag's bounds, the flags that do not go together, --help, bad data, and
every script of baselines/ and tools/ starting from the repository root. Each refusal is one line, before
any work."""
import argparse
import glob
import json
import os

import pytest

import r2rank
from conftest import ROOT, run_script

DEFAULTS = vars(r2rank.parse_args([]))
NUMERIC = sorted(name for name, value in DEFAULTS.items() if type(value) in (int, float))


def refusal(argv, capsys):
    """parse_args(argv)'s exit status and the last line it printed on stderr."""
    with pytest.raises(SystemExit) as stopped:
        r2rank.parse_args(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return stopped.value.code, err.strip().splitlines()[-1]


def test_there_are_numeric_flags_to_check():
    assert {"lr", "head_lr", "max_steps", "temperature", "pl_std", "seed", "micro_batch", "keep_checkpoints"} <= set(NUMERIC)


@pytest.mark.parametrize("name", NUMERIC)
def test_a_numeric_flag_out_of_bounds_is_one_line(name, capsys):
    flag = "--" + name.replace("_", "-")
    for value in ("-1", "nan", "inf", "-inf"):
        status, line = refusal([flag, value], capsys)
        assert status == 2 and ": error: " in line and flag in line, (value, line)  # argparse: "PROG: error: ..."


@pytest.mark.parametrize("argv, allowed, text", [
    (["--temperature", "0"], [["--temperature", "0", "--freeze-llm"], ["--stage", "eval", "--temperature", "0"]],
     "--temperature 0 samples greedy traces, which have no policy gradient"),
    (["--num-rankings", "1"], [["--num-rankings", "1", "--no-baseline"]], "--baseline needs --num-rankings >= 2"),
    (["--advantage", "batch", "--users-per-step", "1"], [["--advantage", "batch", "--users-per-step", "2"]],
     "--advantage batch needs --users-per-step >= 2"),
    (["--max-new-tokens", "0", "--no-score-path"], [["--max-new-tokens", "0"], ["--max-new-tokens", "0", "--no-score-path",
                                                                                  "--freeze-llm"]], "gives the LLM no gradient"),
    (["--lr", "2"], [["--lr", "1"]], "--lr must be a finite number >= 0 and <= 1, got 2.0"),
    (["--lora-rank", "8", "--freeze-llm"], [["--lora-rank", "8"]], "--lora-rank trains adapters of the LLM"),
])
def test_flags_that_do_not_go_together_are_one_line(argv, allowed, text, capsys):
    status, line = refusal(argv, capsys)
    assert status == 2 and text in line, line
    for good in allowed:
        r2rank.parse_args(good)


def test_resume_with_overwrite_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        r2rank.main(["--model", "tiny", "--out", str(tmp_path / "run"), "--resume", "--overwrite"])
    assert stopped.value.code == 1 and capsys.readouterr().err == \
        "error: --resume continues the run in --out and --overwrite replaces it: pass one of them\n"


def test_help_lists_every_flag_with_its_text_grouped_by_stage(capsys, monkeypatch):
    parsers = []
    parse = argparse.ArgumentParser.parse_known_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", lambda self, *a, **k: parsers.append(self) or parse(self, *a, **k))
    with pytest.raises(SystemExit) as stopped:
        r2rank.parse_args(["--help"])
    text = capsys.readouterr().out
    assert stopped.value.code == 0
    actions = [a for a in parsers[0]._actions if a.dest != "help"]
    assert {a.dest for a in actions} == set(DEFAULTS) - {"given"}  # every setting is a flag
    for action in actions:
        assert action.help and len(action.help.split()) >= 2, action.option_strings  # a help text of its own
        assert all(option in text for option in action.option_strings), action.option_strings
    # the sections, in order, and where a few flags of each stage stand
    titles = [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    sections = {title: text.split(title, 1)[1].split("\n\n", 1)[0] for title in titles}
    stage_of = {"--model": "every stage", "--out": "every stage", "--num-rankings": "--stage rl", "--head-lr": "--stage rl",
                "--teacher-url": "--stage sft", "--sft-lr": "--stage sft", "--methods": "--stage eval", "--split": "--stage eval"}
    for flag, stage in stage_of.items():
        (title,) = [title for title, body in sections.items() if f"  {flag} " in body or f"  {flag}\n" in body]
        assert title.startswith(stage), (flag, title)


def test_a_missing_data_folder_and_a_bad_instance_are_one_line_naming_the_file_and_line(tmp_path, synthetic_dir, capsys):
    """Read before the model loads (a missing --model would otherwise be the first error)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = open(f"{synthetic_dir}/train.jsonl").read().splitlines()
    record = json.loads(lines[1])
    record["candidates"], record["labels"] = record["candidates"][:19], record["labels"][:19]
    (bad / "train.jsonl").write_text("\n".join([lines[0], json.dumps(record)] + lines[2:]) + "\n")
    (bad / "valid.jsonl").write_text(open(f"{synthetic_dir}/valid.jsonl").read())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text(lines[0] + "\n" + lines[1][:50] + "\n")
    missing = tmp_path / "missing"
    for data_dir, line in [(missing, f"error: {missing}: no such folder; python data.py SOURCE --out {missing} builds one"),
                           (bad, f"error: {bad}/train.jsonl:2: 19 candidates, but the first instance has 20 (K must be "
                                 "the same across a split)"),
                           (broken, f"error: {broken}/train.jsonl:2: malformed JSON (")]:
        with pytest.raises(SystemExit) as stopped:
            r2rank.main(["--model", str(tmp_path / "no-model"), "--data", str(data_dir), "--out", str(tmp_path / f"out-{data_dir.name}")])
        err = capsys.readouterr().err
        assert stopped.value.code == 1 and len(err.splitlines()) == 1 and err.startswith(line), err


SCRIPTS = sorted(os.path.relpath(path, ROOT) for folder in ("baselines", "tools") for path in glob.glob(f"{ROOT}/{folder}/*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_shows_its_help_from_the_repository_root(script):
    result = run_script(script, "--help", cwd=ROOT, fresh=True, timeout=120)  # as `python tools/x.py --help`
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    if 'if __name__ == "__main__"' in open(os.path.join(ROOT, script)).read():  # a script, not a module of functions
        assert "usage:" in result.stdout, result.stdout[-2000:]
