"""One test harness for every flow layer (STYLE.md, lesson 2).

Every layer takes and returns ``(batch, 3)`` tensors and follows one interface:
``forward(u) -> (y, logabsdet)`` in the sampling direction (base -> parameters) and, where it
exists, ``inverse(y) -> (u, logabsdet)``. The checks below run in float64 on layers whose
parameters have been moved away from their (identity) initial values.
"""

import torch

DIM = 3


def sample_inputs(n=16, scale=1.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, DIM, generator=generator, dtype=torch.float64)


def randomize_(layer, scale=0.5, seed=1):
    """Move every parameter away from its initial value, so identity cannot hide a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


def jacobian_logdet(function, x):
    """log|det J| of ``function`` at each row of ``x``, by autograd, one row at a time."""
    values = []
    for row in x:
        jacobian = torch.autograd.functional.jacobian(lambda v: function(v[None])[0][0], row)
        values.append(torch.linalg.slogdet(jacobian).logabsdet)
    return torch.stack(values)


def check_forward_logdet(layer, x, atol=1e-8):
    y, logdet = layer.forward(x)
    assert y.shape == x.shape and logdet.shape == x.shape[:1]
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    expected = jacobian_logdet(layer.forward, x)
    torch.testing.assert_close(logdet, expected, atol=atol, rtol=1e-7)


def check_round_trip(layer, x, atol=1e-9):
    y, logdet_forward = layer.forward(x)
    x_back, logdet_inverse = layer.inverse(y)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=1e-8)
    torch.testing.assert_close(logdet_forward + logdet_inverse, torch.zeros_like(logdet_forward), atol=atol, rtol=0)
    expected = jacobian_logdet(layer.inverse, y)
    torch.testing.assert_close(logdet_inverse, expected, atol=1e-8, rtol=1e-7)


def check_every_parameter_gets_gradient(layer, x):
    layer.zero_grad()
    y, logdet = layer.forward(x)
    (y.square().sum() + logdet.sum()).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, f"{name} receives no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} receives a zero gradient"


def check_identity_at_init(layer, x):
    y, logdet = layer.forward(x)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=1e-12, rtol=0)


def check_layer(make_layer, invertible=True):
    """Run every check on a freshly made layer (float64, three features)."""
    torch.manual_seed(0)
    x = sample_inputs()
    check_identity_at_init(make_layer().double(), x)
    layer = randomize_(make_layer().double())
    check_forward_logdet(layer, x)
    if invertible:
        check_round_trip(layer, x)
    check_every_parameter_gets_gradient(layer, x)
