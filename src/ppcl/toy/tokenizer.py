"""A word-level tokenizer for ShapesWorld captions.

The vocabulary is closed and fixed (every word ShapesWorld can say), so token ids never change between versions and
the committed teacher's text embedding stays valid.
"""

from __future__ import annotations

import torch

from ppcl.errors import ConfigError
from ppcl.toy.world import COLORS, RELATIONS, SHAPES

PAD, BOS = "<pad>", "<s>"
# Relations are split into words: "left of" → "left", "of".
_WORDS = ["a", "and"] + list(COLORS) + list(SHAPES) + sorted({w for r in RELATIONS for w in r.split()})
VOCAB: tuple[str, ...] = (PAD, BOS, *_WORDS)
MAX_TOKENS = 10  # "<s> a yellow triangle left of a green square" is 9 tokens; one spare.


class WordTokenizer:
    """Maps captions to fixed-length id tensors ``(B, MAX_TOKENS)`` and a mask ``(B, MAX_TOKENS)`` (1 = real token).

    Every caption starts with ``<s>``, so the empty caption (used for classifier-free guidance) is one real token.
    """

    def __init__(self) -> None:
        self.vocab = VOCAB
        self.index = {w: i for i, w in enumerate(VOCAB)}
        self.max_tokens = MAX_TOKENS

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_one(self, caption: str) -> list[int]:
        """Token ids of one caption (no padding)."""
        words = caption.lower().split()
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ConfigError(
                "caption has words outside the ShapesWorld vocabulary",
                expected="words from: " + " ".join(_WORDS),
                found=f"{unknown} in {caption!r}",
                fix="describe 1-2 shapes like 'a red circle left of a blue square'",
            )
        ids = [self.index[BOS]] + [self.index[w] for w in words]
        if len(ids) > self.max_tokens:
            raise ConfigError(
                "caption is too long",
                expected=f"at most {self.max_tokens - 1} words",
                found=f"{len(words)} words in {caption!r}",
                fix="use one or two objects per caption",
            )
        return ids

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``captions`` to ``(ids, mask)``, both ``(B, MAX_TOKENS)``; ids int64, mask int64 0/1."""
        ids = torch.zeros(len(captions), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.long)
        for row, caption in enumerate(captions):
            tokens = self.encode_one(caption)
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask
