"""A RecZero-style recommender (Kong et al., 2025, "Think before Recommendation"): one LLM judges one
(user, candidate) pair at a time, reasons first, then answers; pure RL with a rule reward on the
answer and GRPO's group-relative advantages. The opposite choice to R2Rank's listwise reward.

    python baselines/reczero.py --data data/ml100k --model M --out runs/reczero      # trains
    python r2rank.py --stage eval --data data/ml100k --model runs/reczero/checkpoint-40 --methods reczero

One training step (train):
    1) pairs: each of the step's users gives its positive and --negatives random negatives
    2) rollout: --group G traces per pair from the think-before-recommendation prompt, one r2rank.rollout call
    3) reward: 1 for the right decision, plus FORMAT_REWARD when the trace wrote its own <answer> (answer_reward);
       a trace that wrote none is ended by an answer drawn with the model's own odds (draw_answers, departure 8)
    4) advantages standardized within each group of G (ppo.grpo_advantages)
    5) R2Rank's clipped PPO on the tokens (r2rank.ppo_update); log, checkpoint
Ranking at eval (rank): one greedy trace per candidate, cut before its <answer>, scored by the log-odds of the
answer's deciding token after it (answer_log_odds); a cut trace still gets a score, so every candidate is ranked.
This file also holds what baselines/r2ec.py shares: the flags, the LLM's setup, the end of a step.

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
8. A trace that writes no <answer> within its budget is ended by one drawn with the model's own odds
   (P(Recommend) = sigmoid of the deciding token's log-odds), appended and trained like the trace's own tokens
   (draw_answers), as constrained decoding would; no FORMAT_REWARD. A small model rarely answers (SmolLM2-135M:
   0 of 16 traces at 64 tokens), and deciding by the sign of the log-odds would give a group one decision, so
   every GRPO advantage 0. The drawn answer's probability is what eval ranks by: the update trains it directly.
9. --eval-every: NDCG@10 on validation users during training, ranked as at eval (rank), like R2Rank's.
"""
import argparse
import math
import os
import signal
import sys
import time

import torch
from safetensors.torch import load_file
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import lora  # noqa: E402
import r2rank  # noqa: E402
import runs  # noqa: E402
from metrics import ndcg_from_scores  # noqa: E402
from ppo import grpo_advantages  # noqa: E402

THINK_INSTRUCTIONS = (
    "Decide whether to recommend the candidate item below to this user. Think before you answer, in three steps.\n"
    "# User interests: what the user context says this user likes.\n"
    "# Item features: what the candidate item offers.\n"
    "# Match: how well the two fit.\n"
    f"End with exactly one of <answer>{data.RECOMMEND}</answer> or <answer>{data.NOT_RECOMMEND}</answer>.")
FORMAT_REWARD = 0.1  # for a trace that writes its own <answer>: a small push towards the template
AT_LEAST_ONE = {"max_steps", "users_per_step", "max_new_tokens", "ppo_epochs", "micro_batch", "save_every", "eval_users",
                "max_item_chars", "negatives"}  # the counts parse_rl checks


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_reward(text, label, log_odds):
    """The rule reward of one trace for a 0/1 label: 1 if its decision (its last <answer>, else Recommend when
    log_odds > 0, as at eval) is right, plus FORMAT_REWARD if it wrote an <answer>."""
    answer = data.parse_answer(text)
    decision = answer if answer is not None else int(log_odds > 0)
    return float(decision == label) + (FORMAT_REWARD if answer is not None else 0.0)


def choose_pairs(instance, negatives, generator):
    """[(candidate index, label)]: the positive, then `negatives` distinct random negatives."""
    labels = instance["labels"]
    others = [k for k, label in enumerate(labels) if not label]
    picked = torch.randperm(len(others), generator=generator)[:negatives].tolist()
    return [(labels.index(1), 1)] + [(others[i], 0) for i in picked]


def reasoning_before_answer(text):
    """The text of a trace up to its last "<answer>" (the whole text when it has none)."""
    return text.rpartition("<answer>")[0] if "<answer>" in text else text


def deciding_tokens(tokenizer):
    """The two answers' token ids up to the first one where they differ, included ("<answer>Recommend" and
    "<answer>Not" when the tokenizer splits them so): the decision; the rest of each answer is the template's."""
    yes_ids = encode(tokenizer, f"<answer>{data.RECOMMEND}</answer>")
    no_ids = encode(tokenizer, f"<answer>{data.NOT_RECOMMEND}</answer>")
    common = next(i for i, (a, b) in enumerate(zip(yes_ids + [None], no_ids + [None])) if a != b)
    return yes_ids[:common + 1], no_ids[:common + 1]


@torch.no_grad()
def answer_log_odds(model, tokenizer, prefix, suffixes, texts, rows_per_forward=16):
    """[len(texts)] fp32 on the CPU: log P(Recommend) - log P(Not Recommend) of the deciding token (deciding_tokens),
    teacher-forced after prefix + suffixes[i] and the reasoning of texts[i]. The whole answers' ratio would add
    the template's tail: ~1 for a model that follows it, ~6 nats against the longer answer for the tiny model."""
    yes_ids, no_ids = deciding_tokens(tokenizer)
    contexts = [suffix + encode(tokenizer, reasoning_before_answer(text)) + yes_ids[:-1] for suffix, text in zip(suffixes, texts)]
    rows = [context for context in contexts for _ in range(2)]  # [2n]: each context, then with yes, then with no
    answers = [[yes_ids[-1]], [no_ids[-1]]] * len(contexts)
    logp = torch.cat([r2rank.forward_traces(model, prefix, rows[i:i + rows_per_forward], answers[i:i + rows_per_forward], 1.0)[0][:, 0]
                      for i in range(0, len(rows), rows_per_forward)]).float().cpu()
    return logp[0::2] - logp[1::2]


def draw_answers(tokenizer, traces, texts, log_odds, stops, generator):
    """Departure 8: each trace (token ids) whose text wrote no <answer> gets one appended (a trailing stop token
    dropped first), Recommend with probability sigmoid(log_odds[k]) (log_odds [K]). Returns (traces, decision_odds [K]):
    log_odds where the trace answered itself, else +1 / -1 for the drawn answer (answer_reward's read-out)."""
    options = [encode(tokenizer, f"<answer>{data.NOT_RECOMMEND}</answer>"), encode(tokenizer, f"<answer>{data.RECOMMEND}</answer>")]
    draws = (torch.rand(len(texts), generator=generator) < torch.sigmoid(log_odds.float().cpu())).long().tolist()  # 1: Recommend
    own = [data.parse_answer(text) is not None for text in texts]
    drawn = [trace if mine else (trace[:-1] if trace and trace[-1] in stops else trace) + options[draw]
             for trace, mine, draw in zip(traces, own, draws)]
    return drawn, torch.tensor([odds if mine else 2.0 * draw - 1.0 for odds, mine, draw in zip(log_odds.tolist(), own, draws)])


def truncated(trace, max_new_tokens, stops):
    """Whether the rollout cut this trace at its budget (it wrote no stop token)."""
    return bool(max_new_tokens) and len(trace) == max_new_tokens and trace[-1] not in stops


@torch.no_grad()
def rank(model, tokenizer, instances, max_history, max_item_chars, max_new_tokens, desc="reczero"):
    """([U, K] scores, info): a greedy trace per candidate, scored by answer_log_odds; info: the shares answered and cut."""
    K, stops = len(instances[0]["candidates"]), model.generation_config.eos_token_id
    per_call, scores, answered, cut = max(1, r2rank.ROLLOUT_ROWS // K), [], 0, 0
    for start in tqdm(range(0, len(instances), per_call), desc=desc, dynamic_ncols=True, disable=None, leave=False):
        prompts = [data.encode_user(tokenizer, inst, max_history, max_item_chars, instructions=THINK_INSTRUCTIONS)
                   for inst in instances[start:start + per_call]]
        traces, _ = r2rank.rollout(model, tokenizer, prompts, max_new_tokens, 0.0)
        texts = [tokenizer.decode(trace, skip_special_tokens=True) for trace in traces]
        answered += sum(data.parse_answer(text) is not None for text in texts)
        cut += sum(truncated(trace, max_new_tokens, stops) for trace in traces)
        scores += [answer_log_odds(model, tokenizer, prefix, suffixes, texts[u * K:(u + 1) * K])
                   for u, (prefix, suffixes) in enumerate(prompts)]
    return torch.stack(scores), {"answer_share": answered / (len(instances) * K), "truncated_share": cut / (len(instances) * K)}


def train(args):
    """The RL loop; writes <out>/metrics.jsonl and <out>/checkpoint-<step>/ (a --model for eval)."""
    run = runs.start_run(args, "reczero")  # --out held, the data, the checkpoint to resume from (runs.py)
    instances = data.load_split(run.data_dir, "train")
    K, P, G = len(instances[0]["candidates"]), 1 + args.negatives, args.group
    if args.negatives > K - 1:
        raise data.DataError(f"--negatives {args.negatives}: an instance of {run.data_dir} has only {K - 1} negatives")
    model, tokenizer, optimizers = load_policy(args, run, instances)
    stops = model.generation_config.eos_token_id
    print(f"{args.users_per_step} users x {P} pairs x {G} traces = {args.users_per_step * P * G} traces per step "
          f"(<= {args.max_new_tokens} tokens each); {len(instances)} training users; {run.device}, {run.dtype} compute")
    metrics, bar, validate = start_logging(args, run, "reczero", lambda valid: rank(
        model, tokenizer, valid, args.max_history, args.max_item_chars, args.max_new_tokens, "valid")[0])
    for step in bar:
        started, seed = time.time(), args.seed * 1_000_003 + step
        users = torch.randperm(len(instances), generator=torch.Generator().manual_seed(seed))[:args.users_per_step].tolist()
        generator = torch.Generator().manual_seed(seed)  # the negatives and the drawn answers
        # 1) pairs: each user's positive and negatives; its G traces per pair share the user's prompt prefix
        pairs = [choose_pairs(instances[u], args.negatives, generator) for u in users]
        encoded = [data.encode_user(tokenizer, instances[u], args.max_history, args.max_item_chars, instructions=THINK_INSTRUCTIONS)
                   for u in users]
        prompts = [(prefix, [suffixes[k] for k, _ in user_pairs for _ in range(G)])  # P * G rows, pair-major
                   for (prefix, suffixes), user_pairs in zip(encoded, pairs)]

        # 2) rollout: G traces per pair, every user's in one generate call
        torch.manual_seed(seed)  # the traces' draws: a resume repeats them
        with autocast(run):
            flat, _ = r2rank.rollout(model, tokenizer, prompts, args.max_new_tokens, args.temperature)
        texts = [tokenizer.decode(trace, skip_special_tokens=True) for trace in flat]

        # 3) an answer drawn for a trace that wrote none (departure 8), then the rule reward
        traces, rewards = [], []
        for u, ((prefix, rows), user_pairs) in enumerate(zip(prompts, pairs)):
            user_texts = texts[u * P * G:(u + 1) * P * G]
            with autocast(run):
                log_odds = answer_log_odds(model, tokenizer, prefix, rows, user_texts)
            user_traces, decision_odds = draw_answers(tokenizer, flat[u * P * G:(u + 1) * P * G], user_texts, log_odds, stops, generator)
            labels = [label for _, label in user_pairs for _ in range(G)]
            rewards.append(torch.tensor([answer_reward(*row) for row in zip(user_texts, labels, decision_odds.tolist())]))
            traces.append(user_traces)
        reward = torch.stack(rewards)  # [U, P * G]

        # 4) advantages standardized within each pair's group of G
        advantages = grpo_advantages(reward.view(len(users), P, G)).view(len(users), P * G)

        # 5) clipped PPO on the tokens, then log and checkpoint
        stats = r2rank.ppo_update(model, optimizers["llm"], prompts, traces, advantages.to(run.device), args, dtype=run.dtype)
        row = {"step": step + 1, "reward": reward.mean().item(), "correct_share": (reward >= 1).float().mean().item(),
               "answer_share": sum(data.parse_answer(t) is not None for t in texts) / len(texts),
               "truncated_share": sum(truncated(t, args.max_new_tokens, stops) for t in flat) / len(flat),  # before the draws
               "response_len": sum(len(t) for user in traces for t in user) / len(flat),  # a drawn answer's tokens too
               "advantage_nonzero": (advantages != 0).float().mean().item(), **stats}
        end_step(args, run, row, started, validate, metrics, bar, model, tokenizer, None, optimizers)
    print(f"wrote {os.path.join(args.out, 'metrics.jsonl')} and {os.path.join(args.out, f'checkpoint-{args.max_steps}')}")


# ----------------------------------------------------------------------- shared with baselines/r2ec.py


def autocast(run):
    """Forward passes in the run's compute dtype (weights stay fp32); never around an optimizer step."""
    return torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)


def load_policy(args, run, instances):
    """The LLM to train in fp32 master weights, with --gradient-checkpointing and --lora-rank as r2rank.train_rl
    sets them up, and {"llm": its AdamW}, both restored on --resume; --users-per-step and the free space checked."""
    if args.users_per_step > len(instances):
        raise data.DataError(f"--users-per-step {args.users_per_step} is more than the {len(instances)} training users")
    model, tokenizer = r2rank.load_model(run.checkpoint or args.model, run.device, torch.float32, args.seed)
    torch.manual_seed(args.seed)  # LoRA's A
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers' own switch; ppo_update then feeds whole prompts
    trained = lora.add_adapters(model, args.lora_rank) if args.lora_rank else list(model.parameters())
    if args.lora_rank and run.checkpoint:
        lora.restore_adapters(model, load_file(os.path.join(run.checkpoint, "lora.safetensors"), device=str(run.device)))
    lora.hold_frozen_weights(model, run.dtype)  # LoRA's base, cast once to the compute dtype
    optimizers = {"llm": torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0, fused=run.device.type == "cuda")}
    runs.restore_optimizers(optimizers, run.checkpoint, {"llm": args.lr})
    runs.check_disk(args.out, model, optimizers, args.keep_checkpoints)
    return model.eval(), tokenizer, optimizers


def start_logging(args, run, desc, rank_valid):
    """(metrics.jsonl cut back to the checkpoint on --resume, the bar over the steps to run, validate: NDCG@10 of the
    validation users ranked by rank_valid(instances) -> [U, K] as at eval); signals caught, step 0 validated."""
    valid = data.load_split(run.data_dir, "valid")[:args.eval_users] if args.eval_every else []

    def validate():
        with autocast(run):
            return ndcg_from_scores(rank_valid(valid).float(), r2rank.labels_of(valid), 10).mean().item()
    metrics = runs.open_metrics(args.out, run.start_step)
    runs.catch_signals()  # Ctrl-C, SIGTERM: the step in progress finishes and is saved, then the run stops
    if args.eval_every and run.start_step == 0:
        runs.log_row(metrics, {"step": 0, "valid_ndcg@10": validate()})
    return metrics, tqdm(range(run.start_step, args.max_steps), initial=run.start_step, total=args.max_steps, desc=desc,
                         dynamic_ncols=True, disable=None), validate


def end_step(args, run, row, started, validate, metrics, bar, model, tokenizer, head, optimizers):
    """As r2rank.train_rl ends a step: validation when due, the row logged (a non-finite value stops the run
    unsaved), a checkpoint when due or when a signal asked the run to stop, which it then does."""
    step = row["step"]
    if args.eval_every and step % args.eval_every == 0:
        row["valid_ndcg@10"] = validate()
    row["step_time"] = time.time() - started
    if bad := [name for name, value in row.items() if not math.isfinite(value)]:
        raise data.UsageError(f"step {step}: non-finite {', '.join(bad)}, so the run stops without saving this step; lower --lr")
    runs.log_row(metrics, row, bar.write)
    if (stop := runs.stop_signal()) or step % args.save_every == 0 or step == args.max_steps:
        runs.save_checkpoint(args.out, step, model, tokenizer, head, optimizers, args, run)
    if stop:
        runs.say(f"stopped by {signal.Signals(stop).name}: steps 1-{step} kept in {args.out}/checkpoint-{step}; continue with --resume")
        sys.exit(128 + stop)


def rl_parser(description, users, group, tokens=64, steps=40):
    """The flags of an LLM RL run (defaults per system); parse with parse_rl."""
    p = argparse.ArgumentParser(description=" ".join(description.split("\n\n")[0].split()),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--data", default="", help="data set folder (python data.py); empty: the built-in synthetic set in <out>/data")
    add("--model", required=True, help="the LLM to train: tiny, random:<architecture>, a .gguf file, a folder or a hub id")
    add("--out", required=True, help="output folder: metrics.jsonl and checkpoint-<step>/")
    add("--resume", action="store_true", help="continue the run in --out from its newest whole checkpoint")
    add("--overwrite", action="store_true", help="replace the run in --out (only what this project wrote there)")
    add("--max-steps", type=int, default=steps, help="RL steps")
    add("--users-per-step", type=int, default=users, help="users per step")
    add("--group", type=int, default=group, help="G, traces per group: GRPO's group")
    add("--max-new-tokens", type=int, default=tokens, help="token budget of one trace")
    add("--temperature", type=float, default=1.0, help="sampling temperature of the traces (> 0)")
    add("--lr", type=float, default=1e-6, help="LLM learning rate (AdamW)")
    add("--clip-eps", type=float, default=0.2, help="PPO's clipping epsilon")
    add("--ppo-epochs", type=int, default=2, help="passes over a step's traces, one optimizer step each")
    add("--micro-batch", type=int, default=8, help="traces per forward/backward (memory only, same gradient)")
    add("--max-history", type=int, default=20, help="history items shown in the prompt (the latest)")
    add("--max-item-chars", type=int, default=200, help="characters of an item's line in the prompt")
    add("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of every weight (0: all)")
    add("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    add("--save-every", type=int, default=20, help="checkpoint every N steps and at the end")
    add("--keep-checkpoints", type=int, default=2, help="keep the newest N checkpoints (0: all)")
    add("--eval-every", type=int, default=0, help="validation NDCG@10 every N steps and at step 0, ranked as at eval (0: never)")
    add("--eval-users", type=int, default=32, help="validation users in that check (the first N)")
    add("--seed", type=int, default=0, help="seeds the users, the negatives, the traces, the tiny model")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    add("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="autocast's precision (auto: bfloat16 on CUDA); weights fp32")
    add("--threads", type=int, default=0, help="CPU threads (0: 1 for --model tiny, else torch's default)")
    return p


def parse_rl(p, argv, stage):
    """args of rl_parser's flags (and the system's own), checked; args.stage names the run's checkpoints."""
    p.set_defaults(stage=stage)
    args = p.parse_args(argv)
    if args.group < 2:
        p.error("--group must be >= 2: GRPO's advantage compares the traces of a group")
    for name, value in vars(args).items():  # numbers: finite, >= 0 (>= 1 for counts), a learning rate <= 1
        low, lr = int(name in AT_LEAST_ONE), name.endswith("lr")
        if type(value) in (int, float) and not (math.isfinite(value) and value >= low and (value <= 1 or not lr)):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= {low}{' and <= 1' if lr else ''}, got {value}")
    if args.temperature == 0:
        p.error("--temperature 0 samples greedy traces, which have no policy gradient: use > 0")
    if any(0xD800 <= ord(c) < 0xE000 for c in args.out):  # bytes that are not UTF-8
        p.error(f"--out {args.out!r}: not valid UTF-8, which checkpoint files cannot record; choose another name")
    if args.threads or args.model == "tiny":
        torch.set_num_threads(args.threads or 1)  # the tiny model's ops are too small to share between threads
    return args


def main(argv=None):
    p = rl_parser(__doc__, users=2, group=4)
    p.add_argument("--negatives", type=int, default=1, help="negatives per user and step, beside its positive")
    r2rank.run_stage(train, parse_rl(p, argv, "reczero"))


if __name__ == "__main__":
    main()
