"""The rational-quadratic spline (Durkan et al. 2019) checked against facts computed independently:
knot values and derivatives from the raw parameters in NumPy, the closed-form value at a bin's
midpoint, monotonicity, the exact inverse, autograd derivatives, identity tails and finite gradients;
and the spline coupling layer through the shared harness.
"""

import numpy as np
import pytest
import torch
from scipy.special import softmax

from layer_harness import DIM, check_layer, randomize_, sample_inputs
from gravity_flows.flows.layers import coupling_masks
from gravity_flows.flows.splines import (
    MIN_BIN_HEIGHT,
    MIN_BIN_WIDTH,
    MIN_DERIVATIVE,
    SplineCoupling,
    rational_quadratic_spline,
    spline_from_params,
    spline_param_count,
)

B = 5.0
K = 8


def random_raw(shape, bins=K, scale=2.0, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: scale * torch.randn(*shape, n, generator=generator, dtype=dtype)
    return draw(bins), draw(bins), draw(bins - 1)


def knots_numpy(raw, min_size, bound=B):
    """Knots -B .. B from raw bin sizes, written independently of splines.py."""
    raw = np.asarray(raw, dtype=np.float64)
    sizes = min_size + (1 - min_size * raw.shape[-1]) * softmax(raw, axis=-1)
    zero = np.zeros(raw.shape[:-1] + (1,))
    return -bound + 2 * bound * np.concatenate([zero, np.cumsum(sizes, axis=-1)], axis=-1)


def derivatives_numpy(raw):
    """Knot derivatives: 1 at both ends, MIN_DERIVATIVE + softplus(raw + shift) inside with
    the shift making softplus(shift) = 1 - MIN_DERIVATIVE."""
    raw = np.asarray(raw, dtype=np.float64)
    shift = np.log(np.expm1(1 - MIN_DERIVATIVE))
    interior = MIN_DERIVATIVE + np.logaddexp(0, raw + shift)
    one = np.ones(raw.shape[:-1] + (1,))
    return np.concatenate([one, interior, one], axis=-1)


def expand(raw_params, n):
    """Broadcast per-feature raw parameters (features, k) over n points: (features, n, k)."""
    return [r[:, None, :].expand(r.shape[0], n, r.shape[1]).contiguous() for r in raw_params]


def test_param_count_is_widths_heights_and_interior_derivatives():
    assert spline_param_count(8) == 23
    assert spline_param_count(1) == 2
    x = torch.linspace(-4, 4, 5, dtype=torch.float64)
    params = torch.randn(5, spline_param_count(6), dtype=torch.float64)
    widths, heights, derivatives = params.split([6, 6, 5], dim=-1)
    expected = rational_quadratic_spline(x, widths, heights, derivatives)
    for got, want in zip(spline_from_params(x, params), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [1, 3, 8])
def test_zero_raw_parameters_give_the_identity(dtype, bins):
    x = torch.linspace(-2 * B, 2 * B, 401, dtype=dtype)
    zeros = [torch.zeros(401, n, dtype=dtype) for n in (bins, bins, bins - 1)]
    tolerance = 1e-12 if dtype == torch.float64 else 4e-6  # a few float32 ulps of B
    for inverse in (False, True):
        y, logabsdet = rational_quadratic_spline(x, *zeros, inverse=inverse)
        torch.testing.assert_close(y, x, atol=tolerance, rtol=0)
        torch.testing.assert_close(logabsdet, torch.zeros_like(x), atol=tolerance, rtol=0)


def test_strictly_increasing_on_a_dense_grid():
    n = 4001
    x = torch.linspace(-2 * B, 2 * B, n, dtype=torch.float64).expand(6, n)
    raw = expand(random_raw((6,), scale=3.0, seed=3), n)
    y, _ = rational_quadratic_spline(x, *raw)
    assert (torch.diff(y, dim=-1) > 0).all()


def test_values_and_derivatives_at_the_knots_match_the_parameters():
    raw = random_raw((5,), seed=4)
    knots_x = knots_numpy(raw[0], MIN_BIN_WIDTH)
    knots_y = knots_numpy(raw[1], MIN_BIN_HEIGHT)
    derivatives = derivatives_numpy(raw[2])
    x = torch.from_numpy(knots_x)
    y, logabsdet = rational_quadratic_spline(x, *expand(raw, K + 1))
    np.testing.assert_allclose(y.numpy(), knots_y, atol=1e-12, rtol=0)
    np.testing.assert_allclose(logabsdet.numpy(), np.log(derivatives), atol=1e-9, rtol=0)
    # The inverse maps knot heights back to knot positions.
    x_back, _ = rational_quadratic_spline(torch.from_numpy(knots_y), *expand(raw, K + 1), inverse=True)
    np.testing.assert_allclose(x_back.numpy(), knots_x, atol=1e-12, rtol=0)


def test_value_at_bin_midpoints_is_the_rational_quadratic_formula():
    """At xi = 1/2, eq. (4) of Durkan et al. reduces to y_k + h_k (s_k + d_k) / (2 s_k + d_k + d_{k+1})."""
    raw = random_raw((4,), seed=5)
    knots_x = knots_numpy(raw[0], MIN_BIN_WIDTH)
    knots_y = knots_numpy(raw[1], MIN_BIN_HEIGHT)
    d = derivatives_numpy(raw[2])
    width, height = np.diff(knots_x), np.diff(knots_y)
    slope = height / width
    expected = knots_y[:, :-1] + height * (slope + d[:, :-1]) / (2 * slope + d[:, :-1] + d[:, 1:])
    midpoints = torch.from_numpy(knots_x[:, :-1] + width / 2)
    y, _ = rational_quadratic_spline(midpoints, *expand(raw, K))
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-12, rtol=0)


def test_inverse_recovers_inputs_to_1e10_over_twice_the_bound():
    n = 4001
    x = torch.linspace(-2 * B, 2 * B, n, dtype=torch.float64).expand(6, n)
    raw = expand(random_raw((6,), scale=1.0, seed=6), n)
    y, logabsdet = rational_quadratic_spline(x, *raw)
    x_back, logabsdet_inverse = rational_quadratic_spline(y, *raw, inverse=True)
    assert (x_back - x).abs().max() <= 1e-10
    assert (logabsdet + logabsdet_inverse).abs().max() <= 1e-10


def test_inverse_is_backward_stable_with_steep_parameters():
    """With large raw parameters f' ranges over ~1e-6 .. 1e3, so x = f^{-1}(y) is ill-conditioned
    where f' is small and f(x) where it is large; but f(f^{-1}(y)) must still equal y to within a
    few rounding errors of y and of x (scaled by f'). The plain root 2c / (-b - sqrt(b^2 - 4ac))
    alone misses this by ~500x where b < 0."""
    n = 4001
    y = torch.linspace(-2 * B, 2 * B, n, dtype=torch.float64).expand(6, n)
    raw = expand(random_raw((6,), scale=3.0, seed=6), n)
    x, logabsdet_inverse = rational_quadratic_spline(y, *raw, inverse=True)
    y_again, _ = rational_quadratic_spline(x, *raw)
    derivative = torch.exp(-logabsdet_inverse)
    assert ((y_again - y).abs() / (1.0 + derivative)).max() <= 1e-14


@pytest.mark.parametrize("inverse", [False, True])
def test_log_derivative_matches_autograd(inverse):
    n = 501
    x = torch.linspace(-1.2 * B, 1.2 * B, n, dtype=torch.float64).expand(4, n).clone().requires_grad_(True)
    raw = expand(random_raw((4,), seed=7), n)
    y, logabsdet = rational_quadratic_spline(x, *raw, inverse=inverse)
    (derivative,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(logabsdet, torch.log(derivative), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("inverse", [False, True])
def test_inputs_outside_the_bound_pass_through_with_finite_gradients(inverse):
    outside = torch.cat([torch.linspace(-1e3, -B - 1e-9, 50, dtype=torch.float64),
                         torch.linspace(B + 1e-9, 1e3, 50, dtype=torch.float64)])
    x = outside.expand(3, 100).clone().requires_grad_(True)
    raw = [r.requires_grad_(True) for r in expand(random_raw((3,), seed=8), 100)]
    y, logabsdet = rational_quadratic_spline(x, *raw, inverse=inverse)
    assert torch.equal(y, x.detach())
    assert torch.equal(logabsdet, torch.zeros_like(logabsdet))
    (y.square().sum() + logabsdet.sum()).backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    for r in raw:
        assert torch.isfinite(r.grad).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_are_finite_with_extreme_raw_parameters(inverse):
    n = 801
    generator = torch.Generator().manual_seed(9)
    sign = lambda k: 50.0 * torch.sign(torch.randn(4, k, generator=generator, dtype=torch.float64))
    per_feature = [sign(K), sign(K), sign(K - 1)]
    per_feature = [torch.cat([p, torch.full((2, p.shape[1]), v, dtype=torch.float64)])
                   for p, v in zip(per_feature, (50.0, -50.0, 50.0))]
    raw = [r.requires_grad_(True) for r in expand(per_feature, n)]
    x = torch.linspace(-2 * B, 2 * B, n, dtype=torch.float64).expand(6, n).clone().requires_grad_(True)
    y, logabsdet = rational_quadratic_spline(x, *raw, inverse=inverse)
    assert torch.isfinite(y).all() and torch.isfinite(logabsdet).all()
    (y.sum() + logabsdet.sum()).backward()
    assert torch.isfinite(x.grad).all()
    for r in raw:
        assert torch.isfinite(r.grad).all()
    assert (torch.diff(y, dim=-1) >= 0).all()


def test_float32_round_trip():
    n = 1001
    x = torch.linspace(-2 * B, 2 * B, n).expand(4, n)
    raw = expand(random_raw((4,), scale=1.0, seed=10, dtype=torch.float32), n)
    y, logabsdet = rational_quadratic_spline(x, *raw)
    x_back, logabsdet_inverse = rational_quadratic_spline(y, *raw, inverse=True)
    assert y.dtype == x_back.dtype == logabsdet.dtype == torch.float32
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(logabsdet + logabsdet_inverse, torch.zeros_like(x), atol=1e-3, rtol=0)


# -- spline coupling layer ------------------------------------------------------------------------


@pytest.mark.parametrize("transformed", coupling_masks(DIM, 3) + [[0], [1], [2]], ids=str)
def test_spline_coupling_passes_the_harness(transformed):
    check_layer(lambda: SplineCoupling(DIM, transformed, hidden=8))


def test_spline_coupling_with_other_bins_and_bound_passes_the_harness():
    check_layer(lambda: SplineCoupling(DIM, [0, 2], hidden=8, bins=3, tail_bound=2.0))


def test_spline_coupling_passes_conditioning_features_through_and_is_element_wise():
    torch.manual_seed(0)
    transformed, identity = [0, 2], [1]
    layer = randomize_(SplineCoupling(DIM, transformed, hidden=8).double())
    x = sample_inputs(n=1)[0]
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    assert torch.equal(jacobian[identity], torch.eye(DIM, dtype=x.dtype)[identity])
    assert jacobian[0, 2] == 0 and jacobian[2, 0] == 0
    assert (jacobian[transformed][:, identity] != 0).all()
