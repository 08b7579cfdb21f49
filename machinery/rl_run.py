"""What an RL run needs around Algorithm 1's step (r2rank.train_rl): its set-up, the step's users and
random streams, the block around phase 1, and the bookkeeping after each step, so that the loop a reader
follows beside the paper shows the paper's phases and little else.

    run = setup_rl(cfg)                      data, model, head, optimizers, resume; the start-up checks
    book = Bookkeeper(cfg, run)              metrics.jsonl, progress bar, validation, checkpoints, stops
    with book.rollout_phase(step):           autocast; a stop drops the step still rolling out
        traces, prompts = rollout.rollout_users(...)   (MLP-only: run.cached_traces)
    book.end_step(step, row)                 checks, validates, logs, saves; stops when asked

Stops (Ctrl-C, SIGTERM; stops.StopOnSignal): a step still rolling out is dropped at once (it has
changed nothing) and the finished steps are kept, saved now if they were not; during an update the
step finishes and is saved. Then the run stops. Under torchrun rank 0 validates, logs and saves.
"""
import contextlib
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import data
from protocol import UsageError
import rollout
from metrics import ndcg_from_scores
from head import ScoreHead, score_traces
from machinery import checkpoints, datasets, distributed, memory, runs, stops
from machinery.models import (attach_lora, check_context, enable_checkpointing, has_head, hold_frozen_weights, load_head, load_policy, load_trace_cache,
                    mixed_precision, pick_device, pick_dtype)


@torch.no_grad()
def validate(model, tokenizer, head, instances, cfg, traces=None, fast_decode=True):
    """(NDCG@10 of greedy traces ranked by the head's scores, the traces). Pass the traces of an
    earlier call as traces to skip the rollout (they do not change while the LLM is frozen)."""
    if traces is None:
        traces, _ = rollout.rollout_users(model, tokenizer, instances, cfg, None, temperature=0.0, fast_decode=fast_decode)
    scores = score_traces(head, traces)
    labels = torch.tensor([inst["labels"] for inst in instances])
    return ndcg_from_scores(scores.cpu(), labels, 10).mean().item(), traces


def users_for_step(num_users, users_per_step, seed, step):
    """The step's users: a permutation seeded by (seed, step), so a resumed run sees the same ones."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(num_users, generator=generator)[:users_per_step].tolist()


def user_generator(seed, step, user, device):
    """The random stream of one user's traces and rankings at one step: seeded by (seed, step, user),
    so it is the same whichever rank draws it, and in whatever order."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_000_003 + user)


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
    trace_cache: dict  # MLP-only: user_id -> Traces, sampled once and reused (cached_traces)
    fast_decode: bool  # the rollout on decode.py's forward (False: transformers', after a failed start-up check)
    claim: stops.Claim = None  # --out held for this run (stops.claim), let go when the Bookkeeper's block ends

    def cached_traces(self, cfg, instances, generators):
        """Phase 1 of MLP-only (--freeze-llm, departure 11): the policy never changes, so a user's K traces
        are sampled at its first step (rollout.rollout_users) and reused whenever it comes back (a fixed
        sample instead of a fresh one). Returns (per-user Traces, None: no update reads the prompts)."""
        missing = [u for u, inst in enumerate(instances) if inst["user_id"] not in self.trace_cache]
        sampled = rollout.rollout_users(self.model, self.tokenizer, [instances[u] for u in missing], cfg,
                                        [generators[u] for u in missing], fast_decode=self.fast_decode)[0]
        self.trace_cache.update(zip([instances[u]["user_id"] for u in missing], sampled))
        return [self.trace_cache[inst["user_id"]] for inst in instances], None


def setup_rl(cfg, rank_device=None):
    """Data, model and head (from --model, or the newest checkpoint with --resume), optimizers, with --out
    held for the run (stops.claim; None and let go when there is nothing to train or set-up fails).
    rank_device: this rank's GPU under torchrun (distributed.start)."""
    if cfg.freeze_llm and distributed.world() > 1:
        raise UsageError("--freeze-llm is not supported under torchrun yet (each rank would cache its own users' "
                             "traces); run it as one process")
    if cfg.users_per_step < distributed.world():
        raise UsageError(f"--users-per-step {cfg.users_per_step} leaves some of the {distributed.world()} ranks "
                             "without a user: give each rank at least one")
    claim = stops.claim(cfg.out)  # a second run on this --out is refused until the run ends
    try:
        run = load_run(cfg, rank_device)
    except BaseException:
        claim.release()
        raise
    if run is None:
        claim.release()
    else:
        run.claim = claim
    return run


def load_run(cfg, rank_device):
    """setup_rl's work, once --out is held."""
    device = rank_device if rank_device is not None and cfg.device == "auto" else pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    # the data and --out are checked before the model loads: a bad input costs no download
    if not distributed.is_main():
        distributed.barrier()  # rank 0 builds the synthetic set, if it is the data
    data_dir = datasets.prepare_data(cfg.data, cfg.out, cfg.seed)
    if distributed.is_main():
        distributed.barrier()
    train = data.load_split(data_dir, "train")[: cfg.train_users or None]
    valid = data.load_split(data_dir, "valid", allow_empty=not cfg.eval_every)
    if cfg.users_per_step > len(train):
        raise UsageError(f"--users-per-step {cfg.users_per_step} is more than the {len(train)} training users "
                             f"of {data_dir}" + (" kept by --train-users" if cfg.train_users else ""))
    plan = runs.plan_out(cfg, data_dir, cfg.max_steps)
    start_step, checkpoint = plan.start_step, plan.checkpoint
    if start_step == cfg.max_steps:
        print(f"{checkpoint} is at --max-steps {cfg.max_steps} already: nothing to train (raise --max-steps to go on)")
        return None
    model, tokenizer = load_policy(checkpoint or cfg.model, device, torch.float32, cfg.seed)  # fp32 master weights
    check_context(model, cfg.max_new_tokens)
    hidden_size = model.config.hidden_size
    # a checkpoint of this run (--resume) or of an earlier RL run (--model <dir>) brings its head along
    source = checkpoint or (None if cfg.new_head else cfg.model)
    torch.manual_seed(cfg.seed)
    head = (load_head(source, hidden_size, device) if source and has_head(source)
            else ScoreHead(hidden_size, cfg.head_width).to(device))
    if cfg.freeze_llm:
        model.requires_grad_(False)
    # the update's layout from memory (--gradient-checkpointing auto): the shared-prefix update when it fits
    prefix, suffixes = data.encode_user(tokenizer, train[0], cfg.max_history, cfg.max_item_chars, cfg.response_prefix,
                                        data.PROMPTS[cfg.prompt])
    use_checkpointing, why = (False, "no update of the LLM") if cfg.freeze_llm else memory.choose_checkpointing(
        cfg.gradient_checkpointing, device, model.config, len(suffixes), len(prefix) + max(map(len, suffixes)), len(prefix),
        cfg.max_new_tokens, cfg.micro_batch, dtype.itemsize, cfg.lora_rank)
    enable_checkpointing(model, "on" if use_checkpointing else "off", device)
    if use_checkpointing and cfg.shared_prefix_update == "on":
        raise UsageError("--shared-prefix-update on needs --gradient-checkpointing off (checkpointed layers drop the KV cache)")
    shared_prefix = cfg.shared_prefix_update == "on" or (cfg.shared_prefix_update == "auto" and not use_checkpointing)
    model.eval()
    optimizers = {"head": torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)}
    if not cfg.freeze_llm:  # every weight, or only the LoRA adapters (drawn after the head: the same head either way)
        trained = attach_lora(model, cfg.lora_rank, checkpoint) if cfg.lora_rank else model.parameters()
        optimizers["llm"] = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    if checkpoint:
        states = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location=device, weights_only=True)
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
    trace_cache = {}  # MLP-only: RLRun.cached_traces
    if cfg.freeze_llm and checkpoint and os.path.isfile(os.path.join(checkpoint, "trace-cache.pt")):
        trace_cache = load_trace_cache(os.path.join(checkpoint, "trace-cache.pt"), cfg, device)
    elif cfg.freeze_llm and cfg.trace_cache:
        trace_cache = load_trace_cache(cfg.trace_cache, cfg, device)

    K = len(train[0]["candidates"])
    print(f"{cfg.users_per_step} users x {K} candidates = {cfg.users_per_step * K} traces per step "
          f"(<= {cfg.users_per_step * K * cfg.max_new_tokens} new tokens); {cfg.num_rankings} rankings per user; "
          f"{len(train)} training users; device {device}, {dtype} compute, gradient checkpointing {'on' if use_checkpointing else 'off'} ({why}), "
          f"shared-prefix update {'on' if shared_prefix else 'off'}")
    # every rank checks (it only reads): one rank refusing alone would leave the others waiting at the barrier
    checkpoints.check_disk(cfg.out, checkpoints.checkpoint_bytes(model, optimizers, head),
                    checkpoints.saves_planned(start_step, cfg.max_steps, cfg.save_every), cfg.keep_checkpoints, plan.overwrite)
    if distributed.is_main():
        runs.start(cfg.out, plan)  # the first write into --out
    distributed.barrier()
    return RLRun(device, dtype, train, valid, model, tokenizer, head, optimizers, plan, shared_prefix, trace_cache, fast_decode)




SILENT_STEPS = 10  # steps in a row without a reward signal before the log says so


class Bookkeeper:
    """The bookkeeping of train_rl's steps (the module docstring says what a stop keeps)."""

    def __init__(self, cfg, run):
        self.cfg, self.run = cfg, run
        self.main = distributed.is_main()  # rank 0 (or the only process) validates, logs and saves
        self.metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if self.main else None
        self.saved = run.plan.checkpoint  # the newest checkpoint of this run: what a stop keeps
        self.stop = stops.StopOnSignal(self.saved or "nothing (no checkpoint yet)")
        self.valid_users, self.valid_traces = run.valid[: cfg.eval_users], None  # traces: MLP-only, rolled out once
        self.alone = distributed.world() == 1  # under torchrun a rank cannot drop a step alone: the others would wait for it
        self.warned_collapse, self.started, self.bar = False, None, None
        self.silent_steps, self.warned_silent = 0, False  # steps in a row with signal_share 0

    def __enter__(self):
        self.stop.__enter__()
        return self

    def __exit__(self, *exc):
        if self.metrics_file:
            self.metrics_file.close()
        self.run.claim.release()
        return self.stop.__exit__(*exc)

    def nothing_kept(self):
        """A run stopped before its first step was saved, from step 0: metrics.jsonl goes (it holds at most
        the start's validation), so that the same command can be run again."""
        self.metrics_file.close()
        if self.run.plan.start_step == 0 and not self.saved:
            runs.cut_metrics(self.cfg.out, None)

    def steps(self):
        """The steps to run, after the start's validation (logged as step 0; picking the best step can keep the start)."""
        cfg, run = self.cfg, self.run
        if cfg.eval_every and run.plan.start_step == 0 and self.main:
            self.started = time.time()
            ndcg = self.validate()
            if ndcg is None:
                self.nothing_kept()
                raise self.stop.exit("stopped before step 1; nothing was written but the data")
            runs.log_row(self.metrics_file, {"step": 0, "valid_ndcg@10": ndcg, "step_time": time.time() - self.started}, print)
        self.bar = tqdm(range(run.plan.start_step, cfg.max_steps), initial=run.plan.start_step, total=cfg.max_steps,
                        desc="rl", dynamic_ncols=True, disable=not self.main)
        for step in self.bar:
            self.started = time.time()
            yield step

    def validate(self):
        """NDCG@10 of greedy traces on the validation users; a signal during it returns None (the step is kept)."""
        run = self.run
        try:
            with self.stop.abandonable(), mixed_precision(run.device, run.dtype):
                ndcg, checked = validate(run.model, run.tokenizer, run.head, self.valid_users, self.cfg, self.valid_traces,
                                         run.fast_decode)
        except stops.Abandoned:
            return None
        self.valid_traces = checked if self.cfg.freeze_llm else None
        return ndcg

    @contextlib.contextmanager
    def rollout_phase(self, step):
        """Phase 1's block: under autocast; a signal drops this step (it has changed nothing), keeps the
        finished ones and stops the run."""
        cfg, run = self.cfg, self.run
        try:
            with self.stop.abandonable(self.alone), mixed_precision(run.device, run.dtype):
                yield
        except stops.Abandoned:  # nothing of this step is kept; the finished steps are
            if step > run.plan.start_step and self.saved != os.path.join(cfg.out, f"checkpoint-{step}"):
                self.saved = self.save(step)
            self.nothing_kept()
            raise self.stop.exit(f"step {step + 1} was still rolling out and is dropped; "
                                 + (f"{runs.steps_text(1, step)} kept in {self.saved}; continue with --resume" if self.saved
                                    else "no step had finished, so nothing was written but the data")) from None

    def save(self, steps_done):
        run = self.run
        return checkpoints.save_checkpoint(self.cfg.out, steps_done, run.model, run.tokenizer, run.head, run.optimizers, self.cfg,
                                    run.trace_cache if self.cfg.freeze_llm else None, run.plan.record())

    def end_step(self, step, row):
        """Phase 5 for the step's metrics row: checks, validation, the log line, the checkpoint; stops when asked."""
        cfg = self.cfg
        if problem := runs.non_finite(row, self.run.optimizers):  # nothing of this step is written
            raise UsageError(f"step {step + 1}: {problem}, so the run stops without writing this step "
                                 f"(kept: {self.saved or 'no checkpoint'}); lower --lr / --head-lr, or check the weights it started from")
        if row["score_std"] < runs.COLLAPSED_SPREAD and not self.warned_collapse:
            self.warned_collapse = True
            self.bar.write(f"warning: step {step + 1}: the head's scores have collapsed (spread {row['score_std']:.1e} over "
                           "a user's candidates): Plackett-Luce ranks at random and the head learns nothing; lower --head-lr / --lr")
        self.silent_steps = self.silent_steps + 1 if row.get("signal_share", 1) == 0 else 0
        if self.silent_steps == SILENT_STEPS and not self.warned_silent:
            self.warned_silent = True
            self.bar.write(f"warning: step {step + 1}: for {SILENT_STEPS} steps no user's {cfg.num_rankings} rankings differed "
                           "in reward (signal_share 0), so neither the head nor the score path learns: the scores rank "
                           "every user the same way each time (too far apart for Plackett-Luce to explore); lower "
                           "--pl-std if set, else --head-lr / --lr")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and self.main:
            ndcg = self.validate()
            if ndcg is None:
                self.bar.write(f"step {step + 1}: validation skipped by the signal")
            else:
                row["valid_ndcg@10"] = ndcg
        row["step_time"] = time.time() - self.started
        stop = self.stop
        stop.requested = int(distributed.total(stop.requested or 0, "max")) or None  # a signal to any rank stops all
        if self.main:
            runs.log_row(self.metrics_file, row, self.bar.write)
        if self.main and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop.requested):
            self.saved = stop.kept = self.save(step + 1)
            if cfg.keep_checkpoints:
                runs.prune_checkpoints(cfg.out, cfg.keep_checkpoints)
        if stop.requested:
            distributed.barrier()  # the checkpoint is written
            raise stop.exit(f"{runs.steps_text(1, step + 1)} kept in {os.path.join(cfg.out, f'checkpoint-{step + 1}')}; "
                            "continue with --resume", say=self.main)  # every rank exits 128 + N, rank 0 says why

    def row(self, step, traces, users_share, user_means, step_stats):
        """The step's metrics row. user_means: this rank's means over its users, weighted by users_share
        (its part of the step's users) and summed over the ranks; step_stats: already the whole step's."""
        user_means = {**user_means, **rollout.trace_stats(traces, self.run.tokenizer)}
        tokens = sum(int(s.lengths.sum()) for s in traces)  # token_logp is a mean over tokens, not users
        token_logp = distributed.total(user_means.pop("token_logp") * tokens) / max(distributed.total(tokens), 1)
        return {"step": step + 1, **step_stats, **{name: distributed.total(value * users_share) for name, value in user_means.items()},
                "token_logp": token_logp}

    def close(self):
        if self.main:
            self.metrics_file.close()
            print(f"wrote {os.path.join(self.cfg.out, 'metrics.jsonl')} and {self.saved}")
