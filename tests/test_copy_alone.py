"""The pieces a reader can lift into another project: each is copied with the files it names into an
empty directory and imported by a fresh Python that can reach no other module of this project and
none of its other dependencies (transformers, tqdm, safetensors, numpy, ...), and its small
computation is checked against a number worked out by hand."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

# Torch and the standard library are allowed; these are refused at import.
BLOCKED = ("transformers", "tqdm", "safetensors", "numpy", "tokenizers", "scipy", "machinery", "data", "sources", "models", "rollout",
           "decode", "sampling", "runs", "config", "distributed", "evaluate", "r2rank", "rl_run", "sft", "analyses")

GUARD = textwrap.dedent("""
    import importlib.abc, sys
    import torch  # first: torch imports numpy itself, which is then hidden from the piece below
    # the project's folders leave the path; a virtual environment inside the checkout (.venv) stays
    sys.path = [p for p in sys.path if not p.startswith(ROOT) or "site-packages" in p]
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] in BLOCKED}
    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError("blocked: " + name)
    sys.meta_path.insert(0, Blocked())
""")

PIECES = {
    # files copied, the check: a hand-computed value
    "plackett_luce": (["plackett_luce.py"], """
        import math, torch, plackett_luce
        # scores (0, log 2): ranking (1, 0) has P = 2/3 (item 1 first) x 1
        value = plackett_luce.log_prob(torch.tensor([0.0, math.log(2.0)]), torch.tensor([1, 0])).item()
        expected = math.log(2 / 3)
    """),
    "sampling": (["sampling.py"], """
        import torch, sampling
        # p = (.1, .2, 0, .3, .4): u = 0.35 lies in token 3's interval [.3, .6), u = 0.25 in token 1's [.1, .3)
        ids = sampling.inverse_cdf(torch.tensor([[0.1, 0.2, 0.0, 0.3, 0.4]] * 2), torch.tensor([0.35, 0.25], dtype=torch.float64))
        value, expected = float(ids.tolist() == [3, 1]), 1.0
    """),
    "metrics (NDCG)": (["metrics.py"], """
        import math, torch, metrics
        # the only relevant item at rank 2 of 3: (2^1 - 1) / log2(3), over the ideal 1
        value = metrics.ndcg_at_k(torch.tensor([0.0, 1.0, 0.0]), 10).item()
        expected = 1 / math.log2(3)
    """),
    "ppo": (["ppo.py", "plackett_luce.py", "metrics.py"], """
        import torch, ppo
        # at ratio 1 the clipped loss is minus the mean advantage over valid tokens: -(1 + 1 - 3) / 3
        logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
        loss, _ = ppo.clipped_token_loss(logp, logp, torch.tensor([1.0, -3.0]), torch.tensor([[1, 1], [1, 0]]))
        value, expected = loss.item(), 1 / 3
    """),
    "head": (["head.py"], """
        import torch, head
        f = head.ScoreHead(hidden_size=2, width=1)
        with torch.no_grad():  # LayerNorm([1, 3]) = [-1, 1]; -1 -> GELU(-1) = -0.158655; 2 x that + 0.5
            f.net[1].weight.copy_(torch.tensor([[1.0, 0.0]])); f.net[1].bias.zero_()
            f.net[3].weight.fill_(2.0); f.net[3].bias.fill_(0.5)
        value, expected = f(torch.tensor([1.0, 3.0])).item(), 0.5 + 2 * -0.15865525393145707
    """),
    "decode": (["decode.py"], """
        import torch, decode
        # a zero query weighs its allowed keys equally: the output is the mean of their values, here of
        # the prefix's 1 and 3 and the row's own 8 (the row's second slot is not allowed): (1 + 3 + 8) / 3
        query = torch.zeros(1, 1, 1, 1, 1)  # [K, kv_heads, G, T, d]
        keys, values = torch.randn(1, 1, 2, 1), torch.tensor([[[[8.0], [100.0]]]])  # [K, kv_heads, S, d]
        allowed = torch.tensor([True, False]).view(1, 1, 1, 1, 2)
        prefix = (torch.randn(1, 2, 1), torch.tensor([[[1.0], [3.0]]]))  # [kv_heads, P, d]
        value, expected = decode.attention(query, keys, values, allowed, prefix).item(), 4.0
    """),
    "protocol": (["protocol.py"], """
        import protocol
        from collections import Counter
        class Raw:  # four users, two items each (the second later): p q, r s, t u, p r
            interactions = [(u, i, t) for u, pair in zip("abcd", ("pq", "rs", "tu", "pr")) for t, i in enumerate(pair)]
            items = {i: {"title": i.upper(), "text": ""} for i in "pqrstu"}
            profiles, inputs, touched_outside, dropped = {}, ["toy"], {}, Counter()
        splits, stats = protocol.build_instances(Raw(), protocol.Protocol(candidates=3, split="1:0:1"))
        users = {inst["user_id"]: inst for split in splits.values() for inst in split}
        touched = {"a": "pq", "b": "rs", "c": "tu", "d": "pr"}
        ok = [stats["instances"] == {"train": 2, "valid": 0, "test": 2}]  # 4 users at 1:0:1: 4 - 0 - 2, 0, 2
        for user, inst in users.items():
            items = [c["item_id"] for c in inst["candidates"]]
            positive = items[inst["labels"].index(1)]
            ok += [positive == touched[user][1], [h["item_id"] for h in inst["history"]] == [touched[user][0]],
                   len(items) == 3 and sum(inst["labels"]) == 1, not set(items) - {positive} & set(touched[user])]
        value, expected = float(all(ok) and len(ok) == 17), 1.0
    """),
}


def run_alone(tmp_path, files, check):
    for name in files:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    copied = {name.removesuffix(".py") for name in files}
    script = (f"ROOT, BLOCKED = {ROOT!r}, {set(BLOCKED) - copied!r}\n" + GUARD + textwrap.dedent(check)
              + "\nprint(repr(value), repr(expected))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    return result


@pytest.mark.parametrize("piece", list(PIECES))
def test_the_piece_copies_alone_and_computes_a_hand_number(tmp_path, piece):
    files, check = PIECES[piece]
    result = run_alone(tmp_path, files, check)
    assert result.returncode == 0, result.stderr[-2000:]
    value, expected = map(float, result.stdout.split())
    assert math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6)


def test_the_guard_refuses_what_a_piece_does_not_list(tmp_path):
    """The guard itself can fail: the rollout needs transformers, which is blocked."""
    result = run_alone(tmp_path, ["rollout.py", "decode.py", "ppo.py", "plackett_luce.py", "metrics.py"], """
        import rollout
        value = expected = 0
    """)
    assert result.returncode != 0 and "blocked" in result.stderr
