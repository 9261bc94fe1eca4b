"""One test harness for every flow layer (STYLE.md, lesson 2).

Every layer takes and returns ``(batch, 3)`` tensors and follows one interface:
``forward(u) -> (y, logabsdet)`` in the sampling direction (base -> parameters) and, where it
exists, ``inverse(y) -> (u, logabsdet)``. The checks below run in float64 on layers whose
parameters have been moved away from their (identity) initial values.

Conditional layers (made with ``context=C``, STYLE lesson 12) get :func:`check_conditional_layer`:
the same checks at two different contexts, one context per row and one context shared by every row,
and that changing the context changes the map.
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


def sample_contexts(size, n=16, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, size, generator=generator, dtype=torch.float64)


def jacobian_logdet(function, x, context=None):
    """log|det J| of ``function`` at each row of ``x``, by autograd, one row at a time.

    With ``context`` (rows, C), row i is mapped with context row i, held fixed (the Jacobian is
    with respect to x only: the context is not transformed)."""
    values = []
    for i, row in enumerate(x):
        if context is None:
            jacobian = torch.autograd.functional.jacobian(lambda v: function(v[None])[0][0], row)
        else:
            jacobian = torch.autograd.functional.jacobian(lambda v: function(v[None], context[i:i + 1])[0][0], row)
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


def _conditional_inverse(layer, numerical):
    if numerical:
        return layer.numerical_inverse
    return layer.inverse


def check_conditional_layer(make_layer, context_size=4, invertible=True, numerical_inverse=False):
    """Every check of :func:`check_layer` on a conditional layer, ``make_layer(context_size)``, float64:

    - the identity at initialisation for any context;
    - at two different contexts (one per row, and one shared by every row), log-det equal to the
      autograd Jacobian's with respect to x, and (``invertible``) the round trip and the inverse's
      log-det, by ``numerical_inverse`` where the layer has no closed form;
    - changing the context changes the map (and its log-det), so the context is really used;
    - every parameter receives a gradient, and so does the context;
    - the layer refuses to run without its context.
    """
    torch.manual_seed(0)
    x = sample_inputs()
    first, second = sample_contexts(context_size, seed=2), sample_contexts(context_size, seed=3)
    fresh = make_layer(context_size).double()
    for context in (first, second[0]):
        y, logdet = fresh.forward(x, context)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=1e-12, rtol=0)

    layer = randomize_(make_layer(context_size).double())
    inverse = _conditional_inverse(layer, numerical_inverse)
    for context in (first, second, second[:1]):
        y, logdet = layer.forward(x, context)
        assert y.shape == x.shape and logdet.shape == x.shape[:1]
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        per_row = context.expand(x.shape[0], -1)
        torch.testing.assert_close(logdet, jacobian_logdet(layer.forward, x, per_row), atol=1e-8, rtol=1e-7)
        if invertible:
            x_back, logdet_inverse = inverse(y, context)
            torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-8)
            torch.testing.assert_close(logdet + logdet_inverse, torch.zeros_like(logdet), atol=1e-9, rtol=0)
            torch.testing.assert_close(logdet_inverse, jacobian_logdet(inverse, y, per_row), atol=1e-8, rtol=1e-7)

    y_first, logdet_first = layer.forward(x, first)
    y_second, logdet_second = layer.forward(x, second)
    assert (y_first - y_second).abs().amax(dim=1).min() > 1e-6, "some row's map does not depend on the context"
    assert not torch.allclose(logdet_first, logdet_second), "the log-det does not depend on the context"

    layer.zero_grad()
    context = first.clone().requires_grad_(True)
    y, logdet = layer.forward(x, context)
    (y.square().sum() + logdet.sum()).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, f"{name} receives no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} receives a zero gradient"
    assert context.grad is not None and context.grad.abs().sum() > 0, "the context receives no gradient"

    try:
        layer.forward(x)
    except ValueError as error:
        assert "context" in str(error)
    else:
        raise AssertionError("a conditional layer ran without its context")
