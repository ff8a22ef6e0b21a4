"""Distillation losses (pure tensor maths, no model code).

The depth loss of METHOD.md stage 1.3 compares a student's output with the teacher's output token by token after
L2-normalising every token: ``|| n(s) − n(t) ||² = 2 − 2·cos(s, t)`` per token, averaged over the (valid) tokens of a
stream and summed over streams. Normalising makes the loss blind to the per-token scale of the residual stream, which
grows with depth in MMDiTs and would otherwise let the largest-norm tokens dominate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ppcl.errors import ConfigError

EPS = 1e-6
"""Floor of a token's norm before dividing by it, so an all-zero token gives a finite (zero) direction."""


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of ``|| pred/|pred| − target/|target| ||²`` (= ``2 − 2·cos`` per token).

    Args:
        pred: student tokens ``(B, N, D)``.
        target: teacher tokens ``(B, N, D)``; no gradient flows into it.
        mask: ``(B, N)`` with nonzero/True for tokens that count (e.g. unpadded text tokens); ``None`` counts all.

    Returns:
        A scalar tensor in ``[0, 4]``, computed in float32 whatever the input dtype (bf16 cosines near 1 lose the
        very differences the loss measures). A mask with no valid token gives 0 (with a graph to ``pred``).
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ConfigError(
            "normalized_mse needs two token tensors of one shape",
            expected="pred and target both (B, N, D)",
            found=f"pred {tuple(pred.shape)}, target {tuple(target.shape)}",
        )
    p = pred.float()
    t = target.detach().float()
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(EPS)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(EPS)
    per_token = (p - t).pow(2).sum(dim=-1)  # (B, N)
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ConfigError(
            "token mask does not match the tokens",
            expected=f"a mask of shape {tuple(per_token.shape)} (B, N)",
            found=f"{tuple(mask.shape)}",
        )
    weight = (mask != 0).to(per_token.dtype)
    # clamp: an all-padding batch contributes 0 instead of 0/0.
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def depth_loss(
    student_streams: Mapping[str, torch.Tensor | None],
    teacher_streams: Mapping[str, torch.Tensor | None],
    masks: Mapping[str, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Sum over streams of :func:`normalized_mse` between a student's and the teacher's outputs.

    Args:
        student_streams: ``{"image": (B, N_img, D), "text": (B, N_txt, D) | None}``.
        teacher_streams: the same keys; a stream that is ``None`` on either side (SD3's last block returns no text)
            is skipped.
        masks: optional ``{stream: (B, N) | None}`` of valid tokens (the text padding mask).

    Returns:
        A scalar float32 tensor.

    Raises:
        ConfigError: no stream is present on both sides.
    """
    masks = masks or {}
    terms = []
    for stream, target in teacher_streams.items():
        pred = student_streams.get(stream)
        if pred is None or target is None:
            continue
        terms.append(normalized_mse(pred, target, masks.get(stream)))
    if not terms:
        raise ConfigError(
            "no stream to compare in the depth loss",
            expected="at least one stream present in both the student's and the teacher's outputs",
            found=f"student {sorted(k for k, v in student_streams.items() if v is not None)}, "
            f"teacher {sorted(k for k, v in teacher_streams.items() if v is not None)}",
        )
    return torch.stack(terms).sum()
