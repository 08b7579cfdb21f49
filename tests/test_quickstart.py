"""The README's quickstart learns: its command, as printed there (the tiny model's defaults,
r2rank.TINY_DEFAULTS: 100 steps on the pointwise synthetic set it builds in <out>/data), for two seeds,
is at validation NDCG@10 >= 0.9 by half its steps and still at the end, on validation items no training user
met (popularity cannot rank them, tests/test_synthetic.py). About a minute per seed on one core; the
two seeds run side by side."""
import json
import os
import shlex
from concurrent.futures import ThreadPoolExecutor

import r2rank
from conftest import ROOT, run_cli


def quickstart_args():
    """The arguments of the README quickstart's `python r2rank.py` line."""
    text = open(os.path.join(ROOT, "README.md")).read().replace("\\\n", " ")
    line = next(row for row in text.splitlines() if row.startswith("python r2rank.py --stage rl --model tiny"))
    return shlex.split(line.split("#")[0])[2:]


def test_the_quickstart_learns_for_two_seeds(tmp_path):
    args = quickstart_args()
    assert args[:4] == ["--stage", "rl", "--model", "tiny"] and "--data" not in args
    with ThreadPoolExecutor(2) as pool:  # the two seeds side by side, one core each
        results = list(pool.map(lambda seed: run_cli(*args, "--out", tmp_path / f"seed-{seed}", "--seed", seed, "--threads", 1),
                                (0, 1)))
    last = r2rank.TINY_DEFAULTS["max_steps"]
    for seed, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / f"seed-{seed}" / "metrics.jsonl") as f:
            curve = {row["step"]: row["valid_ndcg@10"] for row in map(json.loads, f) if "valid_ndcg@10" in row}
        assert sorted(curve) == list(range(0, last + 1, r2rank.TINY_DEFAULTS["eval_every"])), (seed, curve)
        assert curve[last // 2] >= 0.9 and curve[last] >= 0.9, (seed, curve)  # there by half its steps, and at the end
        assert curve[0] < 0.7, (seed, curve)  # it learned: the untrained model's ranking is near random
