"""The pieces a reader can lift into another project: each is copied with the files it names into an
empty directory and imported by a fresh Python that can reach no other module of this project and
none of the dependencies the piece does not list (torch, numpy, transformers, tqdm, safetensors, ...),
and its small computation is checked against a number worked out by hand."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

THIRD_PARTY = {"torch", "numpy", "transformers", "tqdm", "safetensors", "tokenizers", "scipy", "huggingface_hub"}
PROJECT = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} | {"baselines", "tools", "machinery", "tests"}

GUARD = textwrap.dedent("""
    import importlib.abc, sys
    if "torch" not in BLOCKED:
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
    # files copied, the third-party packages allowed, the check: a hand-computed value
    "plackett_luce": (["plackett_luce.py"], {"torch"}, """
        import math, torch, plackett_luce
        # scores (0, log 2): ranking (1, 0) has P = 2/3 (item 1 first) x 1
        value = plackett_luce.log_prob(torch.tensor([0.0, math.log(2.0)]), torch.tensor([1, 0])).item()
        expected = math.log(2 / 3)
    """),
    "metrics (NDCG)": (["metrics.py"], {"torch"}, """
        import math, torch, metrics
        # the only relevant item at rank 2 of 3: (2^1 - 1) / log2(3), over the ideal 1
        value = metrics.ndcg_at_k(torch.tensor([0.0, 1.0, 0.0]), 10).item()
        expected = 1 / math.log2(3)
    """),
    "ppo": (["ppo.py", "plackett_luce.py", "metrics.py"], {"torch"}, """
        import torch, ppo
        # at ratio 1 the clipped loss is minus the mean advantage over valid tokens: -(1 + 1 - 3) / 3
        logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
        loss, _ = ppo.clipped_token_loss(logp, logp, torch.tensor([1.0, -3.0]), torch.tensor([[1, 1], [1, 0]]))
        value, expected = loss.item(), 1 / 3
    """),
    "head": (["head.py"], {"torch"}, """
        import torch, head
        f = head.ScoreHead(hidden_size=2, width=1)
        with torch.no_grad():  # LayerNorm([1, 3]) = [-1, 1]; -1 -> GELU(-1) = -0.158655; 2 x that + 0.5
            f.net[1].weight.copy_(torch.tensor([[1.0, 0.0]])); f.net[1].bias.zero_()
            f.net[3].weight.fill_(2.0); f.net[3].bias.fill_(0.5)
        value, expected = f(torch.tensor([1.0, 3.0])).item(), 0.5 + 2 * -0.15865525393145707
    """),
    "lora": (["lora.py"], {"torch"}, """
        import torch, lora
        base = torch.nn.Linear(2, 1)
        with torch.no_grad():
            base.weight.copy_(torch.tensor([[1.0, 2.0]])); base.bias.fill_(0.5)
        layer = lora.LoRALinear(base, rank=1)
        with torch.no_grad():  # A = [1, 1], B = [3]: y = x W^T + b + (alpha / r) (x A^T) B^T = 1 + 2 + 0.5 + 2 x 2 x 3
            layer.lora_A.fill_(1.0); layer.lora_B.fill_(3.0)
        value, expected = layer(torch.tensor([1.0, 1.0])).item(), 15.5
    """),
    "stats": (["stats.py"], {"numpy"}, """
        import stats
        # differences 1, 2, 3, all positive: T = min(W+, W-) = 0; exact p = 2 P(W+ <= 0) = 2 / 2^3
        statistic, value = stats.wilcoxon_signed_rank([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
        expected = 0.25 if statistic == 0 else -1
    """),
    "protocol": (["protocol.py"], set(), """
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


def run_alone(tmp_path, files, allowed, check):
    for name in files:
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    blocked = (PROJECT - {name.removesuffix(".py") for name in files}) | (THIRD_PARTY - allowed)
    script = (f"ROOT, BLOCKED = {ROOT!r}, {blocked!r}\n" + GUARD + textwrap.dedent(check)
              + "\nprint(repr(float(value)), repr(float(expected)))\n")
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})


@pytest.mark.parametrize("piece", list(PIECES))
def test_the_piece_copies_alone_and_computes_a_hand_number(tmp_path, piece):
    result = run_alone(tmp_path, *PIECES[piece])
    assert result.returncode == 0, result.stderr[-2000:]
    value, expected = map(float, result.stdout.split())
    assert math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("files, allowed, check", [
    (["ppo.py"], {"torch"}, "import ppo"),  # ppo needs plackett_luce and metrics, which are not copied
    (["stats.py"], {"numpy"}, "import stats, torch"),  # torch is not what stats lists
    (["protocol.py"], set(), "import protocol, numpy"),
    (["r2rank.py"], {"torch"}, "import r2rank"),  # transformers, and the project's other modules
])
def test_the_guard_refuses_what_a_piece_does_not_list(tmp_path, files, allowed, check):
    result = run_alone(tmp_path, files, allowed, check + "\nvalue = expected = 0")
    assert result.returncode != 0 and "ImportError: blocked: " in result.stderr, result.stderr[-2000:]
