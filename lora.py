"""LoRA (Hu et al., 2021), hand-written (--lora-rank): low-rank adapters beside the LLM's linear layers, so that
RL of Qwen2.5-1.5B needs no gradients or AdamW states for the base weights. Torch only; copies alone.

    adapters = add_adapters(model, rank=16)   # base frozen, B = 0: the model computes what it did
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    model.save_pretrained(path, state_dict=checkpoint_state_dict(model))   # merged: loads as a plain model

Each adapted layer computes y = x W^T + b + (alpha / r) (x A^T) B^T with W, b the frozen base layer, A [r, in]
drawn like nn.Linear's weight and B [out, r] zero. Adapted: the attention projections (q, k, v, o) and the MLP's
(gate, up, down) of every layer; the embeddings and lm_head stay frozen.

Where this departs from the LoRA paper: alpha = 2 r (a fixed scale of 2; the learning rate sets the step size),
no dropout on the adapter's input (RL's log-probs would otherwise differ between the rollout and the update).
"""
import math

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SCALE = 2.0  # alpha / r with alpha = 2 r


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
        return torch.nn.functional.linear(x, self.weight, self.bias) + LORA_SCALE * adapter

    def delta(self):
        """The adapter as a weight update [out, in]: (alpha / r) B A."""
        return LORA_SCALE * self.lora_B @ self.lora_A


def lora_layers(model):
    """{module name: LoRALinear} of model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def add_adapters(model, rank):
    """Freeze every weight of model and put a rank-`rank` adapter beside each LORA_TARGETS linear layer.
    Draws A from torch's global generator (seed it first). Returns the adapter parameters."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(module, rank))
    return [p for module in lora_layers(model).values() for p in (module.lora_A, module.lora_B)]


@torch.no_grad()
def merged_state_dict(model):
    """model's state dict with each adapter folded into its weight (W + (alpha / r) B A) and the
    lora_* entries left out: what save_pretrained writes, so the checkpoint loads as a plain model."""
    state = {key: value for key, value in model.state_dict().items() if ".lora_" not in key}
    for name, module in lora_layers(model).items():
        state[f"{name}.weight"] = module.weight + module.delta()
    return state


def adapter_state_dict(model):
    """The adapters alone ({name.lora_A, name.lora_B}), saved beside the merged weights for --resume."""
    return {key: value.detach() for key, value in model.state_dict().items() if ".lora_" in key}


@torch.no_grad()
def restore_adapters(model, adapters):
    """Undo merged_state_dict on a model loaded from a merged checkpoint that add_adapters has wrapped:
    W = merged - (alpha / r) B A with the saved A, B put back. Exact up to fp32 rounding of one add and
    one subtract (about 1e-7 of a weight)."""
    for name, module in lora_layers(model).items():
        module.lora_A.copy_(adapters[f"{name}.lora_A"])
        module.lora_B.copy_(adapters[f"{name}.lora_B"])
        module.weight.sub_(module.delta())


def hold_frozen_weights(model, dtype):
    """Hold every frozen weight that autocast would cast (the weight and bias of each nn.Linear that
    is not trained: LoRA's base, the whole LLM with --freeze-llm) in the compute dtype, once.

    Why: autocast caches its bf16 copy only of weights that require grad; a frozen fp32 weight is
    cast again at every forward, each decode step included (at 1.5B, ~9 GB of extra memory traffic
    per decode step). A linear under autocast computes in dtype anyway, so the function is the same;
    the norms stay fp32. A tied input embedding (the lm_head's weight) is converted with it, and its
    output is cast back to fp32, so the residual stream keeps the precision it has with fp32 weights.
    Checkpoints write every weight back in fp32 (checkpoint_state_dict), which is exact. Nothing to do
    in fp32. Returns the number of tensors converted."""
    if dtype == torch.float32:
        return 0
    converted = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for weight in (module.weight, module.bias):
                if weight is not None and not weight.requires_grad and weight.dtype != dtype:
                    weight.data = weight.data.to(dtype)  # the same Parameter: ties and optimizers still hold it
                    converted += 1
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype == dtype and not getattr(embedding, "_r2rank_fp32_output", False):
        embedding.register_forward_hook(lambda module, inputs, output: output.float())
        embedding._r2rank_fp32_output = True
    return converted


def checkpoint_state_dict(model):
    """What a checkpoint holds: the model's state dict (LoRA adapters merged in) with every floating
    tensor in fp32, whatever dtype hold_frozen_weights gave it (bf16 -> fp32 is exact). Tied weights
    stay one tensor, so save_pretrained still writes them once."""
    state = merged_state_dict(model) if lora_layers(model) else model.state_dict()
    upcast = {}  # by storage: a tied embedding and lm_head map to one fp32 tensor
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != torch.float32:
            pointer = value.data_ptr()
            upcast.setdefault(pointer, value.float())
            state[key] = upcast[pointer]
    return state
