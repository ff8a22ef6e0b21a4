"""The toy text encoder: a learned word embedding with positions and one small transformer layer.

It plays the role of Qwen2.5-VL for the toy teacher. It is trained together with the teacher, then frozen and
shipped with it; ppcl only ever uses its outputs (prompt embeddings + mask), like a real pipeline's text encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from ppcl.toy.tokenizer import MAX_TOKENS


class ToyTextEncoder(nn.Module):
    """Token ids ``(B, T)`` + mask ``(B, T)`` → prompt embeddings ``(B, T, dim)``.

    The transformer layer lets each word see its neighbours, so "red" can bind to the shape it describes
    before the diffusion model reads the sequence.
    """

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, max_tokens: int = MAX_TOKENS) -> None:
        super().__init__()
        self.vocab_size, self.dim, self.heads, self.max_tokens = vocab_size, dim, heads, max_tokens
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        nn.init.normal_(self.token.weight, std=0.5)
        nn.init.normal_(self.position, std=0.1)

    def config(self) -> dict[str, int]:
        """Constructor arguments, for saving next to the weights."""
        return {"vocab_size": self.vocab_size, "dim": self.dim, "heads": self.heads, "max_tokens": self.max_tokens}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.position[: ids.shape[1]]
        x = self.layer(x, src_key_padding_mask=~mask.bool())
        # Padded positions carry no information; zero them so downstream statistics ignore them.
        return x * mask.unsqueeze(-1).to(x.dtype)
