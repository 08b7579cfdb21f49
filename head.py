"""The scoring head f_phi of Eq. (2) of the R2Rank paper: the LLM's last hidden state h_k at the end of
trace y_k -> relevance score s_k. Torch only: it copies into another project alone.

    head = ScoreHead(hidden_size=1536, width=256)
    scores = head(final_hidden)          # [..., H] -> [...], fp32 whatever the LLM's precision

Where this departs from the paper (departure 9 of the list in r2rank.py): the MLP reads h_k through a
LayerNorm without learned parameters. The hidden state's scale differs between models; normalized,
the head's initial scores are of unit order for any of them.
"""
import torch


class ScoreHead(torch.nn.Module):
    """f_phi of Eq. (2): final hidden state h [..., H] -> relevance score [...], computed in the head's
    own precision (fp32, whatever the LLM's; fp64 when the head is, as in the gradient tests)."""

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
            return self.net(hidden.to(self.net[1].weight.dtype)).squeeze(-1)
