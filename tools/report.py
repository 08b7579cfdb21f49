"""Results across runs: one table from several `--stage eval` files, and a learning curve as text.

    python tools/report.py table runs/baselines/eval-test.json runs/ml-mlp/eval-test.json=MLP-only ...
    python tools/report.py curve runs/ml-rl/metrics.jsonl

`table` reads the per-user NDCG values that `python r2rank.py --stage eval` writes (eval-<split>.json),
puts every method of every file in one table in the layout of the paper's Table 2, and tests every
pair with the paired Wilcoxon signed-rank test. A file's trained row (R2Rank, or a compared RL system:
reczero, r2ec) takes the title given after "=", so several trained runs (MLP-only, RL, a system before
and after training, ...) can sit side by side. All files must hold the same users.

`curve` draws the training reward (a moving average, since one step sees few users) and the
validation NDCG@10 from a run's metrics.jsonl as a character chart.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import evaluate  # noqa: E402
import metrics  # noqa: E402
import sources  # noqa: E402


TRAINED = ("r2rank", "reczero", "r2ec")  # methods whose rows are a checkpoint's: one row per file


class ReportError(ValueError):
    """A bad input file or argument; the message names it."""


# ------------------------------------------------------------------------------------------- table


def read_eval(path):
    try:
        with open(path) as f:
            found = json.load(f)
        return found["methods"], found["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ReportError(f"{path}: not an evaluation file of --stage eval ({error!r})") from None


def merge_evals(specs):
    """specs: ["path" or "path=Title", ...] -> (results {key: method result}, groups for
    evaluate.markdown_table, dataset name). A method met twice (e.g. random) is kept once."""
    results, baseline_rows, trained, first, prompted_model = {}, {}, {name: [] for name in TRAINED}, None, None
    for spec in specs:
        path, _, title = spec.partition("=")
        methods, config = read_eval(path)
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
                    raise ReportError(f"{spec}: two {evaluate.TITLES[name]} rows called {row_title!r}; give each file its own title")
                results[key] = result
                trained[name].append((key, row_title))
            elif name not in results:
                results[name] = result
                baseline_rows[name] = evaluate.TITLES[name]
                if name in evaluate.PROMPTED and prompted_model is None:
                    prompted_model = config["model"]  # the model the zero-shot rows ran on
    model = os.path.basename(os.path.normpath(prompted_model or first[2]["model"]))
    groups = [(group, [(name, title) for name, title in rows if name in baseline_rows])
              for group, rows in evaluate.default_groups(model)[:2]]
    groups += [("Compared RL systems", trained["reczero"] + trained["r2ec"]), ("Ours", trained["r2rank"])]
    return results, groups, os.path.basename(os.path.normpath(first[2]["data_dir"]))


def significance_lines(results, tests, metric="ndcg@10"):
    """For every trained row: its Wilcoxon p-value against each other row on metric."""
    label = lambda key: key.partition(":")[2] or key  # "r2rank:RL" -> "RL"; "random" stays
    lines = []
    for name in (n for n in results if n.partition(":")[0] in TRAINED and ":" in n):
        others = []
        for other in (o for o in results if o != name):
            p_value = evaluate.pair_test(tests, name, other, metric)["p_value"]
            sign = "+" if results[name][metric] > results[other][metric] else "-"
            others.append(f"{label(other)} {p_value:.2g}{metrics.significance_marker(p_value)} ({sign})")
        lines.append(f"{label(name)} vs " + ", ".join(others))
    return lines


def table(specs, dataset=None):
    results, groups, found_dataset = merge_evals(specs)
    dataset = dataset or found_dataset
    tests = evaluate.pairwise_tests(results)
    print(evaluate.markdown_table(results, tests, dataset, groups))
    print(f"\n{tests['markers']}; bold: best in the column, tested against the runner-up ({tests['test']}).")
    print("Two-sided Wilcoxon p-values on NDCG@10 of each trained row, (+) when it is higher:")
    for line in significance_lines(results, tests):
        print("  " + line)


# ------------------------------------------------------------------------------------------- curve


def read_metrics(path):
    """metrics.jsonl -> list of row dicts; a bad line raises ReportError with its number."""
    try:
        rows = [row for _, row in sources.read_jsonl(path)]
    except sources.DataError as error:
        raise ReportError(str(error)) from None
    if not rows:
        raise ReportError(f"{path}: no metrics yet")
    return rows


def moving_average(values, window):
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


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


def curve(path, window):
    rows = read_metrics(path)
    trained = [row for row in rows if "reward" in row]  # step 0 holds only the start's validation
    reward = moving_average([row["reward"] for row in trained], window)
    valid = [(row["step"], row["valid_ndcg@10"]) for row in rows if "valid_ndcg@10" in row]
    series = [(f"training reward (NDCG@10 of sampled rankings), mean of the last {window} steps", ".",
               list(zip([row["step"] for row in trained], reward)))]
    if valid:
        series.append(("validation NDCG@10 (greedy traces, ranked by score)", "o", valid))
    for line in ascii_chart(series):
        print(line)
    seconds = sum(row.get("step_time", 0.0) for row in rows)
    best_step, best = max(valid, key=lambda point: point[1]) if valid else (None, None)  # the first of equals
    print(f"{len(trained)} steps, {seconds / 3600:.2f} h of step time; " + (
        f"validation NDCG@10 first {valid[0][1]:.3f} (step {valid[0][0]}), best {best:.3f} (step {best_step}), "
        f"last {valid[-1][1]:.3f}" if valid else "no validation rows (--eval-every)"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table_args = commands.add_parser("table", help="one Table-2 layout from several eval-<split>.json files")
    table_args.add_argument("files", nargs="+", help="eval-<split>.json of --stage eval, optionally =Title for its trained row (R2Rank, reczero, r2ec)")
    table_args.add_argument("--dataset", help="the dataset's name in the header (default: the data directory's name)")
    curve_args = commands.add_parser("curve", help="reward and validation NDCG@10 per step of a run, as text")
    curve_args.add_argument("metrics", help="metrics.jsonl of --stage rl")
    curve_args.add_argument("--window", type=int, default=10, help="steps in the reward's moving average")
    args = parser.parse_args(argv)
    try:
        table(args.files, args.dataset) if args.command == "table" else curve(args.metrics, max(args.window, 1))
    except ReportError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
