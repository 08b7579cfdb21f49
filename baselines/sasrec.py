"""SASRec (Kang & McAuley, 2018), hand-written in torch: causal self-attention over a user's item
sequence; the output at the last position, dotted with each candidate's embedding, is its score.

    python baselines/sasrec.py --data data/ml100k --out runs/sasrec          # trains: runs/sasrec/sasrec.pt
    python r2rank.py --stage eval --data data/ml100k --methods sasrec,popularity --sasrec runs/sasrec/sasrec.pt

Trained on the training users' sequences (history, then positive) by next-item prediction, with the
original paper's loss (binary cross-entropy against one random negative per position); the epoch
with the best validation NDCG@10 on the protocol's own 20 candidates is kept.

Where this departs from the SASRec paper (defaults are the paper's MovieLens-1M settings, but for
the ones below):
1. Only the training users' sequences are learned from (the LLM methods see no other users);
   valid/test users' histories are read as input only.
2. Items that never occur in a training sequence have no embedding: in a history they are left out,
   as candidates they score below every known item (ties among them broken pessimistically, as for
   every method).
3. The sequence is the protocol's (at most --history 20 items, then the positive), so max length 21.
4. Model selection by validation NDCG@10 on the protocol's candidates, not on 100 sampled negatives.
"""
import argparse
import contextlib
import json
import math
import os
import pickle
import signal
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import runs  # noqa: E402
from data import UsageError  # noqa: E402
from metrics import ndcg_from_scores  # noqa: E402

FILES = ("sasrec.pt", "sasrec-log.json", "sasrec-state.pt")  # what a run writes into --out

MAX_LEN = 21


def padding_mask(sequence):
    """[B, T] left-padded item indices -> [B, T, T] True where query t may not attend to key j: a later
    position (causality) or a padding key, as the original SASRec masks them. A padding query attends to
    itself only (an all-blocked row would be NaN); its output is zeroed anyway."""
    T = sequence.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=sequence.device).triu(1)
    blocked = causal | (sequence == 0)[:, None, :]  # [B, T, T]
    return blocked & ~torch.eye(T, dtype=torch.bool, device=sequence.device)


class SASRec(torch.nn.Module):
    """Item and position embeddings, `blocks` pre-norm causal self-attention blocks. Item 0 = padding."""

    def __init__(self, num_items, dim=50, blocks=2, heads=1, dropout=0.2, max_len=MAX_LEN):
        super().__init__()
        self.items = torch.nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.positions = torch.nn.Embedding(max_len, dim)
        self.dropout = torch.nn.Dropout(dropout)
        self.attention_norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(blocks))
        self.attentions = torch.nn.ModuleList(torch.nn.MultiheadAttention(dim, heads, dropout, batch_first=True)
                                              for _ in range(blocks))
        self.ffn_norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(blocks))
        self.ffns = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                                            torch.nn.Linear(dim, dim), torch.nn.Dropout(dropout))
                                        for _ in range(blocks))
        self.final_norm = torch.nn.LayerNorm(dim)

    def forward(self, sequence):
        """sequence [B, T] item indices, left-padded with 0 -> [B, T, dim]; position t sees items <= t only."""
        T = sequence.shape[1]
        x = self.items(sequence) * math.sqrt(self.items.embedding_dim) + self.positions(torch.arange(T, device=sequence.device))
        keep = (sequence != 0).unsqueeze(-1).float()  # [B, T, 1]
        x = self.dropout(x) * keep
        blocked = padding_mask(sequence).repeat_interleave(self.attentions[0].num_heads, 0)  # [B * heads, T, T]
        for norm, attention, ffn_norm, ffn in zip(self.attention_norms, self.attentions, self.ffn_norms, self.ffns):
            query = norm(x)
            x = x + attention(query, x, x, attn_mask=blocked, need_weights=False)[0]  # pre-norm query, as in the paper's code
            x = (x + ffn(ffn_norm(x))) * keep
        return self.final_norm(x)

    def score(self, sequence, candidates):
        """[B, T] sequences, [B, K] candidate indices (0 = unknown item) -> [B, K] scores."""
        last = self(sequence)[:, -1]  # [B, dim]
        scores = (self.items(candidates) * last[:, None, :]).sum(-1)
        return scores.masked_fill(candidates == 0, -1e9)  # the SASRec departure 2 above: unknown items last


def vocabulary(train):
    """{item_id: index from 1} over every item of the training sequences."""
    ids = sorted({item["item_id"] for inst in train for item in inst["history"]}
                 | {c["item_id"] for inst in train for c, label in zip(inst["candidates"], inst["labels"]) if label})
    return {item: index for index, item in enumerate(ids, 1)}


def encode(items, index, max_len=MAX_LEN):
    """Item ids -> [max_len] left-padded indices of the known ones (the most recent max_len)."""
    known = [index[i] for i in items if i in index][-max_len:]
    return [0] * (max_len - len(known)) + known


def candidate_scores(model, instances, index):
    """[U, K] SASRec scores of each instance's candidates, from its history (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        sequences = torch.tensor([encode([h["item_id"] for h in inst["history"]], index) for inst in instances])
        candidates = torch.tensor([[index.get(c["item_id"], 0) for c in inst["candidates"]] for inst in instances])
        return model.score(sequences, candidates).float()


def train(train_instances, valid_instances, epochs=200, dim=50, blocks=2, lr=1e-3, batch_size=128, dropout=0.2,
          seed=0, eval_every=5, state_path=None, run_settings=None, resume_state=None):
    """(the model with the best validation NDCG@10, item index, per-check log). With state_path, the whole
    training state (and run_settings, what a resume must match) is saved there at each validation check;
    resume_state (one such state) continues it. After Ctrl-C or SIGTERM (runs.catch_signals) the epoch in
    progress finishes, the state is saved, and the run stops (exit 128 + the signal's number)."""
    torch.manual_seed(seed)
    index = vocabulary(train_instances)
    model = SASRec(len(index), dim, blocks, dropout=dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    full = [[h["item_id"] for h in inst["history"]] + [c["item_id"] for c, label in zip(inst["candidates"], inst["labels"]) if label]
            for inst in train_instances]
    sequences = torch.tensor([encode(items, index, MAX_LEN + 1) for items in full])  # inputs [:, :-1], targets [:, 1:]
    generator = torch.Generator().manual_seed(seed)
    best, best_state, log, start = -1.0, None, [], 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        generator.set_state(resume_state["generator"])
        torch.set_rng_state(resume_state["torch_rng"])  # dropout's
        best, best_state, log, start = resume_state["best"], resume_state["best_state"], resume_state["log"], resume_state["epoch"]
    for epoch in tqdm(range(start + 1, epochs + 1), initial=start, total=epochs, desc="sasrec", dynamic_ncols=True):
        model.train()
        for batch in torch.randperm(len(sequences), generator=generator).split(batch_size):
            inputs, targets = sequences[batch, :-1], sequences[batch, 1:]
            negatives = torch.randint(1, len(index) + 1, targets.shape, generator=generator)  # one per position
            hidden = model(inputs)
            positive_logits = (hidden * model.items(targets)).sum(-1)
            negative_logits = (hidden * model.items(negatives)).sum(-1)
            mask = (targets != 0).float()
            bce = torch.nn.functional.binary_cross_entropy_with_logits
            loss = ((bce(positive_logits, torch.ones_like(mask), reduction="none")
                     + bce(negative_logits, torch.zeros_like(mask), reduction="none")) * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch % eval_every == 0 or epoch == epochs:
            labels = torch.tensor([inst["labels"] for inst in valid_instances], dtype=torch.float32)
            ndcg = ndcg_from_scores(candidate_scores(model, valid_instances, index), labels, 10).mean().item()
            log.append({"epoch": epoch, "loss": loss.item(), "valid_ndcg@10": ndcg})
            if ndcg > best:
                best, best_state = ndcg, {k: v.clone() for k, v in model.state_dict().items()}
        stop = runs.stop_signal() if state_path else None
        if state_path and (epoch % eval_every == 0 or epoch == epochs or stop):
            write_whole(state_path, {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "best": best,
                                     "best_state": best_state, "log": log, "settings": run_settings})
        if stop:
            print(f"stopped by {signal.Signals(stop).name}: {epochs_text(epoch)} kept in {state_path}; continue with --resume",
                  file=sys.stderr)
            sys.exit(128 + stop)
    model.load_state_dict(best_state)
    return model, index, log


def epochs_text(last):
    return "epoch 1" if last == 1 else f"epochs 1-{last}"


def write_whole(path, obj):
    """torch.save into path + ".tmp", renamed into place: a crash never leaves half a file. A failed write (a
    full disk, a file-size limit) removes the temporary file, keeps what was at path, and says so in one line."""
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as error:  # a full disk, a file-size limit; torch.save may raise RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        kept = f"the earlier {os.path.basename(path)} is kept" if os.path.exists(path) else "nothing is kept"
        raise UsageError(f"saving {path} failed ({getattr(error, 'strerror', None) or runs.first_line(error)}); {kept}") from None


def load(path, instances, where):
    """(model, item index) from a file written by this script, for the candidates of instances (read from
    where); a data.DataError if it cannot be read, or knows none of those candidates (another data set's)."""
    try:
        saved = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as error:
        raise data.DataError(f"--sasrec {path}: cannot read it ({str(error).splitlines()[0]}); "
                             "train one with python baselines/sasrec.py") from None
    except (pickle.UnpicklingError, EOFError, ValueError):  # a JSON or text file, sasrec-log.json say
        saved = None
    if not (isinstance(saved, dict) and {"state", "index", "settings"} <= saved.keys()):
        raise data.DataError(f"--sasrec {path}: not a model of baselines/sasrec.py (the file it writes is OUT/sasrec.pt); "
                             "train one with python baselines/sasrec.py --data DIR --out OUT")
    settings = saved["settings"]
    model = SASRec(len(saved["index"]), settings["dim"], settings["blocks"], dropout=settings["dropout"])
    model.load_state_dict(saved["state"])
    candidates = [c["item_id"] for inst in instances for c in inst["candidates"]]
    known, total = sum(item in saved["index"] for item in candidates), len(candidates)
    if known == 0:
        raise data.DataError(f"--sasrec {path}: knows none of the {total} candidates of {where} (trained on another data set?)")
    if known < total:
        print(f"note: SASRec knows {known} of the {total} candidates ({known / total:.0%}); the others rank last")
    return model.eval(), saved["index"]


def plan_out(args, settings):
    """The main CLI's --out rules (runs.start_run): a DataError if out holds another model and neither --resume nor
    --overwrite is given, or --resume finds a state made with other settings or past --epochs. Returns the
    state to resume from, or None."""
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the model in --out and --overwrite replaces it: pass one of them")
    found = [name for name in FILES if os.path.lexists(os.path.join(args.out, name))]
    if (foreign := next((name for name in found if not os.path.isfile(os.path.join(args.out, name))
                         or os.path.islink(os.path.join(args.out, name))), None)):
        raise data.DataError(f"--out {args.out}: {foreign} is not a file this script wrote; --overwrite replaces only "
                             f"{', '.join(FILES)}, so move it or choose another --out")
    if not args.resume:
        if found and not args.overwrite:
            raise data.DataError(f"{args.out}: holds another model ({', '.join(found)}); pass --resume to continue it, "
                                 "--overwrite to replace it, or another --out")
        for name in found:  # --overwrite: a stale state must not be resumed later
            os.remove(os.path.join(args.out, name))
        return None
    path = os.path.join(args.out, "sasrec-state.pt")
    if not os.path.isfile(path):
        print(f"--resume: no sasrec-state.pt in {args.out}, so training starts at epoch 0")
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # cut short by a crash: say so, in one line
        raise data.DataError(f"{path}: cannot read it ({str(error).splitlines()[0]}); --overwrite starts again") from None
    differ = ["the data (train/valid.jsonl differ from the state's)" if n == "data_fingerprint" else
              f"--{n.replace('_', '-')} {state['settings'].get(n)!r} -> {v!r}" for n, v in settings.items() if state["settings"].get(n) != v]
    if differ:
        raise data.DataError(f"{path}: --resume needs every setting but --epochs unchanged; these differ: " + "; ".join(differ))
    if state["epoch"] > args.epochs:
        raise data.DataError(f"{path}: already past --epochs {args.epochs} (at epoch {state['epoch']}); raise it to train further")
    print(f"resumed from {path} at epoch {state['epoch']}")
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory written by data.py")
    parser.add_argument("--out", required=True, help="output directory: sasrec.pt, sasrec-log.json and sasrec-state.pt "
                        "(the training state at the last validation check)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/sasrec-state.pt; every setting "
                        "but --epochs must be unchanged")
    parser.add_argument("--overwrite", action="store_true", help="replace the model already in --out; without it, "
                        "or --resume, another model's --out is refused")
    parser.add_argument("--epochs", type=int, default=200, help="passes over the training sequences")
    parser.add_argument("--dim", type=int, default=50, help="embedding and hidden width")
    parser.add_argument("--blocks", type=int, default=2, help="self-attention blocks")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout rate")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="initialization, batches and negatives")
    args = parser.parse_args(argv)
    for name in ("epochs", "dim", "blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:  # NaN fails too
        parser.error(f"--dropout must be in [0, 1), got {args.dropout:g}")
    if not 0 < args.lr <= 1:
        parser.error(f"--lr must be in (0, 1], got {args.lr:g}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must be in [0, {2 ** 32 - 1}], got {args.seed}")
    try:
        runs.claim(args.out)  # one run per --out at a time
        runs.catch_signals()  # Ctrl-C / SIGTERM: the epoch in progress finishes, is saved, and the run stops
        fit(args)
    except UsageError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # a second Ctrl-C
        state = os.path.join(args.out, "sasrec-state.pt")
        print(f"interrupted: kept {state}; --resume continues from it" if os.path.isfile(state)
              else "interrupted: no epoch was saved, so nothing is kept", file=sys.stderr)
        sys.exit(130)


def fit(args):
    """main's work once --out is held: the checks, training, sasrec.pt and its log."""
    train_instances, valid = data.load_split(args.data, "train"), data.load_split(args.data, "valid")
    settings = {**{name: getattr(args, name) for name in ("dim", "blocks", "dropout", "lr", "seed")},
                "data_fingerprint": runs.data_fingerprint(args.data)}  # what --resume must find unchanged
    resume_state = plan_out(args, settings)
    if resume_state is not None and resume_state["epoch"] == args.epochs:
        print(f"{args.out}/sasrec-state.pt is at --epochs {args.epochs} already: nothing to train (raise --epochs to go on)")
        return
    model, index, log = train(train_instances, valid, args.epochs, args.dim, args.blocks, args.lr, dropout=args.dropout,
                              seed=args.seed, state_path=os.path.join(args.out, "sasrec-state.pt"),
                              run_settings=settings, resume_state=resume_state)
    settings = {k: v for k, v in vars(args).items() if k not in ("overwrite", "resume")}
    write_whole(os.path.join(args.out, "sasrec.pt"), {"state": model.state_dict(), "index": index, "settings": settings, "log": log})
    with open(os.path.join(args.out, "sasrec-log.json"), "w") as f:
        json.dump(log, f, indent=1)
    best = max(log, key=lambda row: row["valid_ndcg@10"])
    print(f"{len(index)} items from {len(train_instances)} training sequences; best validation NDCG@10 "
          f"{best['valid_ndcg@10']:.3f} at epoch {best['epoch']}; wrote {args.out}/sasrec.pt")


if __name__ == "__main__":
    main()
