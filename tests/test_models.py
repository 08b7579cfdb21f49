"""The models: the published Qwen2.5 architectures behind --model random:<name>."""
import pytest
import torch

from protocol import UsageError
from machinery import models

# Parameter counts from the Qwen2.5-Instruct model cards (billions, two decimals): total, and without
# the embeddings (the input embedding, and the output one where it is not tied).
PUBLISHED = {"qwen2.5-0.5b": (0.49, 0.36), "qwen2.5-1.5b": (1.54, 1.31), "qwen2.5-3b": (3.09, 2.77),
             "qwen2.5-7b": (7.61, 6.53)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_random_architectures_have_the_published_parameter_counts(name):
    tokenizer = models.offline_tokenizer()
    model = models.random_model(models.qwen25_config(name), tokenizer, seed=0, device="meta")  # no memory
    total = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    embeddings = sum(m.weight.numel() for m in {model.get_input_embeddings(), model.get_output_embeddings()}
                     if m.weight is not None) if not model.config.tie_word_embeddings else model.get_input_embeddings().weight.numel()
    assert (round(total / 1e9, 2), round((total - embeddings) / 1e9, 2)) == PUBLISHED[name]
    assert model.config.vocab_size == 151936 and model.config.rope_parameters["rope_theta"] == 1e6
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name != "qwen2.5-7b")


def test_an_unknown_architecture_is_one_line():
    with pytest.raises(models.UsageError, match="random:qwen2.5-1.5b"):
        models.load_policy("random:qwen2.5-2b", torch.device("cpu"), torch.float32)


def test_the_meta_device_is_refused_in_one_line():
    """meta holds shapes without values: a run on it would fail deep inside the first forward."""
    with pytest.raises(models.UsageError, match=r"^--device meta: the meta device holds shapes only"):
        models.pick_device("meta")
    assert models.pick_device("cpu") == torch.device("cpu")


def test_a_head_of_another_width_or_hidden_size_is_one_line_naming_both(tmp_path):
    """head.safetensors and r2rank.json of two runs mixed, or the head of another model: one line naming
    the file, the shapes it holds and needs, and what to do; a matching head loads exactly."""
    import json

    from safetensors.torch import save_file

    from head import ScoreHead

    def checkpoint(name, saved_width, saved_hidden, recorded_width):
        path = tmp_path / name
        path.mkdir()
        torch.manual_seed(0)
        head = ScoreHead(saved_hidden, saved_width)
        save_file(head.state_dict(), str(path / "head.safetensors"))
        (path / "r2rank.json").write_text(json.dumps({"head_width": recorded_width}))
        return str(path), head

    other_model, _ = checkpoint("other-model", 8, 32, 8)
    with pytest.raises(models.UsageError) as error:
        models.load_head(other_model, 64, torch.device("cpu"))
    assert str(error.value) == (f"{other_model}/head.safetensors: a head of width 8 on hidden size 32, but this run needs "
                                "width 8 (its r2rank.json) on hidden size 64 (the model's): start a new head with "
                                "--new-head, or pass the model the head was trained on as --model")
    mixed, _ = checkpoint("mixed", 8, 64, 16)
    with pytest.raises(models.UsageError, match=r"a head of width 8 on hidden size 64, but this run needs width 16"):
        models.load_head(mixed, 64, torch.device("cpu"))
    same, saved = checkpoint("same", 8, 64, 8)
    loaded = models.load_head(same, 64, torch.device("cpu"))
    hidden = torch.randn(3, 64)
    assert torch.equal(loaded(hidden), saved(hidden))


def test_the_update_layout_is_chosen_by_memory():
    """--gradient-checkpointing auto on CUDA: off when the shared-prefix update fits (Qwen2.5-1.5B, all weights, micro-batch 8:
    about 57 GiB estimated, x 1.25), on when it does not; off on a CPU; "on" / "off" as given."""
    from machinery import memory

    config = models.qwen25_config("qwen2.5-1.5b")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    shape = dict(config=config, K=20, prompt_tokens=700, shared_tokens=500, new_tokens=512, micro_batch=8, compute_bytes=2,
                 lora_rank=0)
    peak = memory.estimate_memory(config, 20, 700, 512, 8, False, 2, 0, shared_prefix_tokens=500)[1]["peak"]
    assert 50 * 2**30 < peak < 65 * 2**30
    assert memory.choose_checkpointing("auto", cuda, **shape, available_bytes=80 * 2**30)[0] is False
    assert memory.choose_checkpointing("auto", cuda, **shape, available_bytes=peak * 1.2)[0] is True  # inside the margin
    assert memory.choose_checkpointing("auto", cuda, **shape, available_bytes=24 * 2**30)[0] is True
    assert memory.choose_checkpointing("auto", cpu, **shape)[0] is False
    assert memory.choose_checkpointing("on", cpu, **shape)[0] is True and memory.choose_checkpointing("off", cuda, **shape)[0] is False


def test_a_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    """Without tokenizer.json the directory loads a tokenizer of 3 special tokens that encodes every prompt
    as []: eval then scored 0.300 instead of 0.762 without a word. Refused, naming the directory."""
    model, tokenizer = models.build_tiny()
    model.save_pretrained(tmp_path), tokenizer.save_pretrained(tmp_path)
    models.load_policy(str(tmp_path), torch.device("cpu"), torch.float32)  # whole: it loads
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match=f"--model {tmp_path}: its tokenizer encodes the prompt as 0 tokens .*a vocabulary of 3"):
        models.load_policy(str(tmp_path), torch.device("cpu"), torch.float32)


def test_new_tokens_beyond_the_context_window_are_refused(synthetic_dir, tmp_path):
    """The tiny model has 4,096 positions: --max-new-tokens 5000 generated past them without a word."""
    from conftest import run_cli
    for stage, extra in (("rl", ["--max-steps", "1"]), ("eval", ["--methods", "pointwise"])):
        result = run_cli("--stage", stage, "--model", "tiny", "--data", synthetic_dir, "--max-new-tokens", "5000",
                         "--out", tmp_path / stage, "--threads", "1", *extra)
        assert result.returncode == 1, result.stderr[-500:]
        assert result.stderr.strip().splitlines()[-1] == ("error: --max-new-tokens 5000 does not fit the model's context "
                                                          "window of 4096 positions (max_position_embeddings) with the "
                                                          "prompt before it: lower --max-new-tokens")


def test_a_run_without_reward_signal_says_so_once(synthetic_dir, tmp_path):
    """--pl-std 1e30 spreads a user's scores so far that every ranking drawn is the same (signal_share 0):
    the head and the score path learn nothing. The log said nothing; now one line, once."""
    from conftest import run_cli
    result = run_cli("--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--max-new-tokens", "1", "--max-history", "0",
                     "--users-per-step", "2", "--pl-std", "1e30", "--max-steps", "14", "--out", tmp_path / "run", "--threads", "1")
    assert result.returncode == 0, result.stderr[-500:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "signal_share 0" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: step 10: for 10 steps"), lines


@pytest.mark.parametrize("kind", ["missing", "file", "no config"])
def test_a_model_path_that_is_no_model_is_one_line_and_never_asks_the_hub(tmp_path, kind):
    """--model /nonexistent or --model README.md went to the hub and came back as a repo-id or JSON error;
    a directory without config.json as 'should have a model_type key'."""
    path = {"missing": tmp_path / "none", "file": tmp_path / "README.md", "no config": tmp_path / "empty"}[kind]
    if kind == "file":
        path.write_text("# not a model\n")
    if kind == "no config":
        path.mkdir()
    expected = {"missing": "no such directory", "file": "a file, not a model directory",
                "no config": "a directory without config.json"}[kind]
    with pytest.raises(UsageError, match=f"^--model {path}: {expected}"):
        models.load_policy(str(path), torch.device("cpu"), torch.float32)
