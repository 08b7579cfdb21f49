"""Results across runs: one table from several `--stage eval` files, and learning curves.

    python tools/report.py table runs/baselines/eval-test.json runs/ml-mlp/eval-test.json=MLP-only ...
    python tools/report.py curve runs/s0/metrics.jsonl=seed0 runs/s1/metrics.jsonl=seed1 [--png curves.png]
    python tools/report.py curve --group 'R2Rank=runs/cmp/r2rank-s*/metrics.jsonl' --floors runs/cmp/floors/eval-valid.json

`table`: Table 2's layout, every pair of rows tested by the paired Wilcoxon signed-rank test; a file's trained row
takes the title after "=". `curve --group NAME=GLOB`: a system's median validation NDCG@10 over seeds, min-max band.
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules

TRAINED = ("r2rank", "reczero", "r2ec")  # methods whose rows are a checkpoint's: one row per file
MAX_LINE = 2**20  # bytes of a metrics row read at most: /dev/zero or a binary file ends at its first line
CURVE_KEYS = ("reward", "valid_ndcg@10", "approx_kl", "step_time")  # the numbers `curve` reads from a row
WANTED = {"user_id", "ndcg@1", "ndcg@5", "ndcg@10"}  # what an eval file holds per user: the table's tests pair them


class ReportError(Exception):
    """A bad input file or argument; the message names it."""


def read_eval(path):
    """(methods, config) of an eval-<split>.json of --stage eval, per-user values in each method; else one ReportError."""
    try:
        with open(path, "rb") as f:
            if not f.peek(2**16).lstrip().startswith(b"{"):  # a binary file, /dev/zero: refused at its first bytes
                raise ValueError("it does not start as a JSON object")
            found = json.loads(f.read(2**28))  # 256 MB at most (100,000 users' per-user values: ~80 MB)
        methods, config = found["methods"], found["config"]
        if missing := {"model", "data_dir"} - config.keys():
            raise ValueError(f"its config has no {', '.join(sorted(missing))}")
        bad = [name for name, result in methods.items() if not result.get("per_user") or any(WANTED - u.keys() for u in result["per_user"])]
        if not methods or bad:
            raise ValueError(f"no per-user values (user_id, ndcg@1, @5, @10) in {', '.join(bad) or 'any method'}: the tests pair them")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ReportError(f"{path}: not an evaluation file of --stage eval ({str(error)[:200]})") from None
    return methods, config


def merge_evals(specs):
    """specs ["path" or "path=Title"] -> (results {key: method result}, rows for evaluate.markdown_table, dataset name).
    A method met in several files (random) is kept once; a trained method's rows are keyed "method:title"."""
    found = [(spec.partition("=")[0], spec.partition("=")[2], *read_eval(spec.partition("=")[0])) for spec in specs]
    import evaluate  # torch, transformers: seconds, so only the table imports it, after the files are read

    users = lambda methods: [user["user_id"] for user in next(iter(methods.values()))["per_user"]]
    results, (first, _, first_methods, first_config) = {}, found[0]
    for path, title, methods, config in found:
        if users(methods) != users(first_methods):
            raise ReportError(f"{path}: its users differ from those of {first} (another split or data set?)")
        for name, result in methods.items():
            key = f"{name}:{title or os.path.dirname(path) or path}" if name in TRAINED else name
            if key in results and name in TRAINED:
                raise ReportError(f"{path}: two {name} rows called {key.partition(':')[2]!r}; give each file its own title")
            results.setdefault(key, result)
    model = os.path.basename(os.path.normpath(next((config["model"] for _, _, methods, config in found  # of the zero-shot rows
                                                     if {"pointwise", "listwise"} & set(methods)), first_config["model"])))
    rows = [(group if group in ("Baselines", "Compared RL systems", "Ours") else f"{group}: {model}", key, key.partition(":")[2] or title)
            for group, titles in evaluate.GROUPS.items() for name, title in titles.items() for key in results if key.partition(":")[0] == name]
    return results, rows, first_config.get("dataset") or evaluate.dataset_name(first_config["data_dir"])


def table(specs, dataset=None):
    """The table, then each trained row's Wilcoxon p-value against every other row on NDCG@10."""
    results, rows, found_dataset = merge_evals(specs)
    import evaluate

    tests = evaluate.pairwise_tests(results)
    print(evaluate.markdown_table(results, tests, dataset or found_dataset, None, rows))
    print(f"\n{tests['markers']}; bold: best in the column, tested against the runner-up ({tests['test']}).")
    print("Two-sided Wilcoxon p-values on NDCG@10 of each trained row, (+) when it is higher:")
    for name in (key for key in results if ":" in key):  # "r2rank:RL": the row RL
        print(f"  {name.partition(':')[2]} vs " + ", ".join(
            f"{other.partition(':')[2] or other} {(p := evaluate.pair_test(tests, name, other, 'ndcg@10')['p_value']):.2g}"
            f"{evaluate.significance_marker(p)} ({'+' if results[name]['ndcg@10'] > results[other]['ndcg@10'] else '-'})"
            for other in results if other != name))


def read_metrics(path):
    """metrics.jsonl -> its rows, a whole-number step in each, rising; else one ReportError naming the line. A last line
    cut short (the run stopped while writing it) and non-finite numbers of CURVE_KEYS are left out, with a note."""
    rows, left_out = [], []
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                try:
                    if len(line) > MAX_LINE:
                        raise ValueError(f"a line over {MAX_LINE // 2**20} MB")
                    if not line.strip():
                        continue
                    row = json.loads(line.decode("utf-8-sig"))  # a BOM too (Notepad's UTF-8)
                    if not isinstance(row, dict) or type(row.get("step")) is not int:
                        raise ValueError(f"no whole-number step in {line[:80]!r}")
                    if rows and row["step"] <= rows[-1]["step"]:  # a resume cuts the file back first
                        raise ValueError(f"step {row['step']} after step {rows[-1]['step']}: two runs wrote into one --out?")
                    for name in [name for name in CURVE_KEYS if name in row]:
                        if type(row[name]) not in (int, float):
                            raise ValueError(f"{name} is {row[name]!r:.80}, not a number")
                        if not math.isfinite(row[name]):
                            left_out.append(f"line {lineno} {name} {json.dumps(row.pop(name))}")
                except ValueError as error:
                    if isinstance(error, json.JSONDecodeError) and not line.endswith(b"\n"):  # --resume drops it too
                        print(f"note: {path}:{lineno}: a row cut short (the run stopped while writing it) is left out", file=sys.stderr)
                        break
                    raise ReportError(f"{path}:{lineno}: not a metrics.jsonl row of --stage rl ({str(error)[:150]})") from None
                rows.append(row)
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from None
    if left_out:
        print(f"note: {path}: non-finite values left out: " + ", ".join(left_out), file=sys.stderr)
    return rows


def moving_average(values, window):
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(last := values[max(0, i - window + 1): i + 1]) / len(last) for i in range(len(values))]


def ascii_chart(series, width=64, height=14):
    """series [(label, mark, [(x, y), ...])] -> lines of a chart; a point lands in its nearest cell, later series on top."""
    points = [point for _, _, values in series for point in values]
    x_low, x_high = min(x for x, _ in points), max(x for x, _ in points)
    y_low, y_span = min(y for _, y in points), max(max(y for _, y in points) - min(y for _, y in points), 1e-12)
    grid = [[" "] * width for _ in range(height)]
    for _, mark, values in series:
        for x, y in values:
            grid[height - 1 - round((y - y_low) / y_span * (height - 1))][round((x - x_low) / max(x_high - x_low, 1e-12) * (width - 1))] = mark
    lines = [f"{y_low + y_span * (height - 1 - i) / (height - 1):6.3f} |" + "".join(cells) for i, cells in enumerate(grid)]
    return lines + [" " * 7 + "+" + "-" * width, " " * 8 + f"{x_low:<{width // 2}g}{x_high:>{width - width // 2}g}  (step)",
                    "  " + "   ".join(f"{mark} {label}" for label, mark, _ in series)]


def curve(specs, window, png=None):
    """Each metrics file as a text chart (the training reward's moving average, the validation NDCG@10) and a summary
    line; with png, every file's reward, validation NDCG@10 and approx_kl on one figure instead."""
    runs = []
    for spec in specs:
        path, _, label = spec.partition("=")
        rows = read_metrics(path)
        series = {name: [(row["step"], row[name]) for row in rows if name in row] for name in ("reward", "valid_ndcg@10", "approx_kl")}
        if not series["reward"] and not series["valid_ndcg@10"]:
            raise ReportError(f"{path}: nothing to draw (no reward nor valid_ndcg@10 in any row)")
        series["reward"] = list(zip([step for step, _ in series["reward"]], moving_average([v for _, v in series["reward"]], window)))
        valid = series["valid_ndcg@10"]
        best_step, best = max(valid, key=lambda point: point[1]) if valid else (None, None)  # the first of equals
        summary = (f"{sum(row['step'] > 0 for row in rows)} steps, {sum(row.get('step_time', 0.0) for row in rows) / 3600:.2f} h "
                   "of step time; " + (f"validation NDCG@10 first {valid[0][1]:.3f} (step {valid[0][0]}), best {best:.3f} "
                                       f"(step {best_step}), last {valid[-1][1]:.3f}" if valid else "no validation rows (--eval-every)"))
        runs.append((path, label or os.path.dirname(path) or path, series, summary))
    if png is not None:  # first: a failure prints one line only
        draw_png(png, {title: {label: series[name] for _, label, series, _ in runs} for title, name in (
            (f"reward (mean of {window} steps)", "reward"), ("validation NDCG@10", "valid_ndcg@10"), ("approx_kl", "approx_kl"))})
    for path, label, series, summary in runs:
        if png is None:
            chart = [(f"training reward (NDCG@10 of sampled rankings), mean of the last {window} steps", ".", series["reward"]),
                     ("validation NDCG@10 (greedy traces, ranked by score)", "o", series["valid_ndcg@10"])]
            print(f"\n{label} ({path})\n" * (len(runs) > 1) + "\n".join(ascii_chart(chart)))
        print(f"{label}: {summary}" if png else summary)


def draw_png(png, panels, floors=None):
    """panels {y label: {line label: [(step, value[, low, high])]}} -> png, one panel each against the step, with a
    min-max band where given; floors {name: value}: grey lines across each panel. Needs matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportError(f"--png needs matplotlib, an optional extra ({error}); install it with: pip install matplotlib") from None
    figure = Figure(figsize=(8, 1.5 + 2.5 * len(panels)), dpi=100, layout="constrained")
    for axes, (name, lines) in zip(figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0], panels.items()):
        for index, (label, points) in enumerate(lines.items()):
            steps, values, *band = zip(*[point[:4] for point in points]) if points else ((), ())
            axes.plot(steps, values, color=f"C{index % 10}", marker="o", markersize=3, label=label)
            if band:
                axes.fill_between(steps, *band, color=f"C{index % 10}", alpha=0.2, linewidth=0)
        for index, (floor, value) in enumerate((floors or {}).items()):
            axes.axhline(value, color="gray", linestyle=("--", ":", "-.")[index % 3], linewidth=1, label=f"{floor} ({value:.3f})")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    axes.set_xlabel("step")
    try:
        figure.savefig(png, format="png")
    except OSError as error:
        raise ReportError(f"--png {png}: cannot write it ({error.strerror or error})") from None
    print(f"wrote {png}")


def group_curves(groups):
    """{system: [each seed's [(step, value)]]} -> {system: [(step, median, min, max, seeds logging it)]}, steps rising."""
    by_step = {name: {} for name in groups}  # system -> step -> the values its seeds logged there
    for name, seeds in groups.items():
        for step, value in (point for points in seeds for point in points):
            by_step[name].setdefault(step, []).append(value)
    return {name: [(step, statistics.median(v), min(v), max(v), len(v)) for step, v in sorted(steps.items())] for name, steps in by_step.items()}


def compare_curves(group_specs, floor_specs=(), png=None):
    """--group NAME=GLOB: each system's validation NDCG@10 over its seeds, as text and optionally a PNG; --floors: an
    eval-valid.json's random and popularity NDCG@10, or NAME=VALUE, as horizontal lines."""
    groups, floors = {}, {}
    for spec in group_specs:
        name, _, pattern = spec.partition("=")
        paths = sorted(glob.glob(pattern)) if name and pattern else []
        groups[name] = [[(row["step"], row["valid_ndcg@10"]) for row in read_metrics(path) if "valid_ndcg@10" in row] for path in paths]
        if not any(groups[name]):
            raise ReportError(f"--group {spec}: no metrics file with validation rows (--eval-every) matches; give NAME=GLOB, "
                              "e.g. 'R2Rank=runs/r2rank-s*/metrics.jsonl'")
    for spec in floor_specs:
        try:
            floors[spec.partition("=")[0]] = float(spec.partition("=")[2])
        except ValueError:  # an eval file
            methods = read_eval(spec)[0]
            floors.update({title: methods[m]["ndcg@10"] for m, title in (("random", "Random"), ("popularity", "Popularity")) if m in methods})
    curves = group_curves(groups)
    for name, points in curves.items():
        print(f"{name} ({len(groups[name])} runs): validation NDCG@10, median [min, max] (seeds) per step")
        print("\n".join(f"  step {step:>5}: {median:.3f} [{low:.3f}, {high:.3f}] ({count})" for step, median, low, high, count in points))
    print("".join(f"{name}: {value:.3f}\n" for name, value in floors.items()), end="")
    if png is not None:
        draw_png(png, {"validation NDCG@10": {f"{name}: median of {len(groups[name])} runs, min-max": points
                                              for name, points in curves.items()}}, floors)
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table_args = commands.add_parser("table", help="one Table-2 layout from several eval-<split>.json files")
    table_args.add_argument("files", nargs="+", help="eval-<split>.json files, each optionally =Title (its trained row's)")
    table_args.add_argument("--dataset", help="the dataset's name in the header (default: the first file's)")
    curve_args = commands.add_parser("curve", help="reward and validation NDCG@10 per step, as text or a PNG")
    curve_args.add_argument("metrics", nargs="*", help="metrics.jsonl of --stage rl, optionally =Label (default: its folder)")
    curve_args.add_argument("--group", action="append", default=[], metavar="NAME=GLOB", help="instead: one system's seeds' metrics files")
    curve_args.add_argument("--floors", action="append", default=[], metavar="FILE|NAME=VALUE", help="with --group: eval-valid.json or a value")
    curve_args.add_argument("--window", type=int, default=10, help="steps in the reward's moving average")
    curve_args.add_argument("--png", help="draw into this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "curve" and (bool(args.metrics) == bool(args.group) or args.floors and not args.group):
        parser.error("curve: give metrics files, or --group NAME=GLOB (one per system, --floors with them), not both")
    try:
        if args.command == "table":
            table(args.files, args.dataset)
        elif args.group:
            compare_curves(args.group, args.floors, args.png)
        else:
            curve(args.metrics, max(args.window, 1), args.png)
    except ReportError as error:
        sys.exit(f"error: {error}")
    except BrokenPipeError:  # the reader of a pipe had enough (| head): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + 13)  # 128 + SIGPIPE


if __name__ == "__main__":
    main()
