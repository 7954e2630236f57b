"""The Lorentz model of hyperbolic space, as plain tensor functions (MERU, Desai et al. 2023).

Points live on the upper sheet of the hyperboloid <x, x>_L = -1/c in R^(D+1), curvature -c.
Only the D space components are stored and passed around; the time component follows from the
constraint:

    x_time = sqrt(1/c + |x_space|^2)

so every (B, D) tensor of space components is a valid point, and an encoder's raw output can be
lifted with `exp_map0` without any projection step.

Precision: every function computes in fp32 (fp64 inputs stay fp64, for gradcheck) with autocast
off, whatever the input dtype: bf16 cannot resolve `acosh` near 1 or the cancellation in
`x . y - x_time * y_time`. Results come back in that compute dtype. Inputs of `acosh`, `asin`,
`acos` and `sinh` are clamped (as the reference does) with margins that stay representable in
fp32, so values and gradients are finite for tangent norms from 0 up to 1e4 and beyond.

`curv` is the positive c: a Python float or a tensor of shape [] or [1] (the head's learnable
curvature), broadcast against the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, TypeVar, Union

import torch
from torch import Tensor

Curvature = Union[float, Tensor]
F = TypeVar("F", bound=Callable[..., Tensor])

# exp_map0 output norms stop growing past sinh(asinh(2**15)) = 2**15 (times 1/sqrt(c)): beyond
# that, squared norms in pairwise_inner leave fp32's exact range and distances turn into noise.
_MAX_SINH_INPUT = math.asinh(2**15)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _full_precision(fn: F) -> F:
    """Run `fn` with autocast off on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(x: Tensor, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _prepare(x: Tensor, curv: Curvature) -> tuple[Tensor, Tensor]:
    """`x` in the compute dtype and `curv` as a tensor of that dtype on the same device."""
    dtype = _compute_dtype(x)
    curv = torch.as_tensor(curv, device=x.device).to(dtype)
    return x.to(dtype), curv


def _margin(dtype: torch.dtype, eps: float) -> float:
    """A clamp margin below 1 that the dtype can represent: 1 - 1e-8 rounds to 1 in fp32, where
    the derivatives of asin / acos are infinite."""
    return max(eps, 2 * torch.finfo(dtype).eps)


def _time(x: Tensor, curv: Tensor) -> Tensor:
    """Time components (..., 1) of points with space components (..., D)."""
    return torch.sqrt(1 / curv + torch.sum(x * x, dim=-1, keepdim=True))


def _acosh1p(t: Tensor) -> Tensor:
    """acosh(1 + t) for t >= 0, without forming 1 + t (which rounds to 1 in fp32 for small t and
    makes the derivative 1 / sqrt(z^2 - 1) infinite)."""
    return torch.log1p(t + torch.sqrt(t * (t + 2)))


@_full_precision
def pairwise_inner(x: Tensor, y: Tensor, curv: Curvature = 1.0) -> Tensor:
    """Lorentzian inner products <x_i, y_j>_L = x_i . y_j - x_time_i * y_time_j.

    Args:
        x: Tensor of shape (N, D), space components of points on the hyperboloid.
        y: Tensor of shape (M, D), space components of points on the hyperboloid.
        curv: positive c (curvature -c).

    Returns:
        Tensor of shape (N, M); every entry is <= -1/c, with equality only for x_i = y_j. Higher is
        closer (-c <x, y>_L = cosh(sqrt(c) d(x, y))), so it ranks like -pairwise_dist.
    """
    x, curv = _prepare(x, curv)
    y = y.to(x.dtype)
    return x @ y.T - _time(x, curv) @ _time(y, curv).T


@_full_precision
def pairwise_dist(x: Tensor, y: Tensor, curv: Curvature = 1.0, eps: float = 1e-8) -> Tensor:
    """Geodesic distances d(x_i, y_j) = acosh(-c <x_i, y_j>_L) / sqrt(c).

    Args:
        x: Tensor of shape (N, D), space components.
        y: Tensor of shape (M, D), space components.
        curv: positive c.
        eps: lower clamp of -c <x, y>_L - 1 (rounding can push it below 0 for close points).

    Returns:
        Tensor of shape (N, M), >= 0.
    """
    x, curv = _prepare(x, curv)
    excess = -curv * pairwise_inner(x, y, curv) - 1  # (N, M), >= 0 up to rounding
    return _acosh1p(torch.clamp(excess, min=eps)) / torch.sqrt(curv)


@_full_precision
def origin_dist(x: Tensor, curv: Curvature = 1.0) -> Tensor:
    """Geodesic distance from the hyperboloid's vertex (the origin) to each point.

    d(O, x) = acosh(sqrt(c) x_time) / sqrt(c) = asinh(sqrt(c) |x|) / sqrt(c), the second form
    exact near the origin.

    Args:
        x: Tensor of shape (B, D), space components.
        curv: positive c.

    Returns:
        Tensor of shape (B,).
    """
    x, curv = _prepare(x, curv)
    sqrt_curv = torch.sqrt(curv)
    return torch.asinh(sqrt_curv * torch.linalg.vector_norm(x, dim=-1)) / sqrt_curv


@_full_precision
def exp_map0(v: Tensor, curv: Curvature = 1.0, eps: float = 1e-8) -> Tensor:
    """Exponential map at the origin: tangent vectors -> points on the hyperboloid.

    x = sinh(sqrt(c) |v|) * v / (sqrt(c) |v|), so d(O, x) = |v|. The sinh input is clamped to
    asinh(2**15): longer tangent vectors keep their direction and land at that radius.

    Args:
        v: Tensor of shape (B, D), vectors in the tangent space at the origin (Euclidean).
        curv: positive c.
        eps: lower clamp of sqrt(c) |v| (zero vectors map to the origin).

    Returns:
        Tensor of shape (B, D), space components of the mapped points.
    """
    v, curv = _prepare(v, curv)
    scaled_norm = torch.sqrt(curv) * torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # (B, 1)
    sinh_input = torch.clamp(scaled_norm, min=eps, max=_MAX_SINH_INPUT)
    return torch.sinh(sinh_input) * v / torch.clamp(scaled_norm, min=eps)


@_full_precision
def log_map0(x: Tensor, curv: Curvature = 1.0, eps: float = 1e-8) -> Tensor:
    """Logarithmic map at the origin, the inverse of `exp_map0`: points -> tangent vectors.

    v = d(O, x) * x / |x| with d(O, x) = asinh(sqrt(c) |x|) / sqrt(c).

    Args:
        x: Tensor of shape (B, D), space components of points on the hyperboloid.
        curv: positive c.
        eps: lower clamp of sqrt(c) |x| in the division.

    Returns:
        Tensor of shape (B, D), tangent vectors at the origin.
    """
    x, curv = _prepare(x, curv)
    scaled_norm = torch.sqrt(curv) * torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (B, 1)
    return torch.asinh(scaled_norm) * x / torch.clamp(scaled_norm, min=eps)


@_full_precision
def half_aperture(x: Tensor, curv: Curvature = 1.0, min_radius: float = 0.1, eps: float = 1e-8) -> Tensor:
    """Half aperture of the entailment cone with apex at each point.

    aperture(x) = asin(2 K / (sqrt(c) |x|)), K = `min_radius`: wide near the origin (generic
    concepts entail much), narrow far from it. Points with sqrt(c) |x| <= 2 K get the widest cone.

    Args:
        x: Tensor of shape (B, D), space components (cone apexes).
        curv: positive c.
        min_radius: K; inside sqrt(c) |x| < 2 K the asin input is clamped.
        eps: keeps the division finite at x = 0, and the asin input below 1.

    Returns:
        Tensor of shape (B,), in (0, pi/2).
    """
    x, curv = _prepare(x, curv)
    margin = _margin(x.dtype, eps)
    asin_input = 2 * min_radius / (torch.linalg.vector_norm(x, dim=-1) * torch.sqrt(curv) + eps)
    return torch.asin(torch.clamp(asin_input, min=-1 + margin, max=1 - margin))


@_full_precision
def oxy_angle(x: Tensor, y: Tensor, curv: Curvature = 1.0, eps: float = 1e-8) -> Tensor:
    """Exterior angle at x of the hyperbolic triangle O-x-y, row by row.

    0 when y lies on the geodesic ray from O through x beyond x, pi when y lies between O and x.
    From the hyperbolic law of cosines:

        cos(angle) = (y_time + c <x, y>_L x_time) / (|x| sqrt((c <x, y>_L)^2 - 1))

    Args:
        x: Tensor of shape (B, D), space components (the vertex of the angle).
        y: Tensor of shape (B, D), paired with `x` row by row.
        curv: positive c.
        eps: lower clamp of (c <x, y>_L)^2 - 1, keeps the division finite, and the acos input
            inside (-1, 1).

    Returns:
        Tensor of shape (B,), in (0, pi).
    """
    x, curv = _prepare(x, curv)
    y = y.to(x.dtype)
    margin = _margin(x.dtype, eps)
    x_time = _time(x, curv).squeeze(-1)  # (B,)
    y_time = _time(y, curv).squeeze(-1)  # (B,)
    # Only the diagonal of pairwise_inner is needed.
    scaled_inner = curv * (torch.sum(x * y, dim=-1) - x_time * y_time)  # (B,), <= -1
    numerator = y_time + scaled_inner * x_time
    denominator = torch.linalg.vector_norm(x, dim=-1) * torch.sqrt(torch.clamp(scaled_inner**2 - 1, min=eps))
    acos_input = numerator / (denominator + eps)
    return torch.acos(torch.clamp(acos_input, min=-1 + margin, max=1 - margin))
