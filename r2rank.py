"""R2Rank: RL training of an LLM and its scoring head (Algorithm 1 of the R2Rank paper), and main,
which runs any stage (the flags: config.py).

    python r2rank.py --stage rl --model tiny            # runs anywhere, no download
    python r2rank.py --stage rl --data data/ml100k --model Qwen/Qwen2.5-1.5B-Instruct
    torchrun --nproc-per-node 4 r2rank.py --stage rl ...   # the step's users split over 4 GPUs (distributed.py)

One RL step (train_rl), tagged with Algorithm 1's lines:
    1) rollout: one reasoning trace y_k per candidate, from the self-check prompt   lines 1-3, Eq. 1
    2) scores s_k = f_phi(h_k), h_k the last hidden state at the trace's end         line 4, Eq. 2
    3) S rankings tau ~ Plackett-Luce(s), reward rho(tau) = NDCG@10                  lines 6-7, Eq. 4
    4) clipped PPO on the tokens and the score path into theta, REINFORCE on phi    lines 8-12, Eqs. 5-6
    5) log, validate, checkpoint

The log line's health signs: answer_share and truncated_share (traces that reach an <answer>, or are
cut at the token limit); distinct_share and token_logp (fall towards 1/K and 0 when the policy writes
one text for every candidate); signal_share (users whose S rankings differ in reward: the head learns
only from those); clip_frac, approx_kl; decode_logp_gap (|decode-time - update log-probs|) and
decode_score_gap (the same for the scores: the update reads h_k where the rollout did);
advantage_abs and advantage_nonzero (the mean |advantage| and the share of traces with one).

Where this departs from the paper (defaults are the paper's unless said; details where implemented):
1. S rankings per user instead of one (--num-rankings 8): sampling one costs nothing next to K traces.
2. A leave-one-out baseline over the S rankings in the head's REINFORCE (--baseline, on; ppo.py).
3. --advantage batch or counterfactual adds a baseline to Eq. 6's advantage, unbiased (ppo.py).
4. The PPO loss is a per-token mean, not Eq. 6's plain sum (ppo.clipped_token_loss).
5. theta_old is the first PPO epoch's own forward, not the decoding pass (rollout.ppo_update).
6. Log-probs at the sampling temperature; RL refuses --temperature 0 and --top-p < 1 (rollout.py).
7. The head's gradient reaches the LLM through h_k too (--score-path, on). Sec. 3.3 asks for the
   gradient to flow from rho(tau) to theta via tau, s_k and y_k; with s_k = f_phi(h_k(theta, y_k))
   grad_theta J = E[sum_k A_k grad log pi(y_k)] (Eq. 6, the tokens) + E[sum_k dV/ds_k grad_theta s_k],
   V(s) = E_{tau ~ PL(s)} rho(tau). Eqs. 5-6 as printed leave out the second term: the LLM would learn
   which words to write but never a hidden state that ranks better. ppo.score_gradient estimates dV/ds
   from the S rankings, rollout.ppo_update adds the term with the token term's divisor (departure 4);
   --no-score-path is the equations to the letter. The head reads h_k through a LayerNorm (models.py).
8. --pl-std (off) fixes the std of a user's scores before Plackett-Luce (plackett_luce.standardized);
   the score path and the counterfactual advantage take their gradients and values through it.
"""
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
import distributed
from config import parse_config
import plackett_luce
import rollout
from metrics import ndcg_at_k, ndcg_from_scores
import runs
from models import (ScoreHead, attach_lora, enable_checkpointing, has_head, hold_frozen_weights, load_head, load_policy,
                    load_trace_cache, mixed_precision, pick_device, pick_dtype, score_traces)
from plackett_luce import standardized
from ppo import batch_baseline_advantages, counterfactual_advantages, leave_one_out_baseline, reinforce_loss, score_gradient

# ------------------------------------------------------------------------- phases of one step


def signal_share(reward):
    """Share of users [U, S] whose S rankings do not all get the same reward: the only users whose
    rankings the head's REINFORCE can learn from."""
    return (reward != reward[:, :1]).any(1).float().mean().item()


@torch.no_grad()
def validate(model, tokenizer, head, instances, cfg, samples=None, fast_decode=True):
    """(NDCG@10 of greedy traces ranked by the head's scores, the traces). Pass the traces of an
    earlier call as samples to skip the rollout (they do not change while the LLM is frozen)."""
    if samples is None:
        samples, _ = rollout.rollout_users(model, tokenizer, instances, cfg, None, temperature=0.0, fast_decode=fast_decode)
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
    model: torch.nn.Module  # the LLM, fp32 master weights (frozen ones in the compute dtype: models.hold_frozen_weights)
    tokenizer: object
    head: ScoreHead
    optimizers: dict  # "head", and "llm" unless --freeze-llm
    plan: runs.Plan  # the step it starts at (0, or the checkpoint's), what --resume changed
    shared_prefix: bool  # the update runs a user's prompt prefix once per micro-batch
    trace_cache: dict  # MLP-only: user_id -> Samples, sampled once and reused
    fast_decode: bool  # the rollout on decode.py's forward (False: transformers', after a failed start-up check)


def setup_rl(cfg, rank_device=None):
    """Data, model and head (from --model, or the newest checkpoint with --resume), optimizers.
    rank_device: this rank's GPU under torchrun (distributed.start)."""
    device = rank_device if rank_device is not None and cfg.device == "auto" else pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.freeze_llm and distributed.world() > 1:
        raise data.DataError("--freeze-llm is not supported under torchrun yet (each rank would cache its own users' "
                             "traces); run it as one process")
    if cfg.users_per_step < distributed.world():
        raise data.DataError(f"--users-per-step {cfg.users_per_step} leaves some of the {distributed.world()} ranks "
                             "without a user: give each rank at least one")
    # the data and --out are checked before the model loads: a bad input costs no download
    if not distributed.is_main():
        distributed.barrier()  # rank 0 builds the synthetic set, if it is the data
    data_dir = data.prepare_data(cfg.data, cfg.out, cfg.seed)
    if distributed.is_main():
        distributed.barrier()
    train = data.load_split(data_dir, "train")[: cfg.train_users or None]
    valid = data.load_split(data_dir, "valid", allow_empty=not cfg.eval_every)
    if cfg.users_per_step > len(train):
        raise data.DataError(f"--users-per-step {cfg.users_per_step} is more than the {len(train)} training users "
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
        raise data.DataError("--shared-prefix-update on needs --gradient-checkpointing off (checkpointed layers drop the KV cache)")
    shared_prefix = cfg.shared_prefix_update == "on" or (cfg.shared_prefix_update == "auto" and not use_checkpointing)
    model.eval()
    optimizers = {"head": torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)}
    if not cfg.freeze_llm:  # every weight, or only the LoRA adapters (drawn after the head: the same head either way)
        trained = attach_lora(model, cfg.lora_rank, checkpoint) if cfg.lora_rank else model.parameters()
        optimizers["llm"] = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    if checkpoint:
        states = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device)
        for name, opt in optimizers.items():
            opt.load_state_dict(states[name])
        print(f"resumed from {checkpoint} at step {start_step}")
    for name, opt in optimizers.items():  # a changed --lr / --head-lr applies to the restored optimizer too
        runs.set_lr(opt, cfg.head_lr if name == "head" else cfg.lr)
    hold_frozen_weights(model, dtype)  # LoRA's base, or the whole --freeze-llm LLM: cast once, not per forward
    fast_decode = True
    if device.type == "cuda":  # decode.py's forward against the model's own, on kernels the CPU tests never ran
        fast_decode, gap = rollout.decode_agrees(model, tokenizer, train[0], cfg, dtype)
        if not fast_decode:
            print(f"warning: decode.py's log-probs differ from the model's forward by {gap:.3f} per token on this GPU "
                  f"(past the {rollout.DECODE_TOLERANCE[dtype]:g} that {dtype} rounding explains): the rollout uses "
                  "transformers' forward instead (slower)")
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
    # every rank checks (it only reads): one rank refusing alone would leave the others waiting at the barrier
    runs.check_disk(cfg.out, runs.checkpoint_bytes(model, optimizers, head),
                    runs.saves_planned(start_step, cfg.max_steps, cfg.save_every), cfg.keep_checkpoints, plan.overwrite)
    if distributed.is_main():
        runs.start(cfg.out, plan)  # the first write into --out
    distributed.barrier()
    return RLRun(device, dtype, train, valid, model, tokenizer, head, optimizers, plan, shared_prefix, trace_cache, fast_decode)


def user_generator(seed, step, user, device):
    """The random stream of one user's traces and rankings at one step: seeded by (seed, step, user),
    so it is the same whichever rank draws it, and in whatever order."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_000_003 + user)


def llm_advantages(cfg, raw_scores, labels, reward, generators):
    """[U, K] advantage of each trace (--advantage; departure 3). raw_scores (the head's, before
    --pl-std), labels [U, K]; reward [U, S]; one generator per user. Under torchrun, U is this rank's
    users; batch reads every rank's."""
    K = raw_scores.shape[1]
    if cfg.advantage == "counterfactual":  # per trace: V(s) - V(s with s_k replaced by the others' mean)
        return torch.cat([counterfactual_advantages(raw_scores[u:u + 1].detach(), labels[u:u + 1], cfg.reward_k,
                                                    cfg.advantage_samples, g, cfg.pl_std) for u, g in enumerate(generators)])
    if cfg.advantage == "batch":  # the user's mean reward minus the other users' (all of the step's users)
        means = torch.tensor(distributed.gather(reward.mean(1).tolist()), device=reward.device)  # [all users]
        return batch_baseline_advantages(means[:, None])[distributed.shard(list(range(len(means))))][:, None].expand(-1, K)
    return reward.mean(1, keepdim=True).expand(-1, K)  # the paper's Eq. (6): the mean reward, no baseline


def train_rl(cfg, rank_device=None):
    run = setup_rl(cfg, rank_device)
    if run is None:
        return
    model, tokenizer, head, device, valid_users = run.model, run.tokenizer, run.head, run.device, run.valid[: cfg.eval_users]
    main = distributed.is_main()  # rank 0 (or the only process) validates, logs and saves
    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if main else None
    valid_samples = None  # MLP-only: the validation traces, rolled out once
    bar = tqdm(range(run.plan.start_step, cfg.max_steps), initial=run.plan.start_step, total=cfg.max_steps, desc="rl",
               dynamic_ncols=True, disable=not main)
    saved = run.plan.checkpoint  # the newest checkpoint of this run: what a stop keeps
    alone, warned_collapse = distributed.world() == 1, False  # under torchrun a rank cannot drop a step alone: the others would wait for it
    # Ctrl-C, SIGTERM: a step still rolling out is dropped at once (it has changed nothing), the steps before it
    # are kept (saved now if they were not); during an update, the step finishes and is saved. Then the run stops.
    with runs.StopOnSignal(saved or "nothing (no checkpoint yet)") as stop:
        try:
            if cfg.eval_every and run.plan.start_step == 0 and main:  # the start's validation (step 0): picking the best step can keep the start
                started = time.time()
                with stop.abandonable(), mixed_precision(device, run.dtype):
                    start_ndcg, checked = validate(model, tokenizer, head, valid_users, cfg, fast_decode=run.fast_decode)
                valid_samples = checked if cfg.freeze_llm else None
                runs.log_row(metrics_file, {"step": 0, "valid_ndcg@10": start_ndcg, "step_time": time.time() - started}, print)
        except runs.Abandoned:
            raise stop.exit("stopped before step 1; nothing was written but the data") from None
        for step in bar:
            started = time.time()
            # the minibatch B of Algorithm 1: the step's users (under torchrun, this rank's share of them)
            users = distributed.shard(users_for_step(len(run.train), cfg.users_per_step, cfg.seed, step))
            instances = [run.train[i] for i in users]
            generators = [user_generator(cfg.seed, step, i, device) for i in users]
            share = len(users) / cfg.users_per_step  # this rank's part of every mean over the step's users
            labels = torch.tensor([inst["labels"] for inst in instances], device=device, dtype=torch.float32)  # [U, K]

            # 1) Alg. 1 lines 1-3: one reasoning trace per candidate (MLP-only: sampled once per user, cached)
            try:
                with stop.abandonable(alone), mixed_precision(device, run.dtype):
                    if cfg.freeze_llm:
                        missing = [u for u, inst in enumerate(instances) if inst["user_id"] not in run.trace_cache]
                        sampled = rollout.rollout_users(model, tokenizer, [instances[u] for u in missing], cfg,
                                                        [generators[u] for u in missing], fast_decode=run.fast_decode)[0]
                    else:
                        samples, prompts = rollout.rollout_users(model, tokenizer, instances, cfg, generators,
                                                                 fast_decode=run.fast_decode)
            except runs.Abandoned:  # nothing of this step is kept; the finished steps are
                if step > run.plan.start_step and saved != os.path.join(cfg.out, f"checkpoint-{step}"):
                    saved = runs.save_checkpoint(cfg.out, step, model, tokenizer, head, run.optimizers, cfg,
                                                 run.trace_cache if cfg.freeze_llm else None, run.plan.record())
                metrics_file.close()
                raise stop.exit(f"step {step + 1} was still rolling out and is dropped; "
                                + (f"{runs.steps_text(1, step)} kept in {saved}; continue with --resume" if saved
                                   else "no step had finished, so nothing was written but the data")) from None
            if cfg.freeze_llm:
                run.trace_cache.update(zip([instances[u]["user_id"] for u in missing], sampled))
                samples = [run.trace_cache[inst["user_id"]] for inst in instances]
            # 2) line 4: scores s_k = f_phi(h_k), [U, K], with grad into phi only
            raw_scores = score_traces(head, samples)
            scores = standardized(raw_scores, cfg.pl_std)

            # 3) lines 6-7: S rankings from Plackett-Luce, reward = NDCG@reward-k
            rankings = torch.stack([plackett_luce.sample(scores[u].detach(), cfg.num_rankings, g)
                                    for u, g in enumerate(generators)])  # [U, S, K]
            reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), cfg.reward_k)  # [U, S]

            # 4) lines 8 and 11: clipped PPO on the tokens (Eq. 6) and the score path (departure 7), theta updated
            ppo_stats, local = {}, {}
            baseline = leave_one_out_baseline(reward) if cfg.baseline else None
            if not cfg.freeze_llm:
                advantages = llm_advantages(cfg, raw_scores, labels, reward, generators)  # [U, K]
                # dV/ds per trace, w.r.t. the raw scores (through --pl-std): the head's REINFORCE stopped at s
                score_grads = score_gradient(raw_scores, rankings, reward, baseline, cfg.pl_std) if cfg.score_path else None
                step_tokens = distributed.total(sum(int(s.lengths.sum()) for s in samples))  # every rank's
                step_traces = distributed.total(sum(len(s.lengths) for s in samples))
                # autocast inside, around each forward only: its optimizer steps must see no cached bf16 weights
                ppo_stats = rollout.ppo_update(model, run.optimizers["llm"], prompts, samples, advantages, cfg,
                                               run.shared_prefix, step_tokens, distributed.sum_gradients,
                                               head if cfg.score_path else None, score_grads, step_traces, run.dtype)
                local.update(advantage_abs=advantages.abs().mean().item(), advantage_nonzero=(advantages != 0).float().mean().item())
            #    lines 9 and 12: REINFORCE on the head through log P(tau | s) (Eq. 5), phi updated. After the LLM's
            #    update: its score path reads the head's weights, which must be those the scores came from.
            head_loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
            run.optimizers["head"].zero_grad(set_to_none=True)
            (head_loss * share).backward()  # this rank's share of the mean over all the step's users
            distributed.sum_gradients(head.parameters())
            run.optimizers["head"].step()

            # 5) log, validate, checkpoint (means over all the step's users, every rank's)
            local.update({"reward": reward.mean().item(),
                          "reward_std": reward.std(1, correction=0).mean().item(),  # spread over a user's S rankings: REINFORCE's signal
                          "signal_share": signal_share(reward),
                          "score_std": raw_scores.detach().std(1, correction=0).mean().item(),  # the head's spread of the K scores
                          "ndcg@10_greedy": ndcg_from_scores(scores.detach(), labels, 10).mean().item(),
                          "head_loss": head_loss.item(), **rollout.trace_stats(samples, tokenizer)})
            tokens = sum(int(s.lengths.sum()) for s in samples)  # token_logp is a mean over tokens, not users
            token_logp = distributed.total(local.pop("token_logp") * tokens) / max(distributed.total(tokens), 1)
            row = {"step": step + 1, **ppo_stats, **{name: distributed.total(value * share) for name, value in local.items()},
                   "token_logp": token_logp}
            if problem := runs.non_finite(row, run.optimizers):  # nothing of this step is written
                raise data.DataError(f"step {step + 1}: {problem}, so the run stops without writing this step "
                                     f"(kept: {saved or 'no checkpoint'}); lower --lr / --head-lr, or check the weights it started from")
            if row["score_std"] < runs.COLLAPSED_SPREAD and not warned_collapse:
                warned_collapse = True
                bar.write(f"warning: step {step + 1}: the head's scores have collapsed (spread {row['score_std']:.1e} over "
                          "a user's candidates): Plackett-Luce ranks at random and the head learns nothing; lower --head-lr / --lr")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and main:
                try:  # a signal during validation skips it; the step itself is kept
                    with stop.abandonable(), mixed_precision(device, run.dtype):
                        row["valid_ndcg@10"], checked = validate(model, tokenizer, head, valid_users, cfg, valid_samples,
                                                                 run.fast_decode)
                    valid_samples = checked if cfg.freeze_llm else None
                except runs.Abandoned:
                    bar.write(f"step {step + 1}: validation skipped by the signal")
            row["step_time"] = time.time() - started
            stop.requested = int(distributed.total(stop.requested or 0, "max")) or None  # a signal to any rank stops all
            if main:
                runs.log_row(metrics_file, row, bar.write)
            if main and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop.requested):
                saved = runs.save_checkpoint(cfg.out, step + 1, model, tokenizer, head, run.optimizers, cfg,
                                             run.trace_cache if cfg.freeze_llm else None, run.plan.record())
                stop.kept = saved
                if cfg.keep_checkpoints:
                    runs.prune_checkpoints(cfg.out, cfg.keep_checkpoints)
            if stop.requested:
                distributed.barrier()  # the checkpoint is written
                if metrics_file:
                    metrics_file.close()
                raise stop.exit(f"{runs.steps_text(1, step + 1)} kept in {os.path.join(cfg.out, f'checkpoint-{step + 1}')}; "
                                "continue with --resume")
    if not main:
        return
    metrics_file.close()
    print(f"wrote {os.path.join(cfg.out, 'metrics.jsonl')} and {saved}")


def main(argv=None):
    cfg = parse_config(argv, " ".join(__doc__.split("\n\n")[0].split()))
    try:
        rank_device = distributed.start()  # under torchrun: join the process group (a plain run: nothing)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all
    try:
        if distributed.world() > 1 and cfg.stage in ("sft-data", "sft"):
            raise data.DataError(f"--stage {cfg.stage} runs as one process (torchrun covers rl and eval)")
        if cfg.stage == "rl":
            train_rl(cfg, rank_device)
        elif cfg.stage in ("sft-data", "sft"):
            import sft

            sft.build_traces(cfg) if cfg.stage == "sft-data" else sft.train_sft(cfg)
        elif cfg.stage == "eval":
            import evaluate

            evaluate.run_eval(cfg, rank_device)
        else:
            sys.exit(f"error: unknown --stage {cfg.stage!r}")
    except data.DataError as error:  # every rank meets the same bad input; rank 0 says so
        if distributed.is_main():
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:  # RuntimeError: the CPU allocator's failure
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(error):
            raise
        if distributed.is_main():
            print(f"error: out of memory ({str(error).strip().splitlines()[0][:200]}); lower --micro-batch, "
                  "--max-new-tokens or --users-per-step, or pass --gradient-checkpointing on or --lora-rank", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        if cfg.stage == "eval":
            print("interrupted: the evaluation stopped before writing its results; nothing was written", file=sys.stderr)
        elif cfg.stage == "sft-data":
            print("interrupted: the pairs written so far are kept; the same command continues", file=sys.stderr)
        else:
            print(f"interrupted: {runs.interrupted_message(cfg.out)}", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
