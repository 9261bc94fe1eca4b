"""Autoregressive flow layers: a MADE conditioner driving an affine or a spline element-wise transform.

Papers:
* Germain, Gregor, Murray & Larochelle (2015), "MADE: Masked Autoencoder for Distribution Estimation", ICML.
* Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), "Improved Variational Inference
  with Inverse Autoregressive Flow", NeurIPS.
* Durkan, Bekasov, Murray & Papamakarios (2019), "Neural Spline Flows", NeurIPS.

Both layers are inverse-autoregressive: in the sampling direction (base -> parameters) every
output feature is computed from the *inputs* that come before it in the layer's order, so one
pass of the MADE gives all of them at once,

    y_i = tau(u_i; c_i(u_{<i})),       log|det dy/du| = sum_i log tau'(u_i; c_i(u_{<i})),

because the Jacobian is triangular in that order. The inverse (evaluating q at given points) needs
the outputs of earlier features first, so it takes ``dim`` passes.
"""

import torch
import torch.nn.functional as F
from torch import nn

from gravity_flows.flows.layers import affine_from_params, freeze_last_columns, with_context
from gravity_flows.flows.splines import DEFAULT_BINS, DEFAULT_TAIL_BOUND, spline_from_params, spline_param_count


def layer_orders(dim, n_layers):
    """Feature order of each autoregressive layer: identity, reversed, identity, reversed, ...

    Alternating with the reversal (as in Papamakarios et al. 2017, MAF) means that over any two
    consecutive layers every feature is conditioned on every other one: feature j depends on
    feature i in one layer of the pair whenever i != j. For dim = 3 that is orders [0, 1, 2] and [2, 1, 0].
    """
    return [list(range(dim)) if layer % 2 == 0 else list(range(dim))[::-1] for layer in range(n_layers)]


def _check_order(order, dim):
    order = list(range(dim)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(dim)):
        raise ValueError(f"order must be a permutation of range({dim}), got {order}")
    return order


class MaskedLinear(nn.Linear):
    """Linear layer y = x (W * M)^T + b with a fixed 0/1 connectivity mask M (a buffer)."""

    def __init__(self, n_inputs, n_outputs, mask):
        super().__init__(n_inputs, n_outputs)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder (Germain et al. 2015): an MLP whose output for feature i depends only on
    the inputs strictly before i in ``order``.

    Degrees: input feature ``order[p]`` has degree p + 1 (1 .. dim); hidden unit k has degree
    (k mod (dim - 1)) + 1, cycling through 1 .. dim - 1 so every unit is connected to at least one
    input and one output. A hidden unit of degree m sees units of degree <= m below it; an output
    of feature i (degree m_i) sees hidden units of degree < m_i. Hence d output_i / d input_j = 0
    unless j precedes i in ``order``, and the first feature's output is a constant (the biases).

    Two hidden layers of ``hidden`` tanh units (as ``layers.conditioner``); the masks are buffers
    multiplied into the weights; the last layer is zeroed, so the outputs start at 0.
    ``forward(x, context=None)`` maps (batch, dim) to (batch, dim, n_params_per_feature). ``order``
    defaults to the identity.

    ``context=C`` (a conditional MADE, as zuko builds it): C more inputs of degree 0, connected to
    every unit of the first hidden layer, never directly to an output; and the hidden degrees cycle
    through 0 .. dim - 1 instead, the units of degree 0 seeing the context alone. Every output then
    depends on the context — the first feature's too, through the degree-0 units (with degrees from 1,
    as in nflows, its parameters would be biases, the same for every context) — while
    d output_i / d input_j is still zero unless j precedes i: the autoregressive masks stay exact.
    """

    def __init__(self, dim, hidden, n_params_per_feature, order=None, context=0):
        super().__init__()
        order = _check_order(order, dim)
        if dim > 1 and hidden < dim - 1 + (context > 0):
            raise ValueError(f"MADE needs at least {dim - 1 + (context > 0)} hidden units, got {hidden}")
        self.dim = dim
        self.n_params_per_feature = n_params_per_feature
        self.order = order
        self.context_size = context

        input_degree = torch.empty(dim, dtype=torch.long)
        input_degree[torch.tensor(order)] = torch.arange(1, dim + 1)
        if context:
            hidden_degree = torch.arange(hidden) % dim  # degree 0: the units that see only the context
        else:
            hidden_degree = torch.arange(hidden) % max(dim - 1, 1) + 1
        # Output unit i * n_params + p is parameter p of feature i.
        output_degree = input_degree.repeat_interleave(n_params_per_feature)

        first_mask = hidden_degree[:, None] >= input_degree[None, :]
        if context:  # the context's inputs have degree 0: every hidden unit sees them
            first_mask = torch.cat([first_mask, torch.ones(hidden, context, dtype=torch.bool)], dim=1)
        self.network = nn.Sequential(
            MaskedLinear(dim + context, hidden, first_mask),
            nn.Tanh(),
            MaskedLinear(hidden, hidden, hidden_degree[:, None] >= hidden_degree[None, :]),
            nn.Tanh(),
            MaskedLinear(hidden, dim * n_params_per_feature, output_degree[:, None] > hidden_degree[None, :]),
        )
        nn.init.zeros_(self.network[-1].weight)
        nn.init.zeros_(self.network[-1].bias)

    def freeze_context(self):
        """For one fixed context: the first layer's context weights stop training (``layers.freeze_last_columns``)."""
        freeze_last_columns(self.network[0], self.context_size)

    def forward(self, x, context=None):
        return self.network(with_context(x, context, self.context_size)).reshape(x.shape[0], self.dim, self.n_params_per_feature)


class AutoregressiveAffine(nn.Module):
    """Inverse autoregressive affine layer, IAF (Kingma et al. 2016), in the sampling direction.

    forward (base -> parameters), one parallel MADE pass:
        (s, t) = MADE(u),  s <- soft_clip(s, LOG_SCALE_BOUND),  y = u * exp(s) + t,
        log|det dy/du| = sum_i s_i.
    inverse (parameters -> base), ``dim`` sequential passes: after pass p the first p features in
    ``order`` are exact, since s_i, t_i depend only on earlier features; log|det du/dy| = -sum_i s_i.
    Identity at initialisation (the MADE's last layer is zero, so s = t = 0). ``context=C``: a
    conditional MADE, (s, t) = MADE(u, c).
    """

    def __init__(self, dim=3, hidden=32, order=None, context=0):
        super().__init__()
        self.dim = dim
        self.made = MADE(dim, hidden, 2, order, context=context)

    def forward(self, u, context=None):
        y, logabsdet = affine_from_params(u, self.made(u, context))
        return y, logabsdet.sum(-1)

    def inverse(self, y, context=None):
        u = torch.zeros_like(y)
        for _ in range(self.dim):
            u, logabsdet = affine_from_params(y, self.made(u, context), inverse=True)
        return u, logabsdet.sum(-1)


class AutoregressiveSpline(nn.Module):
    """Inverse autoregressive neural spline layer (Durkan et al. 2019; IAF direction, Kingma et al. 2016).

    forward (base -> parameters), one parallel MADE pass:
        theta = MADE(u)  (3K - 1 raw spline parameters per feature),
        y_i = RQS(u_i; theta_i(u_{<i})),  log|det dy/du| = sum_i log RQS'(u_i; theta_i),
    with RQS the monotone rational-quadratic spline of ``splines.rational_quadratic_spline``
    (K bins on [-B, B], identity tails). The inverse takes ``dim`` sequential passes, as for
    ``AutoregressiveAffine``. Identity at initialisation (zero raw parameters give the identity spline).
    ``context=C``: a conditional MADE, theta = MADE(u, c).
    """

    def __init__(self, dim=3, hidden=32, order=None, bins=DEFAULT_BINS, tail_bound=DEFAULT_TAIL_BOUND, context=0):
        super().__init__()
        self.dim = dim
        self.tail_bound = tail_bound
        self.made = MADE(dim, hidden, spline_param_count(bins), order, context=context)

    def forward(self, u, context=None):
        y, logabsdet = spline_from_params(u, self.made(u, context), inverse=False, tail_bound=self.tail_bound)
        return y, logabsdet.sum(-1)

    def inverse(self, y, context=None):
        u = torch.zeros_like(y)
        for _ in range(self.dim):
            u, logabsdet = spline_from_params(y, self.made(u, context), inverse=True, tail_bound=self.tail_bound)
        return u, logabsdet.sum(-1)
