"""Each row of the paper's Tables 3-5 by the flags README's paper-to-code map gives, run for two steps on the tiny
model: it trains, logs both steps, and moves the weights the row trains and no others."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import models
import r2rank

ROWS = {  # README's map: row -> flags
    "R2Rank (Table 2, the RL stage)": [],
    "LLM+MLP, Algorithm 1 to the letter (Table 3)": ["--no-score-path", "--num-rankings", "1", "--no-baseline"],
    "MLP-only (Table 3)": ["--freeze-llm"],
    "Without CoT (Table 5)": ["--prompt", "answer-only", "--max-new-tokens", "8"],
    "no token, the score path alone": ["--max-new-tokens", "0"],
}


@pytest.mark.parametrize("row", ROWS)
def test_each_table_row_runs_by_its_flags(row, tmp_path):
    out = tmp_path / "run"
    r2rank.main(["--stage", "rl", "--model", "tiny", "--out", str(out), "--max-steps", "2", "--eval-every", "0",
                 "--threads", "1", *ROWS[row]])
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2]
    saved = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    start = models.build_tiny(seed=0)[0].state_dict()
    moved = max((saved[name] - start[name]).abs().max().item() for name in saved)
    if "--freeze-llm" in ROWS[row]:
        assert moved == 0.0  # MLP-only: the LLM is the one it started from
    else:
        assert moved > 1e-4
    record = json.load(open(out / "checkpoint-2" / "r2rank.json"))
    for flag, value in zip(ROWS[row], ROWS[row][1:] + [""]):  # the row's flags are what the run recorded
        if flag.startswith("--no-"):
            assert record["args"][flag[5:].replace("-", "_")] is False
        elif flag == "--freeze-llm":
            assert record["args"]["freeze_llm"] is True
        elif flag.startswith("--"):
            assert str(record["args"][flag[2:].replace("-", "_")]) == value
    assert os.path.isfile(out / "checkpoint-2" / "head.safetensors")
    assert torch.isfinite(load_file(str(out / "checkpoint-2" / "head.safetensors"))["net.1.weight"]).all()
