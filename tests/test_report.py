"""tools/report.py: the merged results table and the text learning curve."""
import json
import random
import subprocess
import sys

import pytest

from tools import report

from conftest import run_script

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__file__))


def eval_file(path, methods, users=("u1", "u2", "u3", "u4", "u5", "u6"), data_dir="data/ml100k", model="/models/Small.gguf"):
    """An eval-test.json as --stage eval writes it; methods: {name: per-user NDCG@10 values}
    (NDCG@1 and @5 get the same values)."""
    body = {name: {**{f"ndcg@{k}": sum(values) / len(values) for k in (1, 5, 10)},
                   "per_user": [{"user_id": user, **{f"ndcg@{k}": value for k in (1, 5, 10)}}
                                for user, value in zip(users, values)]}
            for name, values in methods.items()}
    path.write_text(json.dumps({"methods": body, "config": {"model": model, "data_dir": data_dir,
                                                           "users": len(users), "split": "test"}}))
    return str(path)


def test_moving_average_by_hand():
    assert report.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert report.moving_average([2.0, 4.0], 10) == [2.0, 3.0]


def test_ascii_chart_puts_the_extremes_in_the_corners():
    lines = report.ascii_chart([("a", "*", [(0, 1.0), (10, 3.0)]), ("b", "o", [(5, 2.0)])], width=11, height=3)
    assert lines[0] == " 3.000 |          *"
    assert lines[1] == " 2.000 |     o     "
    assert lines[2] == " 1.000 |*          "
    assert "* a" in lines[-1] and "o b" in lines[-1]


def test_merged_table_keeps_each_baseline_once_and_tests_the_pairs(tmp_path, capsys):
    random = [0.1, 0.2, 0.1, 0.2, 0.1, 0.2]
    base = eval_file(tmp_path / "base.json", {"random": random, "pointwise": [0.3] * 6})
    # six distinct differences, all of one sign: exact two-sided p = 2 / 2**6 = 0.03125 (marker †)
    mlp = eval_file(tmp_path / "mlp.json", {"r2rank": [0.3, 0.5, 0.5, 0.7, 0.7, 0.9], "random": random},
                    model="runs/mlp/checkpoint-9")
    rl = eval_file(tmp_path / "rl.json", {"r2rank": [0.2, 0.25, 0.21, 0.22, 0.23, 0.24]})
    results, rows, dataset = report.merge_evals([mlp + "=MLP-only", base, rl + "=RL"])
    assert list(results) == ["r2rank:MLP-only", "random", "pointwise", "r2rank:RL"]
    assert rows == [("Baselines", "random", "Random"),
                    ("Prompted LLM: Small.gguf", "pointwise", "Pointwise, zero-shot"),  # the model the zero-shot rows ran on
                    ("Ours", "r2rank:MLP-only", "MLP-only"), ("Ours", "r2rank:RL", "RL")]
    assert dataset == "ml100k"
    report.table([base, mlp + "=MLP-only", rl + "=RL"])
    out = capsys.readouterr().out
    assert "| MLP-only | **0.600**" in out and "| Random | 0.150" in out and "| Pointwise, zero-shot | 0.300" in out
    assert "MLP-only vs random 0.031† (+)" in out
    assert "RL vs random 0.031† (+), pointwise 0.031† (-), MLP-only 0.031† (-)" in out
    # a compared system's checkpoint is a trained row too, in its own group, titled like R2Rank's
    r2ec = eval_file(tmp_path / "r2ec.json", {"r2ec": [0.31, 0.41, 0.51, 0.61, 0.71, 0.81]})
    results, rows, _ = report.merge_evals([base, r2ec + "=R2ec, 17 steps", mlp + "=MLP-only"])
    assert rows[-2:] == [("Compared RL systems", "r2ec:R2ec, 17 steps", "R2ec, 17 steps"), ("Ours", "r2rank:MLP-only", "MLP-only")]
    report.table([base, r2ec + "=R2ec, 17 steps", mlp + "=MLP-only"])
    out = capsys.readouterr().out
    assert "| *Compared RL systems* | | | |\n| R2ec, 17 steps | 0.560 |" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("R2ec, 17 steps vs"))
    assert "pointwise 0.031† (+), MLP-only" in line  # six differences of one sign against pointwise (0.3)
    assert line.endswith("(-)")  # below MLP-only on average (0.560 against 0.600)


def test_table_refuses_files_of_other_users(tmp_path):
    a = eval_file(tmp_path / "a.json", {"random": [0.1] * 6})
    b = eval_file(tmp_path / "b.json", {"r2rank": [0.2] * 6}, users=("x1", "x2", "x3", "x4", "x5", "x6"))
    with pytest.raises(report.ReportError, match="users differ"):
        report.merge_evals([a, b])


def test_curve_cli_draws_and_names_a_bad_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward": 0.2 + 0.01 * s, "step_time": 30.0} for s in range(1, 21)]
    rows[9]["valid_ndcg@10"], rows[19]["valid_ndcg@10"] = 0.25, 0.35
    rows.insert(0, {"step": 0, "valid_ndcg@10": 0.3, "step_time": 18.0})  # the start's validation, no reward
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = run_script("tools/report.py", "curve", str(metrics), "--window", "5", cwd=ROOT)
    assert run.returncode == 0, run.stderr
    # reward 0.21 at step 1 (column round(1 / 20 * 63) = 3); at step 20 the mean of 0.36 .. 0.40
    assert run.stdout.startswith(" 0.380 |") and "\n 0.210 |   ." in run.stdout and "o validation" in run.stdout
    # 20 * 30 s + 18 s = 0.172 h
    assert ("20 steps, 0.17 h of step time; validation NDCG@10 first 0.300 (step 0), best 0.350 (step 20), "
            "last 0.350") in run.stdout
    metrics.write_text(json.dumps(rows[1]) + "\n{oops\n")
    run = run_script("tools/report.py", "curve", str(metrics), cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"error: {metrics}:2: not a metrics.jsonl row of --stage rl (Expecting property name")


def metrics_file(path, rows):
    """A metrics.jsonl as runs.log_row writes it (json.dumps: NaN for a NaN)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run_rows(steps=12, seed=0):
    """A run of `steps` RL steps with validation every 4 (and at the start, step 0)."""
    rows = [{"step": 0, "valid_ndcg@10": 0.30 + 0.01 * seed, "step_time": 5.0}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward": 0.2 + 0.01 * s + 0.03 * (s % 3) + 0.02 * seed,
               "approx_kl": 0.001 * s * (1 + seed), "clip_frac": 0.0, "step_time": 30.0}
        if s % 4 == 0:
            row["valid_ndcg@10"] = 0.3 + 0.015 * s - 0.01 * seed
        rows.append(row)
    return rows


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file starts as a PNG does."""
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_curve_png_draws_several_runs(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra, not in requirements.txt
    seed0 = metrics_file(tmp_path / "metrics-0.jsonl", run_rows(seed=0))
    seed1 = metrics_file(tmp_path / "metrics-1.jsonl", run_rows(seed=1))
    png = tmp_path / "curves.png"
    run = run_script("tools/report.py", "curve", seed0 + "=seed 0", seed1 + "=seed 1", "--png", png, "--window", "3", cwd=ROOT)
    assert run.returncode == 0, run.stderr
    width, height = png_size(png)
    assert width >= 600 and height >= 600 and png.stat().st_size > 20_000  # three panels, not a blank canvas
    # each run's summary line (by its label), then where the figure went
    assert "seed 0: 12 steps, 0.10 h of step time; validation NDCG@10 first 0.300 (step 0), best 0.480 (step 12)" in run.stdout
    assert "seed 1: 12 steps, 0.10 h of step time; validation NDCG@10 first 0.310 (step 0), best 0.470 (step 12)" in run.stdout
    assert f"wrote {png}" in run.stdout
    # a run without validation or approx_kl (e.g. --freeze-llm, no --eval-every) still draws
    bare = metrics_file(tmp_path / "bare.jsonl", [{"step": s, "reward": 0.1 * s} for s in range(1, 4)])
    run = run_script("tools/report.py", "curve", bare, "--png", tmp_path / "bare.png", cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert png_size(tmp_path / "bare.png")[0] >= 600
    # an unwritable --png is one line
    run = run_script("tools/report.py", "curve", bare, "--png", tmp_path / "no" / "such" / "dir.png", cwd=ROOT)
    assert run.returncode == 1 and "cannot write" in run.stderr and "Traceback" not in run.stderr


def test_curve_png_without_matplotlib_says_how_to_install_it(tmp_path):
    # the script run with matplotlib made unimportable, as where it is not installed
    wrapper = tmp_path / "no_matplotlib.py"
    wrapper.write_text("import os, runpy, sys\n"
                       "sys.modules['matplotlib'] = None  # import matplotlib now raises ImportError\n"
                       "sys.argv = sys.argv[1:]\n"
                       "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    metrics = metrics_file(tmp_path / "metrics.jsonl", run_rows())
    run = run_script(wrapper, "tools/report.py", "curve", metrics, "--png", tmp_path / "curves.png", cwd=ROOT)
    assert run.returncode == 1, run.stderr
    assert run.stderr.count("\n") == 1 and "pip install matplotlib" in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == "" and not (tmp_path / "curves.png").exists()
    run = run_script(wrapper, "tools/report.py", "curve", metrics, cwd=ROOT)  # the text chart needs nothing more
    assert run.returncode == 0 and "best 0.480 (step 12)" in run.stdout, run.stderr


def test_curve_leaves_out_a_nan_with_a_note(tmp_path):
    rows = run_rows()
    rows[3]["reward"] = float("nan")  # json.dumps writes NaN, json.loads reads it back
    rows[5]["approx_kl"] = float("inf")
    metrics = metrics_file(tmp_path / "metrics.jsonl", rows)
    assert '"reward": NaN' in open(metrics).read()
    run = run_script("tools/report.py", "curve", metrics, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stderr == f"note: {metrics}: non-finite values left out: line 4 reward NaN, line 6 approx_kl Infinity\n"
    assert "12 steps" in run.stdout and "best 0.480 (step 12)" in run.stdout
    assert report.read_metrics(metrics)[3] == {"step": 3, "approx_kl": 0.003, "clip_frac": 0.0, "step_time": 30.0}


def test_curve_refuses_two_runs_in_one_file(tmp_path):
    rows = [{"step": step, "reward": 0.5} for step in (1, 2, 1, 3, 2)]  # two runs appending to one --out
    metrics = metrics_file(tmp_path / "metrics.jsonl", rows)
    run = run_script("tools/report.py", "curve", metrics, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr == f"error: {metrics}:3: not a metrics.jsonl row of --stage rl (step 1 after step 2: two runs wrote into one --out?)\n"
    with pytest.raises(report.ReportError, match=r":2: not a metrics.jsonl row of --stage rl \(step 1 after step 1"):  # a repeated step too
        report.read_metrics(metrics_file(tmp_path / "again.jsonl", [{"step": 1, "reward": 0.5}] * 2))
    with pytest.raises(report.ReportError, match=r":1: .*no whole-number step"):
        report.read_metrics(metrics_file(tmp_path / "nostep.jsonl", [{"reward": 0.5}]))
    with pytest.raises(report.ReportError, match=r":1: .*reward is 'high', not a number"):
        report.read_metrics(metrics_file(tmp_path / "text.jsonl", [{"step": 1, "reward": "high"}]))
    with pytest.raises(report.ReportError, match="nothing to draw"):
        report.curve([metrics_file(tmp_path / "empty.jsonl", [{"step": 1, "clip_frac": 0.0}])], 5)


def test_table_refuses_an_eval_file_without_methods_or_model(tmp_path):
    good = eval_file(tmp_path / "good.json", {"random": [0.1] * 6})
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"methods": {}, "config": {"model": "m", "data_dir": "data/ml100k"}}))
    run = run_script("tools/report.py", "table", good, empty, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr == f"error: {empty}: not an evaluation file of --stage eval (no per-user values (user_id, ndcg@1, @5, @10) in any method: the tests pair them)\n"
    modelless = tmp_path / "modelless.json"
    found = json.loads(open(good).read())
    del found["config"]["model"]
    modelless.write_text(json.dumps(found))
    run = run_script("tools/report.py", "table", modelless, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr == f"error: {modelless}: not an evaluation file of --stage eval (its config has no model)\n"


@pytest.mark.parametrize("damage", ["no per_user", "a user without ndcg@10"])
def test_table_refuses_an_eval_file_without_per_user_values(damage, tmp_path):
    path = tmp_path / "eval-test.json"
    found = json.loads(open(eval_file(path, {"random": [0.1] * 6, "r2rank": [0.2] * 6})).read())
    if damage == "no per_user":
        del found["methods"]["r2rank"]["per_user"]
    else:
        del found["methods"]["r2rank"]["per_user"][3]["ndcg@10"]
    path.write_text(json.dumps(found))
    run = run_script("tools/report.py", "table", path, cwd=ROOT)
    assert run.returncode == 1 and "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith(f"error: {path}: not an evaluation file of --stage eval (no per-user values (user_id, ndcg@1, @5, @10) in r2rank:"), run.stderr


def test_group_curves_median_and_band_by_hand():
    curves = report.group_curves({"A": [[(0, 0.2), (25, 0.5)], [(0, 0.4), (25, 0.9)], [(0, 0.3), (25, 0.6), (50, 0.7)]],
                                  "B": [[(0, 0.1), (25, 0.3)], [(0, 0.5), (25, 0.2)]]})
    assert curves["A"] == [(0, 0.3, 0.2, 0.4, 3), (25, 0.6, 0.5, 0.9, 3), (50, 0.7, 0.7, 0.7, 1)]
    assert [step for step, *_ in curves["B"]] == [0, 25]
    (_, median0, low0, high0, n0), (_, median25, low25, high25, _) = curves["B"]
    assert (median0, low0, high0, n0) == (pytest.approx(0.3), 0.1, 0.5, 2)  # two seeds: the mean of the middle two
    assert (median25, low25, high25) == (pytest.approx(0.25), 0.2, 0.3)


def test_curve_groups_over_seeds_with_floors(tmp_path, capsys):
    for system, seeds in {"sys-a": [[0.2, 0.5], [0.4, 0.9], [0.3, 0.6]], "sys-b": [[0.5, 0.5]]}.items():
        for seed, values in enumerate(seeds):
            run = tmp_path / f"{system}-s{seed}"
            run.mkdir()
            rows = [{"step": 0, "valid_ndcg@10": values[0]}, {"step": 1, "reward": 0.3}, {"step": 2, "reward": 0.4, "valid_ndcg@10": values[1]}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    floors = eval_file(tmp_path / "eval-valid.json", {"random": [0.45] * 6, "popularity": [0.25] * 6})
    curves = report.compare_curves([f"A={tmp_path}/sys-a-s*/metrics.jsonl", f"B={tmp_path}/sys-b-s*/metrics.jsonl"],
                                   [floors, "Oracle=1"])
    assert curves["A"] == [(0, 0.3, 0.2, 0.4, 3), (2, 0.6, 0.5, 0.9, 3)] and curves["B"] == [(0, 0.5, 0.5, 0.5, 1), (2, 0.5, 0.5, 0.5, 1)]
    out = capsys.readouterr().out
    assert "A (3 runs)" in out and "step     2: 0.600 [0.500, 0.900] (3)" in out
    assert "Random: 0.450" in out and "Popularity: 0.250" in out and "Oracle: 1.000" in out
    with pytest.raises(report.ReportError, match="no metrics file with validation rows"):
        report.compare_curves([f"C={tmp_path}/none-*/metrics.jsonl"])
    pytest.importorskip("matplotlib")
    png = tmp_path / "comparison.png"
    result = run_script(f"{ROOT}/tools/report.py", "curve", "--group", f"A={tmp_path}/sys-a-s*/metrics.jsonl",
                        "--floors", floors, "--png", str(png), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in result.stdout
    both = run_script(f"{ROOT}/tools/report.py", "curve", str(tmp_path / "sys-b-s0" / "metrics.jsonl"), "--group", "A=x", cwd=ROOT)
    assert both.returncode == 2 and "not both" in both.stderr


def test_the_table_names_the_data_set_as_eval_does(synthetic_dir, tmp_path, capsys):
    """The README's order: the synthetic set built into a folder called data, evaluated, then tabled. eval
    calls it "synthetic" (its stats.json's inputs); the table called it by its folder's name, "data". A file
    without the name (older ones) falls back to the folder's name."""
    from conftest import run_cli

    assert synthetic_dir.endswith("/data") and json.load(open(f"{synthetic_dir}/stats.json"))["inputs"] == ["synthetic"]
    result = run_cli("--stage", "eval", "--model", "tiny", "--data", synthetic_dir, "--methods", "random,popularity",
                     "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    assert "| Method | synthetic @1 | @5 | @10 |" in result.stdout
    path = str(tmp_path / "eval" / "eval-test.json")
    assert report.merge_evals([path])[2] == "synthetic"
    report.table([path])
    assert "| Method | synthetic @1 | @5 | @10 |" in capsys.readouterr().out
    old = eval_file(tmp_path / "old.json", {"random": [0.1] * 6}, data_dir="runs/vg/ml100k")
    assert report.merge_evals([old])[2] == "ml100k"


def test_a_table_piped_into_head_ends_quietly(tmp_path):
    """`python tools/report.py table ... | head -1` was a BrokenPipeError traceback once head had its line."""
    import subprocess
    import sys

    import os

    path = eval_file(tmp_path / "eval.json", {"random": [0.1, 0.2, 0.1, 0.2, 0.1, 0.2], "pointwise": [0.3] * 6})
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone (head had its lines) before the table is written
    process = subprocess.Popen([sys.executable, f"{ROOT}/tools/report.py", "table", path], stdout=writer,
                               stderr=subprocess.PIPE, text=True)
    os.close(writer)
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141 and stderr == "", stderr


def test_a_row_cut_short_at_the_end_is_left_out_with_a_note(tmp_path):
    """A run killed while it wrote a row leaves it cut short, without its newline (--resume drops it): the curve
    of such a run was refused ("malformed JSON") instead of drawn."""
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward": 0.2 + 0.1 * s, "step_time": 1.0} for s in (1, 2)]
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 3, "rew')
    run = run_script("tools/report.py", "curve", str(metrics), cwd=ROOT)
    assert run.returncode == 0 and run.stderr == f"note: {metrics}:3: a row cut short (the run stopped while writing it) is left out\n"
    assert "2 steps, 0.00 h of step time" in run.stdout
    metrics.write_text(json.dumps(rows[0]) + '\n{"step": 3, "rew\n' + json.dumps(rows[1]) + "\n")  # not the last line: refused
    run = run_script("tools/report.py", "curve", str(metrics), cwd=ROOT)
    assert run.returncode == 1 and run.stderr.startswith(f"error: {metrics}:2: not a metrics.jsonl row of --stage rl (Invalid control character")


PNG = b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(100_000)  # a figure passed where a metrics file goes


# Short ids: pytest 9.0 put the contents' bytes in the id, and so in PYTEST_CURRENT_TEST, which the child process
# inherits: past the kernel's 128 kB for one variable, the process could not start (E2BIG).
@pytest.mark.parametrize("command, content, expected", [
    ("curve", "/dev/zero", "error: /dev/zero:1: not a metrics.jsonl row of --stage rl (a line over 1 MB)"),
    ("curve", "/dev/urandom", "error: /dev/urandom:"),  # :1: unless the random first line is blank (skipped)
    ("curve", PNG, "error: {path}:1: not a metrics.jsonl row of --stage rl ('utf-8' codec can't decode byte 0x89"),
    ("curve", b"x" * 3_000_000, "error: {path}:1: not a metrics.jsonl row of --stage rl (a line over 1 MB)"),
    ("curve", b'{"step": 1, "reward": "' + b"a" * 100_000 + b'"}\n', "error: {path}:1: not a metrics.jsonl row of --stage rl (reward is 'aaaa"),
    ("curve", b"# notes\n" + b"y" * 100_000 + b"\n", "error: {path}:1: not a metrics.jsonl row of --stage rl (Expecting value"),
    ("table", "/dev/zero", "error: /dev/zero: not an evaluation file of --stage eval (it does not start as a JSON object)"),
    ("table", PNG, "error: {path}: not an evaluation file of --stage eval (it does not start as a JSON object)"),
], ids=["zeros", "random", "png", "3-mb-line", "100-kb-field", "100-kb-line", "table-zeros", "table-png"])
def test_input_that_is_not_what_it_reads_ends_in_one_short_line(command, content, expected, tmp_path):
    """A device, a binary file, one endless line: one line of at most ~200 characters, in a fresh interpreter
    within 10 s (a line is read in at most 1 MB, an eval file refused at its first bytes)."""
    path = content if isinstance(content, str) else str(tmp_path / "input")
    if not isinstance(content, str):
        open(path, "wb").write(content)
    run = subprocess.run([sys.executable, f"{ROOT}/tools/report.py", command, path], capture_output=True, text=True, timeout=10)
    assert run.returncode == 1 and run.stdout == "", run.stderr
    assert len(run.stderr.splitlines()) == 1 and len(run.stderr) < 250 + len(path), run.stderr
    assert run.stderr.startswith(expected.format(path=path)), run.stderr


@pytest.mark.parametrize("script", ["report", "compare", "benchmark", "speed", "benchmark_estimators"])
def test_every_tool_answers_help_from_the_repository_root(script):
    run = run_script(f"{ROOT}/tools/{script}.py", "--help", cwd=ROOT)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr


@pytest.mark.parametrize("flags, message", [
    (["--rl-step", "nonexistent/model"], "error: --model nonexistent/model: cannot load it ("),
    (["--users", "0"], "benchmark.py: error: --users must be >= 1, got 0"),
    (["--new-tokens", "-5"], "benchmark.py: error: --new-tokens must be >= 1, got -5")])
def test_benchmark_refuses_bad_flags_in_one_line(flags, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is not asked: the same refusal, at once
    run = run_script(f"{ROOT}/tools/benchmark.py", *flags, "--threads", "1", cwd=ROOT, timeout=120)
    assert run.returncode in (1, 2) and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(message) and "==" not in run.stdout, run.stderr
