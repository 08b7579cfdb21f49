"""Loading models (r2rank.load_model, models.py): the published Qwen2.5 architectures behind
--model random:<name>, and one-line refusals of what cannot be a model, a device or a head."""
import json

import pytest
import torch
from safetensors.torch import save_file

import models
import r2rank
import runs
from data import UsageError
from head import ScoreHead

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
    with pytest.raises(UsageError, match=r"^--model random:qwen2.5-2b: unknown architecture; .*random:qwen2.5-1.5b"):
        r2rank.load_model("random:qwen2.5-2b", "cpu")


def test_the_meta_device_is_refused_in_one_line():
    """meta holds shapes without values: a run on it would fail deep inside the first forward."""
    with pytest.raises(UsageError, match=r"^--device meta: this machine cannot compute there"):
        runs.pick_device("meta")
    assert runs.pick_device("cpu") == torch.device("cpu")


def test_a_head_of_another_width_or_hidden_size_is_one_line_naming_the_file(tmp_path):
    """head.safetensors of another --head-width, or of a model of another hidden size: one line naming the
    file and what to do; a matching head loads exactly."""
    def checkpoint(name, saved_hidden, saved_width):
        path = tmp_path / name
        path.mkdir()
        torch.manual_seed(0)
        head = ScoreHead(saved_hidden, saved_width)
        save_file(head.state_dict(), str(path / "head.safetensors"))
        return str(path), head

    for name, hidden, width in (("other-model", 32, 8), ("other-width", 64, 16)):
        path, _ = checkpoint(name, hidden, width)
        with pytest.raises(UsageError) as error:
            runs.load_head(ScoreHead(64, 8), path)
        message = str(error.value)
        assert message.startswith(f"{path}/head.safetensors: a head of shapes ") and "\n" not in message
        assert "--head-width" in message and "--model" in message
    path, saved = checkpoint("same", 64, 8)
    loaded = ScoreHead(64, 8)
    runs.load_head(loaded, path)
    hidden = torch.randn(3, 64)
    assert torch.equal(loaded(hidden), saved(hidden))


def test_a_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    """Without tokenizer.json the folder loads a tokenizer of 3 special tokens that encodes every prompt as []:
    eval then scores a constant ranking without a word. Refused in one line naming the folder."""
    model, tokenizer = models.build_tiny()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    r2rank.load_model(str(tmp_path), "cpu")  # whole: it loads
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match=rf"^--model {tmp_path}: .*tokenizer"):
        r2rank.load_model(str(tmp_path), "cpu")


@pytest.mark.parametrize("kind", ["missing", "file", "no config"])
def test_a_model_path_that_is_no_model_is_one_line_and_never_asks_the_hub(tmp_path, kind, monkeypatch):
    """--model /nonexistent, --model README.md or a folder without config.json: one line naming it, and no
    request to the hub (which would answer with a repo-id or JSON error)."""
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError("asked the hub")

    for name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", hub)
    path = {"missing": tmp_path / "none", "file": tmp_path / "README.md", "no config": tmp_path / "empty"}[kind]
    if kind == "file":
        path.write_text("# not a model\n")
    if kind == "no config":
        path.mkdir()
        (path / "notes.json").write_text(json.dumps({}))
    expected = {"missing": "no such model folder", "file": "a file, not a model folder",
                "no config": "a folder without config.json"}[kind]
    with pytest.raises(UsageError, match=f"^--model {path}: {expected}") as error:
        r2rank.load_model(str(path), "cpu")
    assert "\n" not in str(error.value)
