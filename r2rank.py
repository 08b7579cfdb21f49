"""R2Rank: RL training of an LLM and its scoring head (Algorithm 1 of the R2Rank paper), and the CLI.

    python r2rank.py --stage rl --model tiny            # runs anywhere, no download
    python r2rank.py --stage rl --data data/ml100k --model Qwen/Qwen2.5-1.5B-Instruct

One RL step, as in Algorithm 1 (the scoring head f_phi is in head.py):
    1) rollout: one reasoning trace y_k per candidate, sampled from the self-check prompt   (Eq. 1)
    2) scores s_k = f_phi(h_k), h_k the last-layer hidden state at the trace's final token  (Eq. 2)
    3) S rankings tau ~ Plackett-Luce(s), reward rho(tau) = NDCG@10                         (Eq. 4)
    4) REINFORCE on the head through log P(tau | s) (Eq. 5); clipped PPO on the tokens (Eq. 6)
    5) log, checkpoint

A trace cut at --max-new-tokens, or one without an <answer> tag, is scored like any other: the head
reads the hidden state at its last token. The log counts both (truncated_share, answer_share), since
a policy that never finishes its reasoning gives the head little to read. It also logs distinct_share
(distinct traces among a user's K) and token_logp (mean log-prob of the sampled tokens): when both
fall towards their floor (1/K and 0), the policy writes the same text for every candidate and the
head has nothing left to tell the candidates apart by. signal_share is the share of a step's users
whose S rankings do not all get the same reward: only those give the head a signal (see --pl-std
when it stays low). decode_logp_gap is the mean |log-prob at decoding - log-prob in the update's
first forward| of the sampled tokens: how far the two code paths (KV cache, eval mode, vs. teacher
forcing, train mode) differ; theta_old is the update's own, so it costs no clipping.

Where this departs from the paper (each a flag; the default is the paper's choice unless said):
1. S rankings per user instead of one (--num-rankings 8): a cheap Monte-Carlo average, since
   sampling a ranking costs nothing next to the K traces.
2. The head's REINFORCE subtracts a leave-one-out baseline over the S rankings (--baseline, on by
   default): NDCG is never negative, so without a baseline every sampled ranking is pushed up.
3. The LLM's advantage (--advantage): the paper gives every token of every trace the ranking's
   reward (`reward`, the default; with S rankings, their mean). `batch` subtracts the mean reward of
   the step's other users; `counterfactual` gives trace k A_k = V(s) - V(s with s_k replaced by the
   mean of the other scores), V the expected NDCG under Plackett-Luce. All three are unbiased (see
   ppo.counterfactual_advantages); they differ in variance (tests/benchmark.py --toy measures it).
4. The PPO loss is a per-token mean, not the plain sum of Eq. (6) (see ppo.clipped_token_loss).
5. theta_old's log-probs are those of the update's first forward pass (detached), not the ones
   recorded while decoding, so the first PPO epoch has ratio exactly 1 (same code path, precision
   and mode as the gradient). Log-probs are those of softmax(logits / --temperature), the
   distribution the tokens were drawn from; RL refuses --temperature 0 and --top-p < 1.
6. The head reads the final hidden state through a LayerNorm (no affine), so its input scale does
   not depend on the backbone; the head does not back-propagate into the LLM.
7. --pl-std (off by default) standardizes a user's K scores to a fixed std before Plackett-Luce.
   Trained by REINFORCE, the head keeps spreading its scores (std ~100 on MovieLens) until all
   sampled rankings agree, and then neither the head nor the counterfactual credit gets any signal.
   A fixed std keeps the rankings random enough to compare.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import data
import plackett_luce
import rollout
from head import ScoreHead, has_head, load_head, score_traces, standardized
from metrics import ndcg_at_k, ndcg_from_scores
from models import (enable_checkpointing, latest_checkpoint, load_policy, load_trace_cache, mixed_precision,
                    pick_device, pick_dtype, prune_checkpoints, save_checkpoint)
from ppo import (batch_baseline_advantages, clipped_token_loss, counterfactual_advantages, leave_one_out_baseline,
                 reinforce_loss)

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"


def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    stage: str = arg("rl", "what to run: rl (end-to-end RL), sft-data (teacher traces), sft (cold start), eval",
                     ["rl", "sft-data", "sft", "eval"])
    # data, model, output
    data: str = arg("", "dataset directory written by data.py; empty = build the synthetic set in <out>/data")
    model: str = arg(DEFAULT_MODEL, "hub id, local directory, checkpoint, .gguf file, or 'tiny' (random, offline)")
    out: str = arg("runs/r2rank", "output directory: metrics.jsonl and checkpoint-<step>/")
    resume: bool = arg(False, "continue from the newest <out>/checkpoint-<step> at its step")
    seed: int = arg(0, "seeds everything: user order, sampling, the head's initialization, the tiny model")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    threads: int = arg(0, "CPU threads for torch (0 = torch's default; 1 is faster on a busy shared machine)")
    dtype: str = arg("auto", "compute precision: auto (bfloat16 on cuda, else float32); training keeps fp32 weights",
                     ["auto", "float32", "bfloat16", "float16"])
    gradient_checkpointing: str = arg("auto", "recompute activations in the backward pass: auto (on for cuda)",
                                      ["auto", "on", "off"])
    shared_prefix_update: str = arg("auto", "update: run a user's prompt prefix once for its K traces; auto = "
                                    "when gradient checkpointing is off (the two do not combine)", ["auto", "on", "off"])
    # prompt
    max_history: int = arg(20, "history items shown in the prompt (the most recent ones)")
    max_item_chars: int = arg(200, "characters per item line in the prompt (longer texts are cut)")
    # rollout
    max_new_tokens: int = arg(256, "token budget of one reasoning trace; 0 = no reasoning, the head reads the "
                              "prompt's last hidden state (a control: with --freeze-llm, or in eval without listwise)")
    response_prefix: str = arg("", "text every reply is forced to start with, fed as part of the prompt and never "
                               "trained (e.g. '<think>'); pass the same to --stage eval")
    temperature: float = arg(1.0, "sampling temperature of the traces (0 = greedy: not for training the LLM, "
                             "greedy traces have no policy gradient)")
    top_p: float = arg(1.0, "nucleus sampling: keep the most likely tokens up to this mass (1 when training "
                       "the LLM: the log-probs of Eq. 6 do not include the cut)")
    # RL
    max_steps: int = arg(100, "RL steps (one step = users-per-step users x K candidates traces)")
    train_users: int = arg(0, "train on the first N training users only (0 = all): a smaller set to roll out on a CPU")
    users_per_step: int = arg(4, "users per step")
    num_rankings: int = arg(8, "S, rankings sampled from Plackett-Luce per user (the paper samples one)")
    reward_k: int = arg(10, "the reward is NDCG@reward-k")
    baseline: bool = arg(True, "leave-one-out baseline over the S rankings in the head's REINFORCE")
    pl_std: float = arg(0.0, "if > 0, each user's K scores are standardized to this std before Plackett-Luce "
                        "(a PL temperature that follows the head's scale, departure 7; 0 = the paper's raw scores)")
    advantage: str = arg("reward", "LLM advantage: reward (the paper, Eq. 6: the rankings' mean reward), batch (minus "
                         "the other users' mean reward) or counterfactual (per trace: V(s) - V(s with s_k replaced))",
                         ["reward", "batch", "counterfactual"])
    advantage_samples: int = arg(256, "counterfactual: Plackett-Luce rankings per value estimate (no LLM cost)")
    freeze_llm: bool = arg(False, "train the head only, LLM frozen (the MLP-only variant, Table 3); each "
                           "user's traces are then sampled once and reused (saved with the checkpoints)")
    trace_cache: str = arg("", "--freeze-llm: start from the traces of an earlier --freeze-llm run "
                           "(<its checkpoint>/trace-cache.pt), e.g. to train another head on them")
    new_head: bool = arg(False, "start a new scoring head even when --model is a checkpoint that has one, "
                         "e.g. to train a head MLP-only on the LLM of an RL run")
    ppo_epochs: int = arg(2, "passes over a step's traces, one optimizer step each")
    clip_eps: float = arg(0.2, "PPO clipping epsilon")
    micro_batch: int = arg(8, "traces per forward/backward in the update (memory only; same gradient)")
    lr: float = arg(1e-6, "LLM learning rate (AdamW)")
    head_lr: float = arg(1e-3, "scoring-head learning rate (AdamW); 0 freezes the head, e.g. RL of the LLM "
                         "alone under a head trained MLP-only")
    head_width: int = arg(256, "hidden width of the scoring head's MLP")
    head_weight_decay: float = arg(0.01, "scoring-head weight decay (AdamW)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip for the LLM")
    eval_every: int = arg(0, "every N steps, NDCG@10 of greedy traces on validation users, logged; also "
                          "the start's, as step 0 (0 = never)")
    eval_users: int = arg(32, "validation users in that check")
    save_every: int = arg(50, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = arg(0, "keep only the newest N checkpoints of the run (0 = keep all)")
    # SFT cold start (Sec. 3.4): --stage sft-data, then --stage sft
    traces: str = arg("", "teacher traces (jsonl): written by sft-data, read by sft; default <out>/traces.jsonl")
    teacher: str = arg("", "sft-data: local teacher model (hub id, directory or .gguf)")
    teacher_url: str = arg("", "sft-data: OpenAI-compatible endpoint instead, e.g. http://localhost:8000/v1")
    teacher_model: str = arg("", "sft-data: model name sent to --teacher-url")
    teacher_key_env: str = arg("OPENAI_API_KEY", "sft-data: environment variable holding the endpoint's API key")
    num_pairs: int = arg(200, "sft-data: (user, candidate) pairs to ask the teacher about, half positive")
    sft_epochs: int = arg(2, "sft: passes over the traces")
    sft_lr: float = arg(1e-5, "sft: learning rate (AdamW)")
    sft_batch: int = arg(16, "sft: traces per optimizer step, in micro-batches of --micro-batch")
    # evaluation: --stage eval
    split: str = arg("test", "eval: which split to evaluate")
    methods: str = arg("r2rank,random,popularity,pointwise,listwise", "eval: comma-separated methods to run")
    analyses: str = arg("", "eval: comma-separated extra analyses: position,history-order,cold-start,history-length")
    eval_limit: int = arg(0, "eval: evaluate only the first N users of the split (0 = all)")
    eval_sample: bool = arg(False, "eval: sample R2Rank's traces at --temperature instead of greedy")
    history_shuffles: int = arg(5, "eval: R, shuffles of each history in the history-order analysis")
    bootstrap: int = arg(1000, "eval: bootstrap resamples for the 95% intervals")


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"].replace("%", "%%"))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"].replace("%", "%%"))
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.baseline and cfg.num_rankings < 2:
        parser.error("--baseline needs --num-rankings >= 2 (or pass --no-baseline)")
    if cfg.pl_std < 0:
        parser.error("--pl-std must be >= 0")
    if cfg.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")
    if cfg.max_new_tokens == 0 and (cfg.stage in ("sft-data", "sft") or (cfg.stage == "rl" and not cfg.freeze_llm)):
        parser.error("--max-new-tokens 0 writes no trace, so there are no tokens to train: use it with --stage rl --freeze-llm or --stage eval")
    if cfg.response_prefix and cfg.stage in ("sft-data", "sft"):
        parser.error("--response-prefix does not go with SFT: the teacher's replies do not start with it")
    if cfg.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {cfg.top_p}")
    trains_llm = cfg.stage == "rl" and not cfg.freeze_llm
    if trains_llm and cfg.temperature == 0:
        parser.error("--temperature 0 samples greedy traces, which have no policy gradient: use a temperature > 0 "
                     "for --stage rl (or --freeze-llm to train the head alone)")
    if trains_llm and cfg.top_p < 1:
        parser.error("--top-p < 1 is not supported for --stage rl: the PPO log-probs do not include nucleus "
                     "truncation (use --top-p 1, or --freeze-llm)")
    if trains_llm and cfg.advantage == "batch" and cfg.users_per_step < 2:
        parser.error("--advantage batch needs --users-per-step >= 2 (the baseline is the other users' mean reward)")
    if cfg.advantage_samples < 1:
        parser.error(f"--advantage-samples must be >= 1, got {cfg.advantage_samples}")
    if cfg.max_new_tokens == 0 and cfg.stage == "eval" and "listwise" in cfg.methods.split(","):
        parser.error("--max-new-tokens 0 leaves the listwise baseline no tokens to answer with: leave it out of --methods")
    return cfg


# ------------------------------------------------------------------------- phases of one step


def signal_share(reward):
    """Share of users [U, S] whose S rankings do not all get the same reward: the only users whose
    rankings the head's REINFORCE can learn from."""
    return (reward != reward[:, :1]).any(1).float().mean().item()


def ppo_update(model, optimizer, prompts, samples, advantages, cfg, shared_prefix=False):
    """Phase 4 for theta: --ppo-epochs passes of clipped PPO over all traces, in micro-batches.

    prompts: per user (prefix_ids, [suffix_ids] * K); samples: per-user Samples; advantages: [U, K].
    A micro-batch holds up to --micro-batch traces of one user. With shared_prefix the user's prompt
    prefix is run once per micro-batch instead of once per trace (rollout.response_logprobs_shared).
    Each micro-batch's mean loss is weighted by its share of the valid tokens, so the accumulated
    gradient equals that of the per-token mean over the whole step (ppo.clipped_token_loss).

    theta_old (departure 5): the first epoch's own log-probs, detached, so its ratio is exactly 1 and
    later epochs compare against the same forward pass (code path, precision, train mode) as the
    gradient. The log-probs recorded while decoding only measure how far the two paths differ.
    """
    total_tokens = sum(int(s.lengths.sum()) for s in samples)
    stats = {"clip_frac": 0.0, "approx_kl": 0.0, "ratio": 0.0, "ppo_loss": 0.0}
    gap_sum, gap_max, old_logps = 0.0, 0.0, {}
    model.train()
    for epoch in range(cfg.ppo_epochs):
        for user, ((prefix, suffixes), user_samples, user_advantages) in enumerate(zip(prompts, samples, advantages)):
            responses = user_samples.token_lists()
            for start in range(0, len(suffixes), cfg.micro_batch):
                batch = slice(start, start + cfg.micro_batch)
                if shared_prefix:
                    logp, mask = rollout.response_logprobs_shared(model, prefix, suffixes[batch], responses[batch],
                                                                  cfg.temperature)
                else:
                    logp, mask = rollout.response_logprobs(model, [prefix + s for s in suffixes[batch]],
                                                           responses[batch], cfg.temperature)
                if epoch == 0:
                    old_logps[user, start] = logp.detach()
                    decoded = user_samples.logprobs[batch, :logp.shape[1]].to(logp.device)  # [B, R]
                    gap = (logp.detach() - decoded).abs()[mask]
                    if gap.numel():
                        gap_sum, gap_max = gap_sum + gap.sum().item(), max(gap_max, gap.max().item())
                loss, mb_stats = clipped_token_loss(logp, old_logps[user, start], user_advantages[batch].to(logp.device),
                                                    mask, cfg.clip_eps)
                share = mask.sum().item() / max(total_tokens, 1)
                (loss * share).backward()
                for name, value in {**mb_stats, "ppo_loss": loss.item()}.items():
                    stats[name] += value * share / cfg.ppo_epochs
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {**stats, "decode_logp_gap": gap_sum / max(total_tokens, 1), "decode_logp_gap_max": gap_max}


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


def train_rl(cfg):
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    data_dir = data.prepare_data(cfg.data, cfg.out, cfg.seed)
    train, valid = data.load_split(data_dir, "train"), data.load_split(data_dir, "valid")
    train = train[: cfg.train_users or None]
    os.makedirs(cfg.out, exist_ok=True)

    start_step, checkpoint = 0, latest_checkpoint(cfg.out) if cfg.resume else None
    if checkpoint:
        with open(os.path.join(checkpoint, "r2rank.json")) as f:
            saved = json.load(f)
        if saved["config"]["stage"] != "rl":
            sys.exit(f"error: {checkpoint}: not an RL checkpoint (stage {saved['config']['stage']}); "
                     "start RL from it with --model and another --out")
        start_step = saved["step"]
    model, tokenizer = load_policy(checkpoint or cfg.model, device, torch.float32, cfg.seed)  # fp32 master weights
    hidden_size = model.config.hidden_size
    # a checkpoint of this run (--resume) or of an earlier RL run (--model <dir>) brings its head along
    source = checkpoint or (None if cfg.new_head else cfg.model)
    torch.manual_seed(cfg.seed)
    if source and has_head(source):
        head = load_head(source, hidden_size, device)
    else:
        head = ScoreHead(hidden_size, cfg.head_width).to(device)
    if cfg.freeze_llm:
        model.requires_grad_(False)
    use_checkpointing = enable_checkpointing(model, cfg.gradient_checkpointing, device) if not cfg.freeze_llm else False
    if use_checkpointing and cfg.shared_prefix_update == "on":
        sys.exit("error: --shared-prefix-update on needs --gradient-checkpointing off (checkpointed layers drop the KV cache)")
    shared_prefix = cfg.shared_prefix_update == "on" or (cfg.shared_prefix_update == "auto" and not use_checkpointing)
    model.eval()
    optimizers = {"head": torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)}
    if not cfg.freeze_llm:
        optimizers["llm"] = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if checkpoint:
        states = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device)
        for name, opt in optimizers.items():
            opt.load_state_dict(states[name])
        print(f"resumed from {checkpoint} at step {start_step}")
    # MLP-only (--freeze-llm): the policy never changes, so a user's K traces are sampled at its first
    # step and reused whenever it comes back (a fixed sample instead of a fresh one: much cheaper).
    trace_cache, valid_samples = {}, None
    if cfg.freeze_llm and checkpoint and os.path.isfile(os.path.join(checkpoint, "trace-cache.pt")):
        trace_cache = load_trace_cache(os.path.join(checkpoint, "trace-cache.pt"), cfg, device)
    elif cfg.freeze_llm and cfg.trace_cache:
        trace_cache = load_trace_cache(cfg.trace_cache, cfg, device)

    K = len(train[0]["candidates"])
    print(f"{cfg.users_per_step} users x {K} candidates = {cfg.users_per_step * K} traces per step "
          f"(<= {cfg.users_per_step * K * cfg.max_new_tokens} new tokens); {cfg.num_rankings} rankings per user; "
          f"{len(train)} training users; device {device}, {dtype} compute, gradient checkpointing {'on' if use_checkpointing else 'off'}, "
          f"shared-prefix update {'on' if shared_prefix else 'off'}")
    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a")
    if cfg.eval_every and start_step == 0:  # the start's validation (step 0): picking the best step can keep the start
        started = time.time()
        with mixed_precision(device, dtype):
            start_ndcg, checked = validate(model, tokenizer, head, valid[: cfg.eval_users], cfg)
        valid_samples = checked if cfg.freeze_llm else None
        log_row(metrics_file, {"step": 0, "valid_ndcg@10": start_ndcg, "step_time": time.time() - started}, print)
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="rl", dynamic_ncols=True)
    for step in bar:
        started = time.time()
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        instances = [train[i] for i in users_for_step(len(train), cfg.users_per_step, cfg.seed, step)]
        labels = torch.tensor([inst["labels"] for inst in instances], device=device, dtype=torch.float32)  # [U, K]

        # 1) rollout: one reasoning trace per candidate;  2) scores from the head
        if cfg.freeze_llm:
            missing = [inst for inst in instances if inst["user_id"] not in trace_cache]
            with mixed_precision(device, dtype):
                trace_cache.update(zip([inst["user_id"] for inst in missing],
                                       rollout.rollout_users(model, tokenizer, missing, cfg, generator)[0]))
            samples = [trace_cache[inst["user_id"]] for inst in instances]
        else:
            with mixed_precision(device, dtype):
                samples, prompts = rollout.rollout_users(model, tokenizer, instances, cfg, generator)
        raw_scores = score_traces(head, samples)  # [U, K], with grad into phi only
        scores = standardized(raw_scores, cfg.pl_std)

        # 3) sample S rankings from Plackett-Luce, reward = NDCG@10
        rankings = plackett_luce.sample(scores.detach(), cfg.num_rankings, generator)  # [U, S, K]
        reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), cfg.reward_k)  # [U, S]
        baseline = leave_one_out_baseline(reward) if cfg.baseline else None

        # 4) REINFORCE on the head (Eq. 5), clipped PPO on the tokens (Eq. 6)
        head_loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
        optimizers["head"].zero_grad(set_to_none=True)
        head_loss.backward()
        optimizers["head"].step()
        ppo_stats = {}
        if not cfg.freeze_llm:
            K = scores.shape[1]
            if cfg.advantage == "counterfactual":  # per trace: V(s) - V(s with s_k replaced)
                advantages = counterfactual_advantages(scores.detach(), labels, cfg.reward_k, cfg.advantage_samples,
                                                       generator)  # [U, K]
            elif cfg.advantage == "batch":  # the user's mean reward minus the other users'
                advantages = batch_baseline_advantages(reward)[:, None].expand(-1, K)
            else:  # the paper's Eq. (6): the rankings' mean reward, no baseline
                advantages = reward.mean(1, keepdim=True).expand(-1, K)  # [U, K]
            with mixed_precision(device, dtype):
                ppo_stats = ppo_update(model, optimizers["llm"], prompts, samples, advantages, cfg, shared_prefix)

        # 5) log, checkpoint
        row = {"step": step + 1, "reward": reward.mean().item(),
               "reward_std": reward.std(1, correction=0).mean().item(),  # spread over a user's S rankings: REINFORCE's signal
               "signal_share": signal_share(reward),
               "score_std": raw_scores.detach().std(1, correction=0).mean().item(),  # the head's spread of the K scores
               "ndcg@10_greedy": ndcg_from_scores(scores.detach(), labels, 10).mean().item(),
               "head_loss": head_loss.item(), **ppo_stats, **rollout.trace_stats(samples, tokenizer)}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            with mixed_precision(device, dtype):
                row["valid_ndcg@10"], checked = validate(model, tokenizer, head, valid[: cfg.eval_users], cfg, valid_samples)
            valid_samples = checked if cfg.freeze_llm else None
        row["step_time"] = time.time() - started
        log_row(metrics_file, row, bar.write)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(cfg.out, step + 1, model, tokenizer, head, optimizers, cfg,
                            trace_cache if cfg.freeze_llm else None)
            if cfg.keep_checkpoints:
                prune_checkpoints(cfg.out, cfg.keep_checkpoints)
    metrics_file.close()


def log_row(metrics_file, row, write):
    """Append row to metrics.jsonl (flushed, so a crash keeps it) and show it as one line."""
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


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


if __name__ == "__main__":
    main()
