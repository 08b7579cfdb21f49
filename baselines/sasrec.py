"""SASRec (Kang & McAuley, 2018), hand-written in torch: causal self-attention over a user's item
sequence; the output at the last position, dotted with each candidate's embedding, is its score.

    python baselines/sasrec.py --data data/ml100k --out runs/sasrec          # trains: runs/sasrec/sasrec.pt
    python r2rank.py --stage eval --data data/ml100k --methods sasrec,popularity --sasrec runs/sasrec/sasrec.pt

Trained on the training users' sequences (history, then positive) by next-item prediction, with the original paper's
loss (BCE against one random negative per position); the epoch with the best validation NDCG@10 on the protocol's
own 20 candidates is kept.

Where this departs from the SASRec paper (defaults are the paper's MovieLens-1M settings, but for the ones below):
1. Only the training users' sequences are learned from (the LLM methods see no other users);
   valid/test users' histories are read as input only.
2. Items that never occur in a training sequence have no embedding: in a history they are left out, as
   candidates they score below every known item (ties among them broken pessimistically, as for every method).
3. The sequence is the protocol's (at most --history 20 items, then the positive), so max length 21.
4. Model selection by validation NDCG@10 on the protocol's candidates, not on 100 sampled negatives.
"""
import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import runs  # noqa: E402
from metrics import ndcg_from_scores  # noqa: E402

FILES = ("sasrec.pt", "sasrec-log.json", "sasrec-state.pt")  # what a run writes into --out
DEFINING = ("dim", "blocks", "dropout", "lr", "seed", "data_fingerprint")  # what --resume must find unchanged
MAX_LEN, BATCH_SIZE, EVAL_EVERY = 21, 128, 5


class SASRec(nn.Module):
    """Item and position embeddings, `blocks` pre-norm causal self-attention blocks. Item 0 = padding."""

    def __init__(self, num_items, dim=50, blocks=2, heads=1, dropout=0.2, max_len=MAX_LEN):
        super().__init__()
        self.items, self.positions = nn.Embedding(num_items + 1, dim, padding_idx=0), nn.Embedding(max_len, dim)
        self.dropout, self.final_norm = nn.Dropout(dropout), nn.LayerNorm(dim)
        each = lambda make: nn.ModuleList(make() for _ in range(blocks))  # one per block
        self.attention_norms, self.ffn_norms = each(lambda: nn.LayerNorm(dim)), each(lambda: nn.LayerNorm(dim))
        self.attentions = each(lambda: nn.MultiheadAttention(dim, heads, dropout, batch_first=True))
        self.ffns = each(lambda: nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)))

    def forward(self, sequence):
        """sequence [B, T] item indices, left-padded with 0 -> [B, T, dim]; position t sees items <= t only."""
        T, device = sequence.shape[1], sequence.device
        x = self.items(sequence) * math.sqrt(self.items.embedding_dim) + self.positions(torch.arange(T, device=device))
        keep = (sequence != 0).unsqueeze(-1).float()  # [B, T, 1]
        x = self.dropout(x) * keep
        # blocked: a later key or a padding key (the original SASRec's masks); a padding query sees itself (no NaN row)
        blocked = torch.ones(T, T, dtype=torch.bool, device=device).triu(1) | (sequence == 0)[:, None, :]  # [B, T, T]
        blocked = (blocked & ~torch.eye(T, dtype=torch.bool, device=device)).repeat_interleave(self.attentions[0].num_heads, 0)
        for norm, attention, ffn_norm, ffn in zip(self.attention_norms, self.attentions, self.ffn_norms, self.ffns):
            x = x + attention(norm(x), x, x, attn_mask=blocked, need_weights=False)[0]  # pre-norm query, as in the paper's code
            x = (x + ffn(ffn_norm(x))) * keep
        return self.final_norm(x)

    def score(self, sequence, candidates):
        """[B, T] sequences, [B, K] candidate indices (0 = unknown item) -> [B, K] scores."""
        scores = (self.items(candidates) * self(sequence)[:, -1, None, :]).sum(-1)  # the last position . each candidate
        return scores.masked_fill(candidates == 0, -1e9)  # departure 2: unknown items last


def encode(items, index, max_len=MAX_LEN):
    """Item ids -> [max_len] left-padded indices of the known ones (the most recent max_len)."""
    known = [index[i] for i in items if i in index][-max_len:]
    return [0] * (max_len - len(known)) + known


@torch.no_grad()
def candidate_scores(model, instances, index):
    """[U, K] SASRec scores of each instance's candidates, from its history (eval mode)."""
    sequences = torch.tensor([encode([h["item_id"] for h in inst["history"]], index) for inst in instances])
    candidates = torch.tensor([[index.get(c["item_id"], 0) for c in inst["candidates"]] for inst in instances])
    return model.eval().score(sequences, candidates).float()


def train(args, train_instances, valid_instances, state_path, state):
    """(the weights with the best validation NDCG@10, item index, log); state_path gets the state at each check and on a stop."""
    full = [[h["item_id"] for h in inst["history"]] + [c["item_id"] for c, label in zip(inst["candidates"], inst["labels"]) if label]
            for inst in train_instances]  # each training user's sequence: history, then positive
    index = {item: i for i, item in enumerate(sorted({item for items in full for item in items}), 1)}  # 0: padding
    sequences = torch.tensor([encode(items, index, MAX_LEN + 1) for items in full])  # inputs [:, :-1], targets [:, 1:]
    torch.manual_seed(args.seed)
    model = SASRec(len(index), args.dim, args.blocks, dropout=args.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    labels = torch.tensor([inst["labels"] for inst in valid_instances], dtype=torch.float32)
    generator = torch.Generator().manual_seed(args.seed)
    if "model" in state:  # --resume
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout's
    for epoch in tqdm(range(state["epoch"] + 1, args.epochs + 1), initial=state["epoch"], total=args.epochs, desc="sasrec"):
        model.train()
        for batch in torch.randperm(len(sequences), generator=generator).split(BATCH_SIZE):
            inputs, targets = sequences[batch, :-1], sequences[batch, 1:]
            negatives = torch.randint(1, len(index) + 1, targets.shape, generator=generator)  # one per position
            logits = (model(inputs) * model.items(torch.stack([targets, negatives]))).sum(-1)  # [2, B, T]: positives, negatives
            mask = (targets != 0).float()
            loss = -((nn.functional.logsigmoid(logits[0]) + nn.functional.logsigmoid(-logits[1])) * mask).sum() / mask.sum()  # BCE
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if check := epoch % EVAL_EVERY == 0 or epoch == args.epochs:
            ndcg = ndcg_from_scores(candidate_scores(model, valid_instances, index), labels, 10).mean().item()
            state["log"].append({"epoch": epoch, "loss": loss.item(), "valid_ndcg@10": ndcg})
            if ndcg > state["best"]:
                state.update(best=ndcg, best_state={k: v.clone() for k, v in model.state_dict().items()})
        if (stop := runs.stop_signal()) or check:
            write_whole(state_path, {**state, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "torch_rng": torch.get_rng_state()})
        if stop:
            runs.say(f"stopped by {signal.Signals(stop).name}: {epochs_text(epoch)} kept in {state_path}; continue with --resume")
            sys.exit(128 + stop)
    return state["best_state"], index, state["log"]


def epochs_text(last):
    return "epoch 1" if last == 1 else f"epochs 1-{last}"


def write_whole(path, obj):
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as error:  # a full disk, a file-size limit; torch.save may raise RuntimeError
        Path(path + ".tmp").unlink(missing_ok=True)
        kept = f"the earlier {os.path.basename(path)} is kept" if os.path.exists(path) else "nothing is kept"
        raise data.UsageError(f"saving {path} failed ({getattr(error, 'strerror', None) or runs.first_line(error)}); {kept}") from None


def load(path, instances, where):
    """(model, item index) of a sasrec.pt for the candidates of instances (read from where), or one line why not."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # missing, a JSON or text file (sasrec-log.json, say), a damaged file
        saved = None
    if not (isinstance(saved, dict) and {"state", "index", "settings"} <= saved.keys()):
        raise data.DataError(f"--sasrec {path}: not a model of baselines/sasrec.py (the file it writes is OUT/sasrec.pt); "
                             "train one with python baselines/sasrec.py --data DIR --out OUT")
    model = SASRec(len(saved["index"]), saved["settings"]["dim"], saved["settings"]["blocks"], dropout=saved["settings"]["dropout"])
    model.load_state_dict(saved["state"])
    candidates = [c["item_id"] for inst in instances for c in inst["candidates"]]
    known, total = sum(item in saved["index"] for item in candidates), len(candidates)
    if known == 0:
        raise data.DataError(f"--sasrec {path}: knows none of the {total} candidates of {where} (trained on another data set?)")
    if known < total:
        print(f"note: SASRec knows {known} of the {total} candidates ({known / total:.0%}); the others rank last")
    return model.eval(), saved["index"]


def plan_out(args, settings, path):
    """The training state to start from, or one line why --out cannot take this run (--resume, --overwrite)."""
    if args.resume and args.overwrite:
        raise data.UsageError("--resume continues the model in --out and --overwrite replaces it: pass one of them")
    found = [name for name in FILES if os.path.lexists(os.path.join(args.out, name))]
    if foreign := [name for name in found if os.path.islink(file := os.path.join(args.out, name)) or not os.path.isfile(file)]:
        raise data.DataError(f"--out {args.out}: {foreign[0]} is not a file this script wrote; --overwrite replaces only "
                             f"{', '.join(FILES)}, so move it or choose another --out")
    if found and not (args.resume or args.overwrite):
        raise data.DataError(f"{args.out}: holds another model ({', '.join(found)}); pass --resume to continue it, "
                             "--overwrite to replace it, or another --out")
    for name in found if args.overwrite else []:  # a stale state must not be resumed later
        os.remove(os.path.join(args.out, name))
    if args.resume and not os.path.isfile(path):
        print(f"--resume: no sasrec-state.pt in {args.out}, so training starts at epoch 0")
    if not args.resume or not os.path.isfile(path):
        return {"epoch": 0, "best": -1.0, "best_state": None, "log": [], "settings": settings}
    state = torch.load(path, weights_only=True)
    differ = ["the data (train/valid.jsonl differ from the state's)" if n == "data_fingerprint" else
              f"--{n} {state['settings'].get(n)!r} -> {settings[n]!r}" for n in DEFINING if state["settings"].get(n) != settings[n]]
    if differ:
        raise data.DataError(f"{path}: --resume needs every setting but --epochs unchanged; these differ: " + "; ".join(differ))
    if state["epoch"] > args.epochs:
        raise data.DataError(f"{path}: already past --epochs {args.epochs} (at epoch {state['epoch']}); raise it to train further")
    print(f"resumed from {path} at epoch {state['epoch']}")
    return {**state, "settings": settings}


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data", required=True, help="dataset directory written by data.py")
    add("--out", required=True, help="output folder: sasrec.pt, sasrec-log.json, sasrec-state.pt (the training state)")
    add("--resume", action="store_true", help="continue from <out>/sasrec-state.pt (every setting but --epochs unchanged)")
    add("--overwrite", action="store_true", help="replace the model in --out (without it, or --resume, it is refused)")
    add("--epochs", type=int, default=200, help="passes over the training sequences")
    add("--dim", type=int, default=50, help="embedding and hidden width")
    add("--blocks", type=int, default=2, help="self-attention blocks")
    add("--dropout", type=float, default=0.2, help="dropout rate")
    add("--lr", type=float, default=1e-3, help="Adam learning rate")
    add("--seed", type=int, default=0, help="initialization, batches and negatives")
    args = parser.parse_args(argv)
    for ok, problem in [(min(args.epochs, args.dim, args.blocks) >= 1 and 0 <= args.dropout < 1,  # NaN fails too
                         "--epochs, --dim and --blocks must be >= 1, --dropout in [0, 1)"),
                        (0 < args.lr <= 1, f"--lr must be in (0, 1], got {args.lr:g}"),
                        (0 <= args.seed < 2 ** 32, f"--seed must be in [0, {2 ** 32 - 1}], got {args.seed}")]:
        if not ok:
            parser.error(problem)
    state_path = os.path.join(args.out, "sasrec-state.pt")
    try:
        runs.claim(args.out)  # one run per --out at a time
        runs.catch_signals()  # Ctrl-C / SIGTERM: the epoch in progress finishes, is saved, and the run stops
        train_instances, valid = data.load_split(args.data, "train"), data.load_split(args.data, "valid")
        settings = {**vars(args), "data_fingerprint": runs.data_fingerprint(args.data)}
        best_state, index, log = train(args, train_instances, valid, state_path, plan_out(args, settings, state_path))
        write_whole(os.path.join(args.out, "sasrec.pt"), {"state": best_state, "index": index, "settings": settings, "log": log})
        Path(args.out, "sasrec-log.json").write_text(json.dumps(log, indent=1))
    except data.UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # a second Ctrl-C
        runs.say("interrupted: " + (f"kept {state_path}; --resume continues from it" if os.path.isfile(state_path) else "nothing kept"))
        sys.exit(130)
    best = max(log, key=lambda row: row["valid_ndcg@10"])
    print(f"{len(index)} items; best validation NDCG@10 {best['valid_ndcg@10']:.3f} at epoch {best['epoch']}; wrote {args.out}/sasrec.pt")


if __name__ == "__main__":
    main()
