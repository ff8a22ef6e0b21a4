"""Refining a closed-form residual probe by gradient descent on cached tokens (METHOD.md Stage 1.1, optional)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from ppcl.analysis.probes import ResidualProbe, _flat_mask, _tokens
from ppcl.errors import ConfigError

__all__ = ["refine_probe"]


def refine_probe(
    probe: ResidualProbe,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 4096,
    seed: int = 0,
    mask: Tensor | None = None,
    eval_every: int = 10,
) -> ResidualProbe:
    """Refine a probe with Adam on ``L_fit = mean over tokens of ‖P(x) − y‖²`` (a copy; ``probe`` is untouched).

    Args:
        probe: the starting point (usually the closed-form solution).
        x: cached block inputs ``(N, D)``; y: cached block outputs ``(N, D_out)``.
        steps: Adam steps, each on a random minibatch of ``batch_size`` tokens.
        seed: seeds the minibatch draws, so the result is deterministic.
        mask: optional boolean ``(N,)``; only ``True`` tokens are used.
        eval_every: evaluate the full-data loss every this many steps (and after the last one).

    Returns:
        The probe with the lowest full-data loss seen, the start included, so refining never makes the fit worse.
    """
    if steps < 0 or batch_size < 1 or eval_every < 1:
        raise ConfigError(
            "Invalid probe refinement settings",
            expected="steps >= 0, batch_size >= 1, eval_every >= 1",
            found=f"steps={steps}, batch_size={batch_size}, eval_every={eval_every}",
        )
    x2, y2 = _tokens(x, probe.dim, "x"), _tokens(y, probe.out_dim, "y")
    if mask is not None:
        keep = _flat_mask(mask, x2.shape[0]).to(x2.device)
        x2, y2 = x2[keep], y2[keep]
    work = copy.deepcopy(probe).to(x2.device)
    x2, y2 = x2.to(work.W.dtype), y2.to(work.W.dtype)
    n = x2.shape[0]
    if n == 0:
        return work
    best_loss, best_state = _full_loss(work, x2, y2), _snapshot(work)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    for step in range(1, steps + 1):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen).to(x2.device)
        opt.zero_grad(set_to_none=True)
        loss = (work(x2[idx]) - y2[idx]).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            full = _full_loss(work, x2, y2)
            if full < best_loss:
                best_loss, best_state = full, _snapshot(work)
    work.load_state_dict(best_state)
    return work


def _full_loss(probe: ResidualProbe, x: Tensor, y: Tensor, chunk: int = 65536) -> float:
    """Mean over tokens of ``‖P(x) − y‖²``, accumulated in float64 so comparisons between probes are reliable."""
    total = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            err = probe(x[s : s + chunk]).double() - y[s : s + chunk].double()
            total += float(err.pow(2).sum())
    return total / x.shape[0]


def _snapshot(probe: ResidualProbe) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in probe.state_dict().items()}
