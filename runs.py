"""What a user relies on around a training run, as plain functions: one run per --out at a time, --resume
from the newest whole checkpoint, --overwrite that removes only what the project wrote, Ctrl-C or SIGTERM
that keep every finished step, atomic checkpoints, bad input and a full disk as one line; the device, the
precision and torchrun's processes. r2rank.train_rl shows them in use.

A checkpoint-<step>/ is written into .tmp-checkpoint-<step>/ and renamed into place; its r2rank.json lists
every file written with its size: that tells a whole checkpoint from a damaged one, and tells --overwrite
and pruning which files are the project's (anything else is left alone and named).
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import data
import lora
from data import UsageError

LOCK = ".r2rank-lock"
# The flags --resume lets change; every other flag defines the run and must be the checkpoint's.
CHANGEABLE = {"max_steps", "lr", "head_lr", "sft_lr", "sft_epochs", "eval_every", "eval_users", "save_every", "device",
              "keep_checkpoints", "threads", "dtype", "micro_batch", "gradient_checkpointing", "resume", "overwrite", "out",
              "data", "given", "teacher_timeout"}
# What the project writes into --out, and into a checkpoint folder (transformers' model and tokenizer files too).
RUN_FILE = re.compile(r"metrics\.jsonl|(\.tmp-)?checkpoint-\d+|eval-\w+\.json|traces(\.rejected)?\.jsonl|traces\.summary\.json|data|" + re.escape(LOCK))
CHECKPOINT_FILE = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab)\.json|"
                             r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|chat_template\.jinja|merges\.txt|"
                             r"(head|lora)\.safetensors|optimizer\.pt|r2rank\.json")


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------- device, precision, torchrun (nanoGPT's way)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def start_processes():
    """Under torchrun (RANK set): join the process group, NCCL on GPUs (one per process) else gloo; the
    processes other than rank 0 print nothing. A plain run: nothing."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        return
    from datetime import timedelta

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # rank 0 validates and saves alone while the others wait at the next collective: a generous timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")


def collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def say(text):
    """One line on stderr, from rank 0 only."""
    if rank() == 0:
        print(text, file=sys.stderr, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def pick_device(name):
    """auto: cuda (this process's GPU under torchrun), then mps, then cpu; or a torch device name."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps or auto)") from None
    if device.type == "meta" or (device.type == "cuda" and not torch.cuda.is_available()) or (
            device.type == "mps" and not torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: this machine cannot compute there (try --device auto)")
    return device


def pick_dtype(name, device):
    """The compute dtype of autocast: auto is bfloat16 on a CUDA card that has it, else float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------- --out


def claim(out):
    """Hold --out for this process's life: a second run on it meanwhile is refused in one line. The lock is
    an flock on <out>/.r2rank-lock, which the kernel lets go when the process ends, however it ends."""
    import fcntl

    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror}); choose another --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"--out {out}: in use by another run (pid {os.read(fd, 20).decode(errors='replace').strip()}); "
                         "wait for it or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    claim.held = fd  # kept open (and locked) until release() or the process's end


def release():
    """Let --out go (the end of main): another run, in this process or another, may take it."""
    if getattr(claim, "held", None) is not None:
        os.close(claim.held)
        claim.held = None


def prepare_data(args):
    """--data, or the built-in synthetic set in <out>/data, built once (--model tiny: the quickstart's,
    pointwise with 10 candidates). Rank 0 builds it; the others wait."""
    if args.data:
        return args.data
    path = os.path.join(args.out, "data")
    if rank() == 0 and not os.path.isfile(os.path.join(path, "train.jsonl")):
        import datasets

        tiny = dict(pointwise=True, candidates=10) if args.model == "tiny" else {}
        datasets.build_synthetic(path, seed=args.seed, overwrite=True, named=f"--out {args.out} (its data/)", **tiny)
    barrier()
    return path


def checkpoint_steps(out):
    return sorted(int(m[1]) for name in (os.listdir(out) if os.path.isdir(out) else []) if (m := re.fullmatch(r"checkpoint-(\d+)", name)))


def checkpoint_problem(path):
    """Why checkpoint folder path is not whole (a file it lists missing or of another size), or None."""
    try:
        with open(os.path.join(path, "r2rank.json")) as f:
            record = json.load(f)
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return "r2rank.json is missing or unreadable"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            return f"{name} is missing or truncated"
    return None


def newest_whole_checkpoint(out):
    """The newest checkpoint of out that is whole; each newer, broken one is named and skipped."""
    for step in reversed(checkpoint_steps(out)):
        path = os.path.join(out, f"checkpoint-{step}")
        if (problem := checkpoint_problem(path)) is None:
            return path, step
        print(f"--resume: {path} is broken ({problem}), so it is skipped", file=sys.stderr)  # beside the error that names it
    return None, 0


def remove_run_file(path):
    """Remove a file or checkpoint folder the project wrote. In a checkpoint folder only the project's files
    go; anything else stays, with the folder, and is named."""
    if not os.path.isdir(path):
        os.remove(path)
        return
    others = []
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if CHECKPOINT_FILE.fullmatch(name) and os.path.isfile(file) and not os.path.islink(file):
            os.remove(file)
        else:
            others.append(name)
    if others:
        print(f"note: {path}: kept {', '.join(sorted(others))}, which this project did not write")
    else:
        os.rmdir(path)


def data_fingerprint(data_dir):
    digest = hashlib.sha256()
    for split in ("train", "valid"):
        with contextlib.suppress(OSError), open(os.path.join(data_dir, f"{split}.jsonl"), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def start_run(args, stage):
    """Everything a training stage checks before its model loads: the device and dtype, --out held, the data,
    and where to start. Refuses (one line) an --out holding another run unless --resume or --overwrite, an
    --out holding what the project did not write when it would delete there, and a resume whose defining
    settings or data differ from its checkpoint's. --overwrite then removes the earlier run's files only."""
    device, dtype = pick_device(args.device), None
    dtype = pick_dtype(args.dtype, device)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.data and not os.path.isfile(os.path.join(args.data, "train.jsonl")):
        data.load_split(args.data, "train")  # the one-line error naming the folder, before --out is touched
    if rank() == 0:
        claim(args.out)
    barrier()  # --out exists for every process
    data_dir = prepare_data(args)
    found = sorted(n for n in os.listdir(args.out) if re.fullmatch(r"metrics\.jsonl|(\.tmp-)?checkpoint-\d+", n))
    foreign = sorted(n for n in os.listdir(args.out) if not RUN_FILE.fullmatch(n))
    run = SimpleNamespace(device=device, dtype=dtype, rank=rank(), world=world(), data_dir=data_dir, checkpoint=None,
                          start_step=0, fingerprint=data_fingerprint(data_dir))
    if found and not (args.resume or args.overwrite):
        raise UsageError(f"--out {args.out}: holds another run ({', '.join(found[:3])}); pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")
    if found and args.overwrite and foreign:
        raise UsageError(f"--out {args.out}: holds {', '.join(foreign[:3])}, which this project did not write; --overwrite "
                         "removes only a run's files, so move them or choose another --out")
    if args.resume:
        run.checkpoint, run.start_step = newest_whole_checkpoint(args.out)
        if run.checkpoint is None and checkpoint_steps(args.out):
            raise UsageError(f"--resume: no checkpoint in {args.out} is whole (each is named above); --overwrite starts again")
        if run.checkpoint is None:
            print(f"--resume: no checkpoint in {args.out}, so the run starts at step 0")
        else:
            check_resume(args, stage, run)
    if rank() == 0 and (args.overwrite or (args.resume and not run.checkpoint)):
        for name in found:
            remove_run_file(os.path.join(args.out, name))
    barrier()
    return run


def check_resume(args, stage, run):
    """A resumed run is the uninterrupted one: the checkpoint's stage, data and defining flags, unchanged."""
    with open(os.path.join(run.checkpoint, "r2rank.json")) as f:
        saved = json.load(f)
    old, new = saved["args"], vars(args)
    if old.get("stage") != stage:
        raise UsageError(f"{run.checkpoint}: a checkpoint of --stage {old.get('stage')}; start from it with --model and another --out")
    differ = [f"--{n.replace('_', '-')} {old[n]!r} -> {new[n]!r}" for n in sorted(set(old) & set(new) - CHANGEABLE) if old[n] != new[n]]
    if saved.get("data_fingerprint") not in (None, run.fingerprint):
        differ.append(f"the data ({run.data_dir}: train/valid.jsonl differ from the checkpoint's)")
    if differ:
        raise UsageError(f"{run.checkpoint}: --resume needs the settings that define the run unchanged; these differ: " + "; ".join(differ))
    print(f"resumed from {run.checkpoint} at step {run.start_step}")


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_bytes(model, optimizers):
    """One checkpoint: 4 bytes per weight (fp32, a tied weight once), AdamW's two states per trained weight."""
    weights = {p.data_ptr(): p.numel() for p in model.parameters()}
    states = sum(8 * p.numel() for opt in optimizers.values() for group in opt.param_groups for p in group["params"])
    return 4 * sum(weights.values()) + states + 2 ** 20


def check_disk(out, model, optimizers, keep):
    """One line, before any step, when --keep-checkpoints + 1 checkpoints (a save writes before it prunes)
    would not fit in the free space of --out."""
    size = checkpoint_bytes(model, optimizers)
    held = sum(os.path.getsize(os.path.join(folder, name)) for step in checkpoint_steps(out)
               for folder, _, names in os.walk(os.path.join(out, f"checkpoint-{step}")) for name in names)
    needed, free = size * (keep + 1 if keep else 2) - held, shutil.disk_usage(out).free
    if needed > free:
        raise UsageError(f"--out {out}: its checkpoints need about {needed / 1e9:.2f} GB ({size / 1e9:.2f} GB each) but "
                         f"{free / 1e9:.2f} GB are free there; keep fewer (--keep-checkpoints 1), pass --lora-rank, or choose another --out")


def save_checkpoint(out, step, model, tokenizer, head, optimizers, args, run):
    """<out>/checkpoint-<step>/: the model in fp32 (LoRA merged in; it loads as a plain transformers model), its
    tokenizer, head.safetensors, optimizer.pt, lora.safetensors (LoRA's adapters, for --resume), and r2rank.json
    (the step, the flags, the data's fingerprint, every file and its size). Written beside it, then renamed:
    a failed write leaves the checkpoint before it and says so in one line. Then the oldest beyond
    --keep-checkpoints go. Rank 0 writes; the other processes wait."""
    if rank() == 0:
        final, tmp = os.path.join(out, f"checkpoint-{step}"), os.path.join(out, f".tmp-checkpoint-{step}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=lora.checkpoint_state_dict(model))
            tokenizer.save_pretrained(tmp)
            if head is not None:
                save_file(head.state_dict(), os.path.join(tmp, "head.safetensors"))
            if lora.lora_layers(model):
                save_file(lora.adapter_state_dict(model), os.path.join(tmp, "lora.safetensors"))
            torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, os.path.join(tmp, "optimizer.pt"))
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp)}
            record = {"step": step, "args": {k: v for k, v in vars(args).items() if k != "given"}, "files": files,
                      "data_fingerprint": run.fingerprint}
            with open(os.path.join(tmp, "r2rank.json"), "w") as f:
                json.dump(record, f, indent=1)
            umask = os.umask(0)
            os.umask(umask)
            for name in files:  # safetensors writes 0600; a checkpoint is read as other files are
                os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
            if os.path.isdir(final):
                remove_run_file(final)
            if os.path.isdir(final):  # the user's files kept there: ours move in beside them, r2rank.json last
                for name in sorted(os.listdir(tmp), key=lambda name: name == "r2rank.json"):
                    os.replace(os.path.join(tmp, name), os.path.join(final, name))
                os.rmdir(tmp)
            else:
                os.rename(tmp, final)
        except Exception as error:  # a full disk, a read-only --out, a file-size limit (OSError, safetensors' own)
            shutil.rmtree(tmp, ignore_errors=True)
            newest = newest_whole_checkpoint(out)[0]
            raise UsageError(f"step {step}: saving {final} failed ({first_line(error)[:160]}); free space or make --out "
                             f"writable, then " + (f"--resume continues from {newest}" if newest else "run it again")) from None
        steps = checkpoint_steps(out)
        for old in steps[:-args.keep_checkpoints] if args.keep_checkpoints else []:
            remove_run_file(os.path.join(out, f"checkpoint-{old}"))
    barrier()


def load_head(head, path):
    """The scoring head saved in checkpoint folder path, into head; one of another shape is one line."""
    state = load_file(os.path.join(path, "head.safetensors"))
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    if shapes != {name: tuple(t.shape) for name, t in head.state_dict().items()}:
        raise UsageError(f"{path}/head.safetensors: a head of shapes {shapes}, not this run's (--head-width, the model's "
                         "hidden size); pass the model it was trained on as --model")
    head.load_state_dict(state)


def restore_optimizers(optimizers, checkpoint, learning_rates):
    """The optimizers' states of checkpoint (if any), with this run's learning rates (a changed --lr applies)."""
    if checkpoint:
        states = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
        for name, opt in optimizers.items():
            opt.load_state_dict(states[name])
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = learning_rates[name]


# ------------------------------------------------------------------------------------ metrics and stops


def open_metrics(out, start_step):
    """<out>/metrics.jsonl for appending, cut back to the rows of steps up to start_step (a resume runs the
    later ones again) and from a line cut short by a crash. Rank 0 only (the others get None)."""
    if rank() > 0:
        return None
    path = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            lines = f.readlines()
        keep = 0
        for line in lines:
            try:
                if json.loads(line)["step"] > start_step:
                    break
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
        os.truncate(path, keep)
    return open(path, "a")


def log_row(metrics, row, write=print):
    """Append row to metrics.jsonl, flushed (a crash keeps it), and show it as one line."""
    if metrics is None:
        return
    try:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
    except OSError as error:
        raise UsageError(f"{metrics.name}: cannot write step {row.get('step')}'s row ({error.strerror}); free space, then "
                         "--resume from the newest checkpoint") from None
    try:
        write("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    except BrokenPipeError:  # `| head` has gone: the run goes on, its rows in metrics.jsonl
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("note: the reader of this output has gone; the run goes on without printing (metrics.jsonl has every row)",
              file=sys.stderr)


STOP = {"signal": None, "at": 0.0}


class Stopped(BaseException):
    """SIGTERM outside a training step: stop at once (what is on disk is kept), as Ctrl-C does."""


def stop_now(signum, frame):
    raise Stopped(signum)


def catch_signals():
    """From here on Ctrl-C (SIGINT) or SIGTERM asks the run to stop after the step in progress, which is then
    saved (exit 130 / 143); a second Ctrl-C stops at once, keeping what is on disk. Under torchrun a SIGINT
    within 2 s of the first is torchrun's copy of the terminal's, not a second one."""
    def handle(signum, frame):
        if STOP["signal"] is not None:
            if signum == signal.SIGINT and not (world() > 1 and time.monotonic() - STOP["at"] < 2):
                raise KeyboardInterrupt
            return
        STOP.update(signal=signum, at=time.monotonic())
        say(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again: stop now)")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


def stop_signal():
    """The signal that asked this run (any process of it) to stop, or None."""
    requested = STOP["signal"] or 0
    if dist.is_initialized():
        flag = torch.tensor(float(requested), device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        requested = int(flag.item())
    return requested or None


def kept_text(out):
    """What a stopped run left in out, in words."""
    step = newest_whole_checkpoint(out)[1] if os.path.isdir(out) else 0
    return f"kept {out}/checkpoint-{step}; --resume continues from it" if step else f"no checkpoint in {out}: nothing kept"
