"""Tests of the flow building blocks in ``layers.py`` (float64, three features unless stated).

Every layer goes through the shared harness (identity at init, log-det against the autograd
Jacobian, round trip, gradients); the tests below add what is particular to each layer.
"""

import math

import pytest
import torch

from gravity_flows.flows import layers
from layer_harness import (
    DIM,
    check_forward_logdet,
    check_layer,
    jacobian_logdet,
    randomize_,
    sample_inputs,
)

HIDDEN = 8  # small conditioners keep the autograd Jacobians quick; the maths does not depend on it


# -- coupling masks ---------------------------------------------------------------------------------


def _conditioned_on(masks, dim):
    """The (transformed, given) feature pairs that some layer of ``masks`` couples."""
    pairs = set()
    for mask in masks:
        pairs |= {(transformed, given) for transformed in mask for given in set(range(dim)) - set(mask)}
    return pairs


@pytest.mark.parametrize("dim", [2, 3, 4, 5, 6])
def test_coupling_masks_transform_every_feature_within_two_layers(dim):
    """Odd dims (and 2): any two consecutive layers; even dims from 4: layers 2p and 2p + 1."""
    masks = layers.coupling_masks(dim, 4 * dim + 1)
    for mask in masks:
        assert mask == sorted(set(mask)) and 0 < len(mask) < dim and set(mask) <= set(range(dim))
    step = 2 if dim >= 4 and dim % 2 == 0 else 1
    for first, second in list(zip(masks, masks[1:]))[::step]:
        assert set(first) | set(second) == set(range(dim)), (first, second)


@pytest.mark.parametrize("dim", [3, 4, 5, 6])
def test_coupling_masks_let_every_feature_condition_every_other(dim):
    """Within 2 dim layers every ordered pair of features is coupled; at dim 4 the third layer already
    transforms Δρ given R (features 3 and 2: the mass ridge), which a fixed half split never does."""
    everything = {(i, j) for i in range(dim) for j in range(dim) if i != j}
    assert _conditioned_on(layers.coupling_masks(dim, 2 * dim), dim) == everything
    if dim == 4:
        assert (3, 2) in _conditioned_on(layers.coupling_masks(4, 3), 4)


def test_coupling_masks_of_dim_3_let_every_feature_condition_every_other():
    conditioned_on = set()
    for mask in layers.coupling_masks(3, 3):
        identity = set(range(3)) - set(mask)
        conditioned_on |= {(transformed, given) for transformed in mask for given in identity}
    assert conditioned_on == {(i, j) for i in range(3) for j in range(3) if i != j}


def test_coupling_mask_rejects_a_single_feature():
    with pytest.raises(ValueError, match="at least 2 features"):
        layers.coupling_mask(1, 0)


# -- coupling layers --------------------------------------------------------------------------------

MASKS_OF_DIM_3 = layers.coupling_masks(3, 3) + [[0], [1], [2]]


@pytest.mark.parametrize("transformed", MASKS_OF_DIM_3, ids=str)
def test_affine_coupling_passes_the_harness(transformed):
    check_layer(lambda: layers.AffineCoupling(DIM, transformed, hidden=HIDDEN))


@pytest.mark.parametrize("transformed", MASKS_OF_DIM_3, ids=str)
def test_affine_coupling_jacobian_is_block_triangular(transformed):
    torch.manual_seed(0)
    layer = randomize_(layers.AffineCoupling(DIM, transformed, hidden=HIDDEN).double())
    identity = [feature for feature in range(DIM) if feature not in transformed]
    for x in sample_inputs(n=4):
        jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
        # Passed-through features: unit rows of the Jacobian.
        torch.testing.assert_close(jacobian[identity], torch.eye(DIM, dtype=x.dtype)[identity], atol=0, rtol=0)
        # Transformed features: element-wise in themselves (diagonal block) ...
        block = jacobian[transformed][:, transformed]
        torch.testing.assert_close(block, torch.diag(torch.diagonal(block)), atol=0, rtol=0)
        # ... and really conditioned on the others.
        assert (jacobian[transformed][:, identity].abs() > 1e-6).all()


def test_affine_coupling_log_scale_is_soft_clipped():
    layer = layers.AffineCoupling(DIM, [0, 2], hidden=HIDDEN).double()
    with torch.no_grad():
        layer.conditioner[-1].bias.fill_(10.0)  # raw log-scales of 10: past the bound
    x = sample_inputs(n=5)
    y, logabsdet = layer(x)
    bound = layers.LOG_SCALE_BOUND
    torch.testing.assert_close(logabsdet, torch.full_like(logabsdet, 2 * bound * math.tanh(10 / bound)))
    assert (logabsdet < 2 * bound).all() and torch.isfinite(y).all()


def test_coupling_rejects_a_split_that_is_not_a_proper_subset():
    for transformed in ([], [0, 1, 2], [3]):
        with pytest.raises(ValueError, match="non-empty proper subset"):
            layers.AffineCoupling(DIM, transformed)


class _ElementwiseScaleCoupling(layers.Coupling):
    """A subclass returning element-wise log-dets, (batch, len(B)): the base class must sum them."""

    def __init__(self, transformed):
        super().__init__(DIM, transformed, HIDDEN, n_params_per_feature=1)

    def _elementwise(self, x_transformed, params, inverse):
        log_scale = layers.soft_clip(params[..., 0], 2.0)
        if inverse:
            return x_transformed * torch.exp(-log_scale), -log_scale
        return x_transformed * torch.exp(log_scale), log_scale


@pytest.mark.parametrize("transformed", [[0, 2], [1]], ids=str)
def test_coupling_base_sums_elementwise_log_dets_of_a_subclass(transformed):
    check_layer(lambda: _ElementwiseScaleCoupling(transformed))


# -- planar -----------------------------------------------------------------------------------------


def test_planar_passes_the_harness():
    check_layer(lambda: layers.Planar(DIM), invertible=False)


def test_planar_has_no_inverse():
    with pytest.raises(NotImplementedError, match="no closed-form inverse"):
        layers.Planar(DIM).inverse(sample_inputs(n=2))


def test_planar_u_hat_is_exactly_zero_at_init_in_both_precisions():
    torch.manual_seed(3)
    layer = layers.Planar(DIM)
    assert (layer.u_hat() == 0).all() and (layer.double().u_hat() == 0).all()


def test_planar_at_init_is_not_a_dead_point():
    # û = 0 at init, so only u can move first: it must receive a gradient (w ≠ 0 makes tanh(wᵀz) ≠ 0).
    torch.manual_seed(0)
    layer = layers.Planar(DIM).double()
    assert (layer.w != 0).all()
    y, logabsdet = layer(sample_inputs())
    (y.square().sum() + logabsdet.sum()).backward()
    assert layer.u.grad.abs().min() > 1e-3


def _planar_with(u, w, b=0.0):
    layer = layers.Planar(DIM).double()
    with torch.no_grad():
        layer.u.copy_(u)
        layer.w.copy_(w)
        layer.b.fill_(b)
    return layer


def test_planar_invertibility_condition_holds_for_any_raw_parameters():
    generator = torch.Generator().manual_seed(7)
    for trial in range(200):
        w = torch.randn(DIM, generator=generator, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(-2, 2, generator=generator).item()
        u = torch.randn(DIM, generator=generator, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(-2, 3, generator=generator).item()
        for raw in (u, -100 * w, -1e4 * w, u - 1e3 * w):
            layer = _planar_with(raw, w)
            u_hat = layer.u_hat()
            w_dot_u_hat = w @ u_hat
            # Up to the rounding of û = u + (...) w / ‖w‖², which cancels when u is huge.
            rounding = 1e-14 * (1 + w.norm() * raw.norm())
            assert w_dot_u_hat >= -1 - rounding, (trial, w, raw)
            # wᵀû = m(wᵀu) = ELU(wᵀu): this fails if û divided by ‖w‖ instead of ‖w‖².
            torch.testing.assert_close(w_dot_u_hat, torch.nn.functional.elu(w @ raw), atol=rounding, rtol=1e-9)
            # The log-det uses m(wᵀu) itself, which is >= -1 exactly: finite everywhere off wᵀz + b = 0.
            assert torch.isfinite(layer(sample_inputs(n=8, seed=trial))[1]).all()
            # û only moves along w: its part orthogonal to w is the raw u's.
            orthogonal = lambda v: v - (w @ v) * w / (w @ w)  # noqa: E731
            torch.testing.assert_close(orthogonal(u_hat), orthogonal(raw), atol=1e-9 * (1 + raw.norm()), rtol=1e-9)


def test_planar_stays_invertible_where_the_raw_u_would_not_be():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    u = -3.0 * w / (w @ w)  # wᵀu = -3: with û = u, f would fold over itself near wᵀz + b = 0
    assert w @ u < -1
    layer = _planar_with(u, w, b=0.3)
    assert w @ layer.u_hat() >= -1
    # Inputs along w, through the worst place wᵀz + b = 0, where 1 + ûᵀψ = 1 + wᵀû is smallest.
    steps = torch.linspace(-3, 3, 61, dtype=torch.float64)[:, None]
    z = (steps - 0.3) * w / (w @ w) + torch.tensor([0.2, 0.4, 0.1], dtype=torch.float64)
    check_forward_logdet(layer, z)
    jacobians = torch.stack([torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], row) for row in z])
    assert (torch.linalg.det(jacobians) > 0).all()
    # Monotone along w, hence one-to-one: the projection wᵀf(z) increases with wᵀz.
    assert (torch.diff(layer(z)[0] @ w) > 0).all()
    # The unconstrained map (û = u) would not be: its Jacobian determinant changes sign.
    unconstrained = z + torch.tanh(z @ w + 0.3)[:, None] * u
    assert not (torch.diff(unconstrained @ w) > 0).all()


# -- ActNorm, LULinear -----------------------------------------------------------------------------


def test_actnorm_passes_the_harness():
    check_layer(lambda: layers.ActNorm(DIM))


def test_lulinear_passes_the_harness():
    check_layer(lambda: layers.LULinear(DIM))


def test_lulinear_log_det_is_slogdet_of_the_explicit_matrix():
    torch.manual_seed(0)
    layer = randomize_(layers.LULinear(DIM).double(), scale=1.0)
    eye = torch.eye(DIM, dtype=torch.float64)
    weight = layer(eye)[0].T  # y = x Wᵀ, so the rows of layer(I) are the columns of W
    x = sample_inputs(n=5)
    torch.testing.assert_close(layer(x)[0], x @ weight.T)
    sign, logabsdet = torch.linalg.slogdet(weight)
    assert not torch.allclose(weight, eye) and abs(logabsdet) > 0.1  # a real test, not the identity
    torch.testing.assert_close(layer(x)[1], logabsdet.expand(5))
    torch.testing.assert_close(layer.inverse(x)[1], -logabsdet.expand(5))
    assert sign > 0  # det W = prod exp(log_diagonal) > 0


# -- compositions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_glow_step_passes_the_harness(index):
    check_layer(lambda: layers.GlowStep(DIM, hidden=HIDDEN, index=index))


def test_glow_steps_transform_every_feature_in_turn():
    steps = [layers.GlowStep(DIM, hidden=HIDDEN, index=index) for index in range(2)]
    transformed = [set(step.layers[2].transformed_index.tolist()) for step in steps]
    assert transformed[0] | transformed[1] == set(range(DIM))
    assert [type(layer) for layer in steps[0].layers] == [layers.ActNorm, layers.LULinear, layers.AffineCoupling]


def _mixed_sequence():
    return layers.FlowSequence(
        [layers.ActNorm(DIM), layers.LULinear(DIM)]
        + [layers.AffineCoupling(DIM, mask, hidden=HIDDEN) for mask in layers.coupling_masks(DIM, 2)]
    )


def test_flow_sequence_passes_the_harness():
    check_layer(_mixed_sequence)


def test_flow_sequence_with_a_planar_layer_passes_the_harness_and_has_no_inverse():
    check_layer(lambda: layers.FlowSequence([layers.Planar(DIM), layers.ActNorm(DIM), layers.Planar(DIM)]), invertible=False)
    with pytest.raises(NotImplementedError):
        layers.FlowSequence([layers.Planar(DIM), layers.ActNorm(DIM)]).inverse(sample_inputs(n=2))


def test_flow_sequence_composes_in_order():
    torch.manual_seed(0)
    flow = randomize_(layers.FlowSequence([layers.AffineCoupling(DIM, [0], hidden=HIDDEN), layers.LULinear(DIM)]).double())
    x = sample_inputs()
    y, logabsdet = flow(x)
    after_coupling, coupling_logabsdet = flow.layers[0](x)
    expected, linear_logabsdet = flow.layers[1](after_coupling)
    torch.testing.assert_close(y, expected)  # coupling first, then the linear map
    torch.testing.assert_close(logabsdet, coupling_logabsdet + linear_logabsdet)
    reversed_order = flow.layers[0](flow.layers[1](x)[0])[0]
    assert not torch.allclose(y, reversed_order)


# -- both precisions --------------------------------------------------------------------------------

ALL_LAYERS = {
    "affine_coupling": lambda: layers.AffineCoupling(DIM, [0, 2], hidden=HIDDEN),
    "planar": lambda: layers.Planar(DIM),
    "actnorm": lambda: layers.ActNorm(DIM),
    "lulinear": lambda: layers.LULinear(DIM),
    "glow_step": lambda: layers.GlowStep(DIM, hidden=HIDDEN),
    "flow_sequence": _mixed_sequence,
}


@pytest.mark.parametrize("name", ALL_LAYERS)
def test_layers_work_in_float32_and_are_exactly_the_identity_at_init(name):
    torch.manual_seed(0)
    x = sample_inputs().float()
    y, logabsdet = ALL_LAYERS[name]()(x)
    assert y.dtype == torch.float32 and logabsdet.dtype == torch.float32 and logabsdet.shape == (len(x),)
    assert (y == x).all() and (logabsdet == 0).all()
    layer = randomize_(ALL_LAYERS[name]())
    y, logabsdet = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(logabsdet).all()
    torch.testing.assert_close(logabsdet, jacobian_logdet(layer.forward, x), atol=1e-4, rtol=1e-4)
    if name != "planar":
        x_back, inverse_logabsdet = layer.inverse(y)
        torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=1e-4, rtol=1e-4)
