"""The command line of every stage: one Config dataclass, one line of --help per field, turned into
argparse by looping over its fields; every numeric flag declares the values it allows (a Bound), and
parse_config checks them and the rules between flags before any work starts (one-line errors).

    cfg = parse_config(["--stage", "rl", "--model", "tiny"])

The departures from the paper that the flags of the "beyond the paper" section select (--advantage,
--score-path, --num-rankings, --baseline, --pl-std, ...) are listed at the top of r2rank.py.
"""
import argparse
import contextlib
import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field

import torch

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


@dataclass(frozen=True)
class Bound:
    """The values a numeric flag allows: above `low` (strictly, or not), and at most `high` if given."""
    low: float
    strict: bool = False
    high: float | None = None

    def allows(self, value):
        return (value > self.low if self.strict else value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self):
        if self.high is not None:
            return f"in {'(' if self.strict else '['}{number(self.low)}, {number(self.high)}]"
        return f"{'>' if self.strict else '>='} {number(self.low)}"


def number(value):
    """A flag's value as written in messages: an int in full, a float in %g."""
    return str(value) if isinstance(value, int) else f"{value:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT_INTERVAL = Bound(0), Bound(1), Bound(0, strict=True), Bound(0, True, 1.0)
# Seeds are combined as (seed x 1,000,003 + step) x 1,000,003 + user (rl_run.user_generator), which must fit torch's 64 bits.
SEED_RANGE = Bound(0, high=2 ** 24 - 1)
# AdamW moves each weight by about lr per step: above 1, weights and the head's scores blow up or collapse.
LEARNING_RATE = Bound(0, high=1.0)
# --advantage counterfactual ranks K + 1 score vectors per user with S samples each: U x (K + 1) x S x K
# int64 rankings (ppo.counterfactual_advantages). At K = 20 and U = 8 users that is 27 kB per sample, so
# 2^15 samples hold 0.88 GB of rankings (the call peaks at about 3.4 times that; r2rank.py calls it one
# user at a time, 110 MB of rankings); 10^8 asked for 2.7 TB. More samples would buy nothing: at 2^15
# the Monte-Carlo error of an NDCG value (in [0, 1]) is below 0.003, and the common random numbers
# shrink that of the difference further.
ADVANTAGE_SAMPLES = Bound(1, high=2 ** 15)
# --teacher-timeout: above 0; at most an hour (the default, 120 s, fits a reply of a few thousand tokens).
TEACHER_TIMEOUT = Bound(0, True, 3600.0)
# A sampling temperature below this is greedy in all but name (token log-probs ~0, no policy gradient).
MIN_TEMPERATURE = 0.01


def arg(default, help, choices=None, group="common", allowed=None):
    """A Config field: its default, its --help line, its choices or Bound, its --help section."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "allowed": allowed})


# The --help sections; runs.py reads them to know which flags define a stage's run (held fixed on --resume).
COMMON = "common to every stage"
RL = "--stage rl: Algorithm 1"
BEYOND = "--stage rl, beyond the paper (the departures listed at the top of r2rank.py)"
RL_RUN = "--stage rl: how the run is carried out (cost, the users trained on, what it starts from; not the algorithm)"
SFT = "--stage sft-data, then --stage sft: the cold start (Sec. 3.4)"
EVAL = "--stage eval: Table 2 and the analyses of Sec. 4"
common, rl, beyond, rl_run, sft_arg, eval_arg = (functools.partial(arg, group=group)
                                                 for group in (COMMON, RL, BEYOND, RL_RUN, SFT, EVAL))


@dataclass
class Config:
    # common to every stage: data, model, output, precision; the prompt (Fig. 2) and the traces (Eq. 1)
    stage: str = common("rl", "what to run: rl (end-to-end RL), sft-data (teacher traces), sft (cold start), eval",
                        ["rl", "sft-data", "sft", "eval"])
    data: str = common("", "dataset directory written by data.py; empty = build the synthetic set in <out>/data")
    model: str = common(DEFAULT_MODEL, "hub id, local directory, checkpoint, .gguf file, 'tiny' (random, offline), or "
                        "random:qwen2.5-0.5b / 1.5b / 3b / 7b (the published architecture, random weights: memory and speed checks)")
    out: str = common("runs/r2rank", "output directory: metrics.jsonl and checkpoint-<step>/")
    resume: bool = common(False, "continue from the newest <out>/checkpoint-<step> at its step; the settings that "
                          "define the run must be unchanged (runs.py lists which may change)")
    overwrite: bool = common(False, "replace the run (or eval-<split>.json) already in --out; without it, or "
                             "--resume, another run's --out is refused")
    seed: int = common(0, "seeds everything: user order, sampling, the head's initialization, the tiny model", allowed=SEED_RANGE)
    device: str = common("auto", "auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    threads: int = common(0, "CPU threads for torch (0 = 1 for --model tiny, whose ops are too small to share, else "
                          "torch's default: every core; 1 is faster on a busy shared machine)", allowed=AT_LEAST_0)
    dtype: str = common("auto", "compute precision (autocast): auto = bfloat16 on a CUDA card that has it, else float32; "
                        "trained weights stay fp32, frozen ones are held in it; float16 is refused (no loss scaling)",
                        ["auto", "float32", "bfloat16", "float16"])
    gradient_checkpointing: str = common("auto", "recompute activations in the backward pass: auto = on CUDA, off when the "
                                         "shared-prefix update is estimated to fit the GPU without it (memory.py; "
                                         "RL), else on; off on a CPU (SFT: on for CUDA)", ["auto", "on", "off"])
    max_history: int = common(20, "history items shown in the prompt (the most recent ones)", allowed=AT_LEAST_0)
    max_item_chars: int = common(200, "characters per item line in the prompt (longer texts are cut)", allowed=AT_LEAST_1)
    max_new_tokens: int = common(256, "token budget of one reasoning trace; 0 = representation only: no token is "
                                 "written, the head reads the prompt's last hidden state (the LLM then learns through the "
                                 "score path alone)", allowed=AT_LEAST_0)
    prompt: str = common("self-check", "the instructions: self-check (Fig. 2: reason, check, conclude, then the answer) "
                         "or answer-only (the answer alone, Table 5's 'Without CoT'; e.g. --max-new-tokens 8)",
                         ["self-check", "answer-only"])
    temperature: float = common(1.0, "sampling temperature of the traces (0 = greedy: not for training the LLM, "
                                "greedy traces have no policy gradient)", allowed=AT_LEAST_0)
    top_p: float = common(1.0, "nucleus sampling: keep the most likely tokens up to this mass (1 when training "
                          "the LLM: the log-probs of Eq. 6 do not include the cut)", allowed=UNIT_INTERVAL)
    lora_rank: int = common(0, "train rank-R LoRA adapters beside the attention and MLP projections instead of every "
                            "weight (0 = all weights); take a larger --lr / --sft-lr, e.g. 1e-4 (models.py)", allowed=AT_LEAST_0)
    dist_timeout: float = common(120.0, "torchrun: minutes a process waits for the others in a collective, e.g. while "
                                 "rank 0 validates and saves alone (torch's own default: 10 for NCCL)", allowed=POSITIVE)
    rollout_rows: int = common(160, "rows decoded together in the rollout and validation (whole users: users x K, at "
                               "least one user); more read the weights fewer times per token, at more memory; the "
                               "tokens do not change", allowed=AT_LEAST_1)
    micro_batch: int = common(8, "traces per forward/backward in the update (memory only; same gradient)", allowed=AT_LEAST_1)

    # --stage rl: Algorithm 1
    max_steps: int = rl(100, "RL steps (one step = users-per-step users x K candidates traces)", allowed=AT_LEAST_1)
    users_per_step: int = rl(4, "users per step", allowed=AT_LEAST_1)
    reward_k: int = rl(10, "the reward is NDCG@reward-k", allowed=AT_LEAST_1)
    ppo_epochs: int = rl(2, "passes over a step's traces, one optimizer step each", allowed=AT_LEAST_1)
    clip_eps: float = rl(0.2, "PPO clipping epsilon", allowed=POSITIVE)
    lr: float = rl(1e-6, "LLM learning rate (AdamW)", allowed=LEARNING_RATE)
    head_lr: float = rl(1e-3, "scoring-head learning rate (AdamW); 0 freezes the head, e.g. RL of the LLM "
                        "alone under a head trained MLP-only", allowed=LEARNING_RATE)
    head_width: int = rl(256, "hidden width of the scoring head's MLP", allowed=Bound(1, high=65536))
    head_weight_decay: float = rl(0.01, "scoring-head weight decay (AdamW)", allowed=AT_LEAST_0)
    max_grad_norm: float = rl(1.0, "gradient-norm clip for the LLM", allowed=POSITIVE)
    freeze_llm: bool = rl(False, "train the head only, LLM frozen (the MLP-only variant, Table 3); each "
                          "user's traces are then sampled once and reused (saved with the checkpoints)")
    eval_every: int = rl(0, "every N steps, NDCG@10 of greedy traces on validation users, logged; also "
                         "the start's, as step 0 (0 = never)", allowed=AT_LEAST_0)
    eval_users: int = rl(32, "validation users in that check", allowed=AT_LEAST_1)
    save_every: int = rl(50, "checkpoint every N steps (and at the end)", allowed=AT_LEAST_1)
    keep_checkpoints: int = rl(2, "keep only the newest N checkpoints of the run: 2 = the last and one before it, in "
                               "case the last is broken (0 = keep all; a full 1.5B checkpoint is 18.5 GB)", allowed=AT_LEAST_0)

    # --stage rl, beyond the paper (each departure's default and why: r2rank.py's docstring)
    advantage: str = beyond("reward", "LLM advantage: reward (the paper, Eq. 6: the rankings' mean reward), batch (minus "
                        "the other users' mean reward) or counterfactual (per trace: V(s) - V(s with s_k replaced))",
                        ["reward", "batch", "counterfactual"])
    score_path: bool = beyond(True, "carry the head's gradient into the LLM through h_k as well as through the tokens "
                          "(the whole gradient of Sec. 3.3); --no-score-path is Eqs. 5-6 as printed, tokens only")
    num_rankings: int = beyond(8, "S, rankings sampled from Plackett-Luce per user (the paper samples one)", allowed=AT_LEAST_1)
    baseline: bool = beyond(True, "leave-one-out baseline over a user's S rankings, in the head's REINFORCE and the score "
                            "path's dV/ds (the LLM's token advantage has its own: --advantage)")
    advantage_samples: int = beyond(256, "counterfactual: Plackett-Luce rankings per value estimate (no LLM cost)", allowed=ADVANTAGE_SAMPLES)
    pl_std: float = beyond(0.0, "if > 0, each user's K scores are standardized to this std before Plackett-Luce "
                           "(a PL temperature that follows the head's scale, departure 8; 0 = the paper's raw scores)", allowed=AT_LEAST_0)

    # --stage rl: how the run is carried out (not departures: the algorithm is the same either way)
    shared_prefix_update: str = rl_run("auto", "update: run a user's prompt prefix once for its K traces; auto = "
                                       "when gradient checkpointing is off (the two do not combine)", ["auto", "on", "off"])
    train_users: int = rl_run(0, "train on the first N training users only (0 = all): a smaller set to roll out on a CPU", allowed=AT_LEAST_0)
    response_prefix: str = rl_run("", "text every reply is forced to start with, fed as part of the prompt and never "
                                  "trained (e.g. '<think>'); pass the same to --stage eval")
    trace_cache: str = rl_run("", "--freeze-llm: start from the traces of an earlier --freeze-llm run "
                              "(<its checkpoint>/trace-cache.pt), e.g. to train another head on them")
    new_head: bool = rl_run(False, "start a new scoring head even when --model is a checkpoint that has one, "
                            "e.g. to train a head MLP-only on the LLM of an RL run")

    # --stage sft-data, then --stage sft: the cold start (Sec. 3.4)
    traces: str = sft_arg("", "teacher traces (jsonl): written by sft-data, read by sft; default <out>/traces.jsonl")
    teacher: str = sft_arg("", "sft-data: local teacher model (hub id, directory or .gguf)")
    teacher_url: str = sft_arg("", "sft-data: OpenAI-compatible endpoint instead, e.g. http://localhost:8000/v1")
    teacher_model: str = sft_arg("", "sft-data: model name sent to --teacher-url")
    teacher_key_env: str = sft_arg("OPENAI_API_KEY", "sft-data: environment variable holding the endpoint's API key")
    teacher_timeout: float = sft_arg(120.0, "sft-data: seconds one request to --teacher-url waits for the reply; one that "
                                     "times out is tried again, as a 5xx is (sft.RETRIES times); raise it for a slow "
                                     "reasoning model", allowed=TEACHER_TIMEOUT)
    num_pairs: int = sft_arg(200, "sft-data: (user, candidate) pairs to ask the teacher about, half positive", allowed=AT_LEAST_1)
    sft_epochs: int = sft_arg(2, "sft: passes over the traces", allowed=AT_LEAST_1)
    sft_lr: float = sft_arg(1e-5, "sft: learning rate (AdamW)", allowed=LEARNING_RATE)
    sft_batch: int = sft_arg(16, "sft: traces per optimizer step, in micro-batches of --micro-batch", allowed=AT_LEAST_1)

    # --stage eval: Table 2 and the analyses of Sec. 4
    split: str = eval_arg("test", "eval: which split to evaluate", ["train", "valid", "test"])  # data.py's (protocol.SPLITS)
    methods: str = eval_arg("r2rank,random,popularity,pointwise,listwise", "eval: comma-separated methods to run; also "
                            "sasrec (with --sasrec), reczero and r2ec (--model: a checkpoint of baselines/reczero.py or r2ec.py)")
    analyses: str = eval_arg("", "eval: comma-separated extra analyses: position,history-order,cold-start,history-length")
    eval_limit: int = eval_arg(0, "eval: evaluate only the first N users of the split (0 = all)", allowed=AT_LEAST_0)
    sasrec: str = eval_arg("", "eval: the model file of --methods sasrec, written by python baselines/sasrec.py "
                           "--data DIR --out OUT (OUT/sasrec.pt)")
    eval_sample: bool = eval_arg(False, "eval: sample R2Rank's traces at --temperature instead of greedy")
    history_shuffles: int = eval_arg(5, "eval: R, shuffles of each history in the history-order analysis", allowed=AT_LEAST_1)
    bootstrap: int = eval_arg(1000, "eval: bootstrap resamples for the 95% intervals", allowed=AT_LEAST_1)


def parse_config(argv=None, description="R2Rank"):
    """The Config of argv (sys.argv when None); a bad flag or combination exits 2 with argparse's message.
    Under torchrun every rank parses the same flags: only rank 0 prints (--help, a bad flag), the
    others exit with the same status in silence, so one mistake is one message, not one per process."""
    with silenced_unless_rank_0():
        return parse_and_check(argv, description)


@contextlib.contextmanager
def silenced_unless_rank_0():
    """stdout and stderr to devnull in a process that torchrun started with RANK > 0, before
    distributed.start has run (the process group does not exist yet, so the variable is all there is)."""
    rank = os.environ.get("RANK", "0").strip()
    if not (rank.isdigit() and int(rank) > 0):
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def parse_and_check(argv, description):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sections = {}
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        section = sections.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        if f.type is bool or f.type == "bool":
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            section.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata["choices"], help=help)
    cfg = Config(**vars(parser.parse_args(argv)))
    # the flags given on the command line, a default typed out included (eval takes a checkpoint's trace
    # settings for the others: eval_methods.chosen_settings): parsed again into markers only a given flag replaces
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**{f.name: unset for f in dataclasses.fields(Config)}))
    cfg.given = frozenset(name for name, value in vars(given).items() if value is not unset)
    for f in dataclasses.fields(Config):  # every numeric flag declares its Bound (tests/test_r2rank.py checks)
        value, allowed = getattr(cfg, f.name), f.metadata["allowed"]
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if allowed is not None and not allowed.allows(value):
            parser.error(f"--{f.name.replace('_', '-')} must be {allowed}, got {number(value)}")
    if cfg.baseline and cfg.num_rankings < 2:
        parser.error("--baseline needs --num-rankings >= 2 (or pass --no-baseline)")
    if cfg.max_new_tokens == 0 and cfg.stage in ("sft-data", "sft"):
        parser.error("--max-new-tokens 0 writes no trace, so there is nothing to fine-tune on: use it with --stage rl or --stage eval")
    if cfg.max_new_tokens == 0 and cfg.stage == "rl" and not cfg.freeze_llm and not cfg.score_path:
        parser.error("--max-new-tokens 0 with --no-score-path gives the LLM no gradient (no tokens, no score path): "
                     "drop --no-score-path, or use --freeze-llm")
    if cfg.prompt != "self-check" and cfg.stage in ("sft-data", "sft"):
        parser.error(f"--prompt {cfg.prompt} does not go with SFT: the cold start teaches the self-check format")
    if cfg.response_prefix and cfg.stage in ("sft-data", "sft"):
        parser.error("--response-prefix does not go with SFT: the teacher's replies do not start with it")
    trains_llm = cfg.stage == "rl" and not cfg.freeze_llm
    if cfg.lora_rank and not (trains_llm or cfg.stage == "sft"):
        parser.error("--lora-rank trains adapters of the LLM: it goes with --stage rl (without --freeze-llm) or --stage sft")
    if trains_llm and cfg.temperature == 0:
        parser.error("--temperature 0 samples greedy traces, which have no policy gradient: use a temperature > 0 "
                     "for --stage rl (or --freeze-llm to train the head alone)")
    if 0 < cfg.temperature < MIN_TEMPERATURE:
        parser.error(f"--temperature {cfg.temperature:g} is greedy in all but name (every token's log-prob is ~0, so "
                     f"there is no policy gradient): use 0 for greedy traces, or >= {MIN_TEMPERATURE:g}")
    if trains_llm and cfg.top_p < 1:
        parser.error("--top-p < 1 is not supported for --stage rl: the PPO log-probs do not include nucleus "
                     "truncation (use --top-p 1, or --freeze-llm)")
    if trains_llm and cfg.advantage == "batch" and cfg.users_per_step < 2:
        parser.error("--advantage batch needs --users-per-step >= 2 (the baseline is the other users' mean reward)")
    if cfg.trace_cache and not (cfg.stage == "rl" and cfg.freeze_llm):
        parser.error("--trace-cache reuses the traces of a frozen LLM: it goes with --stage rl --freeze-llm "
                     "(an LLM in training writes new traces every step)")
    if cfg.max_new_tokens == 0 and cfg.stage == "eval" and "listwise" in cfg.methods.split(","):
        parser.error("--max-new-tokens 0 leaves the listwise baseline no tokens to answer with: leave it out of --methods")
    set_threads(cfg.threads, cfg.model)
    return cfg


def set_threads(threads, model):
    """--threads: 0 = one thread for the tiny model (on 2 busy cores a tiny step took 6-11 s with one thread
    and about a minute with two: its ops are too small to share), torch's default for any other model."""
    if threads or model == "tiny":
        torch.set_num_threads(threads or 1)
