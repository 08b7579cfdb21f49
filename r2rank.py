"""R2Rank: RL training of an LLM pi_theta and its scoring head f_phi (Algorithm 1 of the R2Rank paper),
top to bottom, and the command line of every stage.

    python r2rank.py --stage rl --model tiny          # the quickstart: tiny random model, built-in data, ~1 min
    python r2rank.py --stage rl --data data/vg --model Qwen/Qwen2.5-1.5B-Instruct --gradient-checkpointing
    torchrun --nproc-per-node 4 r2rank.py --stage rl ...   # the step's users split over 4 processes
    python r2rank.py --stage sft-data | sft | eval ...     # the cold start (sft.py), Table 2 (evaluate.py)

One RL step (train_rl), tagged with Algorithm 1's lines:
    1) rollout: one reasoning trace y_k ~ pi_theta(. | c_u, x_k) per candidate (Eq. 1)     lines 1-3
    2) scores s_k = f_phi(h_k), h_k the last hidden state at the trace's final token (Eq. 2) line 4
    3) S rankings tau ~ Plackett-Luce(s) (Eq. 4), reward rho(tau) = NDCG@10                lines 6-7
    4) clipped PPO on the tokens (Eq. 6) plus the score path into theta; REINFORCE on phi  lines 8-12
    5) log, validate, checkpoint

The rollout is transformers' own `generate`, with each user's shared prompt prefix (instructions and
user context) run once and its KV cache repeated K times; the update's forward runs through the same
kind of prefix cache, with gradient, in micro-batches of --micro-batch traces.

The log line (and metrics.jsonl): reward (mean NDCG@10 of the S rankings), reward_std (its spread over
a user's rankings: REINFORCE's signal), signal_share (users whose rankings differ in reward: the head
learns only from those), score_std (spread of a user's K scores), ndcg@10_greedy (the step's users
ranked by their sorted scores), head_loss; ppo_loss, ratio, clip_frac, approx_kl (PPO's health),
response_len, truncated_share (traces cut at --max-new-tokens), answer_share (traces with an
<answer>), distinct_share and token_logp (fall to 1/K and 0 when the policy writes one text for every
candidate); valid_ndcg@10 (--eval-every: greedy traces of validation users, scores sorted), step_time.

Where this departs from the paper (defaults are the paper's unless said). The RL stage:
1. S rankings per user instead of one (--num-rankings 8): sampling them costs nothing next to K traces.
2. A leave-one-out baseline over the S rankings in the head's REINFORCE and in dV/ds (--no-baseline: none).
3. --advantage batch or counterfactual adds an unbiased baseline to Eq. 6's advantage (ppo.py).
4. The PPO loss is a per-token mean over the step's tokens, not Eq. 6's plain sum (ppo.clipped_token_loss).
5. theta_old is the first PPO epoch's own forward (ratio exactly 1 there), not the sampling pass.
6. Log-probs at the sampling temperature; RL refuses --temperature 0 (greedy traces have no gradient).
7. The score path (--no-score-path: Eqs. 5-6 to the letter). With s_k = f_phi(h_k(theta)),
   grad_theta J = E[sum_k A_k grad log pi(y_k)] + E[sum_k dV/ds_k grad_theta s_k], V(s) = E_tau rho(tau).
   Eqs. 5-6 leave out the second term: the LLM would learn which words to write, never a hidden state
   that ranks better. ppo.score_gradient estimates dV/ds from the S rankings; ppo.llm_loss adds it.
8. --pl-std (0 = off) fixes the std of a user's scores before Plackett-Luce (plackett_luce.standardized).
9. The head reads h_k through a LayerNorm without parameters (head.py).
10. Two PPO epochs per step (--ppo-epochs; the paper does not say): the second reuses the traces.
11. MLP-only (--freeze-llm) samples fresh traces each step, as the policy would, and validates on greedy ones.
Departures 12-18 are data.py's (the data and the prompt), 19-23 sft.py's, 24-28 evaluate.py's, 29-32 analyses.py's.
"""
import argparse
import math
import os
import signal
import sys
import time


def stopped_before_start(signum, frame):
    """Ctrl-C or SIGTERM while torch and transformers load (the first seconds): one line, nothing written."""
    if os.environ.get("RANK", "0") == "0":
        print("stopped before anything started; nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # not sys.exit: torch's import of numpy swallows an exception raised inside it


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stopped_before_start)
    signal.signal(signal.SIGTERM, stopped_before_start)

import torch  # noqa: E402 (after the handlers above: these imports take seconds)
import torch.distributed as dist
import transformers
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import DynamicCache, GenerationConfig

import data
import lora
import plackett_luce
import runs
from data import UsageError
from head import ScoreHead
from metrics import ndcg_at_k, ndcg_from_scores
from ppo import (batch_baseline_advantages, counterfactual_advantages, leave_one_out_baseline, llm_loss,
                 reinforce_loss, score_gradient, token_logprobs)

# The quickstart (README): what --model tiny changes in the defaults when a flag is not given. The traces are
# one token at temperature 0.3: at 1 the random model's token is close to noise, and h_k is read at it.
TINY_DEFAULTS = dict(max_history=0, max_new_tokens=1, temperature=0.3, users_per_step=8, lr=3e-3, head_lr=3e-3,
                     pl_std=1.0, num_rankings=32, max_steps=100, eval_every=25, out="runs/tiny")
ROLLOUT_ROWS = 160  # traces generated in one call at validation and evaluation (whole users)
MAX_GRAD_NORM = 1.0  # the LLM's gradient-norm clip (RL and SFT)


# ----------------------------------------------------------------------------------- the policy


def load_model(name, device, dtype=torch.float32, seed=0, flag="--model"):
    """(model, tokenizer) for a hub id or a local directory (a checkpoint this project wrote loads as a plain
    model), or tiny, random:<architecture>, a .gguf file (models.py). A name that cannot be loaded is one line."""
    if name == "tiny" or name.startswith("random:") or name.endswith(".gguf"):
        import models  # offline models: no hub needed

        model, tokenizer = models.load_offline(name, seed, flag)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(f"{flag} {name}: a folder without config.json, so not a model folder")
        if os.path.isfile(name):
            raise UsageError(f"{flag} {name}: a file, not a model folder, a .gguf file, tiny or a hub id")
        if not os.path.isdir(name) and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
            raise UsageError(f"{flag} {name}: no such model folder (a hub id is org/name)")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as error:  # not found, no network, a damaged file: one line
            raise UsageError(f"{flag} {name}: cannot load it ({runs.first_line(error)})") from None
    if not tokenizer(data.SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]:  # a folder without its tokenizer.json
        raise UsageError(f"{flag} {name}: its tokenizer turns the prompt into no tokens (is tokenizer.json missing?)")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # the rollout's padding needs one
    stops = model.generation_config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    # Sampling from pi_theta itself: a hub's generation_config.json (Qwen's top_k 20, top_p 0.8, a repetition
    # penalty) would change the distribution the tokens come from, and Eq. 6's ratio needs that one.
    model.generation_config = GenerationConfig(eos_token_id=stops + [tokenizer.eos_token_id] * (tokenizer.eos_token_id not in stops),
                                               pad_token_id=tokenizer.pad_token_id)
    return model.to(device=device, dtype=dtype), tokenizer


def prompt_tokens(tokenizer, instances, args):
    """Fig. 2's prompt for every user: (prefix shared by its K candidates, [suffix_k]) token ids."""
    return [data.encode_user(tokenizer, inst, args.max_history, args.max_item_chars, instructions=data.PROMPTS[args.prompt])
            for inst in instances]


def prefix_cache(model, prefixes, copies):
    """The KV cache of each user's prompt prefix, run once (left-padded to the longest), then repeated
    `copies` times along the batch: rows u * copies ... (u + 1) * copies - 1 are user u's. With gradient
    when called with gradient enabled. Returns (cache, prefix ids [U * copies, P], their mask)."""
    P, device = max(map(len, prefixes)), model.device
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prefixes], dtype=torch.long, device=device)  # [U, P]
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prefixes], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    if P:
        model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            cache=cache, use_cache=True)
        cache.batch_repeat_interleave(copies)
    return cache, ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)


@torch.no_grad()
def rollout(model, tokenizer, prompts, max_new_tokens, temperature):
    """Eq. (1) for U users in one `generate` call: one trace per (user, candidate), prompts as prompt_tokens
    gives them (the same K for every user); temperature 0 = greedy. Each user's prefix is run once and its
    cache repeated K times; the rows are laid out [prefix | pad | suffix], the pads masked.
    returns (traces: U * K token-id lists, each cut after its first stop token (kept: h_k is read at it) or at
    the budget; hidden [U * K, H] fp32: h_k, the last layer's state (after the final norm, what the LM head
    reads) at the trace's final token, or at the prompt's last token for an empty trace)."""
    K, device = len(prompts[0][1]), model.device
    if any(not s for _, user_suffixes in prompts for s in user_suffixes):  # every row needs a token past the cache
        prompts = [(prefix[:-1], [prefix[-1:] + s for s in user_suffixes]) for prefix, user_suffixes in prompts]
    suffixes = [s for _, user_suffixes in prompts for s in user_suffixes]
    cache, prefix_ids, prefix_mask = prefix_cache(model, [p for p, _ in prompts], K)
    L = max(map(len, suffixes))
    block = torch.tensor([[tokenizer.pad_token_id] * (L - len(s)) + s for s in suffixes], device=device)  # [N, L]
    ids = torch.cat([prefix_ids, block], 1)  # [N, P + L]
    block_mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in suffixes], device=device)
    mask = torch.cat([prefix_mask, block_mask], 1)  # [N, P + L]
    decoder = model.get_decoder()
    if max_new_tokens == 0:  # no trace: h_k at the prompt's last token
        hidden = decoder(input_ids=block, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)[:, -L:],
                         cache=cache).last_hidden_state[:, -1]
        return [[] for _ in suffixes], hidden.float()
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=max_new_tokens, **sampling)
    new = out[:, ids.shape[1]:]  # [N, T]
    stops = torch.tensor(model.generation_config.eos_token_id, device=device)
    is_stop = torch.isin(new, stops)
    lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, new.shape[1])  # [N]
    # h_k: the final token, fed once more through the cache generate left (which holds every token but the last
    # one generated), attending to the prompt and to the trace's tokens before it only
    T = new.shape[1]
    before = torch.arange(T - 1, device=device)[None, :] < (lengths - 1)[:, None]
    attend = torch.cat([mask, before.long(), torch.ones_like(lengths)[:, None]], 1)
    position = mask.sum(1) + lengths - 1
    final = new.gather(1, (lengths - 1)[:, None])
    hidden = decoder(input_ids=final, attention_mask=attend, position_ids=position[:, None], cache=cache).last_hidden_state[:, -1]
    return [row[:n].tolist() for row, n in zip(new, lengths.tolist())], hidden.float()


def forward_traces(model, prefix, suffixes, traces, temperature, shared=True):
    """The teacher-forced pass over one user's prompts prefix + suffixes[k] and traces[k], with gradient:
    log pi_theta of every trace token at the sampling temperature (Eq. 6's ratio) and h_k (as rollout reads it).
    shared: the prefix runs once, its cache (with gradient) repeated for the B rows; else every row holds its
    whole prompt (gradient checkpointing drops a cache, so it needs this). Layout [left pad | suffix | trace |
    right pad]: every trace starts in one column, and logits are taken only where they predict a trace token.
    returns logp [B, T] fp32 (0 on padding), mask [B, T] bool, hidden [B, H]."""
    device, B = model.device, len(suffixes)
    if not shared:
        prefix, suffixes = [], [prefix + s for s in suffixes]
    cache, _, prefix_mask = prefix_cache(model, [prefix], B)
    L, T = max(map(len, suffixes)), max(1, max(map(len, traces)))
    ids = torch.zeros((B, L + T), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, (suffix, trace) in enumerate(zip(suffixes, traces)):
        ids[i, L - len(suffix):L + len(trace)] = torch.tensor(suffix + trace, device=device)
        mask[i, L - len(suffix):L + len(trace)] = 1
    attend = torch.cat([prefix_mask, mask], 1)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attend, cache=cache if prefix else None,
                                 position_ids=(attend.cumsum(-1) - 1).clamp(min=0)[:, -(L + T):]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, L - 1:L + T - 1])  # [B, T, V]: column t predicts token t + 1
    trace_mask = mask[:, L:].bool()
    logp = token_logprobs(logits, ids[:, L:], temperature).masked_fill(~trace_mask, 0.0)
    final = L - 1 + torch.tensor([len(t) for t in traces], device=device)
    return logp, trace_mask, hidden[torch.arange(B, device=device), final]


def ppo_update(model, optimizer, prompts, traces, advantages, args, head=None, score_grads=None, dtype=torch.float32):
    """Lines 8 and 11: theta's update, --ppo-epochs passes of clipped PPO (Eq. 6) over this process's users, one
    AdamW step each. prompts: per user (prefix, suffixes); traces: per user, K token-id lists; advantages
    [U, K]; score_grads [U, K] = dV/ds (the score path, first epoch only), or None.
    Each micro-batch's loss is ppo.llm_loss, divided by the whole step's token count D (every process's: the
    per-token mean, departure 4), so the gradients summed over micro-batches and processes are those of the
    step's loss. theta_old is the first epoch's own forward (departure 5). Forward and loss run under autocast,
    backward and the optimizer step outside it: autocast caches the bf16 copy of each trained weight for the
    life of its context, and a step inside one would leave the next epoch computing with the old weights.
    returns PPO's health (token means over the step's tokens)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    tokens = all_sum(sum(len(t) for user in traces for t in user))
    divisor = tokens or all_sum(sum(map(len, traces)))  # no token (--max-new-tokens 0): the score path alone, per trace
    epochs = args.ppo_epochs if tokens else 1
    fixed_head = {name: p.detach() for name, p in head.named_parameters()} if head is not None else None
    old_logp, stats = {}, {}
    shared = not model.is_activation_checkpointing  # a checkpointed layer drops a cache: whole prompts then
    model.train()
    for epoch in range(epochs):
        for u, ((prefix, suffixes), user_traces) in enumerate(zip(prompts, traces)):
            for start in range(0, len(suffixes), args.micro_batch):
                rows = slice(start, start + args.micro_batch)
                with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logp, mask, hidden = forward_traces(model, prefix, suffixes[rows], user_traces[rows], args.temperature, shared)
                    if epoch == 0:  # theta_old: the first epoch's own forward (departure 5)
                        old_logp[u, start] = logp.detach()
                        if tokens:  # the mean log-prob of a sampled token: near 0 when the policy stops exploring
                            stats["token_logp"] = stats.get("token_logp", 0.0) + logp.detach().sum().item() / tokens
                    scores = g = None
                    if fixed_head is not None and epoch == 0:  # f_phi(h_k(theta)) with phi held: into theta only
                        scores, g = torch.func.functional_call(head, fixed_head, (hidden,)), score_grads[u, rows]
                    loss, mb_stats = llm_loss(logp, old_logp[u, start], advantages[u, rows], mask, divisor, args.clip_eps, scores, g)
                loss.backward()
                for name, value in mb_stats.items():  # token means of the micro-batch -> of the step
                    stats[name] = stats.get(name, 0.0) + value * mask.sum().item() / divisor / epochs
        sum_gradients(trained)  # under torchrun: every process's gradient, summed (the one process's update)
        torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {name: all_sum(value) for name, value in stats.items()}


# --------------------------------------------------------------------------------------- the RL stage


def train_rl(args):
    run = runs.start_run(args, "rl")  # --out held, the data, the checkpoint to resume from (runs.py)
    device, dtype, main = run.device, run.dtype, run.rank == 0
    train = data.load_split(run.data_dir, "train")
    valid = data.load_split(run.data_dir, "valid")[:args.eval_users] if args.eval_every else []
    if run.start_step > args.max_steps:
        raise UsageError(f"{run.checkpoint}: already past --max-steps {args.max_steps}; raise it to train further")
    if args.users_per_step > len(train):
        raise UsageError(f"--users-per-step {args.users_per_step} is more than the {len(train)} training users of {run.data_dir}")
    model, tokenizer = load_model(run.checkpoint or args.model, device, torch.float32, args.seed)  # fp32 master weights
    torch.manual_seed(args.seed)
    head = ScoreHead(model.config.hidden_size, args.head_width).to(device)
    source = run.checkpoint or (args.model if os.path.isfile(os.path.join(args.model, "head.safetensors")) else None)
    if source:  # a checkpoint of an RL run brings its head along
        runs.load_head(head, source)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers' own switch; the update then feeds whole prompts
    optimizers = {"head": torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=0.01)}
    if args.freeze_llm:
        model.requires_grad_(False)
    else:  # every weight, or LoRA's adapters; fused AdamW on CUDA makes no temporary as large as the weights
        trained = lora.add_adapters(model, args.lora_rank) if args.lora_rank else list(model.parameters())
        if args.lora_rank and run.checkpoint:
            lora.restore_adapters(model, load_file(os.path.join(run.checkpoint, "lora.safetensors"), device=str(device)))
        optimizers["llm"] = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    runs.restore_optimizers(optimizers, run.checkpoint, {"head": args.head_lr, "llm": args.lr})
    lora.hold_frozen_weights(model, dtype)  # LoRA's base or the frozen LLM, cast once to the compute dtype
    model.eval()
    K = len(train[0]["candidates"])
    if main:
        print(f"{args.users_per_step} users x {K} candidates = {args.users_per_step * K} traces per step "
              f"(<= {args.max_new_tokens} tokens each), {args.num_rankings} rankings per user; {len(train)} training users "
              f"({len(train) / args.users_per_step:.0f} steps per pass); {run.world} process(es) on {device}, {dtype} compute, "
              f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    if main:
        runs.check_disk(args.out, model, optimizers, args.keep_checkpoints)
    metrics = runs.open_metrics(args.out, run.start_step)  # rank 0 logs and saves; every process computes
    runs.catch_signals()  # Ctrl-C, SIGTERM: the step in progress finishes and is saved, then the run stops
    if main and args.eval_every and run.start_step == 0:
        runs.log_row(metrics, {"step": 0, "valid_ndcg@10": validate(model, tokenizer, head, valid, args, dtype)})
    bar = tqdm(range(run.start_step, args.max_steps), initial=run.start_step, total=args.max_steps, desc="rl",
               dynamic_ncols=True, disable=None if main else True)  # no bar when the output is no terminal
    for step in bar:
        started = time.time()
        # the minibatch B of Algorithm 1: a seeded draw of users, this process's share of them
        users = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
        users = users[:args.users_per_step].tolist()[run.rank::run.world]
        instances = [train[i] for i in users]
        labels = torch.tensor([inst["labels"] for inst in instances], dtype=torch.float32, device=device)  # [U, K]
        torch.manual_seed((args.seed * 1_000_003 + step) * 1_000 + run.rank)  # the traces' draws: a resume repeats them
        generator = torch.Generator(device).manual_seed((args.seed * 1_000_003 + step) * 1_000 + run.rank)

        # 1) lines 1-3: one reasoning trace y_k ~ pi_theta(. | c_u, x_k) per candidate (Eq. 1)
        prompts = prompt_tokens(tokenizer, instances, args)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            flat, hidden = rollout(model, tokenizer, prompts, args.max_new_tokens, args.temperature)
        traces = [flat[u * K:(u + 1) * K] for u in range(len(instances))]  # U x K token-id lists

        # 2) line 4: s_k = f_phi(h_k) (Eq. 2), [U, K], with gradient into phi only
        raw_scores = head(hidden.view(len(instances), K, -1))
        scores = plackett_luce.standardized(raw_scores, args.pl_std)  # departure 8 (0: the raw scores)

        # 3) lines 6-7: S rankings tau ~ PL(s) (Eq. 4), reward rho(tau) = NDCG@10
        rankings = plackett_luce.sample(scores.detach(), args.num_rankings, generator)  # [U, S, K], best first
        reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), 10)  # [U, S]
        baseline = leave_one_out_baseline(reward) if args.baseline else None  # departure 2

        # 4) lines 8, 11: theta by clipped PPO on the tokens (Eq. 6) and the score path (departure 7)
        ppo_stats = {}
        if not args.freeze_llm:
            advantages = llm_advantages(args, raw_scores.detach(), labels, reward, generator)  # [U, K], departure 3
            score_grads = score_gradient(raw_scores, rankings, reward, baseline, args.pl_std) if args.score_path else None
            ppo_stats = ppo_update(model, optimizers["llm"], prompts, traces, advantages, args,
                                   head if args.score_path else None, score_grads, dtype)
        #    lines 9, 12: phi by REINFORCE through log P(tau | s) (Eq. 5); after theta's, whose score path read phi
        head_loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
        optimizers["head"].zero_grad(set_to_none=True)
        (head_loss * len(users) / args.users_per_step).backward()  # this process's share of the step's mean
        sum_gradients(head.parameters())
        optimizers["head"].step()

        # 5) log, validate, checkpoint: means over all the step's users (every process's)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in flat]
        share = len(users) / args.users_per_step
        row = {name: all_sum(value * share) for name, value in {
            "reward": reward.mean().item(), "reward_std": reward.std(1, correction=0).mean().item(),
            "signal_share": (reward != reward[:, :1]).any(1).float().mean().item(),
            "score_std": raw_scores.detach().std(1, correction=0).mean().item(),
            "ndcg@10_greedy": ndcg_from_scores(scores.detach(), labels, 10).mean().item(),
            "head_loss": head_loss.item(),
            "response_len": sum(map(len, flat)) / len(flat),
            "truncated_share": sum(len(t) == args.max_new_tokens and (not t or t[-1] not in model.generation_config.eos_token_id)
                                   for t in flat) / len(flat) if args.max_new_tokens else 0.0,
            "answer_share": sum(data.parse_answer(t) is not None for t in texts) / len(texts),
            "distinct_share": sum(len(set(texts[u * K:(u + 1) * K])) / K for u in range(len(instances))) / len(instances),
        }.items()}
        row = {"step": step + 1, **row, **ppo_stats}
        if main and args.eval_every and (step + 1) % args.eval_every == 0:
            row["valid_ndcg@10"] = validate(model, tokenizer, head, valid, args, dtype)
        row["step_time"] = time.time() - started
        if bad := [name for name, value in row.items() if not math.isfinite(value)]:
            raise UsageError(f"step {step + 1}: non-finite {', '.join(bad)}, so the run stops without saving this step; "
                             "lower --lr / --head-lr, or check the weights it started from")
        runs.log_row(metrics, row, bar.write)
        stop = runs.stop_signal()
        if (step + 1) % args.save_every == 0 or step + 1 == args.max_steps or stop:
            runs.save_checkpoint(args.out, step + 1, model, tokenizer, head, optimizers, args, run)
        if stop:
            runs.say(f"stopped by {signal.Signals(stop).name}: steps 1-{step + 1} kept in "
                     f"{os.path.join(args.out, f'checkpoint-{step + 1}')}; continue with --resume")
            sys.exit(128 + stop)
    if main:
        print(f"wrote {os.path.join(args.out, 'metrics.jsonl')} and {os.path.join(args.out, f'checkpoint-{args.max_steps}')}")


def llm_advantages(args, raw_scores, labels, reward, generator):
    """[U, K]: each trace's advantage in Eq. 6 (--advantage, departure 3). reward [U, S] of this process's users."""
    K = raw_scores.shape[1]
    if args.advantage == "counterfactual":  # per trace: V(s) - V(s with s_k replaced by the others' mean)
        return counterfactual_advantages(raw_scores, labels, 10, 256, generator, args.pl_std)
    if args.advantage == "batch":  # the user's mean reward minus the other users' (every process's users)
        means = all_gather(reward.mean(1))
        mine = batch_baseline_advantages(means[:, None])[runs.rank()::runs.world()]
        return mine[:, None].expand(-1, K)
    return reward.mean(1, keepdim=True).expand(-1, K)  # the paper's: the rankings' mean reward, no baseline


@torch.no_grad()
def validate(model, tokenizer, head, instances, args, dtype):
    """NDCG@10 of greedy traces ranked by the head's scores, on `instances` (ROLLOUT_ROWS traces per call)."""
    return ndcg_from_scores(score_users(model, tokenizer, head, instances, args, dtype), labels_of(instances), 10).mean().item()


@torch.no_grad()
def score_users(model, tokenizer, head, instances, args, dtype, temperature=0.0):
    """[U, K] fp32 scores on the CPU: f_phi(h_k) of one trace per candidate (greedy unless a temperature)."""
    K, per_call, scores = len(instances[0]["candidates"]), max(1, ROLLOUT_ROWS // len(instances[0]["candidates"])), []
    for start in range(0, len(instances), per_call):
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, hidden = rollout(model, tokenizer, prompt_tokens(tokenizer, instances[start:start + per_call], args),
                                args.max_new_tokens, temperature)
        scores.append(head(hidden).view(-1, K).float().cpu())
    return torch.cat(scores)


def labels_of(instances):
    return torch.tensor([inst["labels"] for inst in instances], dtype=torch.float32)


# --------------------------------------------------------------------------------- torchrun, nanoGPT's way


def sum_gradients(parameters):
    for p in parameters if dist.is_initialized() else []:
        dist.all_reduce(p.grad)


def all_sum(value):
    """value (a number) summed over the processes of torchrun; itself in a plain run."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=runs.collective_device())
    dist.all_reduce(total)
    return total.item()


def all_gather(values):
    """[n_r] of each process -> every process's, in the order of the users they were dealt (users[rank::world])."""
    if not dist.is_initialized():
        return values
    counts = [torch.zeros((), dtype=torch.long, device=values.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(len(values), device=values.device))
    parts = [torch.zeros(int(n), dtype=values.dtype, device=values.device) for n in counts]
    dist.all_gather(parts, values.contiguous())
    merged = torch.zeros(sum(map(len, parts)), dtype=values.dtype, device=values.device)
    for r, part in enumerate(parts):
        merged[r::len(parts)] = part
    return merged


# ------------------------------------------------------------------------------------- the command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="R2Rank: train an LLM to reason about each candidate and rank by its "
                                "scores (Algorithm 1 of the paper), its SFT cold start, and its evaluation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("every stage")
    g.add_argument("--stage", default="rl", choices=["rl", "sft-data", "sft", "eval"], help="what to run")
    g.add_argument("--data", default="", help="data set folder (python data.py); empty: the built-in synthetic set in <out>/data")
    g.add_argument("--model", default="Qwen/Qwen2.5-1.5B-Instruct", help="hub id, local folder or checkpoint, a .gguf file, "
                   "tiny (a random 2-layer Qwen2 built offline; its defaults are the quickstart's), or random:qwen2.5-1.5b "
                   "(also 0.5b, 3b, 7b: the architecture with random weights)")
    g.add_argument("--out", default="runs/r2rank", help="output folder: metrics.jsonl, checkpoint-<step>/, eval-<split>.json")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest whole checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out (only what this project wrote there)")
    g.add_argument("--seed", type=int, default=0, help="seeds the users' order, the sampling, the head, the tiny model")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: 1 for --model tiny, else torch's default)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute precision under autocast (auto: bfloat16 on CUDA, else float32); weights stay fp32")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass "
                   "(less memory, about a third more time)")
    g.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of every weight (0: all)")
    g.add_argument("--micro-batch", type=int, default=8, help="traces per forward/backward (memory only, same gradient)")
    g.add_argument("--max-history", type=int, default=20, help="history items shown in the prompt (the latest)")
    g.add_argument("--max-item-chars", type=int, default=200, help="characters of an item's line in the prompt")
    g.add_argument("--max-new-tokens", type=int, default=512, help="a trace's token budget (the paper gives none); "
                   "0: no trace, h_k at the prompt's end")
    g.add_argument("--prompt", default="self-check", choices=sorted(data.PROMPTS),
                   help="self-check (Fig. 2) or answer-only (Table 5's 'Without CoT')")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the traces")
    g = p.add_argument_group("--stage rl: Algorithm 1")
    g.add_argument("--max-steps", type=int, default=100, help="RL steps")
    g.add_argument("--users-per-step", type=int, default=4, help="users per step (the minibatch B)")
    g.add_argument("--lr", type=float, default=1e-6, help="LLM learning rate (AdamW)")
    g.add_argument("--head-lr", type=float, default=1e-3, help="scoring head's learning rate (AdamW); 0 freezes it")
    g.add_argument("--head-width", type=int, default=256, help="the scoring head's hidden width")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over a step's traces, one optimizer step each")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO's clipping epsilon")
    g.add_argument("--freeze-llm", action="store_true", help="train the head only (Table 3's MLP-only)")
    g.add_argument("--num-rankings", type=int, default=8, help="S, Plackett-Luce rankings per user (the paper: 1)")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="leave-one-out baseline over a user's S rankings (the paper: none)")
    g.add_argument("--score-path", action=argparse.BooleanOptionalAction, default=True,
                   help="the head's gradient into the LLM through h_k too (--no-score-path: Eqs. 5-6 as printed)")
    g.add_argument("--advantage", default="reward", choices=["reward", "batch", "counterfactual"],
                   help="Eq. 6's advantage: reward (the paper), batch or counterfactual (unbiased baselines)")
    g.add_argument("--pl-std", type=float, default=0.0, help="standardize a user's scores to this std before Plackett-Luce (0: off)")
    g.add_argument("--eval-every", type=int, default=0, help="validation NDCG@10 every N steps and at step 0 (0: never)")
    g.add_argument("--eval-users", type=int, default=32, help="validation users in that check")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps and at the end")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest N checkpoints (0: all)")
    g = p.add_argument_group("--stage sft-data, then sft: the cold start (Sec. 3.4)")
    g.add_argument("--traces", default="", help="teacher traces (jsonl); default <out>/traces.jsonl")
    g.add_argument("--teacher", default="", help="sft-data: a local teacher model (as --model)")
    g.add_argument("--teacher-url", default="", help="sft-data: an OpenAI-compatible endpoint instead; key from $OPENAI_API_KEY")
    g.add_argument("--teacher-model", default="", help="sft-data: the model name sent to --teacher-url")
    g.add_argument("--teacher-timeout", type=float, default=120.0, help="sft-data: seconds one request waits for its reply")
    g.add_argument("--teacher-max-tokens", type=int, default=4096, help="sft-data: the teacher's own token budget per reply "
                   "(a reasoning model's thinking counts against it on most endpoints)")
    g.add_argument("--num-pairs", type=int, default=200, help="sft-data: (user, candidate) pairs to ask about, half positive")
    g.add_argument("--sft-epochs", type=int, default=2, help="sft: passes over the traces")
    g.add_argument("--sft-lr", type=float, default=1e-5, help="sft: learning rate (AdamW)")
    g.add_argument("--sft-batch", type=int, default=16, help="sft: traces per optimizer step")
    g = p.add_argument_group("--stage eval: Table 2 and the analyses of Sec. 4")
    g.add_argument("--split", default="test", choices=["train", "valid", "test"], help="the split to evaluate")
    g.add_argument("--methods", default="r2rank,random,popularity,pointwise,listwise",
                   help="comma-separated: r2rank, random, popularity, pointwise, listwise, sasrec, reczero, r2ec")
    g.add_argument("--analyses", default="", help="comma-separated: position, history-order, cold-start, history-length")
    g.add_argument("--eval-limit", type=int, default=0, help="the first N users of the split only (0: all)")
    g.add_argument("--sasrec", default="", help="the model file of --methods sasrec (python baselines/sasrec.py writes it)")
    first, _ = p.parse_known_args(argv)
    if first.model == "tiny":
        p.set_defaults(**TINY_DEFAULTS)
    args = p.parse_args(argv)
    args.given = {a.dest for a in p._actions if any(opt in (argv if argv is not None else sys.argv[1:]) for opt in a.option_strings)}
    for name in ("micro_batch", "max_steps", "users_per_step", "ppo_epochs", "num_rankings", "save_every", "eval_users",
                 "head_width", "max_item_chars", "num_pairs", "sft_epochs", "sft_batch", "teacher_max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "head_lr", "sft_lr", "temperature", "pl_std", "clip_eps", "teacher_timeout",
                 "seed", "threads", "lora_rank", "max_history", "max_new_tokens", "eval_every", "keep_checkpoints", "eval_limit"):
        value = getattr(args, name)
        if not (value == value and abs(value) != float("inf")) or value < 0 or (name.endswith("lr") and value > 1):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0{' and <= 1' if name.endswith('lr') else ''}, got {value}")
    if args.stage == "rl" and not args.freeze_llm and args.temperature == 0:
        p.error("--temperature 0 samples greedy traces, which have no policy gradient: use > 0 (or --freeze-llm)")
    if args.baseline and args.num_rankings < 2:
        p.error("--baseline needs --num-rankings >= 2 (or pass --no-baseline)")
    if args.stage == "rl" and args.advantage == "batch" and args.users_per_step < 2:
        p.error("--advantage batch needs --users-per-step >= 2 (its baseline is the other users' mean reward)")
    if args.max_new_tokens == 0 and args.stage == "rl" and not args.freeze_llm and not args.score_path:
        p.error("--max-new-tokens 0 with --no-score-path gives the LLM no gradient: drop one, or pass --freeze-llm")
    if args.lora_rank and args.freeze_llm:
        p.error("--lora-rank trains adapters of the LLM, and --freeze-llm trains none")
    if args.gradient_checkpointing and args.freeze_llm:
        p.error("--gradient-checkpointing saves memory in the LLM's update, and --freeze-llm makes none")
    try:
        args.out.encode("utf-8")
    except UnicodeEncodeError:
        p.error(f"--out {args.out!r}: not valid UTF-8, which checkpoint files cannot record; choose another name")
    if args.threads or args.model == "tiny":
        torch.set_num_threads(args.threads or 1)  # the tiny model's ops are too small to share between threads
    return args


STOPPED = {"eval": "the evaluation stopped before writing its results; nothing was written",  # what a stop keeps
           "sft-data": "the pairs written so far are kept; the same command continues"}


def run_stage(stage, args):
    """stage(args) with every stage's ending (the baselines' training too): bad input, a full disk or another run
    in --out is one line (exit 1), as is running out of memory; a signal outside a training step stops at once
    (130 / 143), saying what is kept."""
    transformers.utils.logging.disable_progress_bar()  # its save bars would mix with the step lines
    signal.signal(signal.SIGINT, signal.default_int_handler)  # until a training loop takes them over: stop at once
    signal.signal(signal.SIGTERM, runs.stop_now)
    try:
        stage(args)
    except UsageError as error:
        runs.say(f"error: {error}")
        sys.exit(1)
    except (torch.OutOfMemoryError, MemoryError) as error:  # the next setting of README's memory table
        fix = ("--gradient-checkpointing" if not getattr(args, "gradient_checkpointing", True) else "--micro-batch 2"
               if getattr(args, "micro_batch", 2) > 2 else "--lora-rank 16 --lr 1e-4" if not getattr(args, "lora_rank", 1)
               else "a lower --max-new-tokens or --users-per-step")
        runs.say(f"error: out of memory ({runs.first_line(error)[:200]}); try {fix} (python tools/benchmark.py --estimate)")
        sys.exit(1)
    except (KeyboardInterrupt, runs.Stopped) as stop:
        runs.say(f"interrupted: {STOPPED.get(getattr(args, 'stage', None)) or runs.kept_text(args.out)}")
        sys.exit(143 if isinstance(stop, runs.Stopped) else 130)
    finally:
        runs.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    runs.start_processes()  # under torchrun: join the group (nanoGPT's way); rank 0 alone prints
    run_stage(run_any_stage, args)


def run_any_stage(args):
    if runs.world() > 1 and args.stage in ("sft-data", "sft"):
        raise UsageError(f"--stage {args.stage} runs as one process (torchrun splits --stage rl and eval)")
    if args.stage == "rl":
        train_rl(args)
    elif args.stage in ("sft-data", "sft"):
        import sft

        sft.build_traces(args) if args.stage == "sft-data" else sft.train_sft(args)
    else:
        import evaluate

        evaluate.run_eval(args)


if __name__ == "__main__":
    main()
