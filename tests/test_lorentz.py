"""Lorentz-model geometry checked against closed forms and an independent ambient-space reference.

References used here are written from the definitions (Minkowski space R^(D+1), the Poincare
ball), not from models/lorentz.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from vlp.models import lorentz as L

CURVATURES = [0.1, 1.0, 10.0]


def ambient(x: torch.Tensor, curv: float) -> torch.Tensor:
    """(B, D) space components -> (B, D + 1) points of R^(D+1), time first."""
    time = torch.sqrt(1 / curv + (x * x).sum(-1, keepdim=True))
    return torch.cat([time, x], dim=-1)


def minkowski(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b>_L = -a_0 b_0 + sum_i a_i b_i, row by row."""
    return -a[..., 0] * b[..., 0] + (a[..., 1:] * b[..., 1:]).sum(-1)


def poincare_dist(x: torch.Tensor, y: torch.Tensor, curv: float) -> torch.Tensor:
    """Pairwise distance (N, M) via the Poincare ball of radius 1/sqrt(c) (isometric model)."""
    sqrt_curv = math.sqrt(curv)
    p = x / (1 + sqrt_curv * ambient(x, curv)[:, :1])
    q = y / (1 + sqrt_curv * ambient(y, curv)[:, :1])
    diff = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    denom = (1 - curv * (p * p).sum(-1))[:, None] * (1 - curv * (q * q).sum(-1))[None, :]
    return torch.acosh(1 + 2 * curv * diff / denom) / sqrt_curv


def ambient_exterior_angle(x: torch.Tensor, y: torch.Tensor, curv: float) -> torch.Tensor:
    """Exterior angle at x of triangle O-x-y from tangent vectors at x (Minkowski projection)."""
    X, Y = ambient(x, curv), ambient(y, curv)
    origin = torch.zeros_like(X)
    origin[:, 0] = curv**-0.5

    def toward(p):  # component of p in the tangent space at X: direction of the geodesic X -> p
        return p + curv * minkowski(X, p)[:, None] * X

    to_origin, to_y = toward(origin), toward(Y)
    cos = minkowski(-to_origin, to_y) / torch.sqrt(minkowski(to_origin, to_origin) * minkowski(to_y, to_y))
    return torch.acos(cos.clamp(-1, 1))


def random_points(n: int, d: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("curv", CURVATURES)
def test_distance_identities(curv):
    x, y, z = random_points(16, 5, seed=0), random_points(16, 5, seed=1), random_points(16, 5, seed=2)
    self_dist = torch.diagonal(L.pairwise_dist(x, x, curv, eps=1e-14))
    assert self_dist.abs().max() < 1e-5
    torch.testing.assert_close(L.pairwise_dist(x, y, curv), L.pairwise_dist(y, x, curv).T)
    dxz = torch.diagonal(L.pairwise_dist(x, z, curv))
    dxy = torch.diagonal(L.pairwise_dist(x, y, curv))
    dyz = torch.diagonal(L.pairwise_dist(y, z, curv))
    assert torch.all(dxz <= dxy + dyz + 1e-9)
    torch.testing.assert_close(L.pairwise_dist(x, y, curv), poincare_dist(x, y, curv), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("curv", CURVATURES)
def test_inner_product_and_constraint(curv):
    x, y = random_points(7, 4, seed=3), random_points(5, 4, seed=4)
    expected = minkowski(ambient(x, curv)[:, None, :], ambient(y, curv)[None, :, :])
    torch.testing.assert_close(L.pairwise_inner(x, y, curv), expected)
    lifted = L.exp_map0(random_points(7, 4, seed=5), curv)
    # Points on the hyperboloid: <x, x>_L = -1/c.
    torch.testing.assert_close(torch.diagonal(L.pairwise_inner(lifted, lifted, curv)), torch.full((7,), -1 / curv, dtype=torch.float64))


@pytest.mark.parametrize("curv", CURVATURES)
def test_exp_log_round_trip_and_origin_distance(curv):
    # Tangent norms from 1e-6 up to just below the sinh clamp (sqrt(c) |v| < asinh(2**15) ~ 11.09).
    norms = torch.logspace(-6, math.log10(10.5 / math.sqrt(curv)), 40, dtype=torch.float64)
    directions = torch.nn.functional.normalize(random_points(40, 6, seed=6), dim=-1)
    tangent = directions * norms[:, None]
    lifted = L.exp_map0(tangent, curv)
    torch.testing.assert_close(L.log_map0(lifted, curv), tangent, rtol=1e-9, atol=1e-12)
    # d(O, exp_map0(v)) = |v|, three ways: pairwise_dist from the origin, origin_dist, and
    # acosh(sqrt(c) x_time) / sqrt(c).
    origin = torch.zeros(1, 6, dtype=torch.float64)
    closed_form = torch.acosh(math.sqrt(curv) * ambient(lifted, curv)[:, 0]) / math.sqrt(curv)
    far = norms > 1e-2  # acosh loses precision next to 1; compare there only
    torch.testing.assert_close(L.pairwise_dist(origin, lifted, curv)[0][far], norms[far], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(closed_form[far], norms[far], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(L.origin_dist(lifted, curv), norms, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("curv", CURVATURES)
def test_exterior_angle(curv):
    x, y = random_points(32, 4, seed=7), random_points(32, 4, seed=8)
    torch.testing.assert_close(L.oxy_angle(x, y, curv), ambient_exterior_angle(x, y, curv), rtol=0, atol=1e-6)
    # On one geodesic ray from O: y beyond x -> 0, y between O and x -> pi.
    direction = torch.nn.functional.normalize(random_points(8, 4, seed=9), dim=-1) / math.sqrt(curv)
    at, beyond, between = (L.exp_map0(direction * s, curv) for s in (1.0, 2.0, 0.5))
    assert L.oxy_angle(at, beyond, curv).max() < 1e-3
    assert L.oxy_angle(at, between, curv).min() > math.pi - 1e-3


@pytest.mark.parametrize("curv", CURVATURES)
def test_half_aperture_closed_form(curv):
    far = torch.nn.functional.normalize(random_points(8, 4, seed=10), dim=-1) * torch.linspace(0.3, 30, 8, dtype=torch.float64)[:, None] / math.sqrt(curv)
    norms = far.norm(dim=-1)
    torch.testing.assert_close(L.half_aperture(far, curv, min_radius=0.1), torch.asin(0.2 / (math.sqrt(curv) * norms)))
    near = far / norms[:, None] * 0.1 / math.sqrt(curv)  # sqrt(c)|x| = 0.1 < 2 K: widest cone
    assert torch.all((L.half_aperture(near, curv, min_radius=0.1) - math.pi / 2).abs() < 1e-3)


def test_gradcheck_float64():
    x = random_points(4, 3, seed=11).requires_grad_()
    y = random_points(5, 3, seed=12).requires_grad_()
    y_paired = random_points(4, 3, seed=13).requires_grad_()
    curv = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    checks = {
        "pairwise_inner": (lambda a, b, c: L.pairwise_inner(a, b, c), (x, y, curv)),
        "pairwise_dist": (lambda a, b, c: L.pairwise_dist(a, b, c), (x, y, curv)),
        "exp_map0": (lambda a, c: L.exp_map0(a, c), (x, curv)),
        "log_map0": (lambda a, c: L.log_map0(a, c), (x, curv)),
        "origin_dist": (lambda a, c: L.origin_dist(a, c), (x, curv)),
        "half_aperture": (lambda a, c: L.half_aperture(a, c, min_radius=0.1), (x * 0.1 + 0.5, curv)),
        "oxy_angle": (lambda a, b, c: L.oxy_angle(a, b, c), (x, y_paired, curv)),
    }
    for name, (fn, inputs) in checks.items():
        inputs = tuple(t.detach().requires_grad_() for t in inputs)
        assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("curv", CURVATURES)
def test_finite_values_and_grads_over_norm_range(dtype, curv):
    norms = torch.logspace(-6, 4, 41)
    directions = torch.nn.functional.normalize(torch.randn(41, 8, generator=torch.Generator().manual_seed(14)), dim=-1)
    tangent = (directions * norms[:, None]).to(dtype).requires_grad_()
    other = (directions.roll(1, dims=0) * norms.flip(0)[:, None]).to(dtype).requires_grad_()
    curv_param = torch.tensor([curv], dtype=dtype, requires_grad=True)

    x, y = L.exp_map0(tangent, curv_param), L.exp_map0(other, curv_param)
    outputs = {
        "exp_map0": x,
        "log_map0": L.log_map0(x, curv_param),
        "pairwise_inner": L.pairwise_inner(x, y, curv_param),
        "pairwise_dist": L.pairwise_dist(x, y, curv_param),
        "pairwise_dist_self": L.pairwise_dist(x, x, curv_param),  # acosh at exactly 1
        "origin_dist": L.origin_dist(x, curv_param),
        "half_aperture": L.half_aperture(x, curv_param),
        "oxy_angle": L.oxy_angle(x, y, curv_param),
        "oxy_angle_self": L.oxy_angle(x, x, curv_param),
    }
    for name, value in outputs.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    # Keep the sum moderate so the check is about the functions, not fp32 overflow of the sum.
    total = sum((value / (1 + value.detach().abs())).sum() for value in outputs.values())
    total.backward()
    for name, tensor in {"tangent": tangent, "other": other, "curv": curv_param}.items():
        assert torch.isfinite(tensor.grad).all(), name


def test_autocast_does_not_lower_precision():
    x = torch.randn(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = L.pairwise_dist(L.exp_map0(x), L.exp_map0(x))
    assert dist.dtype == torch.float32
    torch.testing.assert_close(dist, L.pairwise_dist(L.exp_map0(x), L.exp_map0(x)))
