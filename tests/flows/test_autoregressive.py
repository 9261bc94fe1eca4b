"""MADE masks (Germain et al. 2015) and the inverse-autoregressive affine and spline layers
(Kingma et al. 2016; Durkan et al. 2019): autoregressive structure from the autograd Jacobian,
the shared layer harness, one MADE pass for sampling and float32 support."""

import itertools

import pytest
import torch

from gravity_flows.flows.autoregressive import MADE, AutoregressiveAffine, AutoregressiveSpline, layer_orders
from layer_harness import DIM, check_layer, randomize_, sample_inputs

RANDOM_ORDER = torch.randperm(DIM, generator=torch.Generator().manual_seed(0)).tolist()  # [2, 0, 1]
ORDERS = [[0, 1, 2], [2, 1, 0], [1, 2, 0], RANDOM_ORDER]
HIDDEN = 8  # small MADEs keep the autograd Jacobians quick; the maths does not depend on it


def position(order):
    return {feature: rank for rank, feature in enumerate(order)}


@pytest.mark.parametrize("order", list(itertools.permutations(range(DIM))))
@pytest.mark.parametrize("hidden, n_params", [(2, 1), (5, 2), (16, 23)])
def test_made_jacobian_is_strictly_triangular_in_its_order(order, hidden, n_params):
    made = randomize_(MADE(DIM, hidden, n_params, order).double())
    rank = position(order)
    for x in sample_inputs(n=3):
        jacobian = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], x)  # (out, param, in)
        assert jacobian.shape == (DIM, n_params, DIM)
        for i, j in itertools.product(range(DIM), repeat=2):
            block = jacobian[i, :, j]
            if rank[j] < rank[i]:
                # Every allowed connection is used: no input is cut off by the masks.
                assert (block.abs() > 1e-12).all(), f"output {i} ignores input {j} in order {order}"
            else:
                assert (block == 0).all(), f"output {i} depends on input {j} in order {order}"


@pytest.mark.parametrize("order", ORDERS)
def test_made_output_of_the_first_feature_in_order_is_constant(order):
    made = randomize_(MADE(DIM, 8, 3, order).double())
    outputs = made(sample_inputs(n=32))
    first = outputs[:, order[0]]
    torch.testing.assert_close(first, first[:1].expand_as(first), atol=0, rtol=0)
    assert (outputs[:, order[-1]].std(0) > 0).all()


def test_made_starts_at_zero_and_keeps_masks_as_buffers():
    made = MADE(DIM, 8, 2, [2, 0, 1]).double()
    assert torch.equal(made(sample_inputs()), torch.zeros(16, DIM, 2, dtype=torch.float64))
    buffers = dict(made.named_buffers())
    assert len(buffers) == 3 and all(name.endswith("mask") for name in buffers)
    assert all(b.dtype == torch.float64 for b in made.buffers())


def test_made_rejects_an_order_that_is_not_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        MADE(DIM, 8, 2, [0, 0, 1])
    with pytest.raises(ValueError, match="hidden units"):
        MADE(DIM, 1, 2)


def test_layer_orders_alternate_identity_and_reversal_and_cover_every_dependency():
    orders = layer_orders(DIM, 5)
    assert orders == [[0, 1, 2], [2, 1, 0], [0, 1, 2], [2, 1, 0], [0, 1, 2]]
    dependencies = {(i, j) for order in orders[:2] for a, j in enumerate(order) for i in order[a + 1:]}
    assert dependencies == {(i, j) for i in range(DIM) for j in range(DIM) if i != j}


@pytest.mark.parametrize("order", ORDERS)
def test_affine_layer_passes_the_harness(order):
    check_layer(lambda: AutoregressiveAffine(DIM, HIDDEN, order))


@pytest.mark.parametrize("order", ORDERS)
def test_spline_layer_passes_the_harness(order):
    check_layer(lambda: AutoregressiveSpline(DIM, HIDDEN, order))


def test_spline_layer_with_other_bins_and_bound_passes_the_harness():
    check_layer(lambda: AutoregressiveSpline(DIM, 8, [1, 0, 2], bins=3, tail_bound=3.0))


@pytest.mark.parametrize("make", [AutoregressiveAffine, AutoregressiveSpline])
def test_layer_jacobian_is_triangular_in_its_order(make):
    order = [1, 2, 0]
    layer = randomize_(make(DIM, 16, order).double())
    rank = position(order)
    jacobian = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], sample_inputs(n=1)[0])
    for i, j in itertools.product(range(DIM), repeat=2):
        if rank[j] > rank[i]:
            assert jacobian[i, j] == 0
        else:
            assert jacobian[i, j] != 0


@pytest.mark.parametrize("make", [AutoregressiveAffine, AutoregressiveSpline])
def test_sampling_takes_one_made_pass_and_the_inverse_dim_passes(make):
    layer = make(DIM, 8, [2, 0, 1]).double()
    calls = []
    layer.made.register_forward_hook(lambda *args: calls.append(1))
    y, _ = layer(sample_inputs())
    assert len(calls) == 1
    layer.inverse(y)
    assert len(calls) == 1 + DIM


def test_affine_log_scale_is_soft_clipped():
    layer = AutoregressiveAffine(DIM, 8, [0, 1, 2]).double()
    with torch.no_grad():
        layer.made.network[-1].bias.fill_(100.0)
    y, logabsdet = layer(sample_inputs())
    assert torch.isfinite(y).all() and (logabsdet.abs() < DIM * 3.0 + 1e-9).all()


@pytest.mark.parametrize("make", [AutoregressiveAffine, AutoregressiveSpline])
def test_float32_round_trip(make):
    torch.manual_seed(0)
    # Moderate weights: with the harness's scale 0.5 the spline gets slopes ~1e-4 whose inverse
    # is ill-conditioned beyond float32's resolution (float64 is checked by the harness).
    layer = randomize_(make(DIM, 16, [2, 1, 0]), scale=0.2)
    u = sample_inputs().float()
    y, logabsdet = layer(u)
    u_back, logabsdet_inverse = layer.inverse(y)
    assert y.dtype == logabsdet.dtype == torch.float32
    torch.testing.assert_close(u_back, u, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logabsdet + logabsdet_inverse, torch.zeros_like(logabsdet), atol=1e-4, rtol=0)


def test_spline_layer_is_the_identity_outside_the_bound():
    layer = randomize_(AutoregressiveSpline(DIM, 8, [0, 1, 2]).double())
    u = torch.tensor([[6.0, -7.0, 50.0], [-5.5, 8.0, -1e3]], dtype=torch.float64)
    y, logabsdet = layer(u)
    assert torch.equal(y, u) and torch.equal(logabsdet, torch.zeros(2, dtype=torch.float64))
