"""A training run's output directory (--out): one run per directory and an honest resume. Writing
checkpoints and the disk check: checkpoints.py; the lock on --out and a clean stop: stops.py.

    plan = runs.plan_out(cfg, data_dir)      # before any work: refuses what would mix or lose runs
    ...load the model from plan.checkpoint or cfg.model...
    runs.start(cfg.out, plan)                # --overwrite clears, a resume cuts metrics.jsonl back
    for optimizer, lr in ...: runs.set_lr(optimizer, lr)
    with stops.StopOnSignal() as stop:        # Ctrl-C / SIGTERM: finish the step, save, exit
        ...
        if stop.requested: save a checkpoint, then raise stop.exit(...)

--overwrite replaces a run's files only (run_files: checkpoint-<step> folders of files, metrics.jsonl);
the data/, eval and sft-data files stay, and a run file not as a run writes it is refused (foreign_run_file).

Around all of it, `with stops.claim(out):` holds --out for the run's life: a second run started on the
same --out meanwhile is refused in one line (an flock on <out>/.r2rank-lock, which dies with the process).

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
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field

import torch

from machinery import config
from protocol import UsageError

# The flags --resume lets change; every other flag of the stage defines the run.
CHANGEABLE = {"max_steps", "lr", "head_lr", "sft_lr", "sft_epochs", "eval_every", "eval_users", "save_every",
              "keep_checkpoints", "device", "threads", "dtype", "micro_batch", "gradient_checkpointing", "dist_timeout",
              "shared_prefix_update", "rollout_rows", "teacher_timeout", "resume", "overwrite", "out", "data"}  # data: by content
STAGE_GROUPS = {"rl": (config.COMMON, config.RL, config.BEYOND, config.RL_RUN), "sft": (config.COMMON, config.SFT)}  # the flags defining a run


def data_fingerprint(data_dir, paths=None):
    """sha256 of train.jsonl and valid.jsonl: the same data wherever it lies (or of the files at paths)."""
    digest = hashlib.sha256()
    for path in paths or [os.path.join(data_dir, f"{split}.jsonl") for split in ("train", "valid")]:
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
    for name in ("config.json", "tokenizer.json"):  # the model's own: what from_pretrained reads first
        try:
            with open(os.path.join(path, name)) as f:
                json.load(f)
        except FileNotFoundError:
            if name == "config.json":
                return "config.json is missing"
        except (OSError, ValueError):
            return f"{name} is unreadable (not JSON)"
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
    """What a training run writes into out (its data/, eval and sft-data files are not counted, nor an
    empty metrics.jsonl: a run stopped before its first row)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(n for n in names if re.fullmatch(r"(\.tmp-)?checkpoint-\d+", n)
                  or n == "metrics.jsonl" and os.path.getsize(os.path.join(out, n)))


def foreign_run_file(out):
    """The first run file of out (run_files) that is not as a run writes it, in words, or None: a run's
    checkpoint-<step> (or .tmp-checkpoint-<step>) is a folder of files only, its metrics.jsonl a file.
    --overwrite, pruning and a save at that step delete run files, so anything else is refused."""
    for name in run_files(out):
        path = os.path.join(out, name)
        if os.path.islink(path) or name == "metrics.jsonl" and not os.path.isfile(path):
            return f"{name} is a link or not a file"
        if name != "metrics.jsonl" and not os.path.isdir(path):
            return f"{name} is not a folder"
        if name != "metrics.jsonl" and (inner := next((n for n in sorted(os.listdir(path)) if os.path.islink(os.path.join(path, n))
                                                      or not os.path.isfile(os.path.join(path, n))), None)):
            return f"{name} holds {inner}, which a checkpoint does not"
    return None


def inside_run_files(out, path):
    """The run file of out (run_files) that path is or lies in, or None: what --overwrite would delete."""
    relative = os.path.relpath(os.path.realpath(path), os.path.realpath(out))
    top = relative.split(os.sep)[0]
    return top if top not in (os.curdir, os.pardir) and top in run_files(out) else None


@dataclass
class Plan:
    """What a training stage found in --out: where it starts, and what it changed on resume."""
    start_step: int = 0
    checkpoint: str | None = None  # the checkpoint resumed from
    fingerprint: str = ""  # of the data, recorded in every checkpoint
    changes: list = field(default_factory=list)  # [{"step", flag: [old, new]}], earlier resumes' first
    overwrite: bool = False  # clear out's run files before writing
    files: dict = field(default_factory=dict)  # {flag: fingerprint} of the other files the run reads (sft: --traces)

    def record(self):
        """The extra fields of each checkpoint's r2rank.json."""
        return {"data_fingerprint": self.fingerprint, "changes": self.changes,
                **({"file_fingerprints": self.files} if self.files else {})}


def flag(name):
    return "--" + name.replace("_", "-")


READS = {"rl": ("model", "trace_cache"), "sft": ("model", "traces")}  # the flags naming what a stage reads, beside --data


def plan_out(cfg, data_dir, max_steps, files=None):
    """Check --out against the run about to start; writes nothing. A UsageError (one line) when
    - out cannot be written, or holds another run and neither --resume nor --overwrite is given;
    - --resume and --overwrite are both given, or --overwrite would delete what the run reads (its
      --model, --trace-cache or --traces inside a checkpoint of out);
    - --resume finds a checkpoint of another stage, past max_steps, or made with other defining settings
      or other data or files, or no whole checkpoint (each broken one is named, and a whole older one is used instead).
    --resume with no checkpoint says so and starts at step 0. files: {flag: path} of the other files
    the run reads whose content a resume must find unchanged (sft: {"--traces": its traces file})."""
    groups = STAGE_GROUPS[cfg.stage]
    defining = {f.name for f in dataclasses.fields(cfg) if f.metadata["group"] in groups} - CHANGEABLE
    return plan_command(dataclasses.asdict(cfg), data_dir, max_steps, defining, CHANGEABLE, reads=READS[cfg.stage], files=files)


# The flags of the baselines' training commands (baselines/reczero.py, r2ec.py) that --resume lets change.
COMMAND_CHANGEABLE = {"max_steps", "minutes", "save_every", "eval_every", "eval_users", "lr", "head_lr", "device", "threads",
                      "dtype", "micro_batch", "resume", "overwrite", "out", "data"}


def plan_command(settings, data_dir, max_steps, defining=None, changeable=COMMAND_CHANGEABLE, record="r2rank.json", extra=(),
                 reads=("model",), files=None):
    """plan_out for any training command: settings, its flags as a dict (out, resume, overwrite among
    them); defining, the ones a resume must keep (default: all but changeable); record, the
    checkpoint's file of {"step", "config" or "settings", "data_fingerprint"}; extra, its files beyond
    the model and optimizer.pt; reads, the flags naming paths the run reads besides data_dir, which
    --overwrite must not delete; files, as in plan_out."""
    out = settings["out"]
    if settings["resume"] and settings["overwrite"]:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    check_writable(out)
    found, fingerprint = run_files(out), data_fingerprint(data_dir)
    if found and (foreign := foreign_run_file(out)):
        raise UsageError(f"--out {out}: {foreign}; a run writes, and --overwrite replaces, only checkpoint-<step> folders "
                         "of files and metrics.jsonl, so move it or choose another --out")
    files = {name: [path, data_fingerprint(None, [path])] for name, path in (files or {}).items()}
    plan = Plan(fingerprint=fingerprint, overwrite=bool(found), files={name: digest for name, (_, digest) in files.items()})
    read = {"--data": data_dir, **{flag(name): settings[name] for name in reads if settings.get(name)}}
    held = next((f"{name} {path}" for name, path in read.items() if inside_run_files(out, path)), None)
    if not settings["resume"]:
        if found and not settings["overwrite"]:
            raise UsageError(f"{out}: holds another run ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); "
                            + (f"pass --resume to continue it, or another --out (--overwrite would delete {held}, which this run reads)"
                               if held else "pass --resume to continue it, --overwrite to replace it, or another --out"))
        if found and held:
            raise UsageError(f"--overwrite would delete {held}, which this run reads; start the new run in another --out")
        return plan
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
        if found and held:
            raise UsageError(f"--resume: no checkpoint in {out}, so the run would start again and delete {held}, "
                            "which this run reads; start the new run in another --out")
        print(f"--resume: no checkpoint in {out}, so the run starts at step 0"
              + (f" ({', '.join(found)} of the earlier start removed)" if found else ""))
        return plan
    with open(os.path.join(checkpoint, record)) as f:
        saved = json.load(f)
    step, old = saved["step"], saved["config"] if "config" in saved else saved["settings"]
    defining = set(settings) - changeable if defining is None else defining
    differ = [f"{flag(n)} {old[n]!r} -> {settings[n]!r}" for n in sorted(defining) if n in old and old[n] != settings[n]]
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        differ.append(f"the data ({data_dir}: train/valid.jsonl differ from the checkpoint's)")
    differ += [f"{name} {path} (its content differs from the checkpoint's)" for name, (path, digest) in files.items()
               if saved.get("file_fingerprints", {}).get(name, digest) != digest]
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
    return Plan(step, checkpoint, fingerprint, history, files=plan.files)


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
    if plan.checkpoint:
        dropped, unreadable = cut_metrics(out, plan.start_step)
        if unreadable:
            print(f"--resume: {unreadable} unreadable line(s) of metrics.jsonl dropped (cut short by a crash)")
        if dropped:
            print(f"--resume: metrics.jsonl rows of {steps_text(dropped[0], dropped[-1])} dropped: not in a checkpoint, "
                  f"so they run again from {plan.checkpoint}")


def cut_metrics(out, last_step):
    """Cut <out>/metrics.jsonl back to its rows of steps up to last_step, in place (so it needs no free
    space), and from the first line cut short by a crash; last_step None removes the file.
    Returns (the steps of the rows dropped, the number of unreadable lines dropped)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return [], 0
    with open(path, "rb") as f:
        lines = f.readlines()
    keep, dropped, unreadable = 0, [], 0  # keep: the bytes before the first line cut
    for line in lines:
        step = row_step(line)
        if not (dropped or unreadable) and last_step is not None and (not line.strip() or step is not None and step <= last_step):
            keep += len(line)
        elif line.strip():
            dropped += [] if step is None else [step]
            unreadable += step is None
    if last_step is None:
        os.remove(path)
    else:
        os.truncate(path, keep)
    return dropped, unreadable


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
def log_row(metrics_file, row, write):
    """Append row to metrics.jsonl (flushed, so a crash keeps it) and show it as one line. A failed write (a
    full disk, a quota, --out gone read-only) is a UsageError: --resume drops the row's unfinished part."""
    try:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
    except OSError as error:
        with contextlib.suppress(OSError):
            metrics_file.close()  # closed here, so that no later flush of the failed row raises again
        raise UsageError(f"{metrics_file.name}: cannot write step {row.get('step')}'s row ({error.strerror or error}); "
                         "free space (or make --out writable), then continue with --resume from the newest checkpoint") from None
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
