"""Residual affine probes: closed-form recovery, streaming, exact error from statistics, ridge, refinement."""

from __future__ import annotations

import pytest
import torch

from ppcl.analysis.probe_refine import refine_probe
from ppcl.analysis.probes import ProbeAccumulator, ProbeFit, ResidualProbe
from ppcl.errors import ConfigError, PPCLError

D = 8


def planted(n: int, seed: int = 0, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``x`` (n, D) and ``y = x + x Aᵀ + c (+ noise)`` in float64, with the planted ``A`` and ``c``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 2.0 + 0.5
    y = x + x @ A.T + c + noise * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, y, A, c


def test_recovers_planted_map_exactly() -> None:
    x, y, A, c = planted(500)
    acc = ProbeAccumulator(D)
    acc.update(x, y)
    fit = acc.fit(ridge=0.0, dtype=torch.float64)
    assert isinstance(fit, ProbeFit) and fit.n_tokens == 500
    torch.testing.assert_close(fit.probe.W.detach(), A, atol=1e-8, rtol=0)
    torch.testing.assert_close(fit.probe.b.detach(), c, atol=1e-8, rtol=0)
    assert fit.rel_error < 1e-6 and fit.mse < 1e-12


def test_masked_batches_equal_one_shot() -> None:
    x, y, A, c = planted(600, seed=1, noise=0.1)
    one = ProbeAccumulator(D)
    one.update(x, y)
    # Feed in (B, S, D) batches with garbage in the masked-out (padding) slots.
    streamed = ProbeAccumulator(D)
    g = torch.Generator().manual_seed(5)
    for chunk_x, chunk_y in zip(x.split(100), y.split(100), strict=False):
        mask = torch.ones(2, 80, dtype=torch.bool)
        mask[:, 50:] = False
        bx = torch.randn(2, 80, D, generator=g, dtype=torch.float64) * 1e3
        by = torch.randn(2, 80, D, generator=g, dtype=torch.float64) * 1e3
        bx[mask], by[mask] = chunk_x, chunk_y
        streamed.update(bx, by, weight_mask=mask)
    assert streamed.n_tokens == one.n_tokens == 600
    for a, b in zip(streamed.gram(), one.gram(), strict=False):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-12)
    p1, p2 = one.solve(1e-4, dtype=torch.float64), streamed.solve(1e-4, dtype=torch.float64)
    torch.testing.assert_close(p1.W, p2.W, atol=1e-10, rtol=0)
    # A noiseless planted map is still recovered exactly from masked batches.
    x, y, A, c = planted(300, seed=2)
    acc = ProbeAccumulator(D)
    for chunk_x, chunk_y in zip(x.split(70), y.split(70), strict=False):
        padded_x = torch.cat([chunk_x, torch.full((5, D), 99.0, dtype=torch.float64)])
        padded_y = torch.cat([chunk_y, torch.zeros(5, D, dtype=torch.float64)])
        mask = torch.arange(len(padded_x)) < len(chunk_x)
        acc.update(padded_x.float(), padded_y.float(), weight_mask=mask)
    fit = acc.fit(ridge=0.0, dtype=torch.float64)
    torch.testing.assert_close(fit.probe.W.detach(), A, atol=1e-4, rtol=0)  # float32 inputs: float32 accuracy


def test_merge_equals_one_shot() -> None:
    x, y, _, _ = planted(400, seed=3, noise=0.2)
    one, a, b = ProbeAccumulator(D), ProbeAccumulator(D), ProbeAccumulator(D)
    one.update(x, y)
    a.update(x[:150], y[:150])
    b.update(x[150:], y[150:])
    a.merge(b)
    assert a.n_tokens == 400
    for s, t in zip(a.gram(), one.gram(), strict=False):
        torch.testing.assert_close(s, t, atol=1e-9, rtol=1e-12)
    assert a.fit().rel_error == pytest.approx(one.fit().rel_error, rel=1e-9)


@pytest.mark.parametrize("residual", [True, False])
def test_error_from_statistics_equals_direct(residual: bool) -> None:
    x, y, _, _ = planted(300, seed=4, noise=0.5)
    if not residual:
        y = y[:, :5]
    acc = ProbeAccumulator(D, y.shape[1], residual=residual)
    acc.update(x, y)
    fit = acc.fit(ridge=1e-2)
    # Also any other probe, e.g. a perturbed one, is evaluated exactly from the statistics.
    other = ResidualProbe.from_tensors(fit.probe.W + 0.05, fit.probe.b - 0.1, residual=residual, dtype=torch.float64)
    for probe in (fit.probe.double(), other):
        stats = acc.fit_error(probe)
        with torch.no_grad():
            err = probe(x) - y
        target = (y - x) if residual else y
        assert stats.rel_error == pytest.approx(float(err.norm() / target.norm()), rel=1e-9)
        assert stats.mse == pytest.approx(float(err.pow(2).mean()), rel=1e-9)


def test_ridge_underdetermined_and_relative() -> None:
    x, y, _, _ = planted(5, seed=6, noise=0.1)  # 5 tokens for 9 unknowns per output channel
    acc = ProbeAccumulator(D)
    acc.update(x, y)
    probe = acc.solve(ridge=1e-3, dtype=torch.float64)
    assert torch.isfinite(probe.W).all() and torch.isfinite(probe.b).all()
    assert acc.fit_error(probe).rel_error < 0.05  # nearly interpolates the few tokens
    assert torch.isfinite(acc.solve(ridge=0.0).W).all()  # singular: minimum-norm fallback
    # Relative ridge: rescaling the data rescales nothing but the bias.
    scaled = ProbeAccumulator(D)
    scaled.update(x * 1e3, y * 1e3)
    probe_s = scaled.solve(ridge=1e-3, dtype=torch.float64)
    torch.testing.assert_close(probe_s.W, probe.W, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(probe_s.b, probe.b * 1e3, atol=1e-5, rtol=1e-6)
    # More ridge shrinks W.
    assert acc.solve(ridge=10.0).W.norm() < acc.solve(ridge=1e-3).W.norm()
    with pytest.raises(ConfigError):
        acc.solve(ridge=-1.0)


def test_probe_module() -> None:
    W, b = torch.randn(D, D), torch.randn(D)
    probe = ResidualProbe.from_tensors(W, b)
    z = torch.randn(3, 4, D)
    torch.testing.assert_close(probe(z), z + z @ W.T + b)
    assert probe(z.bfloat16()).dtype == torch.bfloat16
    assert set(probe.state_dict()) == {"W", "b"}
    fresh = ResidualProbe(D)
    torch.testing.assert_close(fresh(z), z)  # a fresh probe is the identity
    fresh.load_state_dict(probe.state_dict())
    torch.testing.assert_close(fresh(z), probe(z))
    assert probe.to(torch.float64).W.dtype == torch.float64
    plain = ResidualProbe.from_tensors(torch.randn(3, D), torch.zeros(3), residual=False)
    assert plain(z).shape == (3, 4, 3)


def test_refine_never_worse_and_deterministic() -> None:
    x, y, _, _ = planted(256, seed=7, noise=0.3)
    y = y + 0.5 * torch.tanh(x)  # nonlinear part, so the optimum is not the planted map
    x, y = x.float(), y.float()
    acc = ProbeAccumulator(D)
    acc.update(x, y)
    start = acc.solve(ridge=1.0)  # heavily ridged, so refinement has room to improve
    mask = torch.arange(256) % 4 != 0

    def loss(p: ResidualProbe) -> float:
        with torch.no_grad():
            return float((p(x[mask]) - y[mask]).pow(2).sum(-1).mean())

    a = refine_probe(start, x, y, steps=60, lr=1e-2, batch_size=64, seed=3, mask=mask)
    b = refine_probe(start, x, y, steps=60, lr=1e-2, batch_size=64, seed=3, mask=mask)
    assert loss(a) < loss(start)
    torch.testing.assert_close(a.W, b.W, atol=0, rtol=0)
    # A huge learning rate diverges: the best state (the start) is kept.
    best = acc.solve(ridge=0.0)
    c = refine_probe(best, x, y, steps=5, lr=10.0, batch_size=32, seed=0, eval_every=1)
    assert loss(c) <= loss(best)
    assert start.W.grad is None  # the input probe is untouched


def test_shape_errors() -> None:
    with pytest.raises(PPCLError, match="equal input and output widths"):
        ProbeAccumulator(D, 5)
    with pytest.raises(PPCLError):
        ResidualProbe(D, 5)
    acc = ProbeAccumulator(D)
    with pytest.raises(PPCLError, match="wrong width"):
        acc.update(torch.randn(4, D), torch.randn(4, D + 1))
    with pytest.raises(PPCLError, match="token mask"):
        acc.update(torch.randn(4, D), torch.randn(4, D), weight_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(PPCLError, match="No tokens"):
        acc.solve()
    acc.update(torch.randn(4, D), torch.randn(4, D))
    with pytest.raises(PPCLError, match="does not match"):
        acc.fit_error(ResidualProbe(D, 3, residual=False))
    with pytest.raises(PPCLError, match="different shapes"):
        acc.merge(ProbeAccumulator(D, 3, residual=False))
