"""What users rely on around a training run (runs.py, and data.py and --stage eval beside it), as one table of
faults: each made as a user meets it (a second run, a note in a checkpoint folder, a damaged checkpoint, Ctrl-C or
SIGTERM at any point, a full disk, a closed pipe, an ASCII terminal, an --out or --model that cannot be used),
with the exit status and the line the user gets; each case also checks what the run left in --out.

    fault | how it is made (a function below) | exit status | the line (str.format'ed with what the case saw)
"""
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file

import r2rank
import runs
from conftest import ROOT, _forkserver, _run_in_child, read_only, run_cli, run_script, terminal_sigint


def rl(out, data_dir, *extra):
    """A tiny run: 1 user of 20 candidates, 2-token traces, a checkpoint every step, no validation."""
    return ["--stage", "rl", "--model", "tiny", "--data", data_dir, "--out", str(out), "--users-per-step", "1",
            "--max-new-tokens", "2", "--max-history", "2", "--eval-every", "0", "--save-every", "1", "--threads", "1", *extra]


def steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def whole(out, step):
    return runs.checkpoint_problem(os.path.join(out, f"checkpoint-{step}")) is None


class Child:
    """python r2rank.py ARGV from the repository root, not waited for: a process forked from the suite's fork
    server (conftest.run_script), with Popen's poll, send_signal, communicate and returncode. r2rank.main takes
    SIGINT itself, so Ctrl-C reaches it also from a suite started with SIGINT ignored (in the background)."""

    def __init__(self, argv):
        self.files = [tempfile.NamedTemporaryFile() for _ in range(2)]  # its stdout and stderr
        self.process = _forkserver().Process(target=_run_in_child, args=(
            os.path.join(ROOT, "r2rank.py"), [str(a) for a in argv], ROOT, dict(os.environ), *(f.name for f in self.files)))
        self.process.start()
        self.pid = self.process.pid

    def poll(self):
        return self.process.exitcode

    def send_signal(self, signum):
        os.kill(self.pid, signum)

    def communicate(self, timeout):
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired("r2rank.py", timeout)
        self.returncode = self.process.exitcode
        return tuple(open(f.name).read() for f in self.files)


def wait_for_rows(out, count, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.isfile(out / "metrics.jsonl") and (out / "metrics.jsonl").read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} rows in {out}/metrics.jsonl: {process.poll()}")


def finished(ctx):
    """A copy of a finished 2-step run (checkpoint-1, checkpoint-2), as --out."""
    out = ctx.tmp / "run"
    shutil.copytree(ctx.finished, out)
    return out


def in_process(ctx, argv):
    """r2rank.main(argv) here (where a fault is patched in), as a CompletedProcess."""
    try:
        r2rank.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    printed = ctx.capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, printed.out, printed.err)


# ------------------------------------------------------------------------------ how each fault is made


def second_run_while_the_first_holds_out(ctx):
    out = ctx.tmp / "run"
    first = Child(rl(out, ctx.data, "--max-steps", "1000", "--save-every", "1000"))
    try:
        wait_for_rows(out, 1, first)
        second = run_cli(*rl(out, ctx.data, "--max-steps", "1", "--overwrite"))  # would delete the first's files
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143 and steps(out)[0] == 1  # the first run, untouched, stopped by the SIGTERM above
    return second, {"pid": first.pid}


def another_run_in_out(ctx):
    out = finished(ctx)
    result = run_cli(*rl(out, ctx.data, "--max-steps", "1"))
    assert steps(out) == [1, 2] and whole(out, 1) and whole(out, 2)
    return result, {}


def overwrite_over_a_users_file(ctx):
    out = finished(ctx)
    (out / "notes.txt").write_text("mine\n")
    result = run_cli(*rl(out, ctx.data, "--max-steps", "1", "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine\n" and steps(out) == [1, 2] and whole(out, 2)
    return result, {"out": out}


def overwrite_over_a_note_in_a_checkpoint(ctx):
    out = finished(ctx)
    (out / "checkpoint-1" / "my-note.txt").write_text("mine\n")
    result = run_cli(*rl(out, ctx.data, "--max-steps", "2", "--overwrite", "--keep-checkpoints", "0"))
    assert (out / "checkpoint-1" / "my-note.txt").read_text() == "mine\n"
    assert steps(out) == [1, 2] and whole(out, 1) and whole(out, 2), result.stderr[-2000:]
    return result, {"out": out}


def pruning_a_checkpoint_with_a_note(ctx):
    out = finished(ctx)
    (out / "checkpoint-1" / "my-note.txt").write_text("mine\n")
    result = run_cli(*rl(out, ctx.data, "--max-steps", "3", "--resume", "--keep-checkpoints", "1"))
    assert os.listdir(out / "checkpoint-1") == ["my-note.txt"] and (out / "checkpoint-1" / "my-note.txt").read_text() == "mine\n"
    assert not (out / "checkpoint-2").exists() and whole(out, 3) and steps(out) == [1, 2, 3]
    return result, {"out": out}


def resume_past_a_broken_checkpoint(damage):
    def case(ctx):
        out = finished(ctx)
        damage(out / "checkpoint-2")
        result = run_cli(*rl(out, ctx.data, "--max-steps", "3", "--resume"))
        assert steps(out) == [1, 2, 3] and whole(out, 3)
        return result, {"out": out}
    return case


def resume_with_changed_defining_flags(ctx):
    out = finished(ctx)
    result = run_cli(*rl(out, ctx.data, "--max-steps", "3", "--resume", "--seed", "1", "--max-new-tokens", "3"))
    assert steps(out) == [1, 2] and sorted(runs.checkpoint_steps(out)) == [1, 2]
    return result, {}


def a_signal_during_training(signum):
    def case(ctx):
        out = ctx.tmp / "run"
        process = Child(rl(out, ctx.data, "--max-steps", "1000", "--save-every", "1000"))
        wait_for_rows(out, 2, process)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
        last = steps(out)[-1]
        assert 2 <= last < 1000 and runs.checkpoint_steps(out) == [last] and whole(out, last)
        resumed = run_cli(*rl(out, ctx.data, "--max-steps", str(last + 1), "--save-every", "1000", "--resume"))
        assert resumed.returncode == 0 and steps(out) == list(range(1, last + 2)), resumed.stderr[-2000:]
        return subprocess.CompletedProcess([], process.returncode, stdout, stderr), {"out": out, "last": last}
    return case


def a_second_ctrl_c(ctx):
    """Long steps (80 traces of 40 tokens): the second Ctrl-C comes while the step the first one let finish runs."""
    out = ctx.tmp / "run"
    process = Child(rl(out, ctx.data, "--max-steps", "1000", "--users-per-step", "4", "--max-new-tokens", "40"))
    wait_for_rows(out, 1, process)
    while runs.newest_whole_checkpoint(str(out))[1] < 1:
        time.sleep(0.05)
    logged = len(steps(out))
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sent = time.time()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert time.time() - sent < 5 and "stopped by SIGINT" not in stderr, stderr[-2000:]
    assert len(steps(out)) == logged  # the step in progress is dropped, not logged
    step = runs.newest_whole_checkpoint(str(out))[1]
    return subprocess.CompletedProcess([], process.returncode, stdout, stderr), {"out": out, "step": step}


def a_read_only_out(ctx):
    out = ctx.tmp / "read-only"
    out.mkdir()
    read_only(out, ctx.monkeypatch)  # chmod 555; as root, the same refusals patched into os
    try:
        result = in_process(ctx, rl(out, ctx.data, "--max-steps", "1"))
    finally:
        ctx.monkeypatch.undo()
        os.chmod(out, 0o755)
    assert os.listdir(out) == []
    return result, {"out": out}


def a_file_as_out(ctx):
    out = ctx.tmp / "a-file"
    out.write_text("mine\n")
    result = run_cli(*rl(out, ctx.data, "--max-steps", "1"))
    assert out.read_text() == "mine\n"
    return result, {"out": out}


def a_full_disk_at_a_save(ctx):
    """A 16 MB tmpfs as --out, filled up (but for 200 kB) once checkpoint-1 is written: a later save fails. Where
    no tmpfs can be mounted, the save of checkpoint-2 raises ENOSPC after writing part of it, in this process."""
    out = ctx.tmp / "disk"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(out)], capture_output=True).returncode == 0:
        try:
            process = Child(rl(out, ctx.data, "--max-steps", "1000"))
            while not (out / "checkpoint-1").is_dir() and process.poll() is None:
                time.sleep(0.02)
            with open(out / "filler", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(out).free - 200_000))
            stdout, stderr = process.communicate(timeout=120)
            result = subprocess.CompletedProcess([], process.returncode, stdout, stderr)
            left = sorted(os.listdir(out))
            said = re.search(r"saving .*checkpoint-(\d+) failed", stderr)
            failed = int(said[1]) if said else max(runs.checkpoint_steps(out)) + 1
        finally:
            subprocess.run(["umount", "-l", str(out)])
    else:
        import transformers

        save_pretrained = transformers.PreTrainedModel.save_pretrained

        def full_at_step_2(model, directory, *args, **kwargs):
            save_pretrained(model, directory, *args, **kwargs)  # part of the checkpoint written, then the disk is full
            if directory.endswith("checkpoint-2"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        ctx.monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_at_step_2)
        result, failed = in_process(ctx, rl(out, ctx.data, "--max-steps", "3")), 2
        left = sorted(os.listdir(out))
    assert not [name for name in left if name.startswith(".tmp")], (left, result.stderr[-3000:])
    assert f"checkpoint-{failed}" not in left and f"checkpoint-{failed - 1}" in left, (left, result.stderr[-3000:])
    return result, {"out": out, "step": failed, "kept": failed - 1}


def output_piped_into_head(ctx):
    out = ctx.tmp / "run"
    command = " ".join(map(str, [sys.executable, "r2rank.py", *rl(out, ctx.data, "--max-steps", "6", "--save-every", "3")]))
    result = subprocess.run(["bash", "-c", f"{command} | head -1; exit ${{PIPESTATUS[0]}}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, preexec_fn=terminal_sigint)
    assert len(result.stdout.splitlines()) == 1 and steps(out) == [1, 2, 3, 4, 5, 6] and whole(out, 6)
    return result, {}


def non_finite_scores(ctx):
    start_from = ctx.tmp / "nan"
    shutil.copytree(ctx.finished / "checkpoint-1", start_from)
    weights = load_file(str(start_from / "head.safetensors"))
    weights["net.3.weight"][0, 0] = float("nan")  # as a learning rate far too high leaves it
    save_file(weights, str(start_from / "head.safetensors"))
    out = ctx.tmp / "run"
    argv = rl(out, ctx.data, "--max-steps", "2")
    argv[argv.index("tiny")] = str(start_from)
    result = run_cli(*argv)
    assert "so the run stops without saving this step" in result.stderr
    assert (out / "metrics.jsonl").read_text() == "" and runs.checkpoint_steps(out) == []
    return result, {}


def a_users_own_checkpoint_folder_at_resume(ctx):
    out = ctx.tmp / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "note.txt").write_text("mine\n")
    result = run_cli(*rl(out, ctx.data, "--max-steps", "2", "--resume"))
    assert os.listdir(out / "checkpoint-1") == ["note.txt"] and (out / "checkpoint-1" / "note.txt").read_text() == "mine\n"
    assert f"--resume: {out}/checkpoint-1 is broken (r2rank.json is missing or unreadable), so it is skipped" in result.stderr
    return result, {"out": out}


def handles_sigterm(pid):
    """Whether process pid has a SIGTERM handler of its own (the SigCgt mask of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def sigterm_while_torch_loads(ctx):
    """A fresh `python r2rank.py`, sent SIGTERM once its first handler is in place: torch and transformers are
    loading (that handler comes just before them). Then the same command runs, not refused."""
    out = ctx.tmp / "run"
    argv = rl(out, ctx.data, "--max-steps", "1")
    process = subprocess.Popen([sys.executable, "r2rank.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    while process.poll() is None and not handles_sigterm(process.pid):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert stderr == "stopped before anything started; nothing was written\n" and not out.exists(), stderr[-2000:]
    again = run_cli(*argv)
    assert again.returncode == 0 and steps(out) == [1], again.stderr[-2000:]
    swallowing = ctx.tmp / "swallowing.py"  # as torch's import of numpy does with an exception raised inside it
    swallowing.write_text("import signal, r2rank\ntry:\n    r2rank.stopped_before_start(signal.SIGTERM, None)\n"
                          "except BaseException:\n    pass\nprint('went on')\n")
    assert run_script(str(swallowing), cwd=ROOT).returncode == 143
    return subprocess.CompletedProcess([], process.returncode, stdout, stderr), {}


def sigterm_during_set_up(ctx):
    """SIGTERM once --out is taken, as the model loads; then the same command runs, not refused."""
    out = ctx.tmp / "run"
    argv = rl(out, ctx.data, "--max-steps", "1")
    load_model = r2rank.load_model

    def terminated_while_loading(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return load_model(*args, **kwargs)

    ctx.monkeypatch.setattr(r2rank, "load_model", terminated_while_loading)
    result = in_process(ctx, argv)
    ctx.monkeypatch.undo()
    assert result.stderr.count("\n") == 1 and runs.checkpoint_steps(out) == [], result.stderr[-2000:]
    again = run_cli(*argv)
    assert again.returncode == 0 and steps(out) == [1], again.stderr[-2000:]
    return result, {"out": out}


def an_out_that_is_not_utf8(ctx):
    out = str(ctx.tmp / "bad") + "\udcff"  # `--out $'bad\xff'`, as Python decodes that argument
    result = run_cli(*rl(out, ctx.data, "--max-steps", "1"))
    assert os.listdir(ctx.tmp) == []
    return result, {"out": out}


def data_py_output_piped_into_head(ctx):
    """`python data.py synthetic --out X | head -1`, and `| true` (no reader even for the first line): X is written."""
    results = {}
    for reader in ("head -1", "true"):
        out = ctx.tmp / reader.split()[0]
        command = (f"{shlex.quote(sys.executable)} data.py synthetic --users 20 --out {shlex.quote(str(out))} | {reader}; "
                   "exit ${PIPESTATUS[0]}")
        results[reader] = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert sorted(os.listdir(out)) == ["stats.json", "test.jsonl", "train.jsonl", "valid.jsonl"], results[reader].stderr
    assert results["true"].returncode == 0 and results["true"].stdout == results["true"].stderr == "", results["true"]
    return results["head -1"], {"out": ctx.tmp / "head"}


def data_py_output_to_a_full_device(ctx):
    out = ctx.tmp / "data"
    command = f"{shlex.quote(sys.executable)} data.py synthetic --users 20 --out {shlex.quote(str(out))} > /dev/full"
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sorted(os.listdir(out)) == ["stats.json", "test.jsonl", "train.jsonl", "valid.jsonl"], result.stderr
    return result, {}


def a_split_without_valid_and_test(ctx):
    out = ctx.tmp / "data"
    result = run_script(os.path.join(ROOT, "data.py"), "synthetic", "--split", "1:0:0", "--out", out)
    assert not out.exists()
    return result, {}


def eval_with_a_missing_model(ctx):
    """The default --methods would skip r2rank with a note; the error about --model comes first, alone."""
    result = run_cli("--stage", "eval", "--model", "/nonexistent", "--threads", "1", "--out", ctx.tmp / "eval")
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stdout + result.stderr
    return result, {}


def eval_under_an_ascii_locale(ctx):
    """LC_ALL=C, PYTHONIOENCODING=ascii: a fresh interpreter (a forked one keeps the encoding its server started with)."""
    out = ctx.tmp / "eval"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"}
    argv = [sys.executable, "r2rank.py", "--stage", "eval", "--model", "tiny", "--threads", "1", "--data", ctx.data,
            "--methods", "random,popularity", "--out", str(out)]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert set(json.loads((out / "eval-test.json").read_text())["methods"]) == {"random", "popularity"}, result.stderr[-2000:]
    assert "+ p < 0.05" in result.stdout, result.stdout
    return result, {"out": out}


def truncated(name):
    return lambda checkpoint: os.truncate(checkpoint / name, os.path.getsize(checkpoint / name) - 100)


FAULTS = [
    ("a second run on --out while the first holds it", second_run_while_the_first_holds_out, 1,
     "in use by another run (pid {pid})"),
    ("--out holding another run, without --resume or --overwrite", another_run_in_out, 1,
     "holds another run (checkpoint-1, checkpoint-2, metrics.jsonl); pass --resume to continue it, --overwrite to replace it"),
    ("--overwrite, --out holding a file the project did not write", overwrite_over_a_users_file, 1,
     "--out {out}: holds notes.txt, which this project did not write"),
    ("--overwrite, a user's note in a checkpoint folder", overwrite_over_a_note_in_a_checkpoint, 0,
     "note: {out}/checkpoint-1: kept my-note.txt, which this project did not write"),
    ("pruning, a user's note in a checkpoint folder", pruning_a_checkpoint_with_a_note, 0,
     "note: {out}/checkpoint-1: kept my-note.txt, which this project did not write"),
    ("--resume, the newest checkpoint's model.safetensors truncated", resume_past_a_broken_checkpoint(truncated("model.safetensors")),
     0, "--resume: {out}/checkpoint-2 is broken (model.safetensors is missing or truncated), so it is skipped"),
    ("--resume, the newest checkpoint's head.safetensors deleted", resume_past_a_broken_checkpoint(lambda c: os.remove(c / "head.safetensors")),
     0, "--resume: {out}/checkpoint-2 is broken (head.safetensors is missing or truncated), so it is skipped"),
    ("--resume with other defining flags", resume_with_changed_defining_flags, 1,
     "--resume needs the settings that define the run unchanged; these differ: --max-new-tokens 2 -> 3; --seed 0 -> 1"),
    ("Ctrl-C during training", a_signal_during_training(signal.SIGINT), 130,
     "stopped by SIGINT: steps 1-{last} kept in {out}/checkpoint-{last}; continue with --resume"),
    ("SIGTERM during training", a_signal_during_training(signal.SIGTERM), 143,
     "stopped by SIGTERM: steps 1-{last} kept in {out}/checkpoint-{last}; continue with --resume"),
    ("a second Ctrl-C", a_second_ctrl_c, 130, "interrupted: kept {out}/checkpoint-{step}; --resume continues from it"),
    ("a read-only --out", a_read_only_out, 1, "error: --out {out}: cannot write there (Permission denied)"),
    ("a file as --out", a_file_as_out, 1, "error: --out {out}: exists and is not a folder"),
    ("a full disk at a save", a_full_disk_at_a_save, 1, "error: step {step}: saving {out}/checkpoint-{step} failed ("),
    ("the output piped into head -1", output_piped_into_head, 0, "note: the reader of this output has gone"),
    ("non-finite scores (a NaN in the head it starts from)", non_finite_scores, 1,
     "error: step 1: non-finite "),
    ("--resume, a checkpoint-1 of the user's own holding only a note", a_users_own_checkpoint_folder_at_resume, 1,
     "--resume: no checkpoint in {out} is whole (each is named above); --overwrite starts again"),
    ("SIGTERM while torch loads", sigterm_while_torch_loads, 143, "stopped before anything started; nothing was written"),
    ("SIGTERM during set-up", sigterm_during_set_up, 143, "interrupted: no checkpoint in {out}: nothing kept"),
    ("an --out that is not valid UTF-8", an_out_that_is_not_utf8, 2,
     "r2rank.py: error: --out {out!r}: not valid UTF-8, which checkpoint files cannot record; choose another name"),
    ("data.py's output piped into head -1", data_py_output_piped_into_head, 0,
     "building the synthetic set from the generator into {out} ..."),
    ("data.py's output to a full device", data_py_output_to_a_full_device, 0,
     "data.py: the data set is written; its summary could not be printed (No space left on device)"),
    ("data.py --split 1:0:0", a_split_without_valid_and_test, 2, "data.py: error: --split 1:0:0 leaves valid and test empty; "
     "the RL stage trains on train and validates on valid, and eval reads test"),
    ("--stage eval, a --model that does not exist", eval_with_a_missing_model, 1,
     "error: --model /nonexistent: no such model folder (a hub id is org/name)"),
    ("--stage eval under an ASCII locale", eval_under_an_ascii_locale, 0, "wrote {out}/eval-test.json"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(*rl(out, synthetic_dir, "--max-steps", "2", "--keep-checkpoints", "0"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("fault, make, status, line", FAULTS, ids=[row[0] for row in FAULTS])
def test_fault(fault, make, status, line, tmp_path, synthetic_dir, finished_run, monkeypatch, capsys):
    ctx = SimpleNamespace(tmp=tmp_path, data=synthetic_dir, finished=finished_run, monkeypatch=monkeypatch, capsys=capsys)
    result, seen = make(ctx)
    printed = result.stdout + result.stderr
    assert "Traceback" not in printed and "Error:" not in printed, printed[-3000:]
    assert result.returncode == status, printed[-3000:]
    expected = line.format(**seen)
    if status == 1:  # an error: one line, the last
        assert expected in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    else:
        assert expected in printed, printed[-3000:]
    if fault == "a full disk at a save":
        assert "No space left on device" in result.stderr and f"--resume continues from {seen['out']}/checkpoint-{seen['kept']}" in result.stderr
