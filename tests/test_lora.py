"""LoRA (lora.py): the base model at step 0, gradients only in the adapters, the adapted layer against
its merged weight by hand, the merged checkpoint equal to the adapted model, and the RL stage with
--lora-rank end to end."""
import os
import types

import pytest
import torch
from safetensors.torch import load_file

import lora
import models
import r2rank
import runs
from conftest import run_cli


@pytest.fixture
def tiny():
    return models.build_tiny(seed=0)


def test_adapters_start_as_the_base_model_and_only_they_get_gradients(tiny):
    model, _ = tiny
    ids = torch.randint(0, 600, (2, 10), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    torch.manual_seed(0)
    adapters = lora.add_adapters(model, rank=4)
    assert len(lora.lora_layers(model)) == 2 * 7 and len(adapters) == 2 * 2 * 7  # 2 layers x 7 projections, A and B each
    after = model(input_ids=ids).logits
    assert torch.equal(after, before)  # B = 0: exactly the base model
    after.logsumexp(-1).sum().backward()
    trained = {id(p) for p in adapters}
    for name, parameter in model.named_parameters():
        if id(parameter) in trained:
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name
    assert all(m.lora_B.grad.abs().sum() > 0 for m in lora.lora_layers(model).values())  # B moves first (A's grad is 0 at B = 0)


def test_the_adapted_layer_is_the_merged_weight_by_hand():
    base = torch.nn.Linear(6, 5)
    layer = lora.LoRALinear(base, rank=2)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    W = base.weight + 2.0 * layer.lora_B @ layer.lora_A  # alpha / r = 2, by hand
    torch.testing.assert_close(layer(x), x @ W.T + base.bias)
    torch.testing.assert_close(layer.delta(), W - base.weight)


def test_the_merged_checkpoint_loads_as_a_plain_model_and_resume_unmerges_it(tiny, tmp_path):
    model, tokenizer = tiny
    torch.manual_seed(0)
    adapters = lora.add_adapters(model, rank=4)
    with torch.no_grad():
        for parameter in adapters:
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids = torch.randint(0, 600, (2, 10), generator=torch.Generator().manual_seed(1))
    adapted_logits = model(input_ids=ids).logits.detach()
    base_weights = {name: m.weight.detach().clone() for name, m in lora.lora_layers(model).items()}

    args = types.SimpleNamespace(lora_rank=4, keep_checkpoints=0)
    runs.save_checkpoint(str(tmp_path), 1, model, tokenizer, None, {}, args, types.SimpleNamespace(fingerprint=""))
    path = str(tmp_path / "checkpoint-1")
    assert os.path.isfile(os.path.join(path, "lora.safetensors")) and runs.checkpoint_problem(path) is None
    plain, _ = r2rank.load_model(path, "cpu")
    assert not lora.lora_layers(plain)
    torch.testing.assert_close(plain(input_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-4)
    lora.add_adapters(plain, 4)  # as --resume does
    lora.restore_adapters(plain, load_file(os.path.join(path, "lora.safetensors")))
    torch.testing.assert_close(plain(input_ids=ids).logits, adapted_logits, rtol=1e-5, atol=1e-4)
    for name, module in lora.lora_layers(plain).items():
        torch.testing.assert_close(module.weight, base_weights[name], rtol=0, atol=1e-6)


def test_cli_rl_with_lora_changes_weights_by_low_rank_updates_only(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    common = ["--stage", "rl", "--model", "tiny", "--data", synthetic_dir, "--out", out, "--users-per-step", 1,
              "--max-new-tokens", 6, "--max-history", 3, "--save-every", 1, "--keep-checkpoints", 0, "--lr", 1e-2,
              "--lora-rank", 2, "--temperature", 1.0, "--eval-every", 0, "--threads", 1]
    first = run_cli(*common, "--max-steps", 2)
    assert first.returncode == 0, first.stderr
    resumed = run_cli(*common, "--max-steps", 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert runs.checkpoint_steps(str(out)) == [1, 2, 3]
    base, _ = models.build_tiny(seed=0)
    start = base.state_dict()
    for step in (1, 3):
        saved = load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors"))
        changed = 0
        for name, tensor in saved.items():
            delta = tensor - start[name]
            if any(name.endswith(f"{target}.weight") for target in lora.LORA_TARGETS):
                assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 2, name  # W + 2 B A: rank <= r
                changed += bool(delta.abs().max() > 0)
            else:
                assert torch.equal(tensor, start[name]), name  # embeddings, norms, biases: frozen
        assert changed > 0
    refused = run_cli("--stage", "rl", "--freeze-llm", "--lora-rank", 2)
    assert refused.returncode == 2 and "--lora-rank trains adapters of the LLM" in refused.stderr
