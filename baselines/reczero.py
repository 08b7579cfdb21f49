"""A RecZero-style recommender (Kong et al., 2025, "Think before Recommendation"): one LLM judges one
(user, candidate) pair at a time, reasons first, then answers; pure RL with a rule reward on the
answer and GRPO's group-relative advantages. The opposite choice to R2Rank's listwise reward.

    python baselines/reczero.py --data data/ml100k --model M --out runs/reczero      # trains
    python r2rank.py --stage eval --data data/ml100k --model runs/reczero/checkpoint-40 --methods reczero \\
        --max-new-tokens 64                                      # the training's trace budget

One training step (train):
    1) pairs: each of the step's users gives its positive and --negatives random negatives
    2) rollout: --group G traces per pair, from the think-before-recommendation prompt (its prefix shared)
    3) reward: 1 for the right decision, plus FORMAT_REWARD when the trace wrote its own <answer> (answer_reward);
       a trace that wrote none is ended by an answer drawn with the model's own odds (draw_answers, departure 8)
    4) advantages standardized within each group of G (ppo.grpo_advantages)
    5) the clipped token loss of R2Rank (rollout.ppo_update, ppo.clipped_token_loss)
Ranking at eval (rank): one greedy trace per candidate, cut before its <answer>; the score is
log P(Recommend) - log P(Not Recommend) of the answer's deciding token after that reasoning and
"<answer>" (answer_log_odds, untrained.pointwise_scores). A cut trace still gets a score, so every
candidate is ranked.

Where this departs from RecZero:
1. RecZero predicts a rating and is rewarded by its error; the protocol here has a binary label (the
   positive against negatives), so the answer is Recommend / Not Recommend and the reward its match.
2. The template is RecZero's three steps (user interests, item features, match) in R2Rank's prompt
   layout (data.encode_user with THINK_INSTRUCTIONS), not RecZero's wording.
3. No KL penalty to a reference model: the clipped loss alone, as in R2Rank (ppo.py).
4. R2Rank's PPO details: theta_old is the first epoch's forward, the loss a per-token mean over the
   step (not GRPO's per-sequence mean), log-probs at the sampling temperature.
5. Balanced pairs: one negative per positive by default (--negatives), not the data's 1:19.
6. Ranking by the answer's log-odds after a greedy trace (RecZero ranks by its predicted rating), those
   of its deciding token (the rest of an answer is the template's; answer_log_odds says why).
7. RecZero alone (pure RL); RecOne's supervised cold start is not included.
8. A trace that writes no <answer> within its budget is ended by one, drawn from the two the template
   allows with the model's own odds (P(Recommend) = sigmoid of the deciding token's log-odds), its tokens appended
   to the trace and trained like the trace's own (draw_answers): the model is held to the format, as
   constrained decoding would. A small model rarely answers (SmolLM2-135M: 0 of 16 traces at 64 tokens;
   the random tiny model, after its one-token trace, ~2 in 639), and pure RL then has nothing to act on:
   deciding by the sign of the log-odds instead (this file's earlier rule) gives every trace of a group
   the same decision whenever the reasoning does not sway it, so every GRPO advantage is 0 (tiny model,
   one-token traces: 0 in 99 of 100 steps). The drawn answer's probability is what eval ranks by, so the
   update trains the eval's score directly. Its reward has no FORMAT_REWARD (the model did not write it).
9. --eval-every: NDCG@10 on validation users during training, ranked as at eval (rank), like R2Rank's.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from protocol import UsageError  # noqa: E402
import rollout  # noqa: E402
from baselines.untrained import pointwise_scores  # noqa: E402
from metrics import ndcg_from_scores  # noqa: E402
from ppo import grpo_advantages  # noqa: E402
from machinery import checkpoints, config, models, runs, stops  # noqa: E402

THINK_INSTRUCTIONS = (
    "Decide whether to recommend the candidate item below to this user. Think before you answer, in three steps.\n"
    "# User interests: what the user context says this user likes.\n"
    "# Item features: what the candidate item offers.\n"
    "# Match: how well the two fit.\n"
    f"End with exactly one of <answer>{data.RECOMMEND}</answer> or <answer>{data.NOT_RECOMMEND}</answer>.")
FORMAT_REWARD = 0.1  # for a trace that writes its own <answer>: a small push towards the template


def answer_reward(text, label, log_odds):
    """The rule reward of one trace for a 0/1 label: 1 if its decision is right, plus FORMAT_REWARD if
    it wrote an <answer>. The decision is that answer (the last one), or, without one, Recommend when
    log_odds (log P(Recommend) - log P(Not Recommend) after the reasoning, as at eval) is > 0."""
    answer = data.parse_answer(text)
    decision = answer if answer is not None else int(log_odds > 0)
    return float(decision == label) + (FORMAT_REWARD if answer is not None else 0.0)


def draw_answers(tokenizer, traces, texts, log_odds, generator):
    """Departure 8: each trace of traces (rollout.Traces, K rows) whose text wrote no <answer> gets one
    appended, Recommend with probability sigmoid(log_odds[k]) (log_odds [K] on the CPU, one uniform per
    trace from generator), a trailing eos dropped first. Returns (Traces, decision_odds [K]): the
    appended tokens count as response tokens (their decode-time log-probs are left 0: the update
    recomputes every log-prob), and decision_odds is log_odds where the trace answered itself, else +1
    or -1 for the drawn answer, so that answer_reward's read-out is the draw."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    options = {1: encode(f"<answer>{data.RECOMMEND}</answer>"), 0: encode(f"<answer>{data.NOT_RECOMMEND}</answer>")}
    uniforms = torch.rand(len(texts), generator=generator, device=generator.device).cpu()
    draws = (uniforms < torch.sigmoid(log_odds.float())).long().tolist()
    rows, logprob_rows, decision_odds = [], [], []
    for k, (ids, logprobs, text) in enumerate(zip(traces.token_lists(), traces.logprob_lists(), texts)):
        if data.parse_answer(text) is not None:
            rows.append(ids), logprob_rows.append(logprobs), decision_odds.append(float(log_odds[k]))
            continue
        if ids and bool(traces.finished[k]) and ids[-1] == tokenizer.eos_token_id:
            ids, logprobs = ids[:-1], logprobs[:-1]
        rows.append(ids + options[draws[k]])
        logprob_rows.append(logprobs + [0.0] * len(options[draws[k]]))
        decision_odds.append(1.0 if draws[k] else -1.0)
    width, device = max(map(len, rows)), traces.tokens.device
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=traces.tokens.dtype, device=device)
    logprob_table = torch.zeros((len(rows), width), dtype=traces.logprobs.dtype, device=device)
    for k, (ids, logprobs) in enumerate(zip(rows, logprob_rows)):
        tokens[k, :len(ids)] = torch.tensor(ids, dtype=tokens.dtype)
        logprob_table[k, :len(ids)] = torch.tensor(logprobs, dtype=logprob_table.dtype)
    lengths = torch.tensor([len(ids) for ids in rows], device=traces.lengths.device)
    mask = torch.arange(width, device=device)[None, :] < lengths.to(device)[:, None]
    answered = torch.tensor([data.parse_answer(text) is None for text in texts], device=traces.finished.device)
    return dataclasses.replace(traces, tokens=tokens, logprobs=logprob_table, mask=mask, lengths=lengths,
                               finished=traces.finished | answered), torch.tensor(decision_odds)


def choose_pairs(instance, negatives, generator):
    """[(candidate index, label)]: the positive, then `negatives` distinct random negatives."""
    labels = instance["labels"]
    others = [k for k, label in enumerate(labels) if not label]
    picked = torch.randperm(len(others), generator=generator)[:negatives].tolist()
    return [(labels.index(1), 1)] + [(others[i], 0) for i in picked]


def reasoning_before_answer(text):
    """The text of a trace up to its last "<answer>" (the whole text when it has none)."""
    cut = text.rfind("<answer>")
    return text if cut < 0 else text[:cut]


def deciding_tokens(tokenizer):
    """The two answers' token ids up to the first token where they differ, that token included
    ("<answer>Recommend" and "<answer>Not" when the tokenizer splits them so): the decision; the
    rest of each answer is the template's."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    yes_ids, no_ids = encode(f"<answer>{data.RECOMMEND}</answer>"), encode(f"<answer>{data.NOT_RECOMMEND}</answer>")
    common = next(i for i, (a, b) in enumerate(zip(yes_ids + [None], no_ids + [None])) if a != b)
    return yes_ids[:common + 1], no_ids[:common + 1]


def answer_log_odds(model, tokenizer, prefix, suffixes, texts):
    """[len(texts)] log P(Recommend) - log P(Not Recommend) of the deciding token after "<answer>"
    (deciding_tokens), each teacher-forced after prompt prefix + suffixes[i] and the reasoning of
    texts[i] (its answer cut off). The whole answers' ratio would add the template's tail: ~1 for a
    model that follows it, but for the random tiny model a penalty of ~6 nats on the longer answer."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    reasoned = [suffix + encode(reasoning_before_answer(text)) for suffix, text in zip(suffixes, texts)]
    return pointwise_scores(model, prefix, reasoned, *deciding_tokens(tokenizer))


@torch.no_grad()
def rank(model, tokenizer, instances, max_history, max_item_chars, max_new_tokens, desc="reczero", progress=True):
    """([U, K] scores, info): per candidate, a greedy trace, then the log-odds of the two answers after
    its reasoning. info: the share of greedy traces with a parsable answer and of those cut."""
    scores, answered, cut, traces = [], 0, 0, 0
    for instance in tqdm(instances, desc=desc, dynamic_ncols=True, disable=not progress):
        prefix, suffixes = data.encode_user(tokenizer, instance, max_history, max_item_chars,
                                            instructions=THINK_INSTRUCTIONS)
        greedy = rollout.sample_traces(model, tokenizer, prefix, suffixes, max_new_tokens, temperature=0.0)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in greedy.token_lists()]
        answered += sum(data.parse_answer(text) is not None for text in texts)
        cut += int((~greedy.finished).sum())
        traces += len(texts)
        scores.append(answer_log_odds(model, tokenizer, prefix, suffixes, texts))
    return torch.stack(scores), {"answer_share": answered / max(traces, 1), "truncated_share": cut / max(traces, 1)}


def train(args):
    """The RL loop; writes <out>/metrics.jsonl and <out>/checkpoint-<step>/ (a --model for eval)."""
    device = models.pick_device(args.device)
    dtype = models.pick_dtype(args.dtype, device)
    instances = data.load_split(args.data, "train")
    if args.users_per_step > len(instances):
        raise data.DataError(f"--users-per-step {args.users_per_step} is more than the {len(instances)} training users")
    K = len(instances[0]["candidates"])
    if args.negatives > K - 1:
        raise data.DataError(f"--negatives {args.negatives}: an instance has only {K - 1} negatives")
    plan = runs.plan_command(vars(args), args.data, args.max_steps, record="reczero.json")  # the main CLI's --out rules
    if plan.start_step == args.max_steps:
        print(f"{plan.checkpoint} is at --max-steps {args.max_steps} already: nothing to train (raise --max-steps to go on)")
        return None
    model, tokenizer = models.load_policy(plan.checkpoint or args.model, device, torch.float32, args.seed)  # fp32 master weights
    optimizers = {"llm": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)}
    resume_optimizers(plan, optimizers, device, {"llm": args.lr})
    pairs_per_user = 1 + args.negatives
    print(f"{args.users_per_step} users x {pairs_per_user} pairs x {args.group} traces = "
          f"{args.users_per_step * pairs_per_user * args.group} traces per step (<= {args.max_new_tokens} tokens each); "
          f"{len(instances)} training users; device {device}, {dtype}")
    runs.start(args.out, plan)  # the first write into --out: --overwrite clears, a resume cuts metrics.jsonl back
    run_started, row, saved = time.time(), None, plan.start_step
    validate = validation(args, lambda instances: with_dtype(device, dtype, rank, model, tokenizer, instances, args.max_history,
                                                             args.max_item_chars, args.max_new_tokens, "valid", False)[0])

    def keep(done):
        """Save the finished steps 1..done unless they are saved already; what is kept, in words."""
        nonlocal saved
        if done > saved:
            save(args, done, model, tokenizer, optimizers, plan)
            saved = done
        return runs.kept_text(args.out, done)
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as metrics, stops.StopOnSignal(plan.checkpoint or "nothing") as stop:
        log_start(metrics, plan, validate)
        for step in tqdm(range(plan.start_step + 1, args.max_steps + 1), initial=plan.start_step, total=args.max_steps,
                         desc="reczero", dynamic_ncols=True):
            started = time.time()
            generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
            users = torch.randperm(len(instances), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
            prompts, traces, advantages, rewards, texts, truncated = [], [], [], [], [], []
            try:  # a signal during the rollout drops this step (nothing of it has changed the model) and keeps the others
                with stop.abandonable():
                    for user in users[:args.users_per_step].tolist():
                        # 1) pairs, 2) G traces per pair: the user's prompt prefix is shared by all of them
                        instance = instances[user]
                        pair_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + user)
                        pairs = choose_pairs(instance, args.negatives, pair_generator)
                        prefix, suffixes = data.encode_user(tokenizer, instance, args.max_history, args.max_item_chars,
                                                            instructions=THINK_INSTRUCTIONS)
                        rows = [suffixes[k] for k, _ in pairs for _ in range(args.group)]
                        with models.mixed_precision(device, dtype):
                            user_traces = rollout.sample_traces(model, tokenizer, prefix, rows, args.max_new_tokens,
                                                                 args.temperature, 1.0, generator)
                        # 3) an answer drawn for a trace that wrote none (departure 8), the rule reward,
                        # 4) standardized within each pair's group of G
                        user_texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in user_traces.token_lists()]
                        with models.mixed_precision(device, dtype):
                            log_odds = answer_log_odds(model, tokenizer, prefix, rows, user_texts)
                        truncated.append(~user_traces.finished)  # the trace's own end, before an answer is drawn
                        user_traces, decision_odds = draw_answers(tokenizer, user_traces, user_texts, log_odds, generator)
                        labels = [label for _, label in pairs for _ in range(args.group)]
                        reward = torch.tensor([answer_reward(text, label, odds) for text, label, odds in zip(user_texts, labels, decision_odds.tolist())])
                        prompts.append((prefix, rows))
                        traces.append(user_traces)
                        advantages.append(grpo_advantages(reward.view(pairs_per_user, args.group)).view(-1))
                        rewards.append(reward)
                        texts += user_texts
            except stops.Abandoned:
                raise stop.exit(f"step {step} was still rolling out and is dropped; " + keep(step - 1)) from None
            # 5) clipped PPO on the tokens
            # autocast inside, around each forward only: its optimizer steps must see no cached bf16 weights
            stats = rollout.ppo_update(model, optimizers["llm"], prompts, traces, advantages, args, shared_prefix=True, dtype=dtype)
            reward = torch.cat(rewards)
            row = {"step": step, "reward": reward.mean().item(), "correct_share": (reward >= 1).float().mean().item(),
                   "answer_share": sum(data.parse_answer(t) is not None for t in texts) / len(texts),
                   "truncated_share": torch.cat(truncated).float().mean().item(),
                   "response_len": torch.cat([s.lengths for s in traces]).float().mean().item(),  # a drawn answer's tokens too
                   "advantage_nonzero": (torch.cat(advantages) != 0).float().mean().item(),
                   "clip_frac": stats["clip_frac"], "approx_kl": stats["approx_kl"]}
            if problem := runs.non_finite(row, optimizers):  # nothing of this step is written
                raise UsageError(f"step {step}: {problem}, so the run stops without writing this step; lower --lr")
            row = {**row, **validate(step), "step_time": time.time() - started}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            out_of_time = args.minutes and time.time() - run_started > 60 * args.minutes
            if step % args.save_every == 0 or step == args.max_steps or out_of_time or stop.requested:
                keep(step)
                stop.kept = f"{args.out}/checkpoint-{step}"
            if stop.requested:
                raise stop.exit(keep(step))
            if out_of_time:
                print(f"--minutes {args.minutes:g} spent: stopped after step {step}")
                break
    return row


def validation(args, rank_users):
    """--eval-every's check, shared with baselines/r2ec.py: validate(step) -> the row's {"valid_ndcg@10": NDCG@10
    of rank_users(instances) -> [U, K] scores on the first --eval-users validation users} at a multiple of
    --eval-every (step 0: the start), else {}."""
    instances = data.load_split(args.data, "valid")[:args.eval_users] if args.eval_every else []
    labels = torch.tensor([instance["labels"] for instance in instances])

    def validate(step):
        if not args.eval_every or step % args.eval_every:
            return {}
        return {"valid_ndcg@10": ndcg_from_scores(rank_users(instances).float().cpu(), labels, 10).mean().item()}
    return validate


def log_start(metrics, plan, validate):
    """Step 0's row, the start's validation, when a run starts from step 0 and validates."""
    started = time.time()
    if plan.start_step == 0 and (row := validate(0)):
        metrics.write(json.dumps({"step": 0, **row, "step_time": time.time() - started}) + "\n")
        metrics.flush()
        print(f"step 0: validation NDCG@10 {row['valid_ndcg@10']:.3f}")


def resume_optimizers(plan, optimizers, device, lrs):
    """With --resume, the optimizers' saved states, then each its learning rate of this run (lrs: name -> lr)."""
    if plan.checkpoint:
        states = torch.load(os.path.join(plan.checkpoint, "optimizer.pt"), map_location=device, weights_only=True)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(states[name])
            runs.set_lr(optimizer, lrs[name])
        print(f"resumed from {plan.checkpoint} at step {plan.start_step}")


def with_dtype(device, dtype, function, *args):
    """function(*args) under models.mixed_precision(device, dtype)."""
    with models.mixed_precision(device, dtype):
        return function(*args)


def save(args, step, model, tokenizer, optimizers, plan, record="reczero.json", extra=None, extra_files=()):
    """<out>/checkpoint-<step>/: the LLM (works as --model), optimizer.pt, and record (step, settings, the
    data's fingerprint), written into a temporary directory and renamed (checkpoints.checkpoint_directory: a
    failed write keeps the checkpoint before it and says so); extra(directory) writes extra_files more."""
    with checkpoints.checkpoint_directory(args.out, step, record, extra_files) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({name: optimizer.state_dict() for name, optimizer in optimizers.items()}, os.path.join(tmp, "optimizer.pt"))
        if extra is not None:
            extra(tmp)
        with open(os.path.join(tmp, record), "w") as f:
            json.dump({"step": step, "settings": vars(args), **plan.record()}, f, indent=1)


def add_rl_arguments(parser, steps=40, users=2, group=4, tokens=64):
    """The flags of an LLM RL run, shared with baselines/r2ec.py (defaults per system)."""
    parser.add_argument("--data", required=True, help="dataset directory written by data.py (its train.jsonl)")
    parser.add_argument("--model", required=True, help="the LLM to train: tiny, a .gguf file, a directory or a hub id")
    parser.add_argument("--out", required=True, help="output directory: metrics.jsonl and checkpoint-<step>/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out; the settings "
                        "that define the run must be unchanged (--max-steps, --minutes, --save-every, learning rates and "
                        "the compute layout may change)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out; without it, or "
                        "--resume, another run's --out is refused")
    parser.add_argument("--max-steps", type=int, default=steps, help="RL steps")
    parser.add_argument("--minutes", type=float, default=0, help="stop (and checkpoint) after the step that passes "
                        "this many minutes of training: a CPU budget (0 = none, --max-steps only)")
    parser.add_argument("--users-per-step", type=int, default=users, help="users per step")
    parser.add_argument("--group", type=int, default=group, help="G, traces per group: GRPO's group")
    parser.add_argument("--max-new-tokens", type=int, default=tokens, help="token budget of one trace")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the traces (> 0)")
    parser.add_argument("--lr", type=float, default=1e-6, help="LLM learning rate (AdamW)")
    parser.add_argument("--clip-eps", type=float, default=0.2, help="PPO clipping epsilon")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="passes over a step's traces, one optimizer step each")
    parser.add_argument("--micro-batch", type=int, default=8, help="traces per forward/backward (memory only)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--max-history", type=int, default=20, help="history items shown in the prompt")
    parser.add_argument("--max-item-chars", type=int, default=200, help="characters per item line")
    parser.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--eval-every", type=int, default=0, help="every N steps (and at the start, as step 0), NDCG@10 "
                        "on validation users ranked as at eval (greedy traces), logged as valid_ndcg@10; 0 = never")
    parser.add_argument("--eval-users", type=int, default=32, help="validation users in that check (the first N)")
    parser.add_argument("--seed", type=int, default=0, help="users, negatives and traces")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype of the forward passes (auto: bf16 on a GPU that has it, fp32 on CPU; float16 is refused: no loss scaling)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = 1 for --model tiny, else torch's default)")


def check_rl_arguments(parser, args, at_least_1=()):
    """parser.error for a flag of add_rl_arguments out of range; sets --threads."""
    for name in ("max_steps", "users_per_step", "max_new_tokens", "ppo_epochs", "micro_batch", "save_every", "eval_users", *at_least_1):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        parser.error("--group must be >= 2: GRPO's advantage compares the traces of a group")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.temperature < config.MIN_TEMPERATURE or args.minutes < 0 or args.clip_eps <= 0 or args.max_grad_norm <= 0:
        parser.error(f"--temperature must be >= {config.MIN_TEMPERATURE:g}, --clip-eps and --max-grad-norm > 0, --minutes >= 0")
    for name in ("lr", "head_lr"):
        if name in vars(args) and not config.LEARNING_RATE.allows(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be {config.LEARNING_RATE}, got {getattr(args, name):g}")
    if not config.SEED_RANGE.allows(args.seed):
        parser.error(f"--seed must be {config.SEED_RANGE}, got {args.seed}")
    config.set_threads(args.threads, args.model)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_rl_arguments(parser)
    parser.add_argument("--negatives", type=int, default=1, help="negatives per user and step, beside its positive")
    args = parser.parse_args(argv)
    check_rl_arguments(parser, args, ["negatives"])
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        with stops.claim(args.out):  # a second run on this --out is refused until this one ends
            last = train(args)
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"interrupted: {stops.interrupted_message(args.out)}", file=sys.stderr)
        sys.exit(130)
    if last is None:
        return
    print(f"step {last['step']}: reward {last['reward']:.3f}, answer share {last['answer_share']:.2f}; "
          f"wrote {args.out}/checkpoint-{last['step']}")


if __name__ == "__main__":
    main()
