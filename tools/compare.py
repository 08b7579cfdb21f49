"""Every system beside R2Rank on the same task: train each for the given seeds, evaluate each
trained run on the test split, and write one table and one figure.

    python data.py synthetic --pointwise --candidates 10 --out runs/cmp/data
    nice -n 15 python tools/compare.py --data runs/cmp/data --out runs/cmp --seeds 0 1 2 3 4

Systems (SYSTEMS; the same data, model, users per step, history, trace budget and steps for all):
    r2rank    python r2rank.py --stage rl R2RANK_ARGS                 (--r2rank-args replaces R2RANK_ARGS)
    mlp-only  the same command with --freeze-llm --temperature 0      (Table 3's MLP-only)
    reczero   python baselines/reczero.py RECZERO_ARGS
    r2ec      python baselines/r2ec.py R2EC_ARGS
and random and popularity (`--stage eval --methods random,popularity` on the valid and test splits) as floors.

Out (--out):
    <system>-s<seed>/      the run: metrics.jsonl (validation NDCG@10 every 25 steps), checkpoint-<steps>/
    eval/<system>-s<seed>/eval-test.json   --stage eval of its last checkpoint: NDCG@{1,5,10}, per-user values
    floors/eval-{valid,test}.json          random and popularity
    eval/<system>-mean.json                per-user NDCG averaged over the seeds (the table's rows)
    table.md, timings.jsonl (wall seconds of each training and eval command), comparison.png (with matplotlib)
It resumes: a run whose last checkpoint exists is not trained again (a run cut short continues with
--resume), an eval file that exists is not computed again; a system or seed added later costs only
its own runs. One command at a time, in the foreground; nice the whole script on a shared machine.
The table is tools/report.py table over the per-seed means (Wilcoxon signed-rank tests between every
pair of rows, on per-user values; each row's line lists its p-value against R2Rank); the figure is
tools/report.py curve --group, one median line and min-max band per system.
"""
import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
from tools import report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100
# The README quickstart's R2Rank, the reference of the comparison (or --r2rank-args): --model tiny brings the
# quickstart's settings (r2rank.TINY_DEFAULTS); --data, --out, --seed, --threads are added here.
R2RANK_ARGS = f"--model tiny --max-steps {STEPS} --eval-every 25"
# MLP-only: R2Rank's command with the LLM frozen. Greedy traces: a frozen LLM needs no sampling, and its
# validation reads greedy ones; sampled one-token traces of the random model are noise (token_logp -4.4)
# that the head is then validated on greedy traces it never saw (RESULTS.md, the comparison).
MLP_ONLY_EXTRA = "--freeze-llm --temperature 0"
# RecZero-style and R2ec-style with the quickstart's settings where they have them: the same model, users per
# step, history, one-token traces, learning rates and steps; their own G (4) and, RecZero, one negative per pair.
SHARED = f"--model tiny --max-history 0 --max-new-tokens 1 --users-per-step 8 --lr 3e-3 --max-steps {STEPS} --eval-every 25"
RECZERO_ARGS = SHARED
R2EC_ARGS = SHARED + " --head-lr 3e-3"
TITLES = {"r2rank": "R2Rank", "mlp-only": "MLP-only", "reczero": "RecZero-style", "r2ec": "R2ec-style"}
METHODS = {"r2rank": "r2rank", "mlp-only": "r2rank", "reczero": "reczero", "r2ec": "r2ec"}  # --stage eval --methods


def train_command(system, r2rank_args):
    """The argv (after python) that trains `system`, without --data, --out, --seed."""
    if system == "r2rank":
        return ["r2rank.py", "--stage", "rl", *shlex.split(r2rank_args)]
    if system == "mlp-only":
        return ["r2rank.py", "--stage", "rl", *shlex.split(r2rank_args), *shlex.split(MLP_ONLY_EXTRA)]
    script, args = {"reczero": ("baselines/reczero.py", RECZERO_ARGS), "r2ec": ("baselines/r2ec.py", R2EC_ARGS)}[system]
    return [script, *shlex.split(args)]


def max_steps(argv):
    return int(argv[argv.index("--max-steps") + 1]) if "--max-steps" in argv else None


def run(argv, log_path, timings, name):
    """python argv in the project's root, output to log_path; its wall time appended to timings. Exits on failure."""
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ python {shlex.join(argv)}\n")
        log.flush()
        code = subprocess.call([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    with open(timings, "a") as f:
        f.write(json.dumps({"run": name, "seconds": round(seconds, 1), "exit": code}) + "\n")
    if code != 0:
        sys.exit(f"error: {name} failed (exit {code}): {last_line(log_path)} (all its output: {log_path})")
    print(f"{name}: {seconds:.0f} s")


def last_line(path):
    """The last line a command wrote into its log (its error, when it failed), at most 200 characters."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        tail = f.read().decode("utf-8", "replace").replace("\r", "\n")  # a progress bar's redraws are lines too
    lines = [line.strip() for line in tail.split("\n") if line.strip()]
    return (lines[-1][:200] if lines else "no output")


def train(system, seed, args, timings):
    """The run's directory, trained to its last step (skipped when its last checkpoint exists)."""
    argv = train_command(system, args.r2rank_args)
    out = os.path.join(args.out, f"{system}-s{seed}")
    steps = max_steps(argv)
    if os.path.isdir(os.path.join(out, f"checkpoint-{steps}")):
        print(f"{system} seed {seed}: trained already ({out}/checkpoint-{steps})")
        return out
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "metrics.jsonl")) else []
    run([*argv, "--data", args.data, "--out", out, "--seed", str(seed), "--threads", str(args.threads), *resume],
        os.path.join(args.out, "logs", f"{system}-s{seed}.log"), timings, f"train {system} seed {seed}")
    return out


def evaluate(system, seed, run_dir, args, timings):
    """eval/<system>-s<seed>/eval-test.json of the run's last checkpoint (skipped when it exists)."""
    steps = max_steps(train_command(system, args.r2rank_args))
    out = os.path.join(args.out, "eval", f"{system}-s{seed}")
    path = os.path.join(out, "eval-test.json")
    if not os.path.isfile(path):
        run(["r2rank.py", "--stage", "eval", "--model", os.path.join(run_dir, f"checkpoint-{steps}"), "--data", args.data,
             "--methods", METHODS[system], "--out", out, "--threads", str(args.threads), "--overwrite"],
            os.path.join(args.out, "logs", f"eval-{system}-s{seed}.log"), timings, f"eval {system} seed {seed}")
    return path


def floors(args, timings):
    """floors/eval-{valid,test}.json: random and popularity on the same users."""
    paths = {}
    for split in ("valid", "test"):
        paths[split] = os.path.join(args.out, "floors", f"eval-{split}.json")
        if not os.path.isfile(paths[split]):
            run(["r2rank.py", "--stage", "eval", "--model", "tiny", "--data", args.data, "--methods", "random,popularity",
                 "--split", split, "--out", os.path.join(args.out, "floors"), "--threads", str(args.threads)],
                os.path.join(args.out, "logs", f"floors-{split}.log"), timings, f"floors {split}")
    return paths


def seed_mean(paths, method, out_path):
    """One eval file whose `method` row is the per-user mean over the seeds' files (the same users in each)."""
    runs = [json.load(open(path)) for path in paths]
    rows = [found["methods"][method] for found in runs]
    users = [user["user_id"] for user in rows[0]["per_user"]]
    if any([user["user_id"] for user in row["per_user"]] != users for row in rows):
        sys.exit(f"error: {', '.join(paths)} do not hold the same users")
    keys = [key for key in rows[0]["per_user"][0] if key.startswith("ndcg@")]
    per_user = [{"user_id": user, **{key: sum(row["per_user"][i][key] for row in rows) / len(rows) for key in keys}}
                for i, user in enumerate(users)]
    merged = {key: sum(user[key] for user in per_user) / len(per_user) for key in keys}
    with open(out_path, "w") as f:
        json.dump({"methods": {method: {**merged, "per_user": per_user, "seeds": len(paths)}},
                   "config": {**runs[0]["config"], "seed_files": paths}}, f, indent=1)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--data", required=True, help="the data set (data.py synthetic --pointwise --candidates 10)")
    parser.add_argument("--out", required=True, help="where the runs, evals, table and figure go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of every system")
    parser.add_argument("--systems", nargs="+", default=list(TITLES), choices=list(TITLES), help="which systems")
    parser.add_argument("--r2rank-args", default=R2RANK_ARGS, help="R2Rank's --stage rl flags (MLP-only adds "
                        f"{MLP_ONLY_EXTRA!r}); without --data, --out, --seed, --threads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command")
    args = parser.parse_args(argv)
    try:
        os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    except OSError as error:  # a read-only place, a file in the way: before anything runs
        sys.exit(f"error: --out {args.out}: cannot create it ({error.strerror or error})")
    timings = os.path.join(args.out, "timings.jsonl")
    floor_files = floors(args, timings)
    evals = {}
    for system in args.systems:  # one system's seeds after another: its curve is whole early
        for seed in args.seeds:
            run_dir = train(system, seed, args, timings)
            evals.setdefault(system, []).append(evaluate(system, seed, run_dir, args, timings))
    means = [seed_mean(paths, METHODS[system], os.path.join(args.out, "eval", f"{system}-mean.json"))
             for system, paths in evals.items()]
    specs = [floor_files["test"]] + [f"{path}={TITLES[system]}" for system, path in zip(evals, means)]
    table_path = os.path.join(args.out, "table.md")
    with open(table_path, "w") as f:
        stdout, sys.stdout = sys.stdout, f
        try:
            print(f"Test split of {args.data}; each trained row: per-user NDCG averaged over seeds {' '.join(map(str, args.seeds))}.\n")
            report.table(specs)
        finally:
            sys.stdout = stdout
    print(open(table_path).read())
    groups = [f"{TITLES[system]}={os.path.join(args.out, system)}-s*/metrics.jsonl" for system in evals]
    png = os.path.join(args.out, "comparison.png") if importlib.util.find_spec("matplotlib") else None  # an optional extra
    report.compare_curves(groups, [floor_files["valid"]], png)
    print(f"wrote {table_path}, {timings}, " + (png or "no figure (pip install matplotlib draws comparison.png)"))


if __name__ == "__main__":
    try:
        main()
    except report.ReportError as error:
        sys.exit(f"error: {error}")
