"""Monotone rational-quadratic splines, the element-wise transform of both neural spline flows.

Durkan, Bekasov, Murray & Papamakarios (2019), "Neural Spline Flows", NeurIPS, eq. (4)-(6)
and appendix A; the spline itself is Gregory & Delbourgo (1982).

On [-B, B] the transform is a monotone rational-quadratic spline with K bins; outside it is the
identity (linear tails with slope 1, matched by fixing the boundary derivatives to 1). Inside bin k,
with knots (x_k, y_k), bin width w_k, height h_k, slope s_k = h_k / w_k, knot derivatives d_k, d_{k+1}
and xi = (x - x_k) / w_k in [0, 1]:

    y = y_k + h_k [s_k xi^2 + d_k xi (1 - xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)]

    dy/dx = s_k^2 [d_{k+1} xi^2 + 2 s_k xi (1 - xi) + d_k (1 - xi)^2] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)]^2

The inverse solves a xi^2 + b xi + c = 0 for its root in [0, 1]. With Y = (y - y_k) / h_k and the
coefficients divided by h_k: a = s_k - d_k + Y D, b = d_k - Y D, c = -s_k Y, D = d_{k+1} + d_k - 2 s_k,
and the discriminant is the sum of squares b^2 - 4ac = ((1 - Y) d_k - Y d_{k+1})^2 + 4 s_k^2 Y (1 - Y) > 0.
The root is xi = 2c / (-b - sqrt(b^2 - 4ac)) (the form of Durkan et al., exact for b >= 0) and, where
b < 0, the same root written (-b + sqrt(b^2 - 4ac)) / (2a), which avoids the cancellation the first
form suffers there (Press et al., Numerical Recipes, sec. 5.6).

``SplineCoupling`` is the coupling layer (Dinh et al. 2017) whose element-wise transform is this spline.
"""

import functools
import math

import torch
import torch.nn.functional as F

from gravity_flows.flows.layers import Coupling, coupling_mask

#: Every bin is at least this fraction of the interval wide / high, so no slope can vanish or explode.
MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
#: Interior knot derivatives are MIN_DERIVATIVE + softplus(.), so the spline stays strictly increasing.
MIN_DERIVATIVE = 1e-3
DEFAULT_BINS = 8
DEFAULT_TAIL_BOUND = 5.0

# softplus(_DERIVATIVE_SHIFT) = 1 - MIN_DERIVATIVE: a raw derivative of zero gives a knot derivative of 1.
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def spline_param_count(bins=DEFAULT_BINS):
    """Raw parameters per feature of a K-bin spline: K widths, K heights, K - 1 interior derivatives."""
    return 3 * bins - 1


def _knots(raw, min_size, tail_bound):
    """Knot positions -B = k_0 < k_1 < ... < k_K = B from K raw bin sizes (last axis).

    Sizes are min_size + (1 - K min_size) softmax(raw), in units of the interval 2B: uniform when
    raw is zero. The end knots are set to exactly -B and B so the tails join without a gap.
    ``min_size`` is a number or a tensor that broadcasts against raw's leading axes (one floor for
    the widths and one for the heights when both are computed in one pass).
    """
    bins = raw.shape[-1]
    if max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT) * bins >= 1.0:
        raise ValueError(f"minimum bin size {max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT)} is too large for {bins} bins")
    sizes = min_size + (1.0 - min_size * bins) * torch.softmax(raw, dim=-1)
    interior = 2.0 * tail_bound * torch.cumsum(sizes[..., :-1], dim=-1) - tail_bound
    return F.pad(F.pad(interior, (1, 0), value=-tail_bound), (0, 1), value=tail_bound)


def _knot_derivatives(raw_derivatives):
    """d_0 = d_K = 1 (slope of the identity tails); interior d_k = MIN_DERIVATIVE + softplus(raw + shift)."""
    interior = MIN_DERIVATIVE + F.softplus(raw_derivatives + _DERIVATIVE_SHIFT)
    return F.pad(interior, (1, 1), value=1.0)


@functools.lru_cache(maxsize=None)
def _gather_offsets(stride, device):
    """Where x_k, x_{k+1}, y_k, y_{k+1}, d_k, d_{k+1} sit in the concatenated table, relative to bin k.

    Made once per (bins, device), not at every call: on a GPU each new small tensor is a copy from
    the host in the middle of the training step."""
    return torch.tensor([0, 1, stride, stride + 1, 2 * stride, 2 * stride + 1], device=device)


def _size_floor(reference):
    """The floors of the widths and the heights as one number where they are equal, else a (2, 1) tensor."""
    if MIN_BIN_WIDTH == MIN_BIN_HEIGHT:
        return MIN_BIN_WIDTH
    return reference.new_tensor([[MIN_BIN_WIDTH], [MIN_BIN_HEIGHT]])


def rational_quadratic_spline(x, raw_widths, raw_heights, raw_derivatives, inverse=False,
                              tail_bound=DEFAULT_TAIL_BOUND):
    """Monotone rational-quadratic spline on [-B, B], identity outside (Durkan et al. 2019).

    Parameters
    ----------
    x : tensor of shape (...)
        Inputs (the spline's x for ``inverse=False``, its y for ``inverse=True``).
    raw_widths, raw_heights : tensors of shape (..., K)
        Unconstrained bin widths and heights; softmax with a floor of MIN_BIN_WIDTH / MIN_BIN_HEIGHT.
    raw_derivatives : tensor of shape (..., K - 1)
        Unconstrained interior knot derivatives; MIN_DERIVATIVE + softplus(raw + shift), equal to 1
        at raw = 0. The boundary derivatives are fixed to 1.
    inverse : bool
        False: y = f(x). True: x = f^{-1}(y), by the root of the bin's quadratic (module docstring),
        backward-stable: f(f^{-1}(y)) = y to rounding error for any parameters.
    tail_bound : float
        B; the spline is the identity outside [-B, B].

    Returns
    -------
    (output, logabsdet) with logabsdet = log f'(x) element-wise for the forward direction and
    -log f'(x) for the inverse, both of shape (...). Zero raw parameters give the identity, exact up
    to rounding (uniform bins, all derivatives 1). Inputs outside [-B, B] pass through with logabsdet 0; the
    inside branch is evaluated on clamped inputs, so neither values nor gradients are ever NaN.
    """
    bins = raw_widths.shape[-1]
    if raw_heights.shape[-1] != bins or raw_derivatives.shape[-1] != bins - 1:
        raise ValueError(f"expected {bins} widths, {bins} heights and {bins - 1} derivatives, got "
                         f"{raw_widths.shape[-1]}, {raw_heights.shape[-1]}, {raw_derivatives.shape[-1]}")
    return _spline(x, torch.stack([raw_widths, raw_heights], dim=-2), raw_derivatives, inverse, tail_bound)


def _spline(x, raw_sizes, raw_derivatives, inverse, tail_bound):
    """:func:`rational_quadratic_spline` with the raw widths and heights stacked, (..., 2, K): the knots
    of both in one pass, and as few separate tensor operations as the formulas allow (each costs a few
    microseconds of dispatch on tensors this small, forward and backward)."""
    bins = raw_sizes.shape[-1]
    knots = _knots(raw_sizes, _size_floor(raw_sizes), tail_bound)  # (..., 2, K + 1): x knots, y knots
    derivatives = _knot_derivatives(raw_derivatives)

    inside = x.abs() <= tail_bound
    x_in = x.clamp(-tail_bound, tail_bound)
    # Bin index: number of interior knots <= x, in 0 .. K-1.
    interior = knots[..., 1 if inverse else 0, 1:-1]
    index = (interior <= x_in[..., None]).sum(-1, keepdim=True)

    # One gather for the six numbers the bin needs: x_k, x_{k+1}, y_k, y_{k+1}, d_k, d_{k+1}.
    table = torch.cat([knots.flatten(-2), derivatives], dim=-1)
    offsets = _gather_offsets(bins + 1, x.device)
    x_lo, x_hi, y_lo, y_hi, d_lo, d_hi = torch.gather(table, -1, index + offsets).unbind(-1)

    width = x_hi - x_lo
    height = y_hi - y_lo
    slope = height / width
    curvature = d_lo + d_hi - 2.0 * slope

    if inverse:
        # Quadratic a xi^2 + b xi + c = 0 (divided by the bin height), with Y = (y - y_k) / h_k.
        fraction = ((x_in - y_lo) / height).clamp(0.0, 1.0)
        a = slope - d_lo + fraction * curvature
        b = d_lo - fraction * curvature
        c = -slope * fraction
        # b^2 - 4ac rewritten as a sum of squares: never negative, so no cancellation and no NaN.
        discriminant = ((1.0 - fraction) * d_lo - fraction * d_hi).square() \
            + 4.0 * slope.square() * fraction * (1.0 - fraction)
        root = torch.sqrt(discriminant)
        # Both forms are the same root in [0, 1]; each is free of cancellation for one sign of b.
        # (-b - root < 0 always, and a > s_k > 0 wherever b < 0, so neither branch divides by 0.)
        b_negative = b < 0
        xi = torch.where(b_negative,
                         (root - b) / (2.0 * torch.where(b_negative, a, torch.ones_like(a))),
                         2.0 * c / (-b - root))
        output = x_lo + xi * width
    else:
        xi = ((x_in - x_lo) / width).clamp(0.0, 1.0)

    one_minus = 1.0 - xi
    xi_one_minus = xi * one_minus
    denominator = slope + curvature * xi_one_minus
    if not inverse:
        output = y_lo + height * (slope * xi.square() + d_lo * xi_one_minus) / denominator
    # log f'(x) = log(s^2 [d_{k+1} xi^2 + 2 s xi (1 - xi) + d_k (1 - xi)^2]) - 2 log(denominator)
    log_derivative = torch.log(slope.square() * (d_hi * xi.square() + 2.0 * slope * xi_one_minus
                                                 + d_lo * one_minus.square())) \
        - 2.0 * torch.log(denominator)
    if inverse:
        log_derivative = -log_derivative

    return torch.where(inside, output, x), torch.where(inside, log_derivative, 0.0)


def spline_from_params(x, params, inverse=False, tail_bound=DEFAULT_TAIL_BOUND):
    """``rational_quadratic_spline`` with the raw parameters packed in the last axis of ``params``.

    ``params`` has shape x.shape + (3K - 1,): K widths, then K heights, then K - 1 derivatives.
    """
    if params.shape[-1] % 3 != 2:
        raise ValueError(f"a K-bin spline has 3K - 1 raw parameters, got {params.shape[-1]}")
    bins = (params.shape[-1] + 1) // 3
    raw_sizes, raw_derivatives = params.split([2 * bins, bins - 1], dim=-1)
    return _spline(x, raw_sizes.unflatten(-1, (2, bins)), raw_derivatives, inverse, tail_bound)


class SplineCoupling(Coupling):
    """Coupling layer (Dinh et al. 2017) with the rational-quadratic spline as its element-wise
    transform: the neural spline coupling of Durkan et al. (2019).

        y_A = x_A,     y_i = RQS(x_i; theta_i(x_A))  for i in B,
        log|det dy/dx| = sum_{i in B} log RQS'(x_i; theta_i(x_A)),

    theta_i the 3K - 1 raw spline parameters of feature i (``rational_quadratic_spline``: K bins on
    [-B, B], identity tails). The conditioner's last layer is zeroed and zero raw parameters give the
    identity spline, so the layer starts as the identity. ``transformed`` defaults to
    ``coupling_mask(dim, 0)``; ``context=C``: theta_i(x_A, c), the context joining x_A as input.
    """

    def __init__(self, dim=3, transformed=None, hidden=32, bins=DEFAULT_BINS, tail_bound=DEFAULT_TAIL_BOUND, context=0):
        transformed = coupling_mask(dim, 0) if transformed is None else transformed
        super().__init__(dim, transformed, hidden, n_params_per_feature=spline_param_count(bins), context=context)
        self.tail_bound = tail_bound

    def _elementwise(self, x_transformed, params, inverse):
        return spline_from_params(x_transformed, params, inverse=inverse, tail_bound=self.tail_bound)
