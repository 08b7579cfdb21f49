"""A training run's output directory (--out): one run per directory, an honest resume, a clean stop.

    plan = runs.plan_out(cfg, data_dir)      # before any work: refuses what would mix or lose runs
    ...load the model from plan.checkpoint or cfg.model...
    runs.start(cfg.out, plan)                # --overwrite clears, a resume cuts metrics.jsonl back
    for optimizer, lr in ...: runs.set_lr(optimizer, lr)
    with runs.StopOnSignal() as stop:        # Ctrl-C / SIGTERM: finish the step, save, exit
        ...
        if stop.requested: save a checkpoint, then raise stop.exit(...)

What --resume compares with the checkpoint it continues (r2rank.json holds the run's config):
- settings that define the run must be equal, or the run refuses and names each one that differs:
  every flag of the stage but the ones in CHANGEABLE, and the data's content (a fingerprint of
  train.jsonl and valid.jsonl, so a moved data directory is fine and an edited one is not);
- settings in CHANGEABLE (steps, learning rates, evaluation and saving cadence, how the computation
  is laid out) may change: they are applied (a learning rate is set in the restored optimizer, which
  would otherwise keep the saved one), printed, and recorded in the next checkpoints' r2rank.json
  under "changes".
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

import lora
from sources import DataError

# The flags --resume lets change; every other flag of the stage defines the run.
CHANGEABLE = {"max_steps", "lr", "head_lr", "sft_lr", "sft_epochs", "eval_every", "eval_users", "save_every",
              "keep_checkpoints", "device", "threads", "dtype", "micro_batch", "gradient_checkpointing",
              "shared_prefix_update", "resume", "overwrite", "out", "data"}  # data: compared by content
STAGE_GROUPS = {"rl": ("common", "--stage rl"), "sft": ("common", "--stage sft-data")}  # --help sections read


def data_fingerprint(data_dir):
    """sha256 of train.jsonl and valid.jsonl: the same data wherever it lies."""
    digest = hashlib.sha256()
    for split in ("train", "valid"):
        path = os.path.join(data_dir, f"{split}.jsonl")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def checkpoint_steps(out):
    """Steps of the checkpoint-<step> directories in out, ascending."""
    return sorted(int(m.group(1)) for name in (os.listdir(out) if os.path.isdir(out) else [])
                  if (m := re.fullmatch(r"checkpoint-(\d+)", name)))


def latest_checkpoint(out):
    steps = checkpoint_steps(out)
    return os.path.join(out, f"checkpoint-{steps[-1]}") if steps else None


def run_files(out):
    """What a training run writes into out (its data/, eval and sft-data files are not counted)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(n for n in names if n == "metrics.jsonl" or re.fullmatch(r"(\.tmp-)?checkpoint-\d+", n))


@dataclass
class Plan:
    """What a training stage found in --out: where it starts, and what it changed on resume."""
    start_step: int = 0
    checkpoint: str | None = None  # the checkpoint resumed from
    fingerprint: str = ""  # of the data, recorded in every checkpoint
    changes: list = field(default_factory=list)  # [{"step", flag: [old, new]}], earlier resumes' first
    overwrite: bool = False  # clear out's run files before writing

    def record(self):
        """The extra fields of each checkpoint's r2rank.json."""
        return {"data_fingerprint": self.fingerprint, "changes": self.changes}


def flag(name):
    return "--" + name.replace("_", "-")


def plan_out(cfg, data_dir, max_steps):
    """Check --out against the run about to start; writes nothing. A DataError (one line) when
    - out holds another run and neither --resume nor --overwrite is given;
    - --resume finds a checkpoint of another stage, past max_steps, or made with other defining settings.
    --resume with no checkpoint says so and starts at step 0."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise DataError(f"--out {cfg.out}: exists and is not a directory")
    found, fingerprint = run_files(cfg.out), data_fingerprint(data_dir)
    if not cfg.resume:
        if found and not cfg.overwrite:
            raise DataError(f"{cfg.out}: holds another run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
                            "pass --resume to continue it, --overwrite to replace it, or another --out")
        return Plan(fingerprint=fingerprint, overwrite=bool(found))
    checkpoint = latest_checkpoint(cfg.out)
    if checkpoint is None:
        print(f"--resume: no checkpoint in {cfg.out}, so the run starts at step 0")
        return Plan(fingerprint=fingerprint, overwrite=bool(found))
    with open(os.path.join(checkpoint, "r2rank.json")) as f:
        saved = json.load(f)
    step, old = saved["step"], saved["config"]
    if old["stage"] != cfg.stage:
        raise DataError(f"{checkpoint}: a checkpoint of --stage {old['stage']}, not {cfg.stage}; "
                        "start from it with --model and another --out")
    groups = STAGE_GROUPS[cfg.stage]
    defining = [f.name for f in dataclasses.fields(cfg) if f.metadata["group"].startswith(groups)
                and f.name not in CHANGEABLE and f.name in old]
    differ = [f"{flag(n)} {old[n]!r} -> {getattr(cfg, n)!r}" for n in defining if old[n] != getattr(cfg, n)]
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        differ.append(f"the data ({data_dir}: train/valid.jsonl differ from the checkpoint's)")
    if differ:
        raise DataError(f"{checkpoint}: --resume needs the settings that define the run unchanged; these differ: "
                        + "; ".join(differ))
    if step > max_steps:
        raise DataError(f"{checkpoint}: already past --max-steps {max_steps}; raise it to train further")
    changed = {flag(n): [old[n], getattr(cfg, n)] for n in sorted(CHANGEABLE - {"resume", "out", "data"})
               if n in old and old[n] != getattr(cfg, n)}
    if changed:
        print(f"resume at step {step}, changed: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    history = saved.get("changes", []) + ([{"step": step, **changed}] if changed else [])
    return Plan(step, checkpoint, fingerprint, history)


def start(out, plan):
    """Make out ready to write: --overwrite removes the other run's files; a resume cuts metrics.jsonl
    back to the checkpoint's step (rows after it were written by steps that are run again)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise DataError(f"--out {out}: cannot create it ({error.strerror})") from None
    if plan.overwrite:
        for name in run_files(out):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    metrics = os.path.join(out, "metrics.jsonl")
    if plan.checkpoint and os.path.isfile(metrics):
        with open(metrics) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= plan.start_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def prune_checkpoints(out, keep):
    """Delete all but the newest `keep` checkpoint directories of out."""
    for step in checkpoint_steps(out)[:-keep]:
        shutil.rmtree(os.path.join(out, f"checkpoint-{step}"))


def save_checkpoint(out, step, model, tokenizer, head, optimizers, cfg, trace_cache=None, record=None):
    """<out>/checkpoint-<step>/, written into a temporary directory and renamed into place.

    Holds the model (safetensors; LoRA adapters merged in, and also apart in lora.safetensors) and
    tokenizer, so the directory works as --model; head.safetensors
    (unless head is None), the optimizers' states, r2rank.json (step and run config), and with
    --freeze-llm the cached traces (trace-cache.pt: {user_id: rollout.Samples fields}).
    """
    final = os.path.join(out, f"checkpoint-{step}")
    tmp = os.path.join(out, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.adapted(model):  # LoRA: the adapters merged into the weights, and kept apart for --resume
        model.save_pretrained(tmp, state_dict=lora.merged_state_dict(model))
        save_file(lora.adapter_state_dict(model), os.path.join(tmp, "lora.safetensors"))
    else:
        model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    if head is not None:
        save_file(head.state_dict(), os.path.join(tmp, "head.safetensors"))
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, os.path.join(tmp, "optimizer.pt"))
    if trace_cache is not None:
        torch.save({user: dataclasses.asdict(samples) for user, samples in trace_cache.items()},
                   os.path.join(tmp, "trace-cache.pt"))
    with open(os.path.join(tmp, "r2rank.json"), "w") as f:
        json.dump({"step": step, "config": dataclasses.asdict(cfg), "head_width": cfg.head_width, **(record or {})}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def log_row(metrics_file, row, write):
    """Append row to metrics.jsonl (flushed, so a crash keeps it) and show it as one line."""
    metrics_file.write(json.dumps(row) + "\n")
    metrics_file.flush()
    write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


def set_lr(optimizer, lr):
    """Apply --lr to a restored optimizer: load_state_dict brings back the saved learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class StopOnSignal:
    """Within the block, the first Ctrl-C (SIGINT) or SIGTERM only sets .requested, so the loop can
    finish its step and save; a second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.previous = None, {}

    def handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              "(Ctrl-C again to stop now and lose the step)", flush=True)

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def exit(self, checkpoint):
        """The SystemExit to raise once checkpoint is saved: one line, status 128 + the signal's number."""
        print(f"stopped by {signal.Signals(self.requested).name}: saved {checkpoint}; continue with --resume",
              file=sys.stderr)
        return SystemExit(128 + self.requested)
