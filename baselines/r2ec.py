"""An R2ec-style dual-head recommender (You et al., 2025, "R2ec: Towards Large Recommender Models with
Reasoning"): the LLM reasons once per user, from the history alone; a recommendation head turns the
trace's final hidden state into a score for every candidate at once. Trained by RecPO.

    python baselines/r2ec.py --data data/ml100k --model M --out runs/r2ec          # trains
    python r2rank.py --stage eval --data data/ml100k --model runs/r2ec/checkpoint-40 --methods r2ec

Scores: s_k = <W LN(h), LN(e_k)> / sqrt(H) (RecHead), h the hidden state at the trace's last token, e_k candidate
k's item embedding, LN a LayerNorm without weights, W an H x H matrix (identity at the start). Item embeddings: the
backbone's last hidden state at the last token of the item's line (data.candidate_text), computed once by the
starting LLM for every item of the data set and kept fixed (item_embeddings), saved in the head's state dict.
A learned table would have nothing for the items only test users meet; the text always exists.

One RecPO step (train):
    1) rollout: G traces per user from the user prompt, every user's in one r2rank.rollout call
    2) scores of the K candidates from each trace's final hidden state
    3) fused reward per trace: NDCG@10 of its ranking + beta x softmax(scores)[positive] (fused_reward)
    4) head: cross-entropy of the positive among the K candidates, on the best trace of each user only;
       LLM: GRPO advantages within the user's G traces (ppo.grpo_advantages), R2Rank's clipped token loss
    5) log, checkpoint (baselines/reczero.py's end of a step, flags and LLM setup)

Where this departs from R2ec:
1. The head is trained on the detached hidden state: its loss does not reach the LLM (R2ec trains the
   backbone through both heads).
2. The item embeddings come from the starting LLM and stay fixed; R2ec's come from the trained one.
3. Ranking reward and head loss use the protocol's K candidates (a softmax over 20), not the whole item set.
4. No KL penalty to a reference model; theta_old and the per-token mean as in R2Rank (ppo.py).
5. Eval scores one greedy trace per user; training reads sampled ones (the best of G for the head).
6. --eval-every: NDCG@10 on validation users during training, ranked as at eval (rank), like R2Rank's.
"""
import math
import os
import sys
import time

import torch
from safetensors.torch import load_file
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import r2rank  # noqa: E402
import runs  # noqa: E402
from baselines.reczero import autocast, end_step, load_policy, parse_rl, rl_parser, start_logging, truncated  # noqa: E402
from metrics import ndcg_from_scores  # noqa: E402
from ppo import grpo_advantages  # noqa: E402

SYSTEM = "You are a recommendation assistant."
USER_INSTRUCTIONS = ("Think about this user from the user context below: what they like, what they avoid, and "
                     "what kind of item they are likely to choose next. Reason step by step in a few sentences.")
BETA = 0.05  # the similarity term's weight in the fused reward (R2ec's value)


def user_prompt(tokenizer, instance, max_history=20, max_item_chars=200):
    """The chat prompt asking for reasoning about the user, as r2rank.rollout takes it: (ids but the last, [the last])."""
    context = data.user_context_text(instance, max_history, max_item_chars)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{USER_INSTRUCTIONS}\n\nUSER CONTEXT\n{context}"}]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    return ids[:-1], [ids[-1:]]


class RecHead(torch.nn.Module):
    """The recommendation head: [..., H] hidden states and [..., K, H] item embeddings -> [..., K] scores. embeddings
    ({item_id: [H]}) ride as buffers (item_vectors [N, H], item_ids [N, bytes] utf-8, 0-padded); load reads them back."""

    def __init__(self, hidden_size, embeddings=None):
        super().__init__()
        self.project = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        torch.nn.init.eye_(self.project.weight)  # at the start: the plain similarity of trace and item
        names = [item_id.encode() for item_id in embeddings or {}]
        width = max(map(len, names), default=0)
        self.register_buffer("item_vectors", torch.stack(list(embeddings.values())) if names else torch.zeros(0, hidden_size))
        self.register_buffer("item_ids", torch.tensor([list(n.ljust(width, b"\0")) for n in names], dtype=torch.uint8).view(len(names), width))

    def forward(self, hidden, items):
        norm = lambda x: torch.nn.functional.layer_norm(x.float(), x.shape[-1:])
        user = self.project(norm(hidden))  # [..., H]
        return (norm(items) * user[..., None, :]).sum(-1) / math.sqrt(hidden.shape[-1])


def fused_reward(scores, labels, beta=BETA, k=10):
    """RecPO's reward of each trace: NDCG@k of the ranking by its scores (ties pessimistic) plus beta x
    the softmax probability of the positive among the candidates. scores [..., G, K], labels [..., K] -> [..., G]."""
    labels = labels.unsqueeze(-2).expand_as(scores)
    ndcg = ndcg_from_scores(scores.detach().cpu(), labels.cpu(), k).to(scores.device)
    similarity = (scores.detach().softmax(-1) * (labels == labels.max(-1, keepdim=True).values)).sum(-1)
    return ndcg + beta * similarity


def best_trace_loss(scores, labels, reward):
    """The head's loss: cross-entropy of the positive among the K candidates under the scores of each user's trace
    with the highest reward (the first on ties), mean over users. scores [..., G, K], labels [..., K], reward [..., G]."""
    best = reward.argmax(-1)[..., None, None].expand(*reward.shape[:-1], 1, scores.shape[-1])
    best_scores = scores.gather(-2, best).squeeze(-2)  # [..., K]
    return torch.nn.functional.cross_entropy(best_scores.reshape(-1, scores.shape[-1]), labels.argmax(-1).reshape(-1))


@torch.no_grad()
def item_embeddings(model, tokenizer, items, max_item_chars=200, batch=32):
    """{item_id: [H] fp32 on the CPU}: the last-layer hidden state (after the final norm) at the last
    token of each item's line. items: {item_id: item dict with title and text}."""
    decoder, device, ids, out = model.get_decoder(), model.device, list(items), {}
    for start in tqdm(range(0, len(ids), batch), desc="item embeddings", dynamic_ncols=True, disable=None, leave=False):
        chunk = ids[start:start + batch]
        rows = [tokenizer(data.candidate_text(items[i], max_item_chars), add_special_tokens=False)["input_ids"] or
                [tokenizer.eos_token_id] for i in chunk]
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(rows), device=device), mask.sum(1) - 1]  # right padding: the last real token
        out.update({i: vector.float().cpu() for i, vector in zip(chunk, last)})
    return out


def dataset_items(data_dir):
    """{item_id: item} over every history item and candidate of the data set's three splits."""
    return {item["item_id"]: item for split in data.SPLITS for inst in data.load_split(data_dir, split, allow_empty=True)
            for item in inst["history"] + inst["candidates"]}


def candidate_matrix(embeddings, instances, device):
    """[U, 1, K, H]: the candidates' embeddings of each user, to score against its G traces."""
    return torch.stack([torch.stack([embeddings[c["item_id"]] for c in inst["candidates"]]) for inst in instances])[:, None].to(device)


@torch.no_grad()
def rank(model, tokenizer, head, embeddings, instances, max_history, max_item_chars, max_new_tokens, desc="r2ec"):
    """([U, K] scores, info): one greedy trace per user, its final hidden state through the head.
    Candidates missing from `embeddings` are embedded by `model` first (info counts them)."""
    missing = {c["item_id"]: c for inst in instances for c in inst["candidates"] if c["item_id"] not in embeddings}
    embeddings = {**embeddings, **item_embeddings(model, tokenizer, missing, max_item_chars)} if missing else embeddings
    stops, scores, cut = model.generation_config.eos_token_id, [], 0
    for start in tqdm(range(0, len(instances), r2rank.ROLLOUT_ROWS), desc=desc, dynamic_ncols=True, disable=None, leave=False):
        chunk = instances[start:start + r2rank.ROLLOUT_ROWS]
        traces, hidden = r2rank.rollout(model, tokenizer, [user_prompt(tokenizer, inst, max_history, max_item_chars) for inst in chunk],
                                        max_new_tokens, 0.0)
        scores.append(head(hidden[:, None], candidate_matrix(embeddings, chunk, hidden.device))[:, 0].float().cpu())
        cut += sum(truncated(trace, max_new_tokens, stops) for trace in traces)
    return torch.cat(scores), {"truncated_share": cut / max(len(instances), 1), "items_embedded_at_eval": len(missing)}


def load(path, hidden_size, device):
    """(RecHead, {item_id: embedding}) of checkpoint folder path (its head.safetensors)."""
    file = os.path.join(path, "head.safetensors")
    state = load_file(file) if os.path.isfile(file) else {}
    if "item_ids" not in state:
        raise data.UsageError(f"--model {path}: not a checkpoint of baselines/r2ec.py (no head.safetensors with item embeddings)")
    embeddings = {bytes(row).rstrip(b"\0").decode(): vector for row, vector in zip(state["item_ids"].tolist(), state["item_vectors"])}
    head = RecHead(hidden_size, embeddings).to(device)
    head.load_state_dict(state)
    return head.eval(), embeddings


def train(args):
    """The RecPO loop; writes <out>/metrics.jsonl and <out>/checkpoint-<step>/ (a --model for eval)."""
    run = runs.start_run(args, "r2ec")  # --out held, the data, the checkpoint to resume from (runs.py)
    instances = data.load_split(run.data_dir, "train")
    model, tokenizer, optimizers = load_policy(args, run, instances)
    if run.checkpoint:  # the item embeddings stay those of the starting LLM
        head, embeddings = load(run.checkpoint, model.config.hidden_size, run.device)
    else:
        with autocast(run):
            embeddings = item_embeddings(model, tokenizer, dataset_items(run.data_dir), args.max_item_chars)
        head = RecHead(model.config.hidden_size, embeddings).to(run.device)
    optimizers["head"] = torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=0.0)
    runs.restore_optimizers({"head": optimizers["head"]}, run.checkpoint, {"head": args.head_lr})
    U, G = args.users_per_step, args.group
    print(f"{U} users x {G} traces = {U * G} traces per step (<= {args.max_new_tokens} tokens each); {len(embeddings)} "
          f"item embeddings; {len(instances)} training users; {run.device}, {run.dtype} compute")
    metrics, bar, validate = start_logging(args, run, "r2ec", lambda valid: rank(
        model, tokenizer, head, embeddings, valid, args.max_history, args.max_item_chars, args.max_new_tokens, "valid")[0])
    for step in bar:
        started, seed = time.time(), args.seed * 1_000_003 + step
        batch = [instances[u] for u in torch.randperm(len(instances), generator=torch.Generator().manual_seed(seed))[:U].tolist()]
        labels = r2rank.labels_of(batch).to(run.device)  # [U, K]

        # 1) rollout: G traces per user, every user's in one generate call
        prompts = [(prefix, suffixes * G) for prefix, suffixes in
                   (user_prompt(tokenizer, inst, args.max_history, args.max_item_chars) for inst in batch)]
        torch.manual_seed(seed)  # the traces' draws: a resume repeats them
        with autocast(run):
            flat, hidden = r2rank.rollout(model, tokenizer, prompts, args.max_new_tokens, args.temperature)
        traces = [flat[u * G:(u + 1) * G] for u in range(U)]

        # 2) scores of the K candidates from each trace's final hidden state, [U, G, K], into the head only
        scores = head(hidden.view(U, G, -1), candidate_matrix(embeddings, batch, run.device))

        # 3) fused reward, [U, G]
        reward = fused_reward(scores, labels, args.beta)

        # 4) the head on each user's best trace; the LLM by clipped PPO with group advantages
        head_loss = best_trace_loss(scores, labels, reward)
        head_loss.backward()
        optimizers["head"].step()
        optimizers["head"].zero_grad(set_to_none=True)
        advantages = grpo_advantages(reward)
        stats = r2rank.ppo_update(model, optimizers["llm"], prompts, traces, advantages, args, dtype=run.dtype)

        # 5) log, checkpoint
        row = {"step": step + 1, "reward": reward.mean().item(), "best_reward": reward.max(-1).values.mean().item(),
               "head_loss": head_loss.item(), "advantage_nonzero": (advantages != 0).float().mean().item(),
               "truncated_share": sum(truncated(t, args.max_new_tokens, model.generation_config.eos_token_id) for t in flat) / len(flat),
               "response_len": sum(map(len, flat)) / len(flat), **stats}
        end_step(args, run, row, started, validate, metrics, bar, model, tokenizer, head, optimizers)
    print(f"wrote {os.path.join(args.out, 'metrics.jsonl')} and {os.path.join(args.out, f'checkpoint-{args.max_steps}')}")


def main(argv=None):
    p = rl_parser(__doc__, users=4, group=4)
    p.add_argument("--head-lr", type=float, default=1e-3, help="recommendation-head learning rate (AdamW)")
    p.add_argument("--beta", type=float, default=BETA, help="weight of the similarity term in the fused reward")
    r2rank.run_stage(train, parse_rl(p, argv, "r2ec"))


if __name__ == "__main__":
    main()
