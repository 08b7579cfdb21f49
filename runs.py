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
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

import config
from models import adapter_state_dict, checkpoint_state_dict, lora_layers
from protocol import UsageError

# The flags --resume lets change; every other flag of the stage defines the run.
CHANGEABLE = {"max_steps", "lr", "head_lr", "sft_lr", "sft_epochs", "eval_every", "eval_users", "save_every",
              "keep_checkpoints", "device", "threads", "dtype", "micro_batch", "gradient_checkpointing",
              "shared_prefix_update", "rollout_rows", "resume", "overwrite", "out", "data"}  # data: compared by content
STAGE_GROUPS = {"rl": (config.COMMON, config.RL, config.BEYOND), "sft": (config.COMMON, config.SFT)}  # the flags defining a run


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


def existing_parent(out):
    """out itself if it exists, else its nearest existing parent: where out would be created."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_writable(out):
    """A UsageError (one line) unless files can be written in out, or out can be created: tried by making
    and removing an empty directory there (a read-only mount, or a file in the way, is found before any work)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a directory")
    parent = existing_parent(out)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: cannot create it ({parent} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".r2rank-write-test-", dir=parent))
    except OSError as error:
        verb = "write into it" if parent == os.path.abspath(out) else "create it"
        raise UsageError(f"--out {out}: cannot {verb} ({error.strerror})") from None


def safetensors_problem(path):
    """Why the safetensors file at path cannot be whole (missing, unreadable header, shorter than its
    header says), or None. Reads the header only: 8 bytes of length, then JSON with each tensor's byte range."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return f"{name} is missing"
    try:
        with open(path, "rb") as f:
            header_bytes = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_bytes))
        end = 8 + header_bytes + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
        return f"{name} has no readable header"
    size = os.path.getsize(path)
    return None if size == end else f"{name} is truncated ({size} of {end} bytes)"


def checkpoint_problem(path, record="r2rank.json", extra=()):
    """Why checkpoint directory path cannot be resumed from (the first broken or missing file), or None:
    a crash mid-save on a file system without atomic rename can leave any of these. record: the file
    with the step and the run's settings ("config" or "settings"); extra: files beyond the model, the
    optimizer and what an RL checkpoint's config asks for (.safetensors: checked against the header; .pt: a zip)."""
    try:
        with open(os.path.join(path, record)) as f:
            saved = json.load(f)
        settings = saved["config"] if "config" in saved else saved["settings"]
        int(saved["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{record} is missing or unreadable"
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # a large model, saved in shards
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return "model.safetensors.index.json is unreadable"
    else:
        files = ["model.safetensors"]
    files += ["optimizer.pt", *extra] + (["head.safetensors"] if settings.get("stage") == "rl" else []) \
        + (["lora.safetensors"] if settings.get("lora_rank") else []) + (["trace-cache.pt"] if settings.get("freeze_llm") else [])
    for name in files:
        if name.endswith(".safetensors") and (problem := safetensors_problem(os.path.join(path, name))):
            return problem
        if name.endswith(".pt") and not zipfile.is_zipfile(os.path.join(path, name)):  # torch.save writes a zip
            return f"{name} is missing or truncated"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return "config.json is missing"
    return None


def intact_checkpoint(out, record="r2rank.json", extra=()):
    """The newest checkpoint of out that is whole, or None; each newer, broken one is named on stdout."""
    for step in reversed(checkpoint_steps(out)):
        path = os.path.join(out, f"checkpoint-{step}")
        if (problem := checkpoint_problem(path, record, extra)) is None:
            return path
        print(f"--resume: {path} is broken ({problem}), so it is skipped")
    return None


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
    """Check --out against the run about to start; writes nothing. A UsageError (one line) when
    - out cannot be written, or holds another run and neither --resume nor --overwrite is given;
    - --resume finds a checkpoint of another stage, past max_steps, or made with other defining settings,
      or no whole checkpoint (each broken one is named, and a whole older one is used instead).
    --resume with no checkpoint says so and starts at step 0."""
    groups = STAGE_GROUPS[cfg.stage]
    defining = {f.name for f in dataclasses.fields(cfg) if f.metadata["group"] in groups} - CHANGEABLE
    return plan_command(dataclasses.asdict(cfg), data_dir, max_steps, defining, CHANGEABLE)


# The flags of the baselines' training commands (baselines/reczero.py, r2ec.py) that --resume lets change.
COMMAND_CHANGEABLE = {"max_steps", "minutes", "save_every", "lr", "head_lr", "device", "threads", "dtype", "micro_batch",
                      "resume", "overwrite", "out", "data"}


def plan_command(settings, data_dir, max_steps, defining=None, changeable=COMMAND_CHANGEABLE, record="r2rank.json", extra=()):
    """plan_out for any training command: settings, its flags as a dict (out, resume, overwrite among
    them); defining, the ones a resume must keep (default: all but changeable); record, the
    checkpoint's file of {"step", "config" or "settings", "data_fingerprint"}; extra, its files beyond
    the model and optimizer.pt."""
    out = settings["out"]
    check_writable(out)
    found, fingerprint = run_files(out), data_fingerprint(data_dir)
    if not settings["resume"]:
        if found and not settings["overwrite"]:
            raise UsageError(f"{out}: holds another run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
                            "pass --resume to continue it, --overwrite to replace it, or another --out")
        return Plan(fingerprint=fingerprint, overwrite=bool(found))
    newest = latest_checkpoint(out)
    if newest and record == "r2rank.json":  # another stage's checkpoint is refused, whole or broken
        try:
            with open(os.path.join(newest, record)) as f:
                stage = json.load(f)["config"]["stage"]
        except (OSError, ValueError, KeyError, TypeError):
            stage = settings["stage"]
        if stage != settings["stage"]:
            raise UsageError(f"{newest}: a checkpoint of --stage {stage}, not {settings['stage']}; "
                            "start from it with --model and another --out")
    checkpoint = intact_checkpoint(out, record, extra)
    if checkpoint is None and checkpoint_steps(out):
        raise UsageError(f"--resume: no checkpoint in {out} is whole (each is named above); --overwrite starts the run again")
    if checkpoint is None:
        print(f"--resume: no checkpoint in {out}, so the run starts at step 0")
        return Plan(fingerprint=fingerprint, overwrite=bool(found))
    with open(os.path.join(checkpoint, record)) as f:
        saved = json.load(f)
    step, old = saved["step"], saved["config"] if "config" in saved else saved["settings"]
    defining = set(settings) - changeable if defining is None else defining
    differ = [f"{flag(n)} {old[n]!r} -> {settings[n]!r}" for n in sorted(defining) if n in old and old[n] != settings[n]]
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        differ.append(f"the data ({data_dir}: train/valid.jsonl differ from the checkpoint's)")
    if differ:
        raise UsageError(f"{checkpoint}: --resume needs the settings that define the run unchanged; these differ: "
                        + "; ".join(differ))
    if step > max_steps:
        raise UsageError(f"{checkpoint}: already past --max-steps {max_steps}; raise it to train further")
    changed = {flag(n): [old[n], settings[n]] for n in sorted(changeable - {"resume", "out", "data"})
               if n in old and n in settings and old[n] != settings[n]}
    if changed:
        print(f"resume at step {step}, changed: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    history = saved.get("changes", []) + ([{"step": step, **changed}] if changed else [])
    return Plan(step, checkpoint, fingerprint, history)


def steps_text(first, last):
    """'step 3' or 'steps 1-5'."""
    return f"step {first}" if first == last else f"steps {first}-{last}"


def kept_text(out, done):
    """What a stopped run kept, in words: its finished steps 1..done and their checkpoint."""
    return (f"{steps_text(1, done)} kept in {out}/checkpoint-{done}; continue with --resume" if done
            else "no step had finished: nothing kept")


def row_step(line):
    """The step of one metrics.jsonl line, or None when the line is not a whole JSON row."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def start(out, plan):
    """Make out ready to write: --overwrite removes the other run's files; a resume cuts metrics.jsonl
    back to the checkpoint's step (rows after it were written by steps that are run again)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create it ({error.strerror})") from None
    if plan.overwrite:
        for name in run_files(out):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    metrics = os.path.join(out, "metrics.jsonl")
    if plan.checkpoint and os.path.isfile(metrics):
        with open(metrics) as f:
            rows = [line for line in f if line.strip()]
        steps = [row_step(line) for line in rows]  # None: a line cut short by a crash
        kept = [line for line, step in zip(rows, steps) if step is not None and step <= plan.start_step]
        dropped = [step for step in steps if step is not None and step > plan.start_step]
        if None in steps:
            print(f"--resume: {steps.count(None)} unreadable line(s) of metrics.jsonl dropped (cut short by a crash)")
        if dropped:
            print(f"--resume: metrics.jsonl rows of {steps_text(dropped[0], dropped[-1])} dropped: not in a checkpoint, "
                  f"so they run again from {plan.checkpoint}")
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def prune_checkpoints(out, keep):
    """Delete all but the newest `keep` whole checkpoints of out, and every checkpoint older than them.
    A broken one newer than them (a crash mid-save, which --resume skipped) is left for the run to
    rewrite when it reaches that step: counting it would delete the checkpoint just saved."""
    whole = [step for step in checkpoint_steps(out) if checkpoint_problem(os.path.join(out, f"checkpoint-{step}")) is None]
    for step in checkpoint_steps(out):
        if whole and step < whole[-keep:][0]:
            shutil.rmtree(os.path.join(out, f"checkpoint-{step}"))


# Disk space, checked before a run writes anything: a full fine-tune of Qwen2.5-1.5B saves 18.5 GB per
# checkpoint, so keeping all of a 500-step run's saves every 50 steps would take 185 GB.
GB = 1e9
TOKENIZER_BYTES = 32 * 2 ** 20  # tokenizer and small files: Qwen2.5's tokenizer is about 11 MB


def checkpoint_bytes(model, optimizers, head=None):
    """Bytes of one save_checkpoint directory, estimated from the model before any is written:
    - 4 per weight of the model (fp32, also for frozen weights held in bf16), a tied weight (Qwen's
      embedding and lm_head) once. With LoRA: the merged weights plus the adapters in lora.safetensors,
      again 4 bytes per parameter of the wrapped model;
    - AdamW's exp_avg and exp_avg_sq for each weight an optimizer trains, in that weight's dtype
      (8 bytes for an fp32 weight);
    - the head's weights, 4 bytes each, and TOKENIZER_BYTES.
    Qwen2.5-1.5B: 1.54e9 weights, 18.5 GB in full fine-tuning, 6.4 GB with LoRA rank 16. --freeze-llm's
    trace cache (trace-cache.pt, which grows with the users seen) is not counted."""
    weights = {p.data_ptr() or id(p): p.numel() for p in model.parameters()}  # data_ptr 0 on the meta device
    states = sum(2 * p.numel() * p.element_size() for optimizer in optimizers.values()
                 for group in optimizer.param_groups for p in group["params"])
    head_weights = sum(p.numel() for p in head.parameters()) if head is not None else 0
    return 4 * sum(weights.values()) + states + 4 * head_weights + TOKENIZER_BYTES


def saves_planned(start_step, max_steps, save_every):
    """How many checkpoints a run from start_step to max_steps saves: after every save_every-th step and
    after the last. Steps 0 -> 500 every 50: 10; 0 -> 100 every 30: 30, 60, 90, 100 = 4."""
    if start_step >= max_steps:
        return 0
    return max_steps // save_every - start_step // save_every + (max_steps % save_every != 0)


def checkpoints_at_once(saves, keep, existing=0):
    """The most checkpoint directories --out holds at once while a run makes `saves` saves, with `existing`
    ones there at its start (a resume) and --keep-checkpoints `keep` (0 = keep all). A save writes its
    directory before the oldest is pruned, so keep N peaks at N + 1."""
    if not saves:
        return existing
    if not keep:
        return existing + saves
    return max(existing, min(existing + saves - 1, keep)) + 1


def tree_bytes(path):
    """Size of a file, or of every file under a directory."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def check_disk(out, one_checkpoint_bytes, saves, keep, overwrite=False):
    """A UsageError (one line) unless the checkpoints the run writes fit in the free space of --out's file
    system (out's nearest existing parent if out is not there yet): one_checkpoint_bytes (checkpoint_bytes)
    times the directories checkpoints_at_once adds to those already in out. overwrite: the run in out is
    removed first (runs.start), so its files count as free. Returns the bytes the checkpoints need."""
    free = shutil.disk_usage(existing_parent(out)).free
    existing = len(checkpoint_steps(out))
    if overwrite:
        free += sum(tree_bytes(os.path.join(out, name)) for name in run_files(out))
        existing = 0
    added = checkpoints_at_once(saves, keep, existing) - existing
    needed = added * one_checkpoint_bytes
    if needed > free:
        kept = "all kept (--keep-checkpoints 0)" if not keep else f"--keep-checkpoints {keep} plus the one being written"
        raise UsageError(f"--out {out}: the checkpoints need {needed / GB:.1f} GB ({added} of {one_checkpoint_bytes / GB:.1f} "
                        f"GB at once: {saves} saves, {kept}) but {free / GB:.1f} GB are free there; keep fewer "
                        "(--keep-checkpoints), save fewer (--save-every / --max-steps), train LoRA adapters "
                        "(--lora-rank), or choose another --out")
    return needed


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
    if lora_layers(model):  # LoRA: the adapters merged into the weights, and kept apart for --resume
        model.save_pretrained(tmp, state_dict=checkpoint_state_dict(model))
        save_file(adapter_state_dict(model), os.path.join(tmp, "lora.safetensors"))
    else:
        model.save_pretrained(tmp, state_dict=checkpoint_state_dict(model))  # safetensors, fp32
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


COLLAPSED_SPREAD = 1e-6  # a head whose K scores spread less than this ranks at random under Plackett-Luce


def non_finite(row, optimizers):
    """What is not finite after a training step, or None: the logged numbers of row, then the weights each
    optimizer trains (one device sync per optimizer). A run that meets one stops without writing the step."""
    bad = [name for name, value in row.items() if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        return "non-finite " + ", ".join(bad)
    for name, optimizer in optimizers.items():
        weights = [p for group in optimizer.param_groups for p in group["params"]]
        if weights and not torch.stack([w.detach().isfinite().all() for w in weights]).all():
            return f"non-finite weights ({name})"
    return None


def set_lr(optimizer, lr):
    """Apply --lr to a restored optimizer: load_state_dict brings back the saved learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Abandoned(Exception):
    """Raised by StopOnSignal's handler inside an abandonable() block: the work in flight is dropped."""


class StopOnSignal:
    """Within the block, Ctrl-C (SIGINT) or SIGTERM stops the run at the next safe point:
    - inside an abandonable() block (work that changes nothing that is kept, such as a rollout), at once:
      the handler raises Abandoned and the loop keeps the steps before it;
    - elsewhere (an update in progress), the loop finishes the step, saves it, and stops.
    A second Ctrl-C stops at once (KeyboardInterrupt): only what is on disk is kept. .kept names it (the
    loop updates it after each save), so the messages say exactly what is kept."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, kept="nothing (no checkpoint yet)"):
        self.requested, self.previous, self.kept, self.inside = None, {}, kept, False

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            print(f"\nSIGINT again: stopping now; kept: {self.kept}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        self.requested = signum
        if self.inside:
            self.inside = False
            raise Abandoned
        print(f"\n{name}: stopping after this step's update, with a checkpoint (Ctrl-C again to stop now, "
              f"keeping only {self.kept})", flush=True)

    @contextlib.contextmanager
    def abandonable(self, allowed=True):
        """A signal inside the block raises Abandoned (at once, not at the step's end); allowed=False
        makes the block ordinary (under torchrun the other ranks would wait for this one forever)."""
        if self.requested is not None and allowed:
            raise Abandoned
        self.inside = allowed
        try:
            yield
        finally:
            self.inside = False

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def exit(self, kept):
        """The SystemExit to raise once what is kept is on disk: one line, status 128 + the signal's number."""
        print(f"stopped by {signal.Signals(self.requested).name}: {kept}", file=sys.stderr)
        return SystemExit(128 + self.requested)


def interrupted_message(out):
    """What a run that stopped at once (a second Ctrl-C, a crash) left for --resume, in one line."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return f"no checkpoint in {out}: nothing of the run is kept"
    return (f"kept {checkpoint}; --resume continues from it and runs the later steps again "
            "(their metrics.jsonl rows are dropped then)")
