"""The models: the published Qwen2.5 architectures behind --model random:<name>."""
import pytest
import torch

import models

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
    with pytest.raises(models.data.UsageError, match="random:qwen2.5-1.5b"):
        models.load_policy("random:qwen2.5-2b", torch.device("cpu"), torch.float32)
