"""Linear CKA: invariances, streaming, pairwise matrices and probe-chain trajectories."""

from __future__ import annotations

import math

import pytest
import torch

from ppcl.analysis.cka import CKAAccumulator, cka_matrix, cka_trajectories, linear_cka
from ppcl.analysis.probes import ResidualProbe
from ppcl.errors import PPCLError


def feats(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated features ``(n, d)`` (a random linear mix of Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook token-space (HSIC) form, for cross-checking the feature-space implementation."""
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, M = H @ x.double() @ x.double().T @ H, H @ y.double() @ y.double().T @ H
    return float((K * M).sum() / (K.norm() * M.norm()))


def test_identity_and_reference() -> None:
    x, y = feats(200, 16, 0), feats(200, 12, 1)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-10)
    few = feats(10, 30, 2), feats(10, 40, 3)  # N < D takes the token-form path
    assert linear_cka(*few) == pytest.approx(reference_cka(*few), rel=1e-10)
    assert math.isnan(linear_cka(torch.ones(20, 4), x[:20]))  # constant features: undefined


def test_invariances() -> None:
    x, y = feats(300, 16, 4), feats(300, 16, 5) + 0.3 * feats(300, 16, 4)
    base = linear_cka(x, y)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(6)))
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-5)
    assert linear_cka(x * 7.5, y) == pytest.approx(base, rel=1e-6)
    assert linear_cka(x + torch.randn(16) * 100, y - 3.0) == pytest.approx(base, rel=1e-5)
    # A non-orthogonal map (anisotropic scaling of the channels) changes it.
    skew = torch.diag(torch.logspace(-2, 2, 16))
    assert abs(linear_cka(x @ skew, y) - base) > 0.05


def test_independent_noise_is_small() -> None:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5000, 8, generator=g), torch.randn(5000, 8, generator=g)
    assert linear_cka(x, y) < 0.01


def test_accumulator_equals_one_shot() -> None:
    x, y = feats(400, 12, 8) + 5.0, feats(400, 6, 9) - 2.0
    mask = torch.arange(400) % 3 != 0
    acc = CKAAccumulator(12, 6)
    for bx, by, bm in zip(x.split(90), y.split(90), mask.split(90), strict=False):
        acc.update(bx, by, mask=bm)
    assert acc.n_tokens == int(mask.sum())
    assert acc.value() == pytest.approx(linear_cka(x[mask], y[mask]), rel=1e-10)
    a, b = CKAAccumulator(12, 6), CKAAccumulator(12, 6)
    a.update(x[:100], y[:100])
    b.update(x[100:], y[100:])
    a.merge(b)
    assert a.value() == pytest.approx(linear_cka(x, y), rel=1e-10)
    with pytest.raises(PPCLError):
        CKAAccumulator(3, 3).value()


def test_cka_matrix_both_paths() -> None:
    for n, d in ((300, 8), (6, 20)):  # feature-form and token-Gram paths
        layers = [feats(n, d, 10 + i) for i in range(4)]
        rotation = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(d)))[0]
        layers[2] = layers[1] @ rotation  # same as layer 1 up to rotation
        m = cka_matrix(layers)
        assert m.shape == (4, 4)
        torch.testing.assert_close(m, m.T)
        torch.testing.assert_close(m.diagonal(), torch.ones(4, dtype=torch.float64))
        assert m[1, 2] == pytest.approx(1.0, abs=1e-5)
        assert m[0, 3] == pytest.approx(linear_cka(layers[0], layers[3]), rel=1e-9)


def identity_probe(d: int) -> ResidualProbe:
    return ResidualProbe(d)


def test_trajectories_identity_stack() -> None:
    x = feats(100, 8, 20)
    L = 6
    out = cka_trajectories([x] * L, [None] + [identity_probe(8) for _ in range(L - 1)], max_len=3)
    for u in range(L):
        for k in range(L):
            if u <= k <= min(L - 1, u + 3):
                assert out[u, k] == pytest.approx(1.0, abs=1e-9)
            else:
                assert math.isnan(float(out[u, k]))


def test_trajectories_drop_at_nonlinear_layer() -> None:
    # Stack x_i = x_{i-1} + x_{i-1} A_i ᵀ (exactly linear, probes exact) except block j = 3: x_3 = |x_2| (nonlinear),
    # whose best affine probe is poor. Proxies starting before 3 lose similarity exactly when they cross k = 3.
    g = torch.Generator().manual_seed(21)
    d, L, j = 8, 6, 3
    xs = [torch.randn(2000, d, generator=g)]
    probes: list[ResidualProbe | None] = [None]
    for i in range(1, L):
        if i == j:
            xs.append(xs[-1].abs())
            probes.append(identity_probe(d))  # a poor linear stand-in for |.|
        else:
            A = torch.randn(d, d, generator=g) * 0.2
            xs.append(xs[-1] + xs[-1] @ A.T)
            probes.append(ResidualProbe.from_tensors(A, torch.zeros(d)))
    calls: list[int] = []
    out = cka_trajectories(xs, probes, max_len=L, progress=lambda u, n: calls.append(u))
    assert calls == list(range(L - 1))
    for u in range(j):
        for k in range(u + 1, j):
            assert out[u, k] == pytest.approx(1.0, abs=1e-5)
        assert out[u, j] < 0.9
    assert out[j, j + 1] == pytest.approx(1.0, abs=1e-5)  # starting after the nonlinear block is fine again
    # Token subsampling computes the same trajectories on fewer rows.
    sub = cka_trajectories(xs, probes, max_len=2, token_index=torch.arange(0, 2000, 2))
    assert sub[0, 1] == pytest.approx(1.0, abs=1e-5) and sub[2, 3] < 0.9


def test_trajectory_errors() -> None:
    x = feats(10, 4, 0)
    with pytest.raises(PPCLError, match="one probe per block"):
        cka_trajectories([x, x], [None], max_len=1)
    with pytest.raises(PPCLError, match="missing"):
        cka_trajectories([x, x], [None, None], max_len=1)
    with pytest.raises(PPCLError, match="same"):
        cka_trajectories([x, x[:5]], [None, identity_probe(4)], max_len=1)
