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


@pytest.mark.parametrize("flags, fix", [([], "--gradient-checkpointing"), (["--gradient-checkpointing"], "--micro-batch 2"),
                                        (["--gradient-checkpointing", "--micro-batch", "2"], "--lora-rank 16 --lr 1e-4"),
                                        (["--gradient-checkpointing", "--micro-batch", "2", "--lora-rank", "4"], "--max-new-tokens")])
def test_out_of_memory_names_the_next_setting_of_the_memory_table(flags, fix, capsys):
    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as stopped:
        r2rank.run_stage(out_of_memory, r2rank.parse_args(["--out", "unused", *flags]))
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: out of memory (CUDA out of memory.")
    assert f"try {fix}" in err or (fix == "--max-new-tokens" and fix in err)
