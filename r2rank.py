"""R2Rank: RL training of an LLM and its scoring head (Algorithm 1 of the R2Rank paper), and the CLI.

    python r2rank.py --stage rl --model tiny            # runs anywhere, no download
    python r2rank.py --stage rl --data data/ml100k --model Qwen/Qwen2.5-1.5B-Instruct

One RL step (train_rl), tagged with Algorithm 1's lines:
    1) rollout: one reasoning trace y_k per candidate, from the self-check prompt   lines 1-3, Eq. 1
    2) scores s_k = f_phi(h_k), h_k the last hidden state at the trace's end         line 4, Eq. 2
    3) S rankings tau ~ Plackett-Luce(s), reward rho(tau) = NDCG@10                  lines 6-7, Eq. 4
    4) clipped PPO on the tokens, then REINFORCE on the head                         lines 8-12, Eqs. 5-6
    5) log, validate, checkpoint

The log line's health signs: answer_share and truncated_share (traces that reach an <answer>, or are
cut at the token limit); distinct_share and token_logp (fall towards 1/K and 0 when the policy writes
one text for every candidate); signal_share (users whose S rankings differ in reward: the head learns
only from those); clip_frac, approx_kl; decode_logp_gap (|decode-time - update log-probs|);
advantage_abs and advantage_nonzero (the mean |advantage| and the share of traces with one).

Where this departs from the paper (defaults are the paper's unless said; details where implemented):
1. S rankings per user instead of one (--num-rankings 8): sampling one costs nothing next to K traces.
2. A leave-one-out baseline over the S rankings in the head's REINFORCE (--baseline, on; ppo.py).
3. --advantage batch or counterfactual adds a baseline to Eq. 6's advantage, unbiased (ppo.py).
4. The PPO loss is a per-token mean, not Eq. 6's plain sum (ppo.clipped_token_loss).
5. theta_old is the first PPO epoch's own forward, not the decoding pass (rollout.ppo_update).
6. Log-probs at the sampling temperature; RL refuses --temperature 0 and --top-p < 1 (rollout.py).
7. The head reads the hidden state through a LayerNorm and does not back-propagate into the LLM (models.py).
8. --pl-std (off) fixes the std of a user's scores before Plackett-Luce (models.standardized).
"""
import argparse
import dataclasses
import functools
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import lora
import plackett_luce
import rollout
from metrics import ndcg_at_k, ndcg_from_scores
import runs
from models import (ScoreHead, enable_checkpointing, has_head, load_head, load_policy, load_trace_cache, mixed_precision,
                    pick_device, pick_dtype, score_traces, standardized)
from ppo import batch_baseline_advantages, counterfactual_advantages, leave_one_out_baseline, reinforce_loss

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
            return f"in {'(' if self.strict else '['}{self.low:g}, {self.high:g}]"
        return f"{'>' if self.strict else '>='} {self.low:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE, UNIT_INTERVAL = Bound(0), Bound(1), Bound(0, strict=True), Bound(0, True, 1.0)


def arg(default, help, choices=None, group="common", allowed=None):
    """A Config field: its default, its --help line, its choices or Bound, its --help section."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "allowed": allowed})


common = functools.partial(arg, group="common to every stage")
rl = functools.partial(arg, group="--stage rl: Algorithm 1")
beyond = functools.partial(arg, group="--stage rl, beyond the paper (the departures listed at the top)")
sft_arg = functools.partial(arg, group="--stage sft-data, then --stage sft: the cold start (Sec. 3.4)")
eval_arg = functools.partial(arg, group="--stage eval: Table 2 and the analyses of Sec. 4")


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
    seed: int = common(0, "seeds everything: user order, sampling, the head's initialization, the tiny model", allowed=AT_LEAST_0)
    device: str = common("auto", "auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    threads: int = common(0, "CPU threads for torch (0 = torch's default; 1 is faster on a busy shared machine)", allowed=AT_LEAST_0)
    dtype: str = common("auto", "compute precision: auto (bfloat16 on cuda, else float32); training keeps fp32 weights",
                        ["auto", "float32", "bfloat16", "float16"])
    gradient_checkpointing: str = common("auto", "recompute activations in the backward pass: auto (on for cuda)",
                                         ["auto", "on", "off"])
    max_history: int = common(20, "history items shown in the prompt (the most recent ones)", allowed=AT_LEAST_0)
    max_item_chars: int = common(200, "characters per item line in the prompt (longer texts are cut)", allowed=AT_LEAST_1)
    max_new_tokens: int = common(256, "token budget of one reasoning trace; 0 = no reasoning, the head reads the "
                                 "prompt's last hidden state (a control: with --freeze-llm, or in eval without listwise)", allowed=AT_LEAST_0)
    temperature: float = common(1.0, "sampling temperature of the traces (0 = greedy: not for training the LLM, "
                                "greedy traces have no policy gradient)", allowed=AT_LEAST_0)
    top_p: float = common(1.0, "nucleus sampling: keep the most likely tokens up to this mass (1 when training "
                          "the LLM: the log-probs of Eq. 6 do not include the cut)", allowed=UNIT_INTERVAL)
    lora_rank: int = common(0, "train rank-R LoRA adapters beside the attention and MLP projections instead of every "
                            "weight (0 = all weights); take a larger --lr / --sft-lr, e.g. 1e-4 (lora.py)", allowed=AT_LEAST_0)
    micro_batch: int = common(8, "traces per forward/backward in the update (memory only; same gradient)", allowed=AT_LEAST_1)

    # --stage rl: Algorithm 1
    max_steps: int = rl(100, "RL steps (one step = users-per-step users x K candidates traces)", allowed=AT_LEAST_1)
    users_per_step: int = rl(4, "users per step", allowed=AT_LEAST_1)
    reward_k: int = rl(10, "the reward is NDCG@reward-k", allowed=AT_LEAST_1)
    advantage: str = rl("reward", "LLM advantage: reward (the paper, Eq. 6: the rankings' mean reward), batch (minus "
                        "the other users' mean reward) or counterfactual (per trace: V(s) - V(s with s_k replaced))",
                        ["reward", "batch", "counterfactual"])
    ppo_epochs: int = rl(2, "passes over a step's traces, one optimizer step each", allowed=AT_LEAST_1)
    clip_eps: float = rl(0.2, "PPO clipping epsilon", allowed=POSITIVE)
    lr: float = rl(1e-6, "LLM learning rate (AdamW)", allowed=AT_LEAST_0)
    head_lr: float = rl(1e-3, "scoring-head learning rate (AdamW); 0 freezes the head, e.g. RL of the LLM "
                        "alone under a head trained MLP-only", allowed=AT_LEAST_0)
    head_width: int = rl(256, "hidden width of the scoring head's MLP", allowed=AT_LEAST_1)
    head_weight_decay: float = rl(0.01, "scoring-head weight decay (AdamW)", allowed=AT_LEAST_0)
    max_grad_norm: float = rl(1.0, "gradient-norm clip for the LLM", allowed=POSITIVE)
    freeze_llm: bool = rl(False, "train the head only, LLM frozen (the MLP-only variant, Table 3); each "
                          "user's traces are then sampled once and reused (saved with the checkpoints)")
    eval_every: int = rl(0, "every N steps, NDCG@10 of greedy traces on validation users, logged; also "
                         "the start's, as step 0 (0 = never)", allowed=AT_LEAST_0)
    eval_users: int = rl(32, "validation users in that check", allowed=AT_LEAST_1)
    save_every: int = rl(50, "checkpoint every N steps (and at the end)", allowed=AT_LEAST_1)
    keep_checkpoints: int = rl(0, "keep only the newest N checkpoints of the run (0 = keep all)", allowed=AT_LEAST_0)

    # --stage rl, beyond the paper (each departure's default and why: the module docstring)
    num_rankings: int = beyond(8, "S, rankings sampled from Plackett-Luce per user (the paper samples one)", allowed=AT_LEAST_1)
    baseline: bool = beyond(True, "leave-one-out baseline over the S rankings in the head's REINFORCE")
    advantage_samples: int = beyond(256, "counterfactual: Plackett-Luce rankings per value estimate (no LLM cost)", allowed=AT_LEAST_1)
    pl_std: float = beyond(0.0, "if > 0, each user's K scores are standardized to this std before Plackett-Luce "
                           "(a PL temperature that follows the head's scale, departure 8; 0 = the paper's raw scores)", allowed=AT_LEAST_0)
    shared_prefix_update: str = beyond("auto", "update: run a user's prompt prefix once for its K traces; auto = "
                                       "when gradient checkpointing is off (the two do not combine)", ["auto", "on", "off"])
    train_users: int = beyond(0, "train on the first N training users only (0 = all): a smaller set to roll out on a CPU", allowed=AT_LEAST_0)
    response_prefix: str = beyond("", "text every reply is forced to start with, fed as part of the prompt and never "
                                  "trained (e.g. '<think>'); pass the same to --stage eval")
    trace_cache: str = beyond("", "--freeze-llm: start from the traces of an earlier --freeze-llm run "
                              "(<its checkpoint>/trace-cache.pt), e.g. to train another head on them")
    new_head: bool = beyond(False, "start a new scoring head even when --model is a checkpoint that has one, "
                            "e.g. to train a head MLP-only on the LLM of an RL run")

    # --stage sft-data, then --stage sft: the cold start (Sec. 3.4)
    traces: str = sft_arg("", "teacher traces (jsonl): written by sft-data, read by sft; default <out>/traces.jsonl")
    teacher: str = sft_arg("", "sft-data: local teacher model (hub id, directory or .gguf)")
    teacher_url: str = sft_arg("", "sft-data: OpenAI-compatible endpoint instead, e.g. http://localhost:8000/v1")
    teacher_model: str = sft_arg("", "sft-data: model name sent to --teacher-url")
    teacher_key_env: str = sft_arg("OPENAI_API_KEY", "sft-data: environment variable holding the endpoint's API key")
    num_pairs: int = sft_arg(200, "sft-data: (user, candidate) pairs to ask the teacher about, half positive", allowed=AT_LEAST_1)
    sft_epochs: int = sft_arg(2, "sft: passes over the traces", allowed=AT_LEAST_1)
    sft_lr: float = sft_arg(1e-5, "sft: learning rate (AdamW)", allowed=AT_LEAST_0)
    sft_batch: int = sft_arg(16, "sft: traces per optimizer step, in micro-batches of --micro-batch", allowed=AT_LEAST_1)

    # --stage eval: Table 2 and the analyses of Sec. 4
    split: str = eval_arg("test", "eval: which split to evaluate")
    methods: str = eval_arg("r2rank,random,popularity,pointwise,listwise", "eval: comma-separated methods to run")
    analyses: str = eval_arg("", "eval: comma-separated extra analyses: position,history-order,cold-start,history-length")
    eval_limit: int = eval_arg(0, "eval: evaluate only the first N users of the split (0 = all)", allowed=AT_LEAST_0)
    eval_sample: bool = eval_arg(False, "eval: sample R2Rank's traces at --temperature instead of greedy")
    history_shuffles: int = eval_arg(5, "eval: R, shuffles of each history in the history-order analysis", allowed=AT_LEAST_1)
    bootstrap: int = eval_arg(1000, "eval: bootstrap resamples for the 95% intervals", allowed=AT_LEAST_1)


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sections = {}
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%")
        section = sections.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        if f.type is bool or f.type == "bool":
            section.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            section.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata["choices"], help=help)
    cfg = Config(**vars(parser.parse_args(argv)))
    for f in dataclasses.fields(Config):  # every numeric flag declares its Bound (tests/test_r2rank.py checks)
        value, allowed = getattr(cfg, f.name), f.metadata["allowed"]
        if allowed is not None and not allowed.allows(value):
            parser.error(f"--{f.name.replace('_', '-')} must be {allowed}, got {value:g}")
    if cfg.baseline and cfg.num_rankings < 2:
        parser.error("--baseline needs --num-rankings >= 2 (or pass --no-baseline)")
    if cfg.max_new_tokens == 0 and (cfg.stage in ("sft-data", "sft") or (cfg.stage == "rl" and not cfg.freeze_llm)):
        parser.error("--max-new-tokens 0 writes no trace, so there are no tokens to train: use it with --stage rl --freeze-llm or --stage eval")
    if cfg.response_prefix and cfg.stage in ("sft-data", "sft"):
        parser.error("--response-prefix does not go with SFT: the teacher's replies do not start with it")
    trains_llm = cfg.stage == "rl" and not cfg.freeze_llm
    if cfg.lora_rank and not (trains_llm or cfg.stage == "sft"):
        parser.error("--lora-rank trains adapters of the LLM: it goes with --stage rl (without --freeze-llm) or --stage sft")
    if trains_llm and cfg.temperature == 0:
        parser.error("--temperature 0 samples greedy traces, which have no policy gradient: use a temperature > 0 "
                     "for --stage rl (or --freeze-llm to train the head alone)")
    if trains_llm and cfg.top_p < 1:
        parser.error("--top-p < 1 is not supported for --stage rl: the PPO log-probs do not include nucleus "
                     "truncation (use --top-p 1, or --freeze-llm)")
    if trains_llm and cfg.advantage == "batch" and cfg.users_per_step < 2:
        parser.error("--advantage batch needs --users-per-step >= 2 (the baseline is the other users' mean reward)")
    if cfg.max_new_tokens == 0 and cfg.stage == "eval" and "listwise" in cfg.methods.split(","):
        parser.error("--max-new-tokens 0 leaves the listwise baseline no tokens to answer with: leave it out of --methods")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg


# ------------------------------------------------------------------------- phases of one step


def signal_share(reward):
    """Share of users [U, S] whose S rankings do not all get the same reward: the only users whose
    rankings the head's REINFORCE can learn from."""
    return (reward != reward[:, :1]).any(1).float().mean().item()


@torch.no_grad()
def validate(model, tokenizer, head, instances, cfg, samples=None):
    """(NDCG@10 of greedy traces ranked by the head's scores, the traces). Pass the traces of an
    earlier call as samples to skip the rollout (they do not change while the LLM is frozen)."""
    if samples is None:
        samples, _ = rollout.rollout_users(model, tokenizer, instances, cfg, None, temperature=0.0)
    scores = score_traces(head, samples)
    labels = torch.tensor([inst["labels"] for inst in instances])
    return ndcg_from_scores(scores.cpu(), labels, 10).mean().item(), samples


# --------------------------------------------------------------------------------------- RL stage


def users_for_step(num_users, users_per_step, seed, step):
    """The step's users: a permutation seeded by (seed, step), so a resumed run sees the same ones."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(num_users, generator=generator)[:users_per_step].tolist()


@dataclass
class RLRun:
    """What the RL loop works on, built once by setup_rl."""
    device: torch.device
    dtype: torch.dtype
    train: list  # training instances
    valid: list
    model: torch.nn.Module  # the LLM, fp32 master weights
    tokenizer: object
    head: ScoreHead
    optimizers: dict  # "head", and "llm" unless --freeze-llm
    plan: runs.Plan  # the step it starts at (0, or the checkpoint's), what --resume changed
    shared_prefix: bool  # the update runs a user's prompt prefix once per micro-batch
    trace_cache: dict  # MLP-only: user_id -> Samples, sampled once and reused


def setup_rl(cfg):
    """Data, model and head (from --model, or the newest checkpoint with --resume), optimizers."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    # the data and --out are checked before the model loads: a bad input costs no download
    data_dir = data.prepare_data(cfg.data, cfg.out, cfg.seed)
    train = data.load_split(data_dir, "train")[: cfg.train_users or None]
    valid = data.load_split(data_dir, "valid", allow_empty=not cfg.eval_every)
    if cfg.users_per_step > len(train):
        sys.exit(f"error: --users-per-step {cfg.users_per_step} is more than the {len(train)} training users "
                 f"of {data_dir}" + (" kept by --train-users" if cfg.train_users else ""))
    plan = runs.plan_out(cfg, data_dir, cfg.max_steps)
    start_step, checkpoint = plan.start_step, plan.checkpoint
    if start_step == cfg.max_steps:
        print(f"{checkpoint} is at --max-steps {cfg.max_steps} already: nothing to train (raise --max-steps to go on)")
        return None
    model, tokenizer = load_policy(checkpoint or cfg.model, device, torch.float32, cfg.seed)  # fp32 master weights
    hidden_size = model.config.hidden_size
    # a checkpoint of this run (--resume) or of an earlier RL run (--model <dir>) brings its head along
    source = checkpoint or (None if cfg.new_head else cfg.model)
    torch.manual_seed(cfg.seed)
    head = (load_head(source, hidden_size, device) if source and has_head(source)
            else ScoreHead(hidden_size, cfg.head_width).to(device))
    if cfg.freeze_llm:
        model.requires_grad_(False)
    use_checkpointing = enable_checkpointing(model, cfg.gradient_checkpointing, device) if not cfg.freeze_llm else False
    if use_checkpointing and cfg.shared_prefix_update == "on":
        sys.exit("error: --shared-prefix-update on needs --gradient-checkpointing off (checkpointed layers drop the KV cache)")
    shared_prefix = cfg.shared_prefix_update == "on" or (cfg.shared_prefix_update == "auto" and not use_checkpointing)
    model.eval()
    optimizers = {"head": torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)}
    if not cfg.freeze_llm:  # every weight, or only the LoRA adapters (drawn after the head: the same head either way)
        trained = lora.attach(model, cfg.lora_rank, checkpoint) if cfg.lora_rank else model.parameters()
        optimizers["llm"] = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    if checkpoint:
        states = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device)
        for name, opt in optimizers.items():
            opt.load_state_dict(states[name])
        print(f"resumed from {checkpoint} at step {start_step}")
    for name, opt in optimizers.items():  # a changed --lr / --head-lr applies to the restored optimizer too
        runs.set_lr(opt, cfg.head_lr if name == "head" else cfg.lr)
    # MLP-only (--freeze-llm): the policy never changes, so a user's K traces are sampled at its first
    # step and reused whenever it comes back (a fixed sample instead of a fresh one: much cheaper).
    trace_cache = {}
    if cfg.freeze_llm and checkpoint and os.path.isfile(os.path.join(checkpoint, "trace-cache.pt")):
        trace_cache = load_trace_cache(os.path.join(checkpoint, "trace-cache.pt"), cfg, device)
    elif cfg.freeze_llm and cfg.trace_cache:
        trace_cache = load_trace_cache(cfg.trace_cache, cfg, device)

    K = len(train[0]["candidates"])
    print(f"{cfg.users_per_step} users x {K} candidates = {cfg.users_per_step * K} traces per step "
          f"(<= {cfg.users_per_step * K * cfg.max_new_tokens} new tokens); {cfg.num_rankings} rankings per user; "
          f"{len(train)} training users; device {device}, {dtype} compute, gradient checkpointing {'on' if use_checkpointing else 'off'}, "
          f"shared-prefix update {'on' if shared_prefix else 'off'}")
    runs.start(cfg.out, plan)  # the first write into --out
    return RLRun(device, dtype, train, valid, model, tokenizer, head, optimizers, plan, shared_prefix, trace_cache)


def llm_advantages(cfg, scores, labels, reward, generator):
    """[U, K] advantage of each trace (--advantage; departure 3). scores, labels [U, K]; reward [U, S]."""
    K = scores.shape[1]
    if cfg.advantage == "counterfactual":  # per trace: V(s) - V(s with s_k replaced by the others' mean)
        return counterfactual_advantages(scores.detach(), labels, cfg.reward_k, cfg.advantage_samples, generator)
    if cfg.advantage == "batch":  # the user's mean reward minus the other users'
        return batch_baseline_advantages(reward)[:, None].expand(-1, K)
    return reward.mean(1, keepdim=True).expand(-1, K)  # the paper's Eq. (6): the mean reward, no baseline


def train_rl(cfg):
    run = setup_rl(cfg)
    if run is None:
        return
    model, tokenizer, head, device, valid_users = run.model, run.tokenizer, run.head, run.device, run.valid[: cfg.eval_users]
    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a")
    valid_samples = None  # MLP-only: the validation traces, rolled out once
    if cfg.eval_every and run.plan.start_step == 0:  # the start's validation (step 0): picking the best step can keep the start
        started = time.time()
        with mixed_precision(device, run.dtype):
            start_ndcg, checked = validate(model, tokenizer, head, valid_users, cfg)
        valid_samples = checked if cfg.freeze_llm else None
        runs.log_row(metrics_file, {"step": 0, "valid_ndcg@10": start_ndcg, "step_time": time.time() - started}, print)
    bar = tqdm(range(run.plan.start_step, cfg.max_steps), initial=run.plan.start_step, total=cfg.max_steps, desc="rl", dynamic_ncols=True)
    with runs.StopOnSignal() as stop:  # Ctrl-C, SIGTERM: the step in flight finishes and is saved, then the run stops
        for step in bar:
            started = time.time()
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
            # the minibatch B of Algorithm 1: the step's users
            instances = [run.train[i] for i in users_for_step(len(run.train), cfg.users_per_step, cfg.seed, step)]
            labels = torch.tensor([inst["labels"] for inst in instances], device=device, dtype=torch.float32)  # [U, K]

            # 1) Alg. 1 lines 1-3: one reasoning trace per candidate (MLP-only: sampled once per user, cached)
            with mixed_precision(device, run.dtype):
                if cfg.freeze_llm:
                    missing = [inst for inst in instances if inst["user_id"] not in run.trace_cache]
                    run.trace_cache.update(zip([inst["user_id"] for inst in missing],
                                               rollout.rollout_users(model, tokenizer, missing, cfg, generator)[0]))
                    samples = [run.trace_cache[inst["user_id"]] for inst in instances]
                else:
                    samples, prompts = rollout.rollout_users(model, tokenizer, instances, cfg, generator)
            # 2) line 4: scores s_k = f_phi(h_k), [U, K], with grad into phi only
            raw_scores = score_traces(head, samples)
            scores = standardized(raw_scores, cfg.pl_std)

            # 3) lines 6-7: S rankings from Plackett-Luce, reward = NDCG@reward-k
            rankings = plackett_luce.sample(scores.detach(), cfg.num_rankings, generator)  # [U, S, K]
            reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), cfg.reward_k)  # [U, S]

            # 4) lines 8 and 11: clipped PPO on the tokens (Eq. 6), theta updated
            ppo_stats = {}
            if not cfg.freeze_llm:
                advantages = llm_advantages(cfg, scores, labels, reward, generator)  # [U, K]
                with mixed_precision(device, run.dtype):
                    ppo_stats = rollout.ppo_update(model, run.optimizers["llm"], prompts, samples, advantages, cfg, run.shared_prefix)
                ppo_stats.update(advantage_abs=advantages.abs().mean().item(), advantage_nonzero=(advantages != 0).float().mean().item())
            #    lines 9 and 12: REINFORCE on the head through log P(tau | s) (Eq. 5), phi updated. Both updates
            #    use this step's scores, computed before either, so their order does not matter.
            baseline = leave_one_out_baseline(reward) if cfg.baseline else None
            head_loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
            run.optimizers["head"].zero_grad(set_to_none=True)
            head_loss.backward()
            run.optimizers["head"].step()

            # 5) log, validate, checkpoint
            row = {"step": step + 1, "reward": reward.mean().item(),
                   "reward_std": reward.std(1, correction=0).mean().item(),  # spread over a user's S rankings: REINFORCE's signal
                   "signal_share": signal_share(reward),
                   "score_std": raw_scores.detach().std(1, correction=0).mean().item(),  # the head's spread of the K scores
                   "ndcg@10_greedy": ndcg_from_scores(scores.detach(), labels, 10).mean().item(),
                   "head_loss": head_loss.item(), **ppo_stats, **rollout.trace_stats(samples, tokenizer)}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                with mixed_precision(device, run.dtype):
                    row["valid_ndcg@10"], checked = validate(model, tokenizer, head, valid_users, cfg, valid_samples)
                valid_samples = checked if cfg.freeze_llm else None
            row["step_time"] = time.time() - started
            runs.log_row(metrics_file, row, bar.write)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop.requested:
                saved = runs.save_checkpoint(cfg.out, step + 1, model, tokenizer, head, run.optimizers, cfg,
                                             run.trace_cache if cfg.freeze_llm else None, run.plan.record())
                if cfg.keep_checkpoints:
                    runs.prune_checkpoints(cfg.out, cfg.keep_checkpoints)
                if stop.requested:
                    metrics_file.close()
                    raise stop.exit(saved)
    metrics_file.close()
    print(f"wrote {os.path.join(cfg.out, 'metrics.jsonl')} and {cfg.out}/checkpoint-<step>/")


def main(argv=None):
    cfg = parse_config(argv)
    try:
        if cfg.stage == "rl":
            train_rl(cfg)
        elif cfg.stage in ("sft-data", "sft"):
            import sft

            sft.build_traces(cfg) if cfg.stage == "sft-data" else sft.train_sft(cfg)
        elif cfg.stage == "eval":
            import evaluate

            evaluate.run_eval(cfg)
        else:
            sys.exit(f"error: unknown --stage {cfg.stage!r}")
    except data.DataError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        print("interrupted (the newest checkpoint in --out, if any, is where --resume continues)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
