"""Algorithm 1 of the R2Rank paper (RL training of the LLM pi_theta and its scoring head f_phi) in one file,
on transformers' own `generate` and forward, to read top to bottom beside Sec. 3.3.

    python algorithm1.py        # the README's quickstart: tiny random model, pointwise synthetic set, 100 steps

One step (rl_step), tagged with Algorithm 1's lines:
    1) rollout: the self-check prompt (Fig. 2) per (user, candidate), one trace y_k ~ pi_theta    lines 1-3, Eq. 1
    2) scores: h_k, the last hidden state at y_k's final token, and s_k = f_phi(h_k)            line 4, Eq. 2
    3) S rankings tau ~ Plackett-Luce(s), reward rho(tau) = NDCG@10                             lines 6-7, Eq. 4
    4) theta by clipped PPO on the tokens plus the score path; phi by REINFORCE                  lines 8-12, Eqs. 5-6
    5) log

It computes what r2rank.py's train_rl computes, with its defaults (machinery/config.py) and the quickstart's flags as
the constants below: on the same traces and rankings the losses and gradients are the same
(tests/test_algorithm1.py pins the two together in fp64). What it leaves to r2rank.py: the shared-prefix
KV cache and batched decoding (rollout.py, decode.py), micro-batches smaller than one user, bf16 autocast,
checkpoints and resume, torchrun, the --advantage counterfactual, LoRA, MLP-only. r2rank.py is what
scales; this file is what to read.

Where it departs from the paper (the numbers of r2rank.py's list): S = 32 rankings per user (1), a
leave-one-out baseline in the head's REINFORCE and in dV/ds (2), ADVANTAGE "batch" if chosen (3), a
per-token mean instead of Eq. 6's sum (4), theta_old = the first PPO epoch's own forward (5), the score
path (7), the scores standardized to PL_STD before Plackett-Luce (8), a LayerNorm before the head's MLP
(9, head.py), two PPO epochs (10). Unlike r2rank.py, the step's random draws come from one stream (torch's
global one for `generate`, one generator for the rankings), not one per (seed, step, user).
"""
import os
import time

import torch

import data  # the prompt of Fig. 2 only (data.encode_user); data.py imports the standard library and tqdm
import plackett_luce
from head import ScoreHead
from metrics import ndcg_at_k, ndcg_from_scores
from ppo import batch_baseline_advantages, leave_one_out_baseline, llm_loss, reinforce_loss, score_gradient
from sampling import token_logprobs

# The quickstart (README): r2rank.py --stage rl --model tiny --max-history 0 --max-new-tokens 1 --temperature 0.3
# --users-per-step 8 --lr 3e-3 --head-lr 3e-3 --pl-std 1 --num-rankings 32 --max-steps 100, on data.py synthetic
# --pointwise --candidates 10.
MODEL = "tiny"  # models.build_tiny (a random 2-layer Qwen2, built offline), or a hub id
SEED = 0
CANDIDATES = 10  # K per user
MAX_HISTORY, MAX_ITEM_CHARS = 0, 200  # history items and characters per item line in the prompt
MAX_NEW_TOKENS = 1  # a trace's token budget
TEMPERATURE = 0.3  # of the traces; Eq. 6's log-probs are taken at the same temperature (the quickstart's: at 1 the
#                   random model's one token is noise under the head, RESULTS.md)
USERS_PER_STEP = 8  # the minibatch B
NUM_RANKINGS = 32  # S, rankings per user (departure 1; the paper samples one)
REWARD_K = 10  # rho = NDCG@10
PL_STD = 1.0  # each user's scores standardized to this std before Plackett-Luce (departure 8; 0 = the raw scores)
ADVANTAGE = "reward"  # Eq. 6's: "reward" (as printed: rho(tau), here its mean over S), "batch" (minus the other users')
assert ADVANTAGE in ("reward", "batch"), ADVANTAGE  # r2rank.py's "counterfactual" is left to it
SCORE_PATH = True  # the head's gradient dV/ds carried into theta through h_k (departure 7)
BASELINE = True  # leave-one-out over a user's S rankings, in REINFORCE and dV/ds (departure 2)
PPO_EPOCHS, CLIP_EPS, MAX_GRAD_NORM = 2, 0.2, 1.0
LR, HEAD_LR, HEAD_WIDTH, HEAD_WEIGHT_DECAY = 3e-3, 3e-3, 256, 0.01
STEPS = int(os.environ.get("ALGORITHM1_STEPS", 100))  # the test cuts it
EVAL_EVERY, EVAL_USERS = 10, 32  # validation NDCG@10 of greedy traces, on the first EVAL_USERS validation users


def self_check_prompts(tokenizer, instance):
    """Fig. 2's prompt for each of a user's K candidates: K token-id lists, the chat template with the
    assistant's turn opened (data.encode_user: the part the K share, then candidate k's)."""
    prefix, suffixes = data.encode_user(tokenizer, instance, MAX_HISTORY, MAX_ITEM_CHARS)
    return [prefix + suffix for suffix in suffixes]


def stop_ids(model, tokenizer):
    """The tokens that end a trace: the generation config's eos (an int or a list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return ids + [tokenizer.eos_token_id] * (tokenizer.eos_token_id not in ids)


@torch.no_grad()
def rollout(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE):
    """Eq. 1: one trace y ~ pi_theta(. | prompt) per prompt (N token-id lists), temperature 0 = greedy.
    returns N token-id lists, each cut after its first stop token (kept: h_k is read at it) or at the budget."""
    width, pad, stops = max(map(len, prompts)), tokenizer.pad_token_id, stop_ids(model, tokenizer)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)  # [N, P], left-padded
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    # top_k 0, top_p 1, no repetition penalty: generate's defaults (top_k 50) and a hub model's generation_config.json
    # would otherwise cut the distribution, and Eq. 6's ratio needs the log-probs of the one the tokens came from
    how = {"do_sample": False} if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                                             repetition_penalty=1.0)
    out = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=pad, **how)[:, width:].tolist()  # [N, <= max_new_tokens]
    return [row[:next((t + 1 for t, token in enumerate(row) if token in stops), len(row))] for row in out]


def forward(model, prompts, traces, temperature=TEMPERATURE):
    """The teacher-forced pass over prompt + trace, with gradient (N of each): log pi_theta of every trace token
    (Eq. 6's ratio) and h_k, the last layer's hidden state after the final norm (what the LM head reads) at the
    trace's final token, or at the prompt's last for an empty trace: f_phi's input (Eq. 2).
    returns logp [N, R] (fp32 or wider, 0 on padding), mask [N, R] bool, hidden [N, H]."""
    N, C, R = len(prompts), max(map(len, prompts)), max(1, max(map(len, traces)))
    ids = torch.zeros((N, C + R), dtype=torch.long, device=model.device)  # [left pad | prompt | trace | right pad]
    attention_mask = torch.zeros_like(ids)
    for i, (prompt, trace) in enumerate(zip(prompts, traces)):
        ids[i, C - len(prompt):C + len(trace)] = torch.tensor(prompt + trace)
        attention_mask[i, C - len(prompt):C + len(trace)] = 1
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # the padding shifts no position
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                                 use_cache=False).last_hidden_state  # [N, C + R, H]
    logits = model.get_output_embeddings()(hidden[:, C - 1:C + R - 1])  # [N, R, V]: column t predicts token t + 1
    mask = attention_mask[:, C:].bool()  # [N, R]
    logp = token_logprobs(logits, ids[:, C:], temperature).masked_fill(~mask, 0.0)
    final = C - 1 + torch.tensor([len(trace) for trace in traces], device=ids.device)
    return logp, mask, hidden[torch.arange(N, device=ids.device), final]


def update_llm(model, optimizer, head, prompts, traces, advantages, score_grads=None, epochs=PPO_EPOCHS):
    """Lines 8 and 11: theta's update, `epochs` passes of clipped PPO (Eq. 6) over the step's traces, one AdamW
    step each. prompts, traces: per user, K token-id lists; advantages [U, K]; score_grads [U, K] = dV/ds, or None.
    A user's loss is ppo.llm_loss: minus its tokens' clipped objective min(r A, clip(r) A) / D, D the step's token
    count (the per-token mean, departure 4), and in the first epoch minus sum_k g_k f_phi(h_k(theta)) / D, the score
    path: the head's weights held, its gradient into theta through h_k. theta_old (departure 5) is the first
    epoch's own forward, so there the ratio is 1: the first epoch is the plain policy gradient, and the score
    path is taken at the theta the scores came from. returns the PPO's health: token means over the epochs."""
    num_tokens = sum(len(trace) for user in traces for trace in user)
    divisor = num_tokens or sum(map(len, traces))  # no token (max_new_tokens 0): the trace count, the score path alone
    epochs = epochs if num_tokens else 1  # without tokens a second epoch has nothing to learn from
    fixed_head = {name: p.detach() for name, p in head.named_parameters()}
    old_logp, stats = {}, {}
    model.train()
    for epoch in range(epochs):
        for u, (user_prompts, user_traces) in enumerate(zip(prompts, traces)):  # line 8: accumulate J(theta) per user
            logp, mask, hidden = forward(model, user_prompts, user_traces)  # [K, R], [K, R], [K, H]
            if epoch == 0:
                old_logp[u] = logp.detach()  # theta_old
            scores = g = None
            if score_grads is not None and epoch == 0:
                scores, g = torch.func.functional_call(head, fixed_head, (hidden,)), score_grads[u]  # [K], [K]
            loss, user_stats = llm_loss(logp, old_logp[u], advantages[u], mask, divisor, CLIP_EPS, scores, g)
            loss.backward()  # the gradients add up over the users: the step's loss
            for name, value in user_stats.items():  # approx_kl, clip_frac, ratio, ppo_loss: token means
                stats[name] = stats.get(name, 0.0) + value * mask.sum().item() / divisor / epochs
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return stats


def update_head(optimizer, scores, rankings, reward, baseline):
    """Lines 9 and 12: phi's REINFORCE step on Eq. 5, loss = - mean over users and rankings of
    (rho(tau) - b) log P(tau | s). scores [U, K] (with grad into phi), rankings [U, S, K], reward [U, S].
    No gradient clipping here: r2rank.py clips the LLM's only."""
    loss = reinforce_loss(plackett_luce.log_prob(scores[:, None, :], rankings), reward, baseline)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def rl_step(model, tokenizer, head, optimizers, instances, generator):
    """One step of Algorithm 1 on the users `instances` (B); generator draws the rankings. Returns its log row."""
    K = len(instances[0]["candidates"])
    labels = torch.tensor([inst["labels"] for inst in instances], dtype=torch.float32, device=model.device)  # [U, K]

    # 1) lines 1-3: one reasoning trace y_k ~ pi_theta(. | c_u, x_k) per candidate (Eq. 1), all users in one batch
    prompts = [self_check_prompts(tokenizer, inst) for inst in instances]  # U x K token-id lists
    flat = rollout(model, tokenizer, [prompt for user in prompts for prompt in user])
    traces = [flat[u * K:(u + 1) * K] for u in range(len(instances))]  # U x K

    # 2) line 4: s_k = f_phi(h_k) (Eq. 2), [U, K], with grad into phi only (theta's comes by the score path, phase 4)
    with torch.no_grad():
        hidden = torch.stack([forward(model, p, t)[2] for p, t in zip(prompts, traces)])  # [U, K, H]
    raw_scores = head(hidden)  # [U, K]
    scores = plackett_luce.standardized(raw_scores, PL_STD)  # departure 8 (PL_STD 0: the raw scores)

    # 3) lines 6-7: S rankings tau ~ PL(s) (Eq. 4), reward rho(tau) = NDCG@10 (Sec. 3.1)
    rankings = plackett_luce.sample(scores.detach(), NUM_RANKINGS, generator)  # [U, S, K], item indices, best first
    reward = ndcg_at_k(labels[:, None, :].expand_as(rankings).gather(-1, rankings), REWARD_K)  # [U, S]
    baseline = leave_one_out_baseline(reward) if BASELINE else None  # [U, S], departure 2

    # 4) lines 8 and 11: theta by clipped PPO on the tokens (Eq. 6) and the score path; lines 9 and 12: phi by Eq. 5
    user_advantage = batch_baseline_advantages(reward) if ADVANTAGE == "batch" else reward.mean(1)  # [U], departure 3
    advantages = user_advantage[:, None].expand(-1, K)  # [U, K]: every token of a user's K traces gets it
    score_grads = score_gradient(raw_scores, rankings, reward, baseline, PL_STD) if SCORE_PATH else None  # dV/ds, [U, K]
    ppo_stats = update_llm(model, optimizers["llm"], head, prompts, traces, advantages, score_grads)
    head_loss = update_head(optimizers["head"], scores, rankings, reward, baseline)  # after theta's: the score path read phi

    # 5) log
    return {"reward": reward.mean().item(), "ndcg@10_greedy": ndcg_from_scores(scores.detach(), labels, 10).mean().item(),
            "head_loss": head_loss, **ppo_stats, "response_len": sum(map(len, flat)) / len(flat)}


@torch.no_grad()
def validate(model, tokenizer, head, instances):
    """NDCG@10 of the ranking that sorts the head's scores of greedy traces (r2rank's valid_ndcg@10)."""
    prompts = [self_check_prompts(tokenizer, inst) for inst in instances]
    K = len(prompts[0])
    flat = rollout(model, tokenizer, [prompt for user in prompts for prompt in user], temperature=0.0)
    hidden = torch.stack([forward(model, p, flat[u * K:(u + 1) * K])[2] for u, p in enumerate(prompts)])  # [U, K, H]
    labels = torch.tensor([inst["labels"] for inst in instances], dtype=torch.float32)
    return ndcg_from_scores(head(hidden).cpu(), labels, 10).mean().item()


def main(steps=STEPS):
    import tempfile

    from machinery import datasets, models  # the run machinery: only to build the quickstart's set and the tiny model offline

    device = torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    if MODEL == "tiny":
        torch.set_num_threads(1)  # its operations are too small to share between threads
        model, tokenizer = models.build_tiny(seed=SEED)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model, tokenizer = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), AutoTokenizer.from_pretrained(MODEL)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # generate's left padding needs one
    model.to(device).eval()
    with tempfile.TemporaryDirectory() as folder:  # the quickstart's set, built afresh (about a second)
        datasets.build_synthetic(folder, seed=SEED, overwrite=True, pointwise=True, candidates=CANDIDATES)
        train, valid = data.load_split(folder, "train"), data.load_split(folder, "valid")[:EVAL_USERS]
    torch.manual_seed(SEED)  # the one seed: the head's initialization, then generate's draws
    head = ScoreHead(model.config.hidden_size, HEAD_WIDTH).to(device)
    optimizers = {"llm": torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0),
                  "head": torch.optim.AdamW(head.parameters(), lr=HEAD_LR, weight_decay=HEAD_WEIGHT_DECAY)}
    generator = torch.Generator(device).manual_seed(SEED)  # the rankings' and the step's users' draws
    print(f"{USERS_PER_STEP} users x {CANDIDATES} candidates = {USERS_PER_STEP * CANDIDATES} traces per step, "
          f"{NUM_RANKINGS} rankings per user; {len(train)} training users; {steps} steps on {device}")
    print(f"step {0:4d}  valid_ndcg@10 {validate(model, tokenizer, head, valid):.3f}")
    for step in range(1, steps + 1):
        started = time.time()
        users = torch.randperm(len(train), generator=generator, device=device)[:USERS_PER_STEP].tolist()
        row = rl_step(model, tokenizer, head, optimizers, [train[u] for u in users], generator)
        print(f"step {step:4d}  " + "  ".join(f"{name} {value:.3f}" for name, value in row.items())
              + f"  step_time {time.time() - started:.2f}s")
        if step % EVAL_EVERY == 0 or step == steps:
            print(f"step {step:4d}  valid_ndcg@10 {validate(model, tokenizer, head, valid):.3f}")


if __name__ == "__main__":
    main()
