"""Conditional flow layers (STYLE lesson 12): every layer type with a context, through the shared
harness (log-det against the autograd Jacobian at two contexts, round trip, the context changes the
map); the conditional MADE keeps its autoregressive masks; the planar layer's numerical inverse."""

import itertools

import pytest
import torch

from gravity_flows.flows import layers
from gravity_flows.flows.autoregressive import MADE, AutoregressiveAffine, AutoregressiveSpline
from gravity_flows.flows.splines import SplineCoupling
from layer_harness import DIM, check_conditional_layer, check_round_trip, randomize_, sample_contexts, sample_inputs

HIDDEN = 8

CONDITIONAL_LAYERS = {
    "affine_coupling": lambda c: layers.AffineCoupling(DIM, [0, 2], hidden=HIDDEN, context=c),
    "spline_coupling": lambda c: SplineCoupling(DIM, [1, 2], hidden=HIDDEN, bins=4, context=c),
    "autoregressive_affine": lambda c: AutoregressiveAffine(DIM, hidden=HIDDEN, order=[2, 0, 1], context=c),
    "autoregressive_spline": lambda c: AutoregressiveSpline(DIM, hidden=HIDDEN, bins=4, context=c),
    "glow_step": lambda c: layers.GlowStep(DIM, hidden=HIDDEN, index=1, context=c),
    "sequence": lambda c: layers.FlowSequence([layers.ActNorm(DIM), layers.AffineCoupling(DIM, [1], HIDDEN, context=c),
                                               layers.LULinear(DIM), AutoregressiveSpline(DIM, HIDDEN, bins=3, context=c)]),
}


@pytest.mark.parametrize("name", CONDITIONAL_LAYERS)
def test_conditional_layer_passes_the_harness_at_two_contexts(name):
    check_conditional_layer(CONDITIONAL_LAYERS[name])


def test_conditional_planar_passes_the_harness_with_its_numerical_inverse():
    check_conditional_layer(lambda c: layers.Planar(DIM, context=c), numerical_inverse=True)


def test_a_sequence_of_conditional_planar_layers_inverts_numerically():
    check_conditional_layer(lambda c: layers.FlowSequence([layers.Planar(DIM, context=c), layers.ActNorm(DIM),
                                                           layers.Planar(DIM, context=c)]),
                            invertible=False)
    flow = randomize_(layers.FlowSequence([layers.Planar(DIM, context=3), layers.Planar(DIM, context=3)]).double())
    x, context = sample_inputs(), sample_contexts(3)
    y, logdet = flow(x, context)
    x_back, logdet_inverse = flow.inverse(y, context, numerical=True)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inverse, -logdet, atol=1e-10, rtol=0)
    with pytest.raises(NotImplementedError):
        flow.inverse(y, context)  # only when asked for: the closed-form inverse still does not exist


def test_unconditional_planar_numerical_inverse_round_trips():
    layer = randomize_(layers.Planar(DIM).double(), scale=1.5)
    check_round_trip(type("Inverted", (), {"forward": layer.forward, "inverse": layer.numerical_inverse})(),
                     sample_inputs())


def test_conditional_planar_keeps_the_invertibility_condition_for_every_context():
    layer = randomize_(layers.Planar(DIM, context=4).double(), scale=3.0)
    context = 3.0 * sample_contexts(4, n=200)
    u, w, _ = layer._planar_parameters(context, 200)
    u_hat = layer.u_hat(context)
    assert ((w * u_hat).sum(-1) >= -1 - 1e-9).all()  # m(wᵀu) > -1 exactly; the dot itself may round
    assert u_hat.shape == (200, DIM) and not torch.allclose(u_hat[0], u_hat[1])


@pytest.mark.parametrize("order", list(itertools.permutations(range(DIM))))
def test_conditional_made_keeps_its_masks_and_sees_the_context_everywhere(order):
    made = randomize_(MADE(DIM, 6, 2, order, context=3).double())
    rank = {feature: r for r, feature in enumerate(order)}
    context = sample_contexts(3, n=2)
    for x, c in zip(sample_inputs(n=2), context):
        jacobian = torch.autograd.functional.jacobian(lambda v: made(v[None], c[None])[0], x)
        for i, j in itertools.product(range(DIM), repeat=2):
            block = jacobian[i, :, j]
            assert (block.abs() > 1e-12).all() if rank[j] < rank[i] else (block == 0).all()
        context_jacobian = torch.autograd.functional.jacobian(lambda v: made(x[None], v[None])[0], c)
        assert (context_jacobian.abs().sum(-1) > 1e-12).all(), "some output ignores the context"


@pytest.mark.parametrize("make", [lambda: layers.AffineCoupling(DIM, [0]), lambda: layers.Planar(DIM),
                                  lambda: AutoregressiveAffine(DIM, hidden=HIDDEN)])
def test_unconditional_layers_refuse_a_context_and_conditional_ones_a_wrong_one(make):
    with pytest.raises(ValueError, match="without a context"):
        make().double()(sample_inputs(n=3), sample_contexts(2, n=3))
    conditional = layers.AffineCoupling(DIM, [0], context=2).double()
    with pytest.raises(ValueError, match="context must be"):
        conditional(sample_inputs(n=3), sample_contexts(3, n=3))
    with pytest.raises(ValueError, match="context must be"):
        conditional(sample_inputs(n=3), sample_contexts(2, n=2))


@pytest.mark.parametrize("name", [*CONDITIONAL_LAYERS, "planar"])
def test_freezing_the_context_stops_exactly_the_weights_that_see_it_alone(name):
    """``freeze_context`` (one fixed context, ``--init amortized``): after a backward pass and an Adam
    step the first layer's weights reading the context are unchanged while its other weights and bias moved, and the
    map at that context is what it was before freezing (freezing changes training, not the layer)."""
    make = CONDITIONAL_LAYERS.get(name, lambda c: layers.Planar(DIM, context=c))
    layer = randomize_(make(3).double())
    x, context = sample_inputs(), sample_contexts(3, n=1)
    before = layer(x, context)[0].detach()
    frozen = []
    for module in layer.modules():
        if getattr(module, "context_size", 0) and hasattr(module, "freeze_context"):
            module.freeze_context()
            first = module.context_network[0] if isinstance(module, layers.Planar) else (
                module.conditioner[0] if isinstance(module, layers.Coupling) else module.network[0])
            frozen.append((first, module.context_size, isinstance(module, layers.Planar)))
    assert frozen
    torch.testing.assert_close(layer(x, context)[0], before, atol=0, rtol=0)
    trained = [p for p in layer.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trained]
    optimiser = torch.optim.Adam(trained, lr=1e-2)
    y, logdet = layer(x, context)
    (y.square().sum() - logdet.sum()).backward()
    optimiser.step()
    for first, size, whole in frozen:
        old = next(s for p, s in zip(trained, start) if p is first.weight) if first.weight.requires_grad else None
        if whole:
            assert not any(p.requires_grad for p in first.parameters())
        else:
            torch.testing.assert_close(first.weight[:, -size:], old[:, -size:], atol=0, rtol=0)
            assert not torch.equal(first.weight[:, :-size], old[:, :-size]) or first.weight.shape[1] == size
            assert not torch.equal(first.bias, next(s for p, s in zip(trained, start) if p is first.bias))
