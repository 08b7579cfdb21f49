"""The scoring head of R2Rank: f_phi of Eq. (2), a small MLP from the LLM's final hidden state at a
trace's last token to one relevance score; the scores of every user's K traces; and how a head is
saved and found in a checkpoint directory (next to the LLM, models.save_checkpoint).

Departures 7 (the LayerNorm in front of the MLP) and 8 (--pl-std, `standardized`) of the list at the
top of r2rank.py are implemented here.
"""
import json
import os

import torch
from safetensors.torch import load_file


class ScoreHead(torch.nn.Module):
    """f_phi of Eq. (2): final hidden state h [..., H] -> relevance score [...], computed in fp32."""

    def __init__(self, hidden_size, width):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.LayerNorm(hidden_size, elementwise_affine=False),
            torch.nn.Linear(hidden_size, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, 1),
        )

    def forward(self, hidden):
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # the head stays fp32
            return self.net(hidden.float()).squeeze(-1)


def score_traces(head, samples):
    """Phase 2: s_k = f_phi(h_k) (Eq. 2) for every user's K traces -> [U, K] fp32."""
    return torch.stack([head(s.final_hidden) for s in samples])


def standardized(scores, std):
    """Departure 8: each user's K scores [U, K] shifted to mean 0 and scaled to std `std`; std 0 leaves
    them as they are (the paper). PL is shift-invariant, so this fixes only how sharp it is, and the
    order of the scores (all that evaluation uses) does not change."""
    if not std:
        return scores
    centered = scores - scores.mean(-1, keepdim=True)
    return std * centered / centered.std(-1, keepdim=True, correction=0).clamp(min=1e-6)


def load_head(path, hidden_size, device):
    """The scoring head saved in checkpoint directory `path` (its width is in r2rank.json)."""
    with open(os.path.join(path, "r2rank.json")) as f:
        width = json.load(f)["head_width"]
    head = ScoreHead(hidden_size, width).to(device)
    head.load_state_dict(load_file(os.path.join(path, "head.safetensors")))
    return head


def has_head(path):
    return os.path.isfile(os.path.join(path, "head.safetensors"))
