"""Every system beside R2Rank on one task: each trained for --seeds, evaluated on the test split, one table and figure.

    python data.py synthetic --pointwise --candidates 10 --out runs/cmp/data
    nice -n 15 python tools/compare.py --data runs/cmp/data --out runs/cmp --seeds 0 1 2 3 4

--out gets the runs (<system>-s<seed>/), eval/ (theirs, and <system>-mean.json: per-user NDCG averaged over seeds, the
table's rows), floors/, table.md, comparison.png (with matplotlib), logs/. Finished runs and evals are not redone.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules
from tools import report  # noqa: E402

STEPS = 100
SHARED = f"--model tiny --max-history 0 --max-new-tokens 1 --users-per-step 8 --lr 3e-3 --max-steps {STEPS} --eval-every 25"
# --model tiny brings the quickstart's settings (r2rank.TINY_DEFAULTS). MLP-only's traces are greedy: a frozen LLM
# needs no sampling, and its head is validated on greedy traces (RESULTS.md, the comparison).
SYSTEMS = {  # name: (title, its --stage eval --methods, the command that trains it)
    "r2rank": ("R2Rank", "r2rank", f"r2rank.py --stage rl --model tiny --max-steps {STEPS} --eval-every 25"),
    "mlp-only": ("MLP-only", "r2rank", f"r2rank.py --stage rl --model tiny --max-steps {STEPS} --eval-every 25 --freeze-llm --temperature 0"),
    "reczero": ("RecZero-style", "reczero", f"baselines/reczero.py {SHARED}"),
    "r2ec": ("R2ec-style", "r2ec", f"baselines/r2ec.py {SHARED} --head-lr 3e-3")}


def run(argv, args, name):
    """python argv in the project's root, output to logs/<name>.log; exits on failure."""
    log_path, started = os.path.join(args.out, "logs", name.replace(" ", "-") + ".log"), time.time()
    with open(log_path, "a") as log:
        log.write(f"$ python {shlex.join(argv)}\n")
        log.flush()
        code = subprocess.call([sys.executable, *argv, "--threads", str(args.threads)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        last = [line.strip() for line in open(log_path, errors="replace").read().replace("\r", "\n").split("\n") if line.strip()]
        sys.exit(f"error: {name} failed (exit {code}): {(last or ['no output'])[-1][:200]} (all its output: {log_path})")
    print(f"{name}: {time.time() - started:.0f} s")


def train_and_evaluate(system, seed, args):
    """eval/<system>-s<seed>/eval-test.json of the run's last checkpoint; the run is trained (or resumed) first."""
    out, path = os.path.join(args.out, f"{system}-s{seed}"), os.path.join(args.out, "eval", f"{system}-s{seed}", "eval-test.json")
    checkpoint = os.path.join(out, f"checkpoint-{STEPS}")
    if not os.path.isdir(checkpoint):
        resume = ["--resume"] if os.path.isfile(os.path.join(out, "metrics.jsonl")) else []
        run([*shlex.split(SYSTEMS[system][2]), "--data", args.data, "--out", out, "--seed", str(seed), *resume], args, f"train {system} s{seed}")
    if not os.path.isfile(path):
        run(["r2rank.py", "--stage", "eval", "--model", checkpoint, "--data", args.data, "--methods", SYSTEMS[system][1],
             "--out", os.path.dirname(path), "--overwrite"], args, f"eval {system} s{seed}")
    return path


def seed_mean(paths, method, out_path):
    """One eval file whose `method` row is the per-user mean over the seeds' files (the same users in each)."""
    found, keys = [json.load(open(path)) for path in paths], ("ndcg@1", "ndcg@5", "ndcg@10")
    seeds = [each["methods"][method]["per_user"] for each in found]
    if any([user["user_id"] for user in seed] != [user["user_id"] for user in seeds[0]] for seed in seeds):
        sys.exit(f"error: {', '.join(paths)} do not hold the same users")
    per_user = [{"user_id": users[0]["user_id"], **{key: statistics.mean(user[key] for user in users) for key in keys}}
                for users in zip(*seeds)]  # one user's values, a seed's each
    with open(out_path, "w") as f:
        json.dump({"methods": {method: {**{key: statistics.mean(user[key] for user in per_user) for key in keys},
                                        "per_user": per_user, "seeds": len(paths)}},
                   "config": {**found[0]["config"], "seed_files": paths}}, f, indent=1)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the data set (data.py synthetic --pointwise --candidates 10)")
    parser.add_argument("--out", required=True, help="where the runs, evals, table and figure go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of every system")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), help="which systems")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command")
    args = parser.parse_args(argv)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    floors = {split: os.path.join(args.out, "floors", f"eval-{split}.json") for split in ("valid", "test")}
    for split, path in floors.items():
        if not os.path.isfile(path):
            run(["r2rank.py", "--stage", "eval", "--model", "tiny", "--data", args.data, "--methods", "random,popularity",
                 "--split", split, "--out", os.path.dirname(path)], args, f"floors {split}")
    specs = [floors["test"]]
    for system in args.systems:  # one system's seeds after another: its curve is whole early
        paths = [train_and_evaluate(system, seed, args) for seed in args.seeds]
        specs.append(seed_mean(paths, SYSTEMS[system][1], os.path.join(args.out, "eval", f"{system}-mean.json")) + f"={SYSTEMS[system][0]}")
    table_path = os.path.join(args.out, "table.md")
    with open(table_path, "w") as f, contextlib.redirect_stdout(f):
        print(f"Test split of {args.data}; each trained row: per-user NDCG averaged over seeds {' '.join(map(str, args.seeds))}.\n")
        report.table(specs)
    print(open(table_path).read())
    png = os.path.join(args.out, "comparison.png") if importlib.util.find_spec("matplotlib") else None  # an optional extra
    report.compare_curves([f"{SYSTEMS[s][0]}={os.path.join(args.out, s)}-s*/metrics.jsonl" for s in args.systems], [floors["valid"]], png)
    print(f"wrote {table_path}, " + (png or "no figure (pip install matplotlib draws comparison.png)"))


if __name__ == "__main__":
    try:
        main()
    except (report.ReportError, OSError) as error:  # a bad file, an --out that cannot be made or written: one line
        sys.exit(f"error: {error}")
