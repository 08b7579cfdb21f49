"""The policy LLM pi_theta of R2Rank and its files (a hub id, a local directory, a GGUF file, or a tiny
random model built offline) with its LoRA adapters (--lora-rank, the last section), device and
precision choices, activation checkpointing, and reading what a checkpoint holds (the scoring head
f_phi, whose module is head.py, and, for MLP-only, the frozen LLM's trace cache). Writing checkpoints
and the run's directory: runs.py. The LoRA section says where it departs from the LoRA paper
(alpha = 2 r, no dropout).

    model, tokenizer = load_policy("Qwen/Qwen2.5-1.5B-Instruct", pick_device("auto"), torch.float32)
    model, tokenizer = load_policy("tiny", torch.device("cpu"), torch.float32)   # no download
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

import data
from protocol import UsageError
import rollout
from machinery import runs, sources
from head import ScoreHead


def pick_device(name):
    """'auto' (cuda, then mps, then cpu) or a torch device name; one a machine lacks, or meta, is a UsageError."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise UsageError(f"--device {name}: not a torch device ({error})") from None
        if device.type == "meta":  # tensors there have shapes and no values: nothing can be computed
            raise UsageError(f"--device {name}: the meta device holds shapes only, no values, so nothing runs on it "
                                  "(use --device cpu, cuda or auto)")
        if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: this machine has no {device.type.upper()} device (try --device auto)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device):
    """The compute dtype of --dtype on device: auto is bf16 on a CUDA card that has it, else fp32.

    float16 is refused (one line): nothing here scales the loss, so small gradients would underflow,
    and Qwen2's activations overflow fp16's range. bf16 asked of a CUDA card without it (before
    Ampere) falls back to fp32, with one line that says so."""
    if name == "float16":
        raise UsageError("--dtype float16 is not supported: there is no loss scaling, so small gradients underflow, "
                             "and Qwen2's activations overflow fp16; use --dtype bfloat16 (or float32)")
    if name == "auto" and device.type != "cuda":
        return torch.float32  # on a CPU bf16 matmuls are slow and inexact
    if name in ("auto", "bfloat16") and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        print(f"note: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic: computing in float32 instead")
        return torch.float32
    return torch.bfloat16 if name == "auto" else getattr(torch, name)


# The tiny model's chat template: Qwen2's ChatML, without Qwen's default system prompt.
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def offline_tokenizer(vocab_size=1024):
    """A byte-level BPE tokenizer trained offline on the project's own prompt text, with Qwen2's
    pipeline (its split regex, its special tokens) wrapped in transformers' Qwen2Tokenizer, so
    save_pretrained / AutoTokenizer.from_pretrained rebuild it exactly. Deterministic; about a second."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's order: pad, turn start, turn end
    raw = sources.synthetic_raw(users=50, seed=0)
    corpus = [data.SYSTEM_PROMPT, data.INSTRUCTIONS] + [f"{i['title']} - {i['text']}" for i in raw.items.values()]
    corpus += [f"The user liked the {i['title'].lower()}, so <answer>{data.RECOMMEND}</answer> or "
               f"<answer>{data.NOT_RECOMMEND}</answer>." for i in raw.items.values()]
    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size - len(special), show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = json.loads(bpe.to_str())["model"]
    vocab = dict(trained["vocab"])
    vocab.update({token: len(vocab) + i for i, token in enumerate(special)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_model(config, tokenizer, seed, device="cpu"):
    """Qwen2ForCausalLM(config) with seeded random weights, built on `device` ("meta": no memory)."""
    from transformers import Qwen2ForCausalLM

    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]), torch.device(device):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# The tiny model's initial weight std. With the usual 0.02 a random tied model just repeats its input
# token. At 0.3 (before issue 42) its attention was nearly one-hot: the last position read about three
# tokens (attention entropy 1.2 of a uniform 5.3), so the score path had to route the candidate's text
# there through near-zero attention gradients, and whether the quickstart learned in 100 steps was
# chance (RESULTS.md). At 0.1 attention starts nearly uniform (entropy 5.1) and every seed learns.
TINY_INIT_STD = 0.1


def build_tiny(seed=0, hidden_size=64, layers=2, init_std=TINY_INIT_STD):
    """A tiny random Qwen2 (2 layers of width 64) and the offline tokenizer: --model tiny."""
    from transformers import Qwen2Config

    tokenizer = offline_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         initializer_range=init_std)
    return random_model(config, tokenizer, seed), tokenizer


# The published Qwen2.5-Instruct architectures (each model's config.json), for --model random:<name>:
# memory and speed do not depend on the weights' values, so a random model costs what the real one
# costs. It rarely writes an end token, so its traces run to --max-new-tokens: the worst case.
QWEN25 = {  # hidden, intermediate, layers, attention heads, key-value heads, tied embeddings
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, True),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, False),
}


def qwen25_config(name, flag="--model"):
    """The Qwen2Config of a QWEN25 architecture: vocabulary 151,936, rope theta 1e6, RMSNorm eps 1e-6."""
    from transformers import Qwen2Config

    if name not in QWEN25:
        raise UsageError(f"{flag} random:{name}: unknown architecture; choose from {', '.join('random:' + n for n in QWEN25)}")
    hidden, intermediate, layers, heads, kv_heads, tied = QWEN25[name]
    return Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def load_gguf(path):
    """A GGUF file (e.g. SmolLM2-135M-Instruct) as a plain fp32 transformers model and its tokenizer.

    Needs the optional `gguf` package (pip install gguf). from_pretrained(..., gguf_file=...) would also
    ask for `accelerate`; its three parts do not: the config from the GGUF metadata, the dequantized
    weights from load_gguf_checkpoint, and the tokenizer (with its chat template).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with no_init_weights():  # every weight is overwritten below
        model = AutoModelForCausalLM.from_config(config)
    state_dict = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()) or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def mixed_precision(device, dtype):
    """Autocast forward passes to dtype (bf16 on GPU). The training stages keep weights, gradients and
    optimizer states in fp32: bf16 weights cannot absorb updates of ~1e-6 (near 0.02 their spacing is
    ~1e-4), so a pure-bf16 model would mostly not move at the learning rates used here.

    Wrap forward passes and losses only, never an optimizer step: autocast keeps the bf16 copy of each
    trained fp32 weight it casts until the outermost autocast context exits, and an in-place step
    does not refresh it, so a forward after a step inside the same context runs on the old weights
    (PyTorch's AMP recipe: forward and loss inside, backward and step outside)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


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


def load_policy(name, device, dtype, seed=0, flag="--model"):
    """(model, tokenizer) for 'tiny', a .gguf file, a local directory or a hub id. A model that cannot
    be loaded is a UsageError naming it by its flag (one line for the CLI; sft-data's teacher: --teacher)."""
    if name == "tiny":
        model, tokenizer = build_tiny(seed=seed)
    elif name.startswith("random:"):
        config, tokenizer = qwen25_config(name.removeprefix("random:"), flag), offline_tokenizer()
        model = random_model(config, tokenizer, seed, device)  # built where it runs: no fp32 copy on the CPU first
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise UsageError(f"{flag} {name}: no such file")
        try:
            model, tokenizer = load_gguf(name)
        except ImportError as error:
            raise UsageError(f"{flag} {name}: reading GGUF needs the optional gguf package (pip install gguf; {error})") from None
        except Exception as error:  # not GGUF, truncated, or an architecture transformers cannot read: one line
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"{flag} {name}: cannot read it as a GGUF model ({reason})") from None
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if problem := local_model_problem(name):
            raise UsageError(f"{flag} {name}: {problem}")
        if not os.path.isdir(name):
            print(f"loading {name} from the Hugging Face hub (downloaded once, then cached; --model tiny needs none)")
        for file in sorted(os.listdir(name) if os.path.isdir(name) else []):  # the head and LoRA's too: a save cut short
            if file.endswith(".safetensors") and (problem := runs.safetensors_problem(os.path.join(name, file))):
                raise UsageError(f"{flag} {name}: {problem}, so it is damaged; pass another checkpoint")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:  # not found, no network, not a model directory
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"{flag} {name}: cannot load it ({reason})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_tokenizer(name, tokenizer, flag)
    return model.to(device=device, dtype=dtype), tokenizer


def local_model_problem(name):
    """Why `name` cannot be a model on this machine, or None (a model directory, or a hub id: "org/name").
    A path (absolute, ./ or ../ or ~, or an existing file) is never sent to the hub."""
    if os.path.isdir(name):
        return None if os.path.isfile(os.path.join(name, "config.json")) else \
            "a directory without config.json, so not a model directory (a checkpoint-<step>/ this project wrote has one)"
    if os.path.exists(name):
        return "a file, not a model directory, a .gguf file, tiny or a hub id"
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return "no such directory (a hub id is org/name)"
    return None


def check_context(model, max_new_tokens):
    """A UsageError when --max-new-tokens leaves no room in the model's context window (its
    max_position_embeddings) for the prompt: the traces would run past the positions it was built for."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and max_new_tokens >= positions:
        raise UsageError(f"--max-new-tokens {max_new_tokens} does not fit the model's context window of {positions} "
                         f"positions (max_position_embeddings) with the prompt before it: lower --max-new-tokens")


def check_tokenizer(name, tokenizer, flag="--model"):
    """A UsageError unless the tokenizer encodes a line of the prompt into tokens that decode back to it.
    A checkpoint directory without its tokenizer.json can load a tokenizer of a few special tokens that
    encodes every prompt as []: the model would then rank candidates it never read."""
    probe = data.SYSTEM_PROMPT
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if not ids or probe not in tokenizer.decode(ids):
        raise UsageError(f"{flag} {name}: its tokenizer encodes the prompt as {len(ids)} tokens that do not read back "
                         f"(a vocabulary of {len(tokenizer)}); is tokenizer.json missing? pass a directory with the model's tokenizer")


def enable_checkpointing(model, setting, device):
    """Gradient (activation) checkpointing: setting "on", "off" or "auto" (on for cuda); returns whether it is on."""
    on = setting == "on" or (setting == "auto" and device.type == "cuda")
    if on:  # recompute each layer in backward, use_reentrant=False (the default of both methods)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns)
            model.activation_checkpointing_enable()
        else:  # before 5.24
            model.gradient_checkpointing_enable()
    return on


# ------------------------------------------------------------------ the MLP-only trace cache


TRACE_SETTINGS = ("model", "max_new_tokens", "temperature", "top_p", "max_history", "max_item_chars", "response_prefix", "prompt")
ADDED_TRACE_SETTINGS = {"prompt": "self-check"}  # added after caches were made: the one value there was before


def load_trace_cache(path, cfg, device):
    """{user_id: rollout.Traces} from a trace-cache.pt; refuses traces made with other trace settings
    (read from the r2rank.json beside it). --model may name the --freeze-llm checkpoint that holds the
    cache instead of the model that run started from: its LLM is the same, frozen."""
    if not os.path.isfile(path):
        sys.exit(f"error: {path}: no such trace cache (a checkpoint of a --freeze-llm run holds trace-cache.pt)")
    settings = os.path.join(os.path.dirname(path), "r2rank.json")
    if os.path.isfile(settings):
        with open(settings) as f:
            saved = json.load(f)["config"]
        saved = {**ADDED_TRACE_SETTINGS, **saved}  # any other setting a cache does not record is refused, not guessed
        differ = [name for name in TRACE_SETTINGS if saved.get(name) != getattr(cfg, name)]
        if saved.get("freeze_llm") and os.path.realpath(cfg.model) == os.path.realpath(os.path.dirname(path)):
            differ = [name for name in differ if name != "model"]  # that checkpoint holds the LLM the traces came from
        if differ:
            sys.exit(f"error: {path}: its traces were made with " + ", ".join(f"--{n.replace('_', '-')} {saved.get(n)}" for n in differ)
                     + "; this run has " + ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in differ))
    return {user: rollout.Traces(**fields) for user, fields in torch.load(path, map_location=device, weights_only=True).items()}


# --------------------------------------------------------------------- the scoring head's file


def load_head(path, hidden_size, device):
    """The scoring head saved in checkpoint directory `path` (its width is in r2rank.json), for a model of
    hidden size hidden_size. A head of another width or hidden size (files of two runs mixed, or another
    --model) is a UsageError naming both shapes."""
    file = os.path.join(path, "head.safetensors")
    try:
        with open(os.path.join(path, "r2rank.json")) as f:
            width = int(json.load(f)["head_width"])
    except (OSError, ValueError, KeyError, TypeError) as error:  # a checkpoint copied in part, or cut mid-write
        reason = "missing" if isinstance(error, FileNotFoundError) else "unreadable (no head_width)"
        raise UsageError(f"--model {path}: r2rank.json is {reason}, so its head's width is unknown; pass another "
                         "checkpoint, or --new-head to start a new head on this model") from None
    if problem := runs.safetensors_problem(file):
        raise UsageError(f"{path}: {problem}, so the head cannot be read; pass another checkpoint")
    state, head = load_file(file), ScoreHead(hidden_size, width)
    found = {name: tuple(value.shape) for name, value in state.items()}
    if found != {name: tuple(value.shape) for name, value in head.state_dict().items()}:
        saved_width, saved_hidden = found.get("net.1.weight", ("?", "?"))  # [width, hidden size]
        raise UsageError(f"{file}: a head of width {saved_width} on hidden size {saved_hidden}, but this run needs width "
                              f"{width} (its r2rank.json) on hidden size {hidden_size} (the model's): start a new head with "
                              "--new-head, or pass the model the head was trained on as --model")
    head.load_state_dict(state)
    return head.to(device)


def has_head(path):
    return os.path.isfile(os.path.join(path, "head.safetensors"))


# LoRA (Hu et al., 2021), hand-written (--lora-rank): low-rank adapters beside the LLM's linear
# layers, so that RL of Qwen2.5-1.5B needs no gradients or AdamW states for the base weights.
#
#     adapters = add_adapters(model, rank=16)   # base frozen, B = 0: the model computes what it did
#     optimizer = torch.optim.AdamW(adapters, lr=1e-4)
#     model.save_pretrained(path, state_dict=merged_state_dict(model))   # loads as a plain model
#
# Each adapted layer computes y = x W^T + b + (alpha / r) (x A^T) B^T with W, b the frozen base layer,
# A [r, in] drawn like nn.Linear's weight and B [out, r] zero. Adapted: the attention projections
# (q, k, v, o) and the MLP's (gate, up, down) of every layer; the embeddings and lm_head stay frozen.
#
# Where this departs from the LoRA paper: alpha = 2 r (a fixed scale of 2; the learning rate sets the
# step size), no dropout on the adapter's input (RL's log-probs would otherwise differ between the
# rollout and the update).

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


def attach_lora(model, rank, checkpoint=None):
    """add_adapters, then, resuming from a checkpoint of a LoRA run, its adapters (lora.safetensors)
    with the base weights unmerged. Returns the adapter parameters, for the optimizer."""
    parameters = add_adapters(model, rank)
    if checkpoint:
        restore_adapters(model, load_file(os.path.join(checkpoint, "lora.safetensors"), device=str(model.device)))
    return parameters


@torch.no_grad()
def restore_adapters(model, adapters):
    """Undo merged_state_dict on a model loaded from a merged checkpoint that add_adapters has wrapped:
    W = merged - (alpha / r) B A with the saved A, B put back. Exact up to fp32 rounding of one add and
    one subtract (about 1e-7 of a weight)."""
    for name, module in lora_layers(model).items():
        module.lora_A.copy_(adapters[f"{name}.lora_A"])
        module.lora_B.copy_(adapters[f"{name}.lora_B"])
        module.weight.sub_(module.delta())
