"""A training run's checkpoints on disk: their size, the disk check before a run, and writing one
so that a failure loses nothing (the temporary directory removed, metrics.jsonl cut back to the
checkpoint kept, one line). What a checkpoint directory holds: save_checkpoint's docstring.
"""
import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from machinery.models import adapter_state_dict, checkpoint_state_dict, lora_layers
from protocol import UsageError

from machinery import runs

try:  # POSIX; elsewhere a file-size limit is not looked up
    import resource
except ImportError:
    resource = None


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


def size_text(size):
    """Bytes as text a person reads: 18.5 GB, 93 MB, 512 kB (a small model's checkpoint is no 0.0 GB)."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}" if unit == "GB" else f"{size / factor:.0f} {unit}"
    return f"{size:.0f} bytes"


def check_disk(out, one_checkpoint_bytes, saves, keep, overwrite=False):
    """A UsageError (one line) unless the checkpoints the run writes fit in the free space of --out's file
    system (out's nearest existing parent if out is not there yet): one_checkpoint_bytes (checkpoint_bytes)
    times the directories checkpoints_at_once adds to those already in out. overwrite: the run in out is
    removed first (runs.start), so its files count as free. Returns the bytes the checkpoints need."""
    free = shutil.disk_usage(runs.existing_parent(out)).free
    existing = len(runs.checkpoint_steps(out))
    if overwrite:
        free += sum(tree_bytes(os.path.join(out, name)) for name in runs.run_files(out))
        existing = 0
    added = checkpoints_at_once(saves, keep, existing) - existing
    needed = added * one_checkpoint_bytes
    if needed > free:
        kept = "all kept (--keep-checkpoints 0)" if not keep else f"--keep-checkpoints {keep} plus the one being written"
        fewer = "keep fewer (--keep-checkpoints), " if keep != 1 else ""  # 1 is the fewest: the newest, beside the one written
        raise UsageError(f"--out {out}: the checkpoints need {size_text(needed)} ({added} of {size_text(one_checkpoint_bytes)} "
                        f"at once: {saves} saves, {kept}) but {size_text(free)} are free there; {fewer}save fewer "
                        "(--save-every / --max-steps), train LoRA adapters (--lora-rank), or choose another --out")
    return needed


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # torch.save reports a failed write as a RuntimeError


@contextlib.contextmanager
def checkpoint_directory(out, step, record="r2rank.json", extra=()):
    """The directory to write <out>/checkpoint-<step> into: a temporary one, renamed into place when the
    block ends. When a write fails (a full disk, a file-size limit, an --out that became read-only), it is
    removed, metrics.jsonl is cut back to the newest whole checkpoint (which is kept) and a UsageError says
    so in one line, naming --out, never the temporary directory. record, extra: as in checkpoint_problem."""
    final, tmp = os.path.join(out, f"checkpoint-{step}"), os.path.join(out, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except WRITE_ERRORS as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = next((s for s in reversed(runs.checkpoint_steps(out)) if s < step
                     and runs.checkpoint_problem(os.path.join(out, f"checkpoint-{s}"), record, extra) is None), None)
        try:
            runs.cut_metrics(out, kept)  # no row without its checkpoint: --resume would drop them anyway
            rows = f"metrics.jsonl up to step {kept}" if kept is not None else "metrics.jsonl removed"
        except OSError:  # --out cannot be written at all now: metrics.jsonl stays as it is
            rows = "metrics.jsonl as it is (--resume drops its later rows)" if kept is not None else "metrics.jsonl as it is"
        what = (f"kept {out}/checkpoint-{kept} and {rows}; then continue with --resume" if kept is not None
                else f"no earlier checkpoint, so nothing is kept ({rows}); then run it again"
                + (" with --overwrite" if os.path.isfile(os.path.join(out, "metrics.jsonl")) else ""))
        raise UsageError(f"step {step}: saving {final} failed ({write_failure(out, error)}); {what}") from None


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_cause(error):
    """(errno or None, the reason in words) of a failed write, without the path the error names: that path
    is often an internal temporary one (.tmp-checkpoint-<step>/, safetensors' .tmpXXXXXX, <file>.tmp).
    An OSError has its errno; safetensors writes "I/O error: Permission denied (os error 13) at path ...",
    torch.save "[enforce fail at ...] . open file failed with strerror: Permission denied"."""
    if isinstance(error, OSError) and error.errno:
        return error.errno, error.strerror or os.strerror(error.errno)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if found := re.search(r"os error (\d+)", text):
        return int(found.group(1)), os.strerror(int(found.group(1)))
    if found := re.search(r"strerror: (.+)$", text):
        reason = found.group(1).strip()
        return next((code for code in errno.errorcode if os.strerror(code) == reason), None), reason
    return None, re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)[:200]


def write_failure(out, error):
    """Why a write into --out failed, and what to do, in a few words: a full disk, a file-size limit
    (ulimit -f), or an --out that cannot be written (a permission, a read-only file system). torch.save's
    failed write may carry no reason: then a full disk and the file-size limit are both named."""
    code, text = write_cause(error)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else None
    size_limit = f"the file-size limit (ulimit -f) is {limit} bytes" if resource and limit != resource.RLIM_INFINITY else ""
    free = f"{size_text(shutil.disk_usage(runs.existing_parent(out)).free)} free there"
    if code in NOT_WRITABLE:
        return f"{text}: --out {out} cannot be written now; make it writable"
    if code == errno.EFBIG:
        return f"{text}: {size_limit}; raise it" if size_limit else f"{text}: the file system's largest file is smaller; choose another --out"
    if code in (errno.ENOSPC, errno.EDQUOT) or not size_limit:
        return f"{text}: {free}; free space, keep fewer checkpoints (--keep-checkpoints) or choose another --out"
    return f"{text}: {size_limit} and {free}; raise the limit or free space"


def save_checkpoint(out, step, model, tokenizer, head, optimizers, cfg, trace_cache=None, record=None):
    """<out>/checkpoint-<step>/, written into a temporary directory and renamed into place
    (checkpoint_directory: a failed write keeps the checkpoint before it and says so).

    Holds the model (safetensors; LoRA adapters merged in, and also apart in lora.safetensors) and
    tokenizer, so the directory works as --model; head.safetensors
    (unless head is None), the optimizers' states, r2rank.json (step and run config), and with
    --freeze-llm the cached traces (trace-cache.pt: {user_id: rollout.Traces fields}).
    """
    with checkpoint_directory(out, step) as tmp:
        model.save_pretrained(tmp, state_dict=checkpoint_state_dict(model))  # safetensors, fp32, LoRA adapters merged in
        if lora_layers(model):  # and kept apart for --resume
            save_file(adapter_state_dict(model), os.path.join(tmp, "lora.safetensors"))
        tokenizer.save_pretrained(tmp)
        if head is not None:
            save_file(head.state_dict(), os.path.join(tmp, "head.safetensors"))
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, os.path.join(tmp, "optimizer.pt"))
        if trace_cache is not None:
            torch.save({user: dataclasses.asdict(traces) for user, traces in trace_cache.items()},
                       os.path.join(tmp, "trace-cache.pt"))
        with open(os.path.join(tmp, "r2rank.json"), "w") as f:
            json.dump({"step": step, "config": dataclasses.asdict(cfg), "head_width": cfg.head_width, **(record or {})}, f, indent=1)
    return os.path.join(out, f"checkpoint-{step}")
