"""LoRA (Hu et al., 2021), hand-written: low-rank adapters beside the LLM's linear layers (--lora-rank),
so that RL of Qwen2.5-1.5B needs no gradients or AdamW states for the 1.5B base weights.

    adapters = lora.add_adapters(model, rank=16)   # base frozen, B = 0: the model computes what it did
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    model.save_pretrained(path, state_dict=lora.merged_state_dict(model))   # loads as a plain model

Each adapted layer computes y = x W^T + b + (alpha / r) (x A^T) B^T with W, b the frozen base layer,
A [r, in] drawn like nn.Linear's weight and B [out, r] zero. Adapted: the attention projections
(q, k, v, o) and the MLP's (gate, up, down) of every layer; the embeddings and lm_head stay frozen.

Where this departs from the LoRA paper: alpha = 2 r (a fixed scale of 2; the learning rate sets the
step size), no dropout on the adapter's input (RL's log-probs would otherwise differ between the
rollout and the update).
"""
import math
import os

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE = 2.0  # alpha / r with alpha = 2 r


class LoRALinear(torch.nn.Linear):
    """A linear layer with the base layer's own weight and bias (the same names in the state dict) and
    an adapter: lora_A [r, in], lora_B [out, r]."""

    def __init__(self, base, rank):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = torch.nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear draws its weight

    def forward(self, x):
        adapter = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A), self.lora_B)
        return torch.nn.functional.linear(x, self.weight, self.bias) + SCALE * adapter

    def delta(self):
        """The adapter as a weight update [out, in]: (alpha / r) B A."""
        return SCALE * self.lora_B @ self.lora_A


def adapted(model):
    """{module name: LoRALinear} of model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def add_adapters(model, rank):
    """Freeze every weight of model and put a rank-`rank` adapter beside each TARGETS linear layer.
    Draws A from torch's global generator (seed it first). Returns the adapter parameters."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(module, rank))
    return [p for module in adapted(model).values() for p in (module.lora_A, module.lora_B)]


@torch.no_grad()
def merged_state_dict(model):
    """model's state dict with each adapter folded into its weight (W + (alpha / r) B A) and the
    lora_* entries left out: what save_pretrained writes, so the checkpoint loads as a plain model."""
    state = {key: value for key, value in model.state_dict().items() if ".lora_" not in key}
    for name, module in adapted(model).items():
        state[f"{name}.weight"] = module.weight + module.delta()
    return state


def adapter_state_dict(model):
    """The adapters alone ({name.lora_A, name.lora_B}), saved beside the merged weights for --resume."""
    return {key: value.detach() for key, value in model.state_dict().items() if ".lora_" in key}


def attach(model, rank, checkpoint=None):
    """add_adapters, then, resuming from a checkpoint of a LoRA run, its adapters (lora.safetensors)
    with the base weights unmerged. Returns the adapter parameters, for the optimizer."""
    from safetensors.torch import load_file

    parameters = add_adapters(model, rank)
    if checkpoint:
        restore_adapters(model, load_file(os.path.join(checkpoint, "lora.safetensors"), device=str(model.device)))
    return parameters


@torch.no_grad()
def restore_adapters(model, adapters):
    """Undo merged_state_dict on a model loaded from a merged checkpoint that add_adapters has wrapped:
    W = merged - (alpha / r) B A with the saved A, B put back. Exact up to fp32 rounding of one add and
    one subtract (about 1e-7 of a weight)."""
    for name, module in adapted(model).items():
        module.lora_A.copy_(adapters[f"{name}.lora_A"])
        module.lora_B.copy_(adapters[f"{name}.lora_B"])
        module.weight.sub_(module.delta())
