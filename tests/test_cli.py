"""The command line of every stage: each flag explained in --help, each numeric flag's bounds, and bad
settings or inputs stopped before any work with one line that names them."""
import dataclasses
import json
import os

import pytest
import torch

from machinery import config
from conftest import run_cli


def test_cli_bad_input_is_one_clear_line(tmp_path, synthetic_dir):
    synthetic = synthetic_dir
    result = run_cli("--stage", "rl", "--model", "tiny", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    missing = tmp_path / "missing"  # said to be a missing folder (it was "missing/train.jsonl: cannot read file")
    assert result.stderr == f"error: {missing}: no such folder; python data.py SOURCE --out {missing} builds one\n"
    missing_model = run_cli("--model", str(tmp_path / "no-model"), "--data", synthetic, "--out", str(tmp_path / "o2"))
    assert missing_model.returncode == 1 and "Traceback" not in missing_model.stderr
    assert missing_model.stderr == f"error: --model {tmp_path / 'no-model'}: no such directory (a hub id is org/name)\n"
    assert not (tmp_path / "o2").exists()  # nothing written before the model loaded
    for out, message in [("README.md", "exists and is not a directory"), ("/proc/none/o", "cannot create it")]:
        for stage in (["--stage", "rl"], ["--stage", "eval", "--methods", "random"]):
            result = run_cli(*stage, "--model", "tiny", "--data", synthetic, "--out", out)
            assert result.returncode == 1 and result.stderr.startswith(f"error: --out {out}: {message}"), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
    missing_gguf = run_cli("--model", str(tmp_path / "m.gguf"), "--data", synthetic, "--out", str(tmp_path / "o2"))
    assert missing_gguf.returncode == 1 and missing_gguf.stderr.strip() == f"error: --model {tmp_path}/m.gguf: no such file"
    (tmp_path / "fake.gguf").write_text("not a model")
    fake_gguf = run_cli("--model", str(tmp_path / "fake.gguf"), "--data", synthetic, "--out", str(tmp_path / "o2"))
    assert fake_gguf.returncode == 1 and "Traceback" not in fake_gguf.stderr, fake_gguf.stderr
    assert fake_gguf.stderr.startswith(f"error: --model {tmp_path}/fake.gguf: cannot read it as a GGUF model (")
    too_many = run_cli("--model", "tiny", "--data", synthetic, "--users-per-step", "500", "--out", str(tmp_path / "o3"))
    assert too_many.returncode == 1 and "--users-per-step 500 is more than the" in too_many.stderr
    if not torch.cuda.is_available():
        no_cuda = run_cli("--device", "cuda", "--model", "tiny", "--out", str(tmp_path / "o4"))
        assert no_cuda.returncode == 1 and "--device cuda: this machine has no CUDA device" in no_cuda.stderr
        assert "Traceback" not in no_cuda.stderr
    meta = run_cli("--device", "meta", "--model", "tiny", "--out", str(tmp_path / "o5"))
    assert meta.returncode == 1 and meta.stderr.startswith("error: --device meta: the meta device holds shapes only")
    assert len(meta.stderr.strip().splitlines()) == 1 and not (tmp_path / "o5").exists()
    bad = run_cli("--num-rankings", "1")
    assert bad.returncode != 0 and "--baseline needs" in bad.stderr
    assert config.parse_config(["--max-new-tokens", "0"]).score_path  # the LLM learns its representation only
    for args, message in [(["--max-new-tokens", "0", "--no-score-path"], "gives the LLM no gradient"),
                          (["--stage", "sft", "--max-new-tokens", "0"], "nothing to fine-tune on"),
                          (["--stage", "eval", "--max-new-tokens", "0"], "leave it out of --methods"),
                          (["--max-new-tokens", "-1"], "must be >= 0"),
                          (["--stage", "sft", "--response-prefix", "User"], "does not go with SFT"),
                          (["--temperature", "0"], "no policy gradient"),
                          (["--temperature", "-1"], "--temperature must be >= 0"),
                          (["--top-p", "0.9"], "--top-p < 1 is not supported"),
                          (["--top-p", "0"], "--top-p must be in (0, 1]"),
                          (["--advantage", "batch", "--users-per-step", "1"], "needs --users-per-step >= 2"),
                          (["--advantage", "item"], "invalid choice"),
                          (["--advantage-samples", "0"], "must be in [1, 32768], got 0"),
                          (["--advantage-samples", "100000000"], "--advantage-samples must be in [1, 32768], got 100000000"),
                          (["--trace-cache", "c.pt"], "--trace-cache reuses the traces of a frozen LLM: it goes with "
                                                      "--stage rl --freeze-llm"),
                          (["--stage", "eval", "--freeze-llm", "--trace-cache", "c.pt"], "it goes with --stage rl --freeze-llm"),
                          (["--seed", "99999999999999999999"], "--seed must be in [0, 16777215], got 99999999999999999999"),
                          (["--lr", "inf"], "--lr must be a finite number, got inf"),
                          (["--head-lr", "nan"], "--head-lr must be a finite number, got nan"),
                          (["--lr", "1e6"], "--lr must be in [0, 1], got 1e+06"),
                          (["--temperature", "1e-30"], "--temperature 1e-30 is greedy in all but name"),
                          (["--stage", "eval", "--temperature", "0.001"], "use 0 for greedy traces, or >= 0.01"),
                          (["--head-width", "100000000"], "--head-width must be in [1, 65536]")]:
        bad = run_cli(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_every_numeric_flag_declares_its_bounds_and_they_are_enforced(capsys):
    """A new numeric flag cannot skip validation: each declares a Bound. Just outside it, parsing stops
    with a one-line error naming the flag (exit 2, before any work); at its edge, the value is taken."""
    base = ["--stage", "eval", "--no-baseline", "--methods", "r2rank"]  # no cross-flag rule fires at an edge
    numeric = [f for f in dataclasses.fields(config.Config) if f.type in (int, float, "int", "float")]
    assert len(numeric) > 25
    for f in numeric:
        allowed, flag = f.metadata["allowed"], "--" + f.name.replace("_", "-")
        assert isinstance(allowed, config.Bound), f"{flag} declares no Bound"
        outside = [allowed.low if allowed.strict else allowed.low - 1] + ([allowed.high + 1] if allowed.high else [])
        for value in outside:
            with pytest.raises(SystemExit) as exit_info:
                config.parse_config(base + [flag, str(int(value) if f.type in (int, "int") else value)])
            message = capsys.readouterr().err.strip().splitlines()[-1]
            shown = str(int(value)) if f.type in (int, "int") else f"{value:g}"
            assert exit_info.value.code == 2 and message.endswith(f"error: {flag} must be {allowed}, got {shown}"), message
        edge = allowed.high if allowed.high else (allowed.low + 0.5 if allowed.strict else allowed.low)
        edge = int(edge) if f.type in (int, "int") else edge
        assert getattr(config.parse_config(base + [flag, str(edge)]), f.name) == edge


def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for field in dataclasses.fields(config.Config):
        assert "--" + field.name.replace("_", "-") in result.stdout


def test_every_stage_rejects_a_bad_instance_on_its_line_before_loading_a_model(tmp_path, synthetic_dir):
    """The RL, SFT and eval stages read instances through one validator (data.load_split), before any
    model is loaded: a missing --model here would otherwise be the first error."""
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = open(f"{synthetic_dir}/train.jsonl").read().splitlines()
    record = json.loads(lines[1])
    record["candidates"], record["labels"] = record["candidates"][:19], record["labels"][:19]
    (bad / "train.jsonl").write_text("\n".join([lines[0], json.dumps(record)] + lines[2:]) + "\n")
    (bad / "valid.jsonl").write_text("")
    for stage in (["--stage", "rl"], ["--stage", "sft"], ["--stage", "eval", "--split", "train"]):
        result = run_cli(*stage, "--model", str(tmp_path / "no-model"), "--data", str(bad), "--out", str(tmp_path / "o"))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == f"error: {bad}/train.jsonl:2: 19 candidates, but the first instance has 20 " \
                                        "(K must be the same across a split)"
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    empty_valid = run_cli("--model", str(tmp_path / "no-model"), "--data", str(bad), "--out", str(tmp_path / "o"), "--eval-every", "2")
    assert empty_valid.returncode == 1 and empty_valid.stderr.strip() == f"error: {bad}/valid.jsonl: no instances"
    assert not (tmp_path / "o").exists()


def test_under_torchrun_only_rank_0_prints_a_bad_flag(monkeypatch, capsys):
    """torchrun starts one process per rank, each parsing the same flags: one message, from rank 0; the
    others exit with the same status (2) in silence, for a bad flag, a bad combination and --help."""
    for argv in (["--lr", "5"], ["--users-per-step"], ["--trace-cache", "c.pt"], ["--help"]):
        for rank, silent in (("1", True), ("3", True), ("0", False)):
            monkeypatch.setenv("RANK", rank)
            with pytest.raises(SystemExit) as exit_info:
                config.parse_config(argv)
            printed = capsys.readouterr()
            assert exit_info.value.code == (0 if argv == ["--help"] else 2)
            assert (printed.out + printed.err == "") == silent, (argv, rank, printed)
    monkeypatch.setenv("RANK", "1")
    assert config.parse_config(["--lr", "0.5"]).lr == 0.5  # good flags parse as on rank 0


def test_out_of_memory_names_advantage_samples_when_the_counterfactual_advantage_is_on(monkeypatch, capsys, tmp_path):
    """--advantage counterfactual holds [K + 1, S, K] rankings per user: its --advantage-samples comes first in
    the advice; other runs are not told about a flag they do not use."""
    import r2rank

    def out_of_memory(cfg, rank_device=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(r2rank, "train_rl", out_of_memory)
    for advantage, named in (("counterfactual", True), ("reward", False)):
        with pytest.raises(SystemExit) as exit_info:
            r2rank.main(["--model", "tiny", "--out", str(tmp_path / "o"), "--advantage", advantage,
                         "--advantage-samples", "4096"])
        message = capsys.readouterr().err
        assert exit_info.value.code == 1 and len(message.strip().splitlines()) == 1
        assert message.startswith("error: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower ")
        assert ("lower --advantage-samples (4096 rankings" in message) == named, message
        assert "--micro-batch" in message
    # many rankings per step (S x U >= 1024 of K items each): --num-rankings is named, not only the model's flags
    for rankings, named in (("4096", True), ("8", False)):
        with pytest.raises(SystemExit):
            r2rank.main(["--model", "tiny", "--out", str(tmp_path / "o"), "--num-rankings", rankings])
        message = capsys.readouterr().err
        assert ("lower --num-rankings (4096 rankings per user), --micro-batch" in message) == named, message


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path):
    """Ctrl-C in the first seconds of `python r2rank.py`, while torch loads, before main's handlers exist:
    one line, exit status 130, nothing written. The interrupt is sent at the exact moment: a fresh
    interpreter that raises SIGINT in itself when r2rank.py starts importing torch (no timing to win)."""
    import os
    import subprocess
    import sys

    from conftest import terminal_sigint

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    interrupt_at_torch = (
        "import os, runpy, signal, sys\n"
        "class InterruptAtTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, InterruptAtTorch())\n"
        "sys.argv = ['r2rank.py'] + sys.argv[1:]\n"
        "runpy.run_path('r2rank.py', run_name='__main__')\n")
    out = tmp_path / "o"
    result = subprocess.run([sys.executable, "-c", interrupt_at_torch, "--model", "tiny", "--out", str(out)], cwd=root,
                            capture_output=True, text=True, timeout=120, preexec_fn=terminal_sigint)
    assert result.returncode == 130, result.stderr
    assert result.stderr == "interrupted before anything started; nothing was written\n"
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--rl-step", "nonexistent/model"], "error: --model nonexistent/model: cannot load it ("),
    (["--users", "0"], "benchmark.py: error: --users must be >= 1, got 0"),
    (["--new-tokens", "-5"], "benchmark.py: error: --new-tokens must be >= 1, got -5"),
    (["--models", "tiny,foo"], "benchmark.py: error: --models: unknown 'foo'; choose from tiny, smollm2")])
def test_benchmark_refuses_bad_flags_in_one_line(flags, message, monkeypatch):
    """tools/benchmark.py: a model that cannot be loaded, a count out of range, an unknown --models name (it
    ran a 10-minute sweep of the others): one line, before any timing."""
    from conftest import ROOT, run_script

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is not asked: the same refusal, at once
    result = run_script(f"{ROOT}/tools/benchmark.py", *flags, "--threads", "1", cwd=ROOT, timeout=120)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "==" not in result.stdout  # no model was benchmarked


def test_compare_refuses_an_out_it_cannot_write_before_any_run(tmp_path, monkeypatch):
    """tools/compare.py --out a read-only folder: it was os.makedirs's PermissionError traceback."""
    from conftest import read_only
    from tools import compare

    read_only(tmp_path, monkeypatch)
    try:
        with pytest.raises(SystemExit) as stopped:
            compare.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "cmp"), "--seeds", "0"])
    finally:
        monkeypatch.undo()
        os.chmod(tmp_path, 0o755)
    assert stopped.value.code == f"error: --out {tmp_path / 'cmp'}: cannot create it (Permission denied)"
    assert os.listdir(tmp_path) == []
