"""Results across runs: one table from several `--stage eval` files, and a learning curve as text.

    python tools/report.py table runs/baselines/eval-test.json runs/ml-mlp/eval-test.json=MLP-only ...
    python tools/report.py curve runs/ml-rl/metrics.jsonl
    python tools/report.py curve runs/s0/metrics.jsonl=seed0 runs/s1/metrics.jsonl=seed1 --png curves.png
    python tools/report.py curve --group 'R2Rank=runs/cmp/r2rank-s*/metrics.jsonl' --group 'MLP-only=runs/cmp/mlp-s*/metrics.jsonl' \
        --floors runs/cmp/floors/eval-valid.json --png comparison.png

`table`: every method of eval-<split>.json files (`--stage eval`, the same users in each) in the layout
of the paper's Table 2, every pair tested by the paired Wilcoxon signed-rank test on per-user values. A
file's trained row (R2Rank, reczero, r2ec) takes the title after "=", so several trained runs sit side by side.

`curve`: the training reward (a moving average: one step sees few users) and the validation NDCG@10 of a
metrics.jsonl as a character chart; with --png the reward, the validation NDCG@10 and approx_kl of every
file (its line named by "=Label") in a PNG. `curve --group NAME=GLOB` (one per system): each system's
median validation NDCG@10 over its seeds' files with the min-max band, per step; --floors adds the random
and popularity rows of an eval-valid.json, or NAME=VALUE. The PNG needs matplotlib (an optional extra).
"""
import argparse
import glob
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import stats  # noqa: E402
# evaluate (which imports torch and transformers, seconds) is imported by the table's functions only: a curve needs none


TRAINED = ("r2rank", "reczero", "r2ec")  # methods whose rows are a checkpoint's: one row per file
MAX_LINE = 2**20  # bytes of one metrics row read at most (a row is a few hundred): a file that is not one ends at once
MAX_EVAL = 2**28  # bytes of an eval file read at most (per-user values of 100,000 users and 8 methods: ~80 MB)


class ReportError(Exception):
    """A bad input file or argument; the message names it."""


# ------------------------------------------------------------------------------------------- table


def shorten(value, chars=80):
    """repr(value) cut to about `chars` characters: what an error shows of a bad value."""
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + "..."


def read_eval(path):
    """(methods, config) of an eval-<split>.json, read in at most MAX_EVAL bytes; anything else is one ReportError."""
    try:
        with open(path, "rb") as f:
            if not f.peek(2**16).lstrip().startswith(b"{"):  # a binary file, /dev/zero: refused at its first bytes
                raise ReportError(f"{path}: not an evaluation file of --stage eval (it does not start as a JSON object)")
            content = f.read(MAX_EVAL + 1)
        if len(content) > MAX_EVAL:
            raise ReportError(f"{path}: over {MAX_EVAL // 2**20} MB, so not an evaluation file of --stage eval")
        found = json.loads(content)
        methods, config = found["methods"], found["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ReportError(f"{path}: not an evaluation file of --stage eval ({shorten(error, 200)})") from None
    import evaluate

    if not isinstance(methods, dict) or not methods:
        raise ReportError(f'{path}: no method results in it ("methods" is empty)')
    wanted = ["user_id"] + [f"ndcg@{k}" for k in evaluate.KS]  # the per-user values the Wilcoxon tests pair
    for name, result in methods.items():
        per_user = result.get("per_user") if isinstance(result, dict) else None
        if not isinstance(per_user, list) or not per_user or any(not isinstance(user, dict) or set(wanted) - set(user) for user in per_user):
            raise ReportError(f'{path}: method {name!r} has no per-user values ("per_user" with {", ".join(wanted)} for '
                              "each user), which the table's tests need; evaluate it again with --stage eval")
    for key in ("model", "data_dir"):  # the table's header and the check that all files hold one split
        if not isinstance(config, dict) or key not in config:
            raise ReportError(f'{path}: its config has no "{key}" (not written by --stage eval?)')
    return methods, config


def merge_evals(specs):
    """specs: ["path" or "path=Title", ...] -> (results {key: method result}, groups for markdown_table,
    dataset name). A method met twice (e.g. random) is kept once; a trained method's rows are keyed method:title."""
    found = [(spec, *read_eval(spec.partition("=")[0])) for spec in specs]
    import evaluate

    titles = {name: title for rows in evaluate.GROUPS.values() for name, title in rows.items()}
    results, baseline_rows, trained, first, prompted_model = {}, {}, {name: [] for name in TRAINED}, None, None
    for spec, methods, config in found:
        path, _, title = spec.partition("=")
        users = [user["user_id"] for user in next(iter(methods.values()))["per_user"]]
        if first is None:
            first = (path, users, config)
        elif users != first[1]:
            raise ReportError(f"{path}: its users differ from those of {first[0]} (split {config.get('split')} of "
                              f"{config.get('data_dir')} vs {first[2].get('split')} of {first[2].get('data_dir')})")
        for name, result in methods.items():
            if name in TRAINED:
                row_title = title or os.path.dirname(path) or path
                key = f"{name}:{row_title}"
                if key in results:
                    raise ReportError(f"{spec}: two {titles[name]} rows called {row_title!r}; give each file its own title")
                results[key] = result
                trained[name].append((key, row_title))
            elif name not in results:
                results[name] = result
                baseline_rows[name] = titles.get(name, name)
                if name in evaluate.PROMPTED and prompted_model is None:
                    prompted_model = config["model"]  # the model the zero-shot rows ran on
    model = os.path.basename(os.path.normpath(prompted_model or first[2]["model"]))
    groups = [(group if group == "Baselines" else f"{group}: {model}",
               [(name, title) for name, title in rows.items() if name in baseline_rows])
              for group, rows in evaluate.GROUPS.items() if not set(rows) & set(TRAINED)]  # Table 2's untrained groups
    groups += [("Compared RL systems", trained["reczero"] + trained["r2ec"]), ("Ours", trained["r2rank"])]
    # the data set's own name, as eval printed it ("synthetic" for <out>/data); older files: from its folder
    return results, groups, first[2].get("dataset") or evaluate.dataset_name(first[2]["data_dir"])


def markdown_table(results, tests, dataset, groups):
    """Table 2's layout, as evaluate.markdown_table, with rows of any title (several trained rows): groups
    [(group title, [(key, row title)])]; each column's best is bold and marked by its test against the
    column's runner-up. A method with unparsable answers says how many, and is never best when they are most."""
    import evaluate

    metrics = [f"ndcg@{k}" for k in evaluate.KS]
    best = {}
    for metric in metrics:
        ranked = sorted((key for key in results if evaluate.rankable(results[key])), key=lambda key: -results[key][metric])
        if len(ranked) > 1 and results[ranked[0]][metric] > results[ranked[1]][metric]:
            p_value = evaluate.pair_test(tests, ranked[0], ranked[1], metric)["p_value"]
            best[metric] = (ranked[0], stats.significance_marker(p_value))
    lines = [f"| Method | {dataset} @1 | @5 | @10 |", "|---|---:|---:|---:|"]
    for group, rows in groups:
        lines += [f"| *{group}* | | | |"] if rows else []
        for key, title in rows:
            if failed := evaluate.unparsable(results[key]):
                title += (f" ({failed} of {len(results[key]['per_user'])} answers unparsable"
                          + (")" if evaluate.rankable(results[key]) else "; not marked best)"))
            cells = [f"**{results[key][m]:.3f}**{best[m][1]}" if best.get(m, ("",))[0] == key else f"{results[key][m]:.3f}"
                     for m in metrics]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(specs, dataset=None):
    """The table, then for every trained row its Wilcoxon p-value against each other row on NDCG@10."""
    results, groups, found_dataset = merge_evals(specs)
    import evaluate

    tests = evaluate.pairwise_tests(results)
    print(markdown_table(results, tests, dataset or found_dataset, groups))
    print(f"\n{tests['markers']}; bold: best in the column, tested against the runner-up ({tests['test']}).")
    print("Two-sided Wilcoxon p-values on NDCG@10 of each trained row, (+) when it is higher:")
    label = lambda key: key.partition(":")[2] or key  # "r2rank:RL" -> "RL"; "random" stays
    for name in (n for n in results if n.partition(":")[0] in TRAINED and ":" in n):
        others = [f"{label(other)} {(p := evaluate.pair_test(tests, name, other, 'ndcg@10')['p_value']):.2g}"
                  f"{stats.significance_marker(p)} ({'+' if results[name]['ndcg@10'] > results[other]['ndcg@10'] else '-'})"
                  for other in results if other != name]
        print(f"  {label(name)} vs " + ", ".join(others))


# ------------------------------------------------------------------------------------------- curve


CURVE_KEYS = ("reward", "valid_ndcg@10", "approx_kl", "step_time")  # the numbers `curve` reads from a row


def read_metrics(path):
    """metrics.jsonl -> list of row dicts, their steps rising. A bad line raises ReportError naming it (a line
    over MAX_LINE bytes too: /dev/zero or a binary file ends at its first line); a last line cut short (a run
    stopped while writing it) and a non-finite number in CURVE_KEYS (json writes NaN) are left out, with a
    note on stderr."""
    rows, left_out, previous = [], [], None  # previous: (step, line) of the last row
    try:
        f = open(path, "rb")
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from None
    with f:
        for lineno, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(line) > MAX_LINE:
                raise ReportError(f"{path}:{lineno}: a line over {MAX_LINE // 2**20} MB, so not a metrics.jsonl of --stage rl")
            try:
                text = line.decode("utf-8").removeprefix("\ufeff" if lineno == 1 else "")  # a BOM (Notepad's UTF-8)
            except UnicodeDecodeError as error:
                raise ReportError(f"{path}:{lineno}: not UTF-8 text (byte {error.start + 1}), so not a metrics.jsonl") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as error:
                if not line.endswith(b"\n"):  # the last line, cut short: --resume drops it too
                    print(f"note: {path}:{lineno}: a row cut short (the run stopped while writing it) is left out", file=sys.stderr)
                    break
                raise ReportError(f"{path}:{lineno}: malformed JSON ({shorten(getattr(error, 'msg', error), 100)}) "
                                  f"in {shorten(text[:100])}") from None
            if not isinstance(row, dict):
                raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            step = row.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise ReportError(f"{path}:{lineno}: no whole-number step ({shorten(step)})")
            if previous is not None and step <= previous[0]:  # a resume cuts the file back, so only two runs do this
                raise ReportError(f"{path}:{lineno}: step {step} after step {previous[0]} (line {previous[1]}): "
                                  "the rows of two runs in one file (two runs wrote into one --out?)")
            for name in [name for name in CURVE_KEYS if name in row]:
                if isinstance(row[name], bool) or not isinstance(row[name], (int, float)):
                    raise ReportError(f"{path}:{lineno}: {name} is {shorten(row[name])}, not a number")
                if not math.isfinite(row[name]):
                    left_out.append(f"line {lineno} {name} {json.dumps(row.pop(name))}")
            rows.append(row)
            previous = (step, lineno)
    if not rows:
        raise ReportError(f"{path}: no metrics yet")
    if left_out:
        print(f"note: {path}: non-finite values left out: " + ", ".join(left_out), file=sys.stderr)
    return rows


def moving_average(values, window):
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(last := values[max(0, i - window + 1): i + 1]) / len(last) for i in range(len(values))]


def ascii_chart(series, width=64, height=14):
    """series: [(label, mark, [(x, y), ...])] -> lines of a chart from the smallest to the largest y.

    Each point lands in the cell nearest to it; a later series overwrites an earlier one."""
    points = [(x, y) for _, _, values in series for x, y in values]
    x_low, x_high = min(x for x, _ in points), max(x for x, _ in points)
    y_low, y_high = min(y for _, y in points), max(y for _, y in points)
    y_span = max(y_high - y_low, 1e-12)
    grid = [[" "] * width for _ in range(height)]
    for _, mark, values in series:
        for x, y in values:
            column = round((x - x_low) / max(x_high - x_low, 1e-12) * (width - 1))
            row = height - 1 - round((y - y_low) / y_span * (height - 1))
            grid[row][column] = mark
    lines = [f"{y_low + y_span * (height - 1 - i) / (height - 1):6.3f} |" + "".join(cells) for i, cells in enumerate(grid)]
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"{x_low:<{width // 2}g}{x_high:>{width - width // 2}g}  (step)")
    lines.append("  " + "   ".join(f"{mark} {label}" for label, mark, _ in series))
    return lines


def run_series(rows, window):
    """A run's rows -> {name: [(step, value), ...]}: the reward's moving average over `window` steps,
    the reward per step, the validation NDCG@10, approx_kl."""
    series = {name: [(row["step"], row[name]) for row in rows if name in row]
              for name in ("reward", "valid_ndcg@10", "approx_kl")}
    series["reward_mean"] = list(zip([step for step, _ in series["reward"]],
                                     moving_average([value for _, value in series["reward"]], window)))
    return series


def summary(rows, series):
    """One line: the steps, their time, and the first, best and last validation NDCG@10."""
    valid = series["valid_ndcg@10"]
    seconds = sum(row.get("step_time", 0.0) for row in rows)
    best_step, best = max(valid, key=lambda point: point[1]) if valid else (None, None)  # the first of equals
    return f"{sum(row['step'] > 0 for row in rows)} steps, {seconds / 3600:.2f} h of step time; " + (
        f"validation NDCG@10 first {valid[0][1]:.3f} (step {valid[0][0]}), best {best:.3f} (step {best_step}), "
        f"last {valid[-1][1]:.3f}" if valid else "no validation rows (--eval-every)")


def curve(specs, window, png=None):
    """Each metrics file as a text chart and a summary line; with png, the files on one figure instead."""
    runs = []
    for spec in specs:
        path, _, label = spec.partition("=")  # the label defaults to the run's folder
        label = label or os.path.dirname(path) or path
        rows = read_metrics(path)
        series = run_series(rows, window)
        if not series["reward"] and not series["valid_ndcg@10"]:
            raise ReportError(f"{path}: nothing to draw (no reward nor valid_ndcg@10 in any row)")
        runs.append((path, label, rows, series))
    if png is not None:
        draw_png([(label, series) for _, label, _, series in runs], png, window)  # first: a failure prints one line only
        for _, label, rows, series in runs:
            print(f"{label}: {summary(rows, series)}")
        print(f"wrote {png}")
        return
    for path, label, rows, series in runs:
        if len(runs) > 1:
            print(f"\n{label} ({path})")
        chart = [(f"training reward (NDCG@10 of sampled rankings), mean of the last {window} steps", ".",
                  series["reward_mean"])]
        if series["valid_ndcg@10"]:
            chart.append(("validation NDCG@10 (greedy traces, ranked by score)", "o", series["valid_ndcg@10"]))
        print("\n".join(ascii_chart(chart) + [summary(rows, series)]))


def new_figure(height):
    """A matplotlib Figure 8 inches wide (matplotlib: an optional extra, which only the PNG needs)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportError(f"--png needs matplotlib, an optional extra ({error}); install it with: pip install matplotlib") from None
    return Figure(figsize=(8, height), dpi=100, layout="constrained")


def save(figure, png):
    try:
        figure.savefig(png, format="png")  # whatever the file's name ends in
    except OSError as error:
        raise ReportError(f"--png {png}: cannot write it ({error.strerror or error})") from None


def draw_png(runs, png, window):
    """runs: [(label, run_series(...))] -> png: three panels against the step (reward, validation
    NDCG@10, approx_kl), one colour per run."""
    figure = new_figure(9)
    from matplotlib.ticker import MaxNLocator

    reward_axes, valid_axes, kl_axes = figure.subplots(3, 1, sharex=True)
    for index, (label, series) in enumerate(runs):
        color = f"C{index % 10}"
        reward_axes.plot([], [], color=color, label=label)  # the run's legend entry, whatever it logged
        if series["reward"]:
            reward_axes.plot(*zip(*series["reward"]), color=color, alpha=0.25, linewidth=1)
            reward_axes.plot(*zip(*series["reward_mean"]), color=color)
        if series["valid_ndcg@10"]:
            valid_axes.plot(*zip(*series["valid_ndcg@10"]), color=color, marker="o", markersize=4, label=label)
            best_step, best = max(series["valid_ndcg@10"], key=lambda point: point[1])
            valid_axes.plot([best_step], [best], color=color, marker="*", markersize=14, linestyle="none")
        if series["approx_kl"]:
            kl_axes.plot(*zip(*series["approx_kl"]), color=color, label=label)
    reward_axes.set_title(f"training reward (NDCG@10 of sampled rankings): per step (faint), mean of the last {window} (solid)",
                          fontsize=10)
    valid_axes.set_title("validation NDCG@10 (greedy traces, ranked by score; step 0 = the start; * = best)", fontsize=10)
    kl_axes.set_title("approx_kl (PPO, KL(old || new) per token)", fontsize=10)
    for axes, name, missing in ((reward_axes, "reward", "no reward rows"),
                                (valid_axes, "valid_ndcg@10", "no validation rows (--eval-every)"),
                                (kl_axes, "approx_kl", "no approx_kl (the LLM was not trained: --freeze-llm?)")):
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        if not any(series[name] for _, series in runs):
            axes.text(0.5, 0.5, missing, transform=axes.transAxes, ha="center", va="center", color="gray")
    reward_axes.legend(fontsize=9, loc="best")
    kl_axes.set_xlabel("step")
    kl_axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    save(figure, png)


# ------------------------------------------------------------------------------ curves over seeds


def group_curves(groups):
    """groups: {system: [seed's [(step, value), ...], ...]} -> {system: [(step, median, low, high, seeds), ...]},
    steps rising: at each step any seed logged, the median of the seeds' values there (the mean of the two
    middle ones for an even count), their min and max, and how many seeds logged it."""
    out = {}
    for name, seeds in groups.items():
        by_step = {}
        for points in seeds:
            for step, value in points:
                by_step.setdefault(step, []).append(value)
        out[name] = [(step, statistics.median(values), min(values), max(values), len(values))
                     for step, values in sorted(by_step.items())]
    return out


def read_floors(specs):
    """--floors: eval-<split>.json files (their random and popularity NDCG@10) or NAME=VALUE -> {name: value}."""
    floors = {}
    for spec in specs:
        name, equals, value = spec.partition("=")
        if equals and not os.path.exists(spec):
            try:
                floors[name] = float(value)
            except ValueError:
                raise ReportError(f"--floors {spec}: not NAME=NUMBER nor an eval file") from None
            continue
        methods, config = read_eval(spec)
        if config.get("split") not in (None, "valid"):
            print(f"note: --floors {spec} is of split {config.get('split')}, the curves are validation NDCG@10", file=sys.stderr)
        for method, title in (("random", "Random"), ("popularity", "Popularity")):
            if method in methods:
                floors[title] = methods[method]["ndcg@10"]
    return floors


def compare_curves(group_specs, floor_specs=(), png=None):
    """--group NAME=GLOB ...: each system's validation NDCG@10 over its seeds, as text and optionally a PNG."""
    groups = {}
    for spec in group_specs:
        name, equals, pattern = spec.partition("=")
        if not equals or not name or not pattern:
            raise ReportError(f"--group {spec}: give NAME=GLOB, e.g. 'R2Rank=runs/r2rank-s*/metrics.jsonl'")
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise ReportError(f"--group {spec}: no file matches {pattern}")
        seeds = [[(row["step"], row["valid_ndcg@10"]) for row in read_metrics(path) if "valid_ndcg@10" in row] for path in paths]
        if not any(seeds):
            raise ReportError(f"--group {spec}: no validation rows in {', '.join(paths)} (--eval-every)")
        groups[name] = seeds
    curves, floors = group_curves(groups), read_floors(floor_specs)
    for name, points in curves.items():
        print(f"{name} ({len(groups[name])} runs): validation NDCG@10, median [min, max] (seeds) per step")
        for step, median, low, high, count in points:
            print(f"  step {step:>5}: {median:.3f} [{low:.3f}, {high:.3f}] ({count})")
    for name, value in floors.items():
        print(f"{name}: {value:.3f}")
    if png is not None:
        draw_comparison(curves, floors, png)
        print(f"wrote {png}")
    return curves


def draw_comparison(curves, floors, png):
    """curves: group_curves(...); floors: {name: value} -> png, one panel: each system's median line and min-max band."""
    figure = new_figure(5)
    axes = figure.subplots()
    for index, (name, points) in enumerate(curves.items()):
        steps, medians, lows, highs, counts = zip(*points)
        color = f"C{index % 10}"
        axes.fill_between(steps, lows, highs, color=color, alpha=0.2, linewidth=0)
        axes.plot(steps, medians, color=color, marker="o", markersize=4, label=f"{name} (median of {max(counts)}, band min-max)")
    for index, (name, value) in enumerate(floors.items()):
        axes.axhline(value, color="gray", linestyle=("--", ":", "-.")[index % 3], linewidth=1, label=f"{name} ({value:.3f})")
    axes.set_xlabel("step")
    axes.set_ylabel("validation NDCG@10")
    axes.set_title("validation NDCG@10 over seeds: median (line), min-max (band)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    save(figure, png)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table_args = commands.add_parser("table", help="one Table-2 layout from several eval-<split>.json files")
    table_args.add_argument("files", nargs="+", help="eval-<split>.json files, each optionally =Title (its trained row's)")
    table_args.add_argument("--dataset", help="the dataset's name in the header (default: the first file's)")
    curve_args = commands.add_parser("curve", help="reward and validation NDCG@10 per step of a run, as text or a PNG")
    curve_args.add_argument("metrics", nargs="*", help="metrics.jsonl of --stage rl, optionally =Label (default: its directory)")
    curve_args.add_argument("--group", action="append", default=[], metavar="NAME=GLOB", help="instead: one system's "
                            "metrics files (a quoted glob), repeated per system: medians and min-max bands over seeds")
    curve_args.add_argument("--floors", action="append", default=[], metavar="FILE or NAME=VALUE",
                            help="with --group: lines at an eval-valid.json's random and popularity rows, or at a value")
    curve_args.add_argument("--window", type=int, default=10, help="steps in the reward's moving average")
    curve_args.add_argument("--png", help="draw the curves into this PNG (needs matplotlib: pip install matplotlib)")
    args = parser.parse_args(argv)
    if args.command == "curve" and bool(args.metrics) == bool(args.group):
        parser.error("curve: give metrics files, or --group NAME=GLOB (one per system), not both")
    if args.command == "curve" and args.floors and not args.group:
        parser.error("curve: --floors goes with --group")
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
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left in the buffer goes nowhere
        sys.exit(128 + 13)  # 128 + SIGPIPE, a shell's status for a writer its reader left


if __name__ == "__main__":
    main()
