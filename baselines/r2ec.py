"""An R2ec-style dual-head recommender (You et al., 2025, "R2ec: Towards Large Recommender Models with
Reasoning"): the LLM reasons once per user, from the history alone; a recommendation head turns the
trace's final hidden state into a score for every candidate at once. Trained by RecPO.

    python baselines/r2ec.py --data data/ml100k --model M --out runs/r2ec          # trains
    python r2rank.py --stage eval --data data/ml100k --model runs/r2ec/checkpoint-40 --methods r2ec \\
        --max-new-tokens 64                                      # the training's trace budget

Scores: s_k = <W LN(h), LN(e_k)> / sqrt(H) (RecHead), h the hidden state at the trace's last token,
e_k candidate k's item embedding, LN a LayerNorm without weights, W an H x H matrix (identity at
the start). Item embeddings: the backbone's last hidden state at the last token of the item's line
("title - text", data.candidate_text), computed once by the starting LLM for every item of the
dataset and kept fixed (item_embeddings). A learned table would have nothing for the items that
only test users meet; the item text always exists.

One RecPO step (train):
    1) rollout: G traces per user from the user prompt (its prefix shared)
    2) scores of the K candidates from each trace's final hidden state
    3) fused reward per trace: NDCG@10 of its ranking + beta x softmax(scores)[positive] (fused_reward)
    4) LLM: GRPO advantages within the user's G traces (ppo.grpo_advantages), R2Rank's clipped token loss
    5) head: cross-entropy of the positive among the K candidates, on the best trace of each user only

Where this departs from R2ec:
1. The head is trained on the detached hidden state: its loss does not reach the LLM (R2ec trains the
   backbone through both heads), as R2Rank's head (departure 7 in r2rank.py).
2. The item embeddings come from the starting LLM and stay fixed; R2ec's come from the trained one.
3. Ranking reward and head loss use the protocol's K candidates (a softmax over 20), not the whole
   item set.
4. No KL penalty to a reference model; theta_old and the per-token mean as in R2Rank (ppo.py).
5. Eval scores one greedy trace per user; training reads sampled ones (the best of G for the head).
6. --eval-every: NDCG@10 on validation users during training, ranked as at eval (rank), like R2Rank's.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from protocol import UsageError  # noqa: E402
import rollout  # noqa: E402
from baselines.reczero import add_rl_arguments, check_rl_arguments, log_start, resume_optimizers, save, validation, with_dtype  # noqa: E402
from metrics import ndcg_from_scores  # noqa: E402
from ppo import grpo_advantages  # noqa: E402
from machinery import models, runs, stops  # noqa: E402

SYSTEM = "You are a recommendation assistant."
USER_INSTRUCTIONS = ("Think about this user from the user context below: what they like, what they avoid, and "
                     "what kind of item they are likely to choose next. Reason step by step in a few sentences.")
BETA = 0.05  # the similarity term's weight in the fused reward (R2ec's value)
FILES = ("r2ec-head.safetensors", "item-embeddings.pt")  # a checkpoint's files beside reczero.save's


def user_prompt(tokenizer, instance, max_history=20, max_item_chars=200):
    """Token ids of the chat prompt that asks for reasoning about the user, assistant turn opened."""
    context = data.user_context_text(instance, max_history, max_item_chars)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{USER_INSTRUCTIONS}\n\nUSER CONTEXT\n{context}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class RecHead(torch.nn.Module):
    """The recommendation head: [..., H] hidden states and [..., K, H] item embeddings -> [..., K] scores."""

    def __init__(self, hidden_size):
        super().__init__()
        self.project = torch.nn.Linear(hidden_size, hidden_size, bias=False)
        torch.nn.init.eye_(self.project.weight)  # at the start: the plain similarity of trace and item

    def forward(self, hidden, items):
        norm = lambda x: torch.nn.functional.layer_norm(x.float(), x.shape[-1:])
        user = self.project(norm(hidden))  # [..., H]
        return (norm(items) * user[..., None, :]).sum(-1) / math.sqrt(hidden.shape[-1])


def fused_reward(scores, labels, beta=BETA, k=10):
    """RecPO's reward of each trace: NDCG@k of the ranking by its scores (ties pessimistic) plus beta x
    the softmax probability of the positive among the candidates. scores [G, K], labels [K] -> [G]."""
    labels = labels.expand_as(scores)
    ndcg = ndcg_from_scores(scores.detach().cpu(), labels.cpu(), k).to(scores.device)
    similarity = (scores.detach().softmax(-1) * (labels == labels.max(-1, keepdim=True).values)).sum(-1)
    return ndcg + beta * similarity


def best_trace_loss(scores, labels, reward):
    """The head's loss for one user: cross-entropy of its positive among the K candidates under the
    scores of the trace with the highest reward (the first one on ties). scores [G, K], labels [K], reward [G]."""
    best = int(reward.argmax())
    return torch.nn.functional.cross_entropy(scores[best:best + 1], labels.argmax()[None])


@torch.no_grad()
def item_embeddings(model, tokenizer, items, max_item_chars=200, batch=32):
    """{item_id: [H] fp32 on the CPU}: the last-layer hidden state (after the final norm) at the last
    token of each item's line. items: {item_id: item dict with title and text}."""
    decoder, device = model.get_decoder(), model.get_output_embeddings().weight.device
    ids, out = list(items), {}
    for start in tqdm(range(0, len(ids), batch), desc="item embeddings", dynamic_ncols=True):
        chunk = ids[start:start + batch]
        rows = [tokenizer(data.candidate_text(items[i], max_item_chars), add_special_tokens=False)["input_ids"] or
                [tokenizer.eos_token_id] for i in chunk]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for r, row in enumerate(rows):
            input_ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row, device=device), 1
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(rows), device=device), mask.sum(1) - 1]  # right padding: the last real token
        out.update({i: vector.float().cpu() for i, vector in zip(chunk, last)})
    return out


def dataset_items(data_dir):
    """{item_id: item} over every history item and candidate of the dataset's three splits."""
    items = {}
    for split in data.SPLITS:
        for inst in data.load_split(data_dir, split, allow_empty=True):
            items.update((item["item_id"], item) for item in inst["history"] + inst["candidates"])
    return items


def candidate_matrix(embeddings, instance, device):
    return torch.stack([embeddings[c["item_id"]] for c in instance["candidates"]]).to(device)  # [K, H]


@torch.no_grad()
def rank(model, tokenizer, head, embeddings, instances, max_history, max_item_chars, max_new_tokens, desc="r2ec", progress=True):
    """([U, K] scores, info): one greedy trace per user, its final hidden state through the head.
    Candidates missing from `embeddings` are embedded by `model` first (info counts them)."""
    device = model.get_output_embeddings().weight.device
    missing = {c["item_id"]: c for inst in instances for c in inst["candidates"] if c["item_id"] not in embeddings}
    embeddings = {**embeddings, **item_embeddings(model, tokenizer, missing, max_item_chars)} if missing else embeddings
    scores, cut = [], 0
    for instance in tqdm(instances, desc=desc, dynamic_ncols=True, disable=not progress):
        prompt = user_prompt(tokenizer, instance, max_history, max_item_chars)
        sample = rollout.sample_traces(model, tokenizer, prompt[:-1], [prompt[-1:]], max_new_tokens, temperature=0.0)
        scores.append(head(sample.final_hidden[0], candidate_matrix(embeddings, instance, device)).cpu())
        cut += int(not sample.finished[0])
    return torch.stack(scores), {"truncated_share": cut / max(len(instances), 1), "items_embedded_at_eval": len(missing)}


def has_head(path):
    return os.path.isfile(os.path.join(path, "r2ec-head.safetensors"))


def load(path, hidden_size, device):
    """(RecHead, {item_id: embedding}) saved in checkpoint directory `path`."""
    head = RecHead(hidden_size).to(device)
    head.load_state_dict(load_file(os.path.join(path, "r2ec-head.safetensors")))
    return head.eval(), torch.load(os.path.join(path, "item-embeddings.pt"), weights_only=True)


def train(args):
    """The RecPO loop; writes <out>/metrics.jsonl and <out>/checkpoint-<step>/ (a --model for eval)."""
    device = models.pick_device(args.device)
    dtype = models.pick_dtype(args.dtype, device)
    instances = data.load_split(args.data, "train")
    if args.users_per_step > len(instances):
        raise data.DataError(f"--users-per-step {args.users_per_step} is more than the {len(instances)} training users")
    plan = runs.plan_command(vars(args), args.data, args.max_steps, record="r2ec.json", extra=FILES)  # the main CLI's --out rules
    if plan.start_step == args.max_steps:
        print(f"{plan.checkpoint} is at --max-steps {args.max_steps} already: nothing to train (raise --max-steps to go on)")
        return None
    model, tokenizer = models.load_policy(plan.checkpoint or args.model, device, torch.float32, args.seed)  # fp32 master weights
    model.eval()
    torch.manual_seed(args.seed)
    if plan.checkpoint:  # the item embeddings stay those of the starting LLM
        head, embeddings = load(plan.checkpoint, model.config.hidden_size, device)
    else:
        with models.mixed_precision(device, dtype):
            embeddings = item_embeddings(model, tokenizer, dataset_items(args.data), args.max_item_chars)
        head = RecHead(model.config.hidden_size).to(device)
    head.train()
    optimizers = {"llm": torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
                  "head": torch.optim.AdamW(head.parameters(), lr=args.head_lr, weight_decay=0.0)}
    resume_optimizers(plan, optimizers, device, {"llm": args.lr, "head": args.head_lr})
    print(f"{args.users_per_step} users x {args.group} traces = {args.users_per_step * args.group} traces per step "
          f"(<= {args.max_new_tokens} tokens each); {len(embeddings)} item embeddings; {len(instances)} training users; "
          f"device {device}, {dtype}")
    runs.start(args.out, plan)  # the first write into --out: --overwrite clears, a resume cuts metrics.jsonl back
    run_started, row, saved = time.time(), None, plan.start_step
    validate = validation(args, lambda instances: with_dtype(device, dtype, rank, model, tokenizer, head, embeddings, instances,
                                                             args.max_history, args.max_item_chars, args.max_new_tokens, "valid", False)[0])

    def keep(done):
        """Save the finished steps 1..done unless they are saved already; what is kept, in words."""
        nonlocal saved
        if done > saved:
            save(args, done, model, tokenizer, optimizers, plan, "r2ec.json", lambda directory: save_head(directory, head, embeddings),
                 FILES)
            saved = done
        return runs.kept_text(args.out, done)

    with open(os.path.join(args.out, "metrics.jsonl"), "a") as metrics, stops.StopOnSignal(plan.checkpoint or "nothing") as stop:
        log_start(metrics, plan, validate)
        for step in tqdm(range(plan.start_step + 1, args.max_steps + 1), initial=plan.start_step, total=args.max_steps,
                         desc="r2ec", dynamic_ncols=True):
            started = time.time()
            generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
            users = torch.randperm(len(instances), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + step))
            prompts, traces, advantages, rewards, head_losses = [], [], [], [], []
            try:  # a signal during the rollout drops this step (nothing of it has changed the model) and keeps the others
                with stop.abandonable():
                    for user in users[:args.users_per_step].tolist():
                        instance = instances[user]
                        labels = torch.tensor(instance["labels"], dtype=torch.float32, device=device)
                        # 1) G traces per user, 2) the candidates' scores from each trace's final hidden state
                        prompt = user_prompt(tokenizer, instance, args.max_history, args.max_item_chars)
                        prompts.append((prompt[:-1], [prompt[-1:]] * args.group))
                        with models.mixed_precision(device, dtype):
                            traces.append(rollout.sample_traces(model, tokenizer, *prompts[-1], args.max_new_tokens,
                                                                 args.temperature, 1.0, generator))
                        scores = head(traces[-1].final_hidden, candidate_matrix(embeddings, instance, device))  # [G, K]
                        # 3) fused reward, 4) group advantages for the tokens, 5) the head on the best trace
                        reward = fused_reward(scores, labels, args.beta)
                        rewards.append(reward)
                        advantages.append(grpo_advantages(reward))
                        head_losses.append(best_trace_loss(scores, labels, reward))
            except stops.Abandoned:
                raise stop.exit(f"step {step} was still rolling out and is dropped; " + keep(step - 1)) from None
            head_loss = torch.stack(head_losses).mean()
            head_loss.backward()
            optimizers["head"].step()
            optimizers["head"].zero_grad(set_to_none=True)
            # autocast inside, around each forward only: its optimizer steps must see no cached bf16 weights
            stats = rollout.ppo_update(model, optimizers["llm"], prompts, traces, advantages, args, shared_prefix=True, dtype=dtype)
            reward = torch.stack(rewards)
            row = {"step": step, "reward": reward.mean().item(), "best_reward": reward.max(-1).values.mean().item(),
                   "head_loss": head_loss.item(), "advantage_nonzero": (torch.stack(advantages) != 0).float().mean().item(),
                   "truncated_share": (~torch.cat([s.finished for s in traces])).float().mean().item(),
                   "response_len": torch.cat([s.lengths for s in traces]).float().mean().item(),
                   "clip_frac": stats["clip_frac"], "approx_kl": stats["approx_kl"]}
            if problem := runs.non_finite(row, optimizers):  # nothing of this step is written
                raise UsageError(f"step {step}: {problem}, so the run stops without writing this step; lower --lr / --head-lr")
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


def save_head(directory, head, embeddings):
    """A checkpoint's R2ec part, beside the LLM that reczero.save writes: r2ec-head.safetensors, item-embeddings.pt."""
    save_file(head.state_dict(), os.path.join(directory, "r2ec-head.safetensors"))
    torch.save(embeddings, os.path.join(directory, "item-embeddings.pt"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_rl_arguments(parser, users=4, group=4)
    parser.add_argument("--head-lr", type=float, default=1e-3, help="recommendation-head learning rate (AdamW)")
    parser.add_argument("--beta", type=float, default=BETA, help="weight of the similarity term in the fused reward")
    args = parser.parse_args(argv)
    check_rl_arguments(parser, args)
    if args.head_lr < 0 or args.beta < 0:
        parser.error("--head-lr and --beta must be >= 0")
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
    print(f"step {last['step']}: reward {last['reward']:.3f}, head loss {last['head_loss']:.3f}; "
          f"wrote {args.out}/checkpoint-{last['step']}")


if __name__ == "__main__":
    main()
