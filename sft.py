"""Self-reflective SFT cold start (Sec. 3.4 of the R2Rank paper): teacher traces, then fine-tuning.

    python r2rank.py --stage sft-data --teacher-url http://localhost:8000/v1 --teacher-model deepseek-r1
    python r2rank.py --stage sft-data --teacher HuggingFaceTB/SmolLM2-135M-Instruct --out runs/sft
    python r2rank.py --stage sft --model Qwen/Qwen2.5-1.5B-Instruct --out runs/sft   # reads runs/sft/traces.jsonl
    python r2rank.py --stage rl --model runs/sft/checkpoint-N --out runs/rl

sft-data: for (user, candidate) pairs of the training split, ask the teacher for the self-check trace
(data.self_check_messages, Fig. 2) and keep it only when its <answer> matches the label. Kept traces
go to traces.jsonl, the others to traces.rejected.jsonl, one flushed line per asked pair: a rerun skips
every pair in either file (a torn last line is cut off, its pair asked again). traces.summary.json: the counts.

sft: next-token loss on the trace tokens only; the prompt is exactly what the RL stage feeds the
policy (r2rank.prompt_tokens), the trace is the teacher's text followed by the tokenizer's eos.
Checkpoints (no head) work as --model for --stage rl; --resume needs the traces it started on (their sha256).

Where this departs from the paper, which gives no SFT details beyond the data filter (the numbers of the one
list, at the top of r2rank.py):
19. The teacher is any local transformers model (--teacher) or OpenAI-compatible endpoint
    (--teacher-url, key from $OPENAI_API_KEY), not only DeepSeek-R1, sampled at --temperature with top_p 1
    and a budget of its own, --teacher-max-tokens (4096: a reasoning model's thinking counts against it;
    --max-new-tokens is the student's). Only the reply's `content` is kept: a reasoning model's separate
    `reasoning_content` is dropped, the student learns the three-part answer the template asks for.
20. --num-pairs pairs, half positive and half negative, each user giving at most one positive and one
    negative pair, instead of every training instance: with 1 positive among K = 20 candidates, all
    pairs would be 95% negative. Both halves come from seeded shuffles that do not depend on
    --num-pairs, so a larger --num-pairs extends the same list.
21. One teacher sample per pair; a wrong or answerless reply is dropped, not asked again.
22. The loss is the per-token mean over a step's trace tokens (--micro-batch traces per forward,
    --sft-batch traces per optimizer step), AdamW at a constant --sft-lr, no weight decay, gradient norm
    clipped at 1 (r2rank.MAX_GRAD_NORM).
23. The trace (the teacher's reply) is stripped of surrounding whitespace before tokenization.
"""
import hashlib
import http.client
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib

import torch
from safetensors.torch import load_file
from tqdm import tqdm

import data
import lora
import r2rank
import runs
from data import UsageError

RETRIES = 5  # an endpoint request is retried this often on connection errors, timeouts, 5xx and 429 ...
BACKOFF_SECONDS = 1.0  # ... after waiting 1, 2, 4, 8, 16 seconds; each try waits --teacher-timeout for the reply


# ------------------------------------------------------------------------------------ the pairs


def choose_pairs(instances, num_pairs, seed):
    """num_pairs (instance index, candidate index) pairs: positives and negatives alternating, so every
    prefix is balanced; no user gives more than one of each. Seeded; independent of num_pairs."""
    rng = random.Random(f"sft-pairs/{seed}")
    users = list(range(len(instances)))
    positive_users, negative_users = rng.sample(users, len(users)), rng.sample(users, len(users))
    positives = [(u, instances[u]["labels"].index(1)) for u in positive_users]  # load_split: a 1 and a 0 in each
    negatives = [(u, random.Random(f"sft-negative/{seed}/{instances[u]['user_id']}").choice(
        [k for k, label in enumerate(instances[u]["labels"]) if not label])) for u in negative_users]
    n_pos, n_neg = min(num_pairs - num_pairs // 2, len(positives)), min(num_pairs // 2, len(negatives))
    pairs = [pair for two in zip(positives[:n_pos], negatives[:n_neg]) for pair in two]
    return pairs + positives[n_neg:n_pos] + negatives[n_pos:n_neg]


def read_appended(path):
    """Records of a JSON-lines file written one flushed line at a time. A torn last line (a crash in mid-write)
    is cut off the file; any other malformed line is a DataError naming file:line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        text = f.read()
    if (tail := text[text.rfind(b"\n") + 1:]).strip():
        os.truncate(path, len(text) - len(tail))
        print(f"{path}:{len(text.splitlines())}: dropped a torn last line (an interrupted run); its pair is asked again")
    return [record for _, record in data.read_jsonl(path)]


# ---------------------------------------------------------------------------------- the teachers


def chat_completion(url, model, messages, temperature, max_tokens, api_key=None, retries=5, backoff=1.0, timeout=120.0):
    """The reply text of an OpenAI-compatible endpoint: POST {url}/chat/completions (top_p 1), standard library only.
    Each try waits `timeout` s; connection errors, timeouts, 5xx and 429 are retried `retries` times after backoff
    * 1, 2, 4, ... s (a 429's Retry-After seconds instead, up to 10 min). Any other failure is a DataError."""
    endpoint = url.rstrip("/") + "/chat/completions"
    if not endpoint.startswith(("http://", "https://")):
        raise data.DataError(f"{endpoint}: not an http:// or https:// URL")
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature, "top_p": 1.0,
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    request, started = urllib.request.Request(endpoint, data=body, headers=headers, method="POST"), time.monotonic()
    for attempt in range(retries + 1):
        delay = backoff * 2 ** attempt
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                payload = reply.read()
            break
        except urllib.error.HTTPError as e:  # the server answered with an error status
            problem = f"HTTP {e.code} {e.reason}: {e.read(300).decode(errors='replace').strip()}"
            if e.code in (401, 403) and not api_key:
                problem += " (no API key was sent: set OPENAI_API_KEY)"
            if e.code != 429 and e.code < 500:
                raise data.DataError(f"{endpoint}: {problem}") from None
            if e.code == 429 and (wait := e.headers.get("Retry-After", "")).isdigit():  # seconds (a date: ignored)
                delay = min(int(wait), 600)
        except (OSError, http.client.HTTPException) as e:  # no answer: refused, reset, timed out (URLError is an OSError)
            problem = str(getattr(e, "reason", e)) or type(e).__name__
        if attempt == retries:
            raise data.DataError(f"{endpoint}: {problem} (gave up after {retries + 1} attempts, {time.monotonic() - started:.1f} "
                                 f"s in all; each waits at most --teacher-timeout {timeout:g} s for the reply)")
        time.sleep(delay)
    try:
        return json.loads(payload)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise data.DataError(f"{endpoint}: not a chat completion: {payload[:300]!r}") from None


def local_teacher(args):
    """ask(instance, k, messages) -> reply text, sampled from --teacher on the RL stage's prompt tokens.
    Each pair has its own seed, so a resumed run writes what an uninterrupted one would have."""
    device = runs.pick_device(args.device)  # sampled only: weights in the compute dtype, no autocast
    model, tokenizer = r2rank.load_model(args.teacher, device, runs.pick_dtype(args.dtype, device), args.seed, "--teacher")
    model.eval()

    def ask(instance, k, messages):
        prefix, suffixes = r2rank.prompt_tokens(tokenizer, [instance], args)[0]
        torch.manual_seed(zlib.crc32(f"{args.seed}/{instance['user_id']}/{instance['candidates'][k]['item_id']}".encode()))
        traces, _ = r2rank.rollout(model, tokenizer, [(prefix, [suffixes[k]])], args.teacher_max_tokens, args.temperature)
        return tokenizer.decode(traces[0], skip_special_tokens=True)

    return ask


# -------------------------------------------------------------------------------------- sft-data


def build_traces(args):
    """--stage sft-data: ask the teacher about --num-pairs pairs; keep the replies whose answer is right.
    A stop (r2rank.run_stage's line) keeps the pairs written; the pair in flight is asked again."""
    if bool(args.teacher) == bool(args.teacher_url):
        raise UsageError("sft-data needs one teacher: --teacher (a local model) or --teacher-url (an endpoint)")
    runs.claim(args.out)  # two runs appending to the same traces would ask every pair twice
    started = time.time()
    instances = data.load_split(runs.prepare_data(args), "train")
    path = args.traces or os.path.join(args.out, "traces.jsonl")
    rejected_path, summary_path = path.removesuffix(".jsonl") + ".rejected.jsonl", path.removesuffix(".jsonl") + ".summary.json"
    if os.path.isdir(path):
        raise UsageError(f"--traces {path}: a folder; pass a file, e.g. {os.path.join(path, 'traces.jsonl')}")
    try:  # before the teacher: the file is appended to, two are written beside it
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "a").close()
        tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path))).close()
    except OSError as error:
        raise UsageError(f"--traces {path}: cannot write there ({error.strerror or type(error).__name__})") from None
    teacher = args.teacher or args.teacher_model or args.teacher_url  # what a resumed run must match
    earlier = read_appended(path) + read_appended(rejected_path)
    others = {record.get("teacher") for record in earlier} - {teacher}
    if others:
        raise data.DataError(f"{path}: written by another teacher ({', '.join(map(str, others))}); "
                             "pass another --traces or delete it and its sidecars")
    seen = {(record.get("user_id"), record.get("item_id")) for record in earlier}

    pairs = choose_pairs(instances, args.num_pairs, args.seed)
    key = lambda pair: (instances[pair[0]]["user_id"], instances[pair[0]]["candidates"][pair[1]]["item_id"])
    pending = [pair for pair in pairs if key(pair) not in seen]
    n_pos = sum(instances[u]["labels"][k] for u, k in pairs)
    print(f"{len(pairs)} pairs ({n_pos} positive, {len(pairs) - n_pos} negative) from {len(instances)} training users; "
          f"{len(pairs) - len(pending)} already asked, {len(pending)} to ask; teacher {teacher}, "
          f"--teacher-max-tokens {args.teacher_max_tokens}")
    if len(pairs) < args.num_pairs:
        print(f"only {len(pairs)} pairs: each user gives at most one positive and one negative pair")
    ask = local_teacher(args) if pending and args.teacher else (  # a local model loads only when there is work
        lambda instance, k, messages: chat_completion(args.teacher_url, args.teacher_model, messages, args.temperature,
                                                      args.teacher_max_tokens, os.environ.get("OPENAI_API_KEY"), RETRIES,
                                                      BACKOFF_SECONDS, args.teacher_timeout))
    accepted = 0
    with open(path, "a", encoding="utf-8") as kept_file, open(rejected_path, "a", encoding="utf-8") as rejected_file:
        bar = tqdm(pending, desc="sft-data", dynamic_ncols=True)
        for done, (u, k) in enumerate(bar, 1):
            instance = instances[u]
            messages = data.self_check_messages(instance, k, args.max_history, args.max_item_chars, data.PROMPTS[args.prompt])
            response = ask(instance, k, messages)
            decision, label = data.parse_answer(response), instance["labels"][k]
            record = {"user_id": instance["user_id"], "item_id": instance["candidates"][k]["item_id"], "label": label,
                      "decision": decision, "teacher": teacher, "messages": messages, "response": response}
            out = kept_file if decision == label else rejected_file
            print(json.dumps(record, ensure_ascii=False), file=out, flush=True)
            os.fsync(out.fileno())  # a crash loses at most the pair in flight
            accepted += decision == label
            bar.set_postfix(accepted=f"{accepted}/{done}")

    kept, rejected = read_appended(path), read_appended(rejected_path)  # this run's and those it resumed
    asked, no_answer = len(kept + rejected), sum(r.get("decision") is None for r in rejected)
    pos, neg = ({"asked": sum(r.get("label") == label for r in kept + rejected),
                 "accepted": sum(r.get("label") == label for r in kept)} for label in (1, 0))
    summary = {"teacher": teacher, "asked": asked, "accepted": len(kept), "acceptance_rate": len(kept) / max(1, asked),
               "positive": pos, "negative": neg, "no_answer": no_answer, "asked_this_run": len(pending),
               "wall_time_s": round(time.time() - started, 1)}
    with open(summary_path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(summary_path + ".tmp", summary_path)
    print(f"acceptance rate {summary['acceptance_rate']:.1%}: kept {len(kept)} of {asked} pairs (positives "
          f"{pos['accepted']}/{pos['asked']}, negatives {neg['accepted']}/{neg['asked']}, no answer tag {no_answer}) "
          f"-> {path} ({summary['wall_time_s']:.0f} s)")
    if no_answer > asked / 4:  # replies cut off before their <answer>, most often
        print(f"warning: {no_answer} of {asked} replies have no <answer> tag; raise the teacher's budget: "
              f"--teacher-max-tokens (now {args.teacher_max_tokens})")
    return summary


# ------------------------------------------------------------------------------------------ sft


def read_traces(path, instances, args):
    """Validated traces -> [(instance, candidate index, trace text)]. instances: user_id -> instance
    of the training split. A bad line is a DataError naming file:line."""
    if not os.path.exists(path):  # the cold start's first stage not run yet, or another --out
        raise data.DataError(f"{path}: no such file; --stage sft-data writes it (with the same --out), or pass --traces FILE")
    traces = []
    for lineno, record in data.read_jsonl(path):
        user, item, response = (data.require(record, name, str, path, lineno) for name in ("user_id", "item_id", "response"))
        if user not in instances:
            raise data.DataError(f"{path}:{lineno}: user {user!r} is not in the training split")
        items = [c["item_id"] for c in instances[user]["candidates"]]
        if item not in items:
            raise data.DataError(f"{path}:{lineno}: item {item!r} is not a candidate of user {user!r}")
        instance, k, decision = instances[user], items.index(item), data.parse_answer(response)
        if decision is None:
            raise data.DataError(f"{path}:{lineno}: the response has no <answer>{data.RECOMMEND}</answer> or "
                                 f"<answer>{data.NOT_RECOMMEND}</answer> tag")
        if decision != instance["labels"][k]:
            raise data.DataError(f"{path}:{lineno}: the response's answer contradicts the label {instance['labels'][k]}")
        messages = data.self_check_messages(instance, k, args.max_history, args.max_item_chars, data.PROMPTS[args.prompt])
        if "messages" in record and record["messages"] != messages:
            raise data.DataError(f"{path}:{lineno}: the prompt differs from the one built from this data with --prompt, "
                                 "--max-history and --max-item-chars (were the traces made with other settings?)")
        traces.append((instance, k, response))
    if not traces:
        raise data.DataError(f"{path}: no traces")
    return traces


def accumulate_gradients(model, prompts, traces, micro_batch, dtype=torch.float32):
    """Backward of the per-token mean NLL of traces (token-id lists) given their prompts, micro_batch traces per
    r2rank.forward_traces at temperature 1, forward under autocast, backward outside. Returns the mean NLL."""
    total_tokens = max(1, sum(map(len, traces)))
    nll_sum = 0.0
    for start in range(0, len(prompts), micro_batch):
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logp, mask, _ = r2rank.forward_traces(model, [], prompts[start:start + micro_batch],
                                                  traces[start:start + micro_batch], 1.0)
            nll = -(logp * mask).sum()  # the users differ: each row holds its whole prompt, no shared prefix
        (nll / total_tokens).backward()
        nll_sum += nll.item()
    return nll_sum / total_tokens


def train_sft(args):
    """--stage sft: fine-tune --model on the traces, loss on the trace tokens only. Returns the last checkpoint."""
    run = runs.start_run(args, "sft")
    instances = {inst["user_id"]: inst for inst in data.load_split(run.data_dir, "train")}
    path = args.traces or os.path.join(args.out, "traces.jsonl")
    traces = read_traces(path, instances, args)  # fail before loading a model
    with open(path, "rb") as f:
        args.traces_sha256 = hashlib.sha256(f.read()).hexdigest()  # recorded in the checkpoints' r2rank.json
    if run.checkpoint:
        with open(os.path.join(run.checkpoint, "r2rank.json")) as f:
            if json.load(f)["args"].get("traces_sha256") != args.traces_sha256:
                raise UsageError(f"{run.checkpoint}: --resume needs the settings that define the run unchanged; these "
                                 f"differ: --traces {path} (its content differs from the checkpoint's)")
    steps_per_epoch = math.ceil(len(traces) / args.sft_batch)
    max_steps = args.sft_epochs * steps_per_epoch
    if run.start_step >= max_steps:
        print(f"{run.checkpoint} is the last step of {args.sft_epochs} epochs: nothing to train (raise --sft-epochs)")
        return run.checkpoint
    model, tokenizer = r2rank.load_model(run.checkpoint or args.model, run.device, torch.float32, args.seed)  # fp32 master weights

    # prompt tokens exactly as in the RL stage; trace = teacher text + eos (the end of the turn)
    users = {inst["user_id"]: inst for inst, _, _ in traces}
    encoded = dict(zip(users, r2rank.prompt_tokens(tokenizer, list(users.values()), args)))  # user_id -> (prefix, suffixes)
    prompts = [encoded[inst["user_id"]][0] + encoded[inst["user_id"]][1][k] for inst, k, _ in traces]
    trace_ids = [tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, _, text in traces]

    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    torch.manual_seed(args.seed)  # --lora-rank: the adapters' A are drawn from it
    trained = lora.add_adapters(model, args.lora_rank) if args.lora_rank else list(model.parameters())
    if args.lora_rank and run.checkpoint:
        lora.restore_adapters(model, load_file(os.path.join(run.checkpoint, "lora.safetensors"), device=str(run.device)))
    optimizer = torch.optim.AdamW(trained, lr=args.sft_lr, weight_decay=0.0, fused=run.device.type == "cuda")
    runs.restore_optimizers({"llm": optimizer}, run.checkpoint, {"llm": args.sft_lr})  # a changed --sft-lr applies
    lora.hold_frozen_weights(model, run.dtype)  # LoRA's base: cast once, not at every forward
    model.train()  # gradient checkpointing acts in training mode only (Qwen2 has no dropout)
    lengths = [len(t) for t in trace_ids]
    n_pos = sum(inst["labels"][k] for inst, k, _ in traces)
    print(f"{len(traces)} traces ({n_pos} positive) x {args.sft_epochs} epochs, {args.sft_batch} per step in micro-batches "
          f"of {args.micro_batch} = {max_steps} steps; trace tokens mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} "
          f"({sum(n > args.max_new_tokens for n in lengths)} over --max-new-tokens); {run.device}, {run.dtype} compute, gradient "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    runs.check_disk(args.out, model, {"llm": optimizer}, args.keep_checkpoints)
    metrics = runs.open_metrics(args.out, run.start_step)
    runs.catch_signals()  # Ctrl-C, SIGTERM: the step in progress finishes and is saved, then the run stops
    bar = tqdm(range(run.start_step, max_steps), initial=run.start_step, total=max_steps, desc="sft", dynamic_ncols=True,
               disable=None)
    for step in bar:
        started = time.time()
        # 1) the step's traces: a seeded shuffle per epoch, so a resumed run sees the same batches
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(traces), generator=torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)).tolist()
        batch = order[index * args.sft_batch:(index + 1) * args.sft_batch]

        # 2) forward and backward in micro-batches: the per-token mean NLL over the step's traces
        loss = accumulate_gradients(model, [prompts[i] for i in batch], [trace_ids[i] for i in batch], args.micro_batch, run.dtype)

        # 3) update, outside any autocast context: the next step's forward casts the new weights
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, r2rank.MAX_GRAD_NORM).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 4) log, checkpoint
        row = {"step": step + 1, "epoch": epoch + 1, "loss": loss, "traces": len(batch),
               "tokens": sum(lengths[i] for i in batch), "grad_norm": grad_norm, "step_time": time.time() - started}
        if bad := [name for name, value in row.items() if not math.isfinite(value)]:
            raise UsageError(f"step {step + 1}: non-finite {', '.join(bad)}, so the run stops without saving this step; "
                             "lower --sft-lr")
        runs.log_row(metrics, row, bar.write)
        stop = runs.stop_signal()
        if (step + 1) % args.save_every == 0 or step + 1 == max_steps or stop:
            runs.save_checkpoint(args.out, step + 1, model, tokenizer, None, {"llm": optimizer}, args, run)
        if stop:
            runs.say(f"stopped by {signal.Signals(stop).name}: steps 1-{step + 1} kept in "
                     f"{os.path.join(args.out, f'checkpoint-{step + 1}')}; continue with --resume")
            sys.exit(128 + stop)
    return os.path.join(args.out, f"checkpoint-{max_steps}")
