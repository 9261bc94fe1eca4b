"""Flow building blocks shared by the six flow scripts.

Every layer is a ``torch.nn.Module`` on ``(batch, 3)`` tensors with one interface:

* ``forward(u, context=None) -> (y, logabsdet)`` — the sampling direction, base -> parameters;
* ``inverse(y, context=None) -> (u, logabsdet)`` — where an inverse exists (planar layers have none
  in closed form; :meth:`Planar.numerical_inverse` finds it by a one-dimensional root).

``logabsdet`` has shape ``(batch,)``: log |det dy/du| for ``forward``, log |det du/dy| for ``inverse``.
Every layer is exactly the identity at initialisation (the last layer of each conditioner is zeroed),
so a flow starts from its base distribution and training refines it.

Conditional layers (STYLE lesson 12). A layer made with ``context=C > 0`` is the same class with a
context: a vector c of C numbers (a learned summary of the observed profile, for an amortized
posterior q(theta | d)) that enters its conditioner as extra inputs, so that the map is a different
bijection of u for every c, with the same log-determinant formula (c is not transformed, so the
Jacobian with respect to u keeps its structure). ``context`` is then (batch, C), one row per input
row, or (C,) / (1, C), one context for every row. With ``context=0`` (the default) a layer takes no
context and creates exactly the parameters, in the same order and shapes, that it did before
contexts existed, so an unconditional flow's results for a seed are unchanged. ActNorm and the LU
map stay unconditional (as in the conditional Glow of InvertibleNetworks.jl); they accept and ignore
a context so that a sequence can pass it to every layer.

Papers:

* Rezende & Mohamed (2015), Variational inference with normalizing flows — ``Planar``.
* Dinh, Sohl-Dickstein & Bengio (2017), Density estimation using Real NVP — ``Coupling``, ``AffineCoupling``.
* Kingma & Dhariwal (2018), Glow: generative flow with invertible 1x1 convolutions — ``ActNorm``,
  ``LULinear``, ``GlowStep``.
"""

import torch
import torch.nn.functional as F
from torch import nn

#: Affine log-scales are soft-clipped to (-LOG_SCALE_BOUND, LOG_SCALE_BOUND): bounded, never a hard clamp.
LOG_SCALE_BOUND = 3.0


def soft_clip(x, bound):
    """Smoothly squash ``x`` into (-bound, bound); slope 1 at zero, so identity-at-init is kept."""
    return bound * torch.tanh(x / bound)


def affine_from_params(x, params, inverse=False):
    """The element-wise affine map of the coupling and autoregressive affine layers.

    ``params[..., 0]`` is the raw log-scale, soft-clipped to s = LOG_SCALE_BOUND tanh(raw / LOG_SCALE_BOUND);
    ``params[..., 1]`` the shift t. Forward: y = x exp(s) + t, log-derivative s; inverse:
    x = (y - t) exp(-s), log-derivative -s. Returns ``(output, logabsdet)``, both element-wise.
    """
    log_scale = soft_clip(params[..., 0], LOG_SCALE_BOUND)
    shift = params[..., 1]
    if inverse:
        return (x - shift) * torch.exp(-log_scale), -log_scale
    return x * torch.exp(log_scale) + shift, log_scale


def conditioner(n_inputs, n_outputs, hidden, context=0):
    """A small MLP whose last layer is zeroed, so the layer it conditions starts as the identity.

    ``context`` extra inputs (a conditional layer's context, appended to the inputs by
    :func:`with_context`) widen the first layer only."""
    network = nn.Sequential(
        nn.Linear(n_inputs + context, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, n_outputs),
    )
    nn.init.zeros_(network[-1].weight)
    nn.init.zeros_(network[-1].bias)
    return network


def freeze_last_columns(linear, n):
    """Stop training the weights of ``linear``'s last ``n`` inputs (a gradient hook zeroes them; Adam then leaves them).

    Used by the conditional layers' ``freeze_context``: with one fixed context c (a per-profile fit
    from the amortized start, ``amortized.ConditionedPosterior``) the context's part of a first layer,
    W_c c, is a constant added to that layer's bias b, which trains anyway, so the layer can represent
    nothing less. Trained, W_c would move W_c c by about lr * ||c||_1 on Adam's first step (Adam moves
    every weight by about lr, and for a constant input all of them the same way)."""
    keep = torch.ones_like(linear.weight)
    keep[:, linear.weight.shape[1] - n:] = 0.0
    linear.weight.register_hook(lambda grad: grad * keep.to(grad.dtype))


def check_context(context, size, rows):
    """The context of a layer made with ``context=size``, as (rows, size) (a broadcast view for one context).

    ``size`` 0: the layer is unconditional and ``context`` must be None. Otherwise ``context`` must be
    (rows, size), (1, size) or (size,). ValueError for anything else: a conditional layer never
    silently runs without its context."""
    if size == 0:
        if context is not None:
            raise ValueError("this layer was made without a context (context=0) and cannot take one")
        return None
    if context is None:
        raise ValueError(f"this layer was made with a context of {size} numbers: pass context=")
    if context.dim() == 1:
        context = context[None]
    if context.dim() != 2 or context.shape[1] != size or context.shape[0] not in (1, rows):
        raise ValueError(f"context must be ({rows}, {size}), (1, {size}) or ({size},), got {tuple(context.shape)}")
    return context.expand(rows, size)


def with_context(inputs, context, size):
    """The conditioner's input: ``inputs`` (batch, n), with the checked context appended when ``size`` > 0."""
    context = check_context(context, size, inputs.shape[0])
    return inputs if context is None else torch.cat([inputs, context.to(inputs.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------
# Coupling layers (Dinh et al. 2017)
# --------------------------------------------------------------------------------------------------


def coupling_mask(dim, index):
    """Sorted list of the features that coupling layer number ``index`` transforms.

    Layer k is conditioned on a window of c = dim // 2 consecutive features (cyclically), starting
    at feature k * c mod dim, and transforms the other dim - c. The window slides by its own width,
    so two consecutive windows never overlap: **any two consecutive layers transform every feature**,
    at every dimension >= 2 (odd ones included). With dim = 3 the layers condition on feature
    0, 1, 2, 0, ... and transform [1, 2], [0, 2], [0, 1], ...: each feature is transformed in two
    layers out of three and is conditioned on each other feature in turn (a fixed split such as
    [0, 2] / [1] would never let features 0 and 2 condition each other).

    When windows of more than one feature tile the features exactly (dim a multiple of c > 1: every
    even dim from 4), sliding by c would return to the same split every dim / c layers, and features
    inside one window would never condition each other — with dim = 4, R and Δρ (features 2, 3)
    never would, yet their relation is the mass ridge. So each time the windows come round, they
    start one feature further on: with dim = 4 the layers condition on [0, 1], [2, 3], [1, 2],
    [3, 0], [2, 3], [0, 1], ...: layers 2p and 2p + 1 are complementary (together they transform
    every feature), and every feature conditions every other within 2 dim / c layers.
    """
    if dim < 2:
        raise ValueError(f"a coupling layer needs at least 2 features, got dim={dim}")
    width = dim // 2
    start = index * width
    if width > 1 and dim % width == 0:
        start += index * width // dim
    start %= dim
    conditioning = {(start + offset) % dim for offset in range(width)}
    return [feature for feature in range(dim) if feature not in conditioning]


def coupling_masks(dim, n_layers):
    """``coupling_mask(dim, k)`` for k = 0 .. n_layers - 1: any two consecutive ones cover every feature."""
    return [coupling_mask(dim, index) for index in range(n_layers)]


class Coupling(nn.Module):
    """Coupling layer (Dinh et al. 2017) with an index-based split, for any dimension.

    The features split into ``identity_index`` (A, passed through) and ``transformed_index`` (B):

        y_A = x_A,        y_B = tau(x_B; theta(x_A)),

    with tau an element-wise monotone transform (``_elementwise``, defined by the subclass) and theta
    a conditioner MLP from x_A to ``len(B) * n_params_per_feature`` numbers, whose last layer is zeroed.
    The Jacobian is block-triangular, so

        log|det dy/dx| = sum_{i in B} log|d tau_i / d x_i|.

    The inverse reuses theta(y_A) = theta(x_A) and tau's inverse. Made with ``context=C``, the
    conditioner is theta(x_A, c): the context joins x_A as input, the Jacobian stays block-triangular
    and the log-determinant keeps its form. Subclasses implement
    ``_elementwise(x_transformed, params, inverse) -> (y_transformed, logabsdet)`` where ``params`` has
    shape ``(batch, len(B), n_params_per_feature)`` and ``logabsdet`` is either element-wise,
    ``(batch, len(B))``, or already summed, ``(batch,)``; ``tau`` must be the identity when
    ``params`` is zero, so that the layer starts as the identity.
    """

    def __init__(self, dim, transformed, hidden, n_params_per_feature, context=0):
        super().__init__()
        transformed = sorted(set(int(feature) for feature in transformed))
        if not transformed or transformed[0] < 0 or transformed[-1] >= dim or len(transformed) == dim:
            raise ValueError(f"transformed features {transformed} must be a non-empty proper subset of range({dim})")
        identity = [feature for feature in range(dim) if feature not in transformed]
        self.dim = dim
        self.n_params_per_feature = n_params_per_feature
        self.register_buffer("identity_index", torch.tensor(identity, dtype=torch.long))
        self.register_buffer("transformed_index", torch.tensor(transformed, dtype=torch.long))
        self.context_size = context
        self.conditioner = conditioner(len(identity), len(transformed) * n_params_per_feature, hidden, context)

    def _elementwise(self, x_transformed, params, inverse):
        raise NotImplementedError

    def freeze_context(self):
        """For one fixed context: the conditioner's context weights stop training (:func:`freeze_last_columns`)."""
        freeze_last_columns(self.conditioner[0], self.context_size)

    def _couple(self, x, inverse, context):
        x_identity = x.index_select(1, self.identity_index)
        x_transformed = x.index_select(1, self.transformed_index)
        inputs = with_context(x_identity, context, self.context_size)
        params = self.conditioner(inputs).view(x.shape[0], x_transformed.shape[1], self.n_params_per_feature)
        y_transformed, logabsdet = self._elementwise(x_transformed, params, inverse)
        if logabsdet.dim() == 2:
            logabsdet = logabsdet.sum(dim=1)
        # Out-of-place: a copy of x with the transformed columns replaced (autograd flows to both).
        return x.index_copy(1, self.transformed_index, y_transformed), logabsdet

    def forward(self, x, context=None):
        return self._couple(x, inverse=False, context=context)

    def inverse(self, y, context=None):
        return self._couple(y, inverse=True, context=context)


class AffineCoupling(Coupling):
    """RealNVP affine coupling (Dinh et al. 2017).

    For the transformed features B, with (raw_s, t) = theta(x_A):

        s = LOG_SCALE_BOUND * tanh(raw_s / LOG_SCALE_BOUND)      (soft-clipped log-scale)
        y_B = x_B * exp(s) + t,                x_B = (y_B - t) * exp(-s),

        log|det dy/dx| = sum_{i in B} s_i      (and minus that for the inverse).

    ``transformed`` defaults to ``coupling_mask(dim, 0)``; ``context=C``: (raw_s, t) = theta(x_A, c).
    """

    def __init__(self, dim=3, transformed=None, hidden=32, context=0):
        transformed = coupling_mask(dim, 0) if transformed is None else transformed
        super().__init__(dim, transformed, hidden, n_params_per_feature=2, context=context)

    def _elementwise(self, x_transformed, params, inverse):
        return affine_from_params(x_transformed, params, inverse)


# --------------------------------------------------------------------------------------------------
# Planar flow (Rezende & Mohamed 2015)
# --------------------------------------------------------------------------------------------------


def _dot(a, b):
    """The dot product over the last axis; a plain ``@`` where ``b`` is one vector (the unconditional
    planar layer computes exactly what it always did)."""
    return a @ b if b.dim() == 1 else (a * b).sum(-1)


class Planar(nn.Module):
    """Planar flow (Rezende & Mohamed 2015, section 4.1), sampling direction only.

        f(z) = z + û tanh(wᵀz + b),
        log|det df/dz| = log|1 + ûᵀψ(z)|,   ψ(z) = (1 - tanh²(wᵀz + b)) w,
                       = log(1 + (1 - tanh²(wᵀz + b)) wᵀû).

    f is invertible iff wᵀû >= -1 (then 1 + ûᵀψ >= tanh² >= 0). As in the paper, the free
    parameter u is projected along w:

        û = u + (m(wᵀu) - wᵀu) w / ‖w‖²,    so that    wᵀû = m(wᵀu),

    (the division is by ‖w‖², not ‖w‖). The paper takes m(a) = -1 + softplus(a), but its m(0) =
    log 2 - 1 ≠ 0, so u = 0 would not give û = 0 and the layer would not start as the identity.
    Here m(a) = ELU(a) = a for a > 0, exp(a) - 1 otherwise, which has

        m(a) > -1 for every a (hence wᵀû >= -1),   m(0) = 0 (u = 0 gives û = 0 exactly),
        m(a) = a for a >= 0 (û = u whenever wᵀu >= 0),   m'(0) = 1, m linear for large a.

    It also keeps û bounded: 0 <= m(a) - a <= -a for a < 0, so ‖û‖ <= 2‖u‖.
    Initialisation: u = 0, b = 0 (identity); w ~ N(0, I / dim), nonzero, so that in standardised
    space wᵀz is of order one and u receives a gradient from the first step.
    There is no closed-form inverse: ``inverse`` raises ``NotImplementedError``;
    :meth:`numerical_inverse` finds it by a one-dimensional root.

    Conditional (``context=C``): the amortized planar flows of Rezende & Mohamed's own experiments,
    (u, w, b) = (u₀, w₀, b₀) + NN(c), one set per context, from a small network
    (:func:`conditioner`, ``hidden`` units, default C, its last layer zeroed: the identity at
    initialisation for every context), and the same projection, row by row, keeps wᵀû >= -1 for
    every context.
    """

    def __init__(self, dim=3, context=0, hidden=None):
        super().__init__()
        self.dim = dim
        self.u = nn.Parameter(torch.zeros(dim))
        self.w = nn.Parameter(torch.randn(dim) / dim**0.5)
        self.b = nn.Parameter(torch.zeros(()))
        self.context_size = context
        if context:
            self.context_network = conditioner(context, 2 * dim + 1, hidden or context)

    def freeze_context(self):
        """For one fixed context: NN(c) is then a constant offset of (u, w, b), which train anyway; the
        network stops training (see :func:`freeze_last_columns` for why)."""
        self.context_network.requires_grad_(False)

    def _planar_parameters(self, context, rows):
        """(u, w, b): the layer's own, or, for a conditional layer, one set per row of the context."""
        context = check_context(context, self.context_size, rows)
        if context is None:
            return self.u, self.w, self.b
        offsets = self.context_network(context.to(self.u.dtype))
        return self.u + offsets[:, :self.dim], self.w + offsets[:, self.dim:2 * self.dim], self.b + offsets[:, -1]

    @staticmethod
    def _constrained(u, w):
        """(û, m(a), a) with a = wᵀu."""
        w_dot_u = _dot(w, u)
        w_dot_u_hat = F.elu(w_dot_u)  # m(wᵀu) >= -1 holds exactly in floating point too
        u_hat = u + (w_dot_u_hat - w_dot_u)[..., None] * w / _dot(w, w)[..., None]
        return u_hat, w_dot_u_hat, w_dot_u

    def u_hat(self, context=None):
        """The constrained û, with wᵀû = ELU(wᵀu) >= -1 (one row per context row for a conditional layer)."""
        u, w, _ = self._planar_parameters(context, 1 if context is None or context.dim() == 1 else context.shape[0])
        return self._constrained(u, w)[0]

    def forward(self, z, context=None):
        u, w, b = self._planar_parameters(context, z.shape[0])
        u_hat, _, a = self._constrained(u, w)
        h = torch.tanh(_dot(z, w) + b)
        y = z + h[:, None] * u_hat
        # 1 + ûᵀψ = 1 + (1 - h²) m(a), a = wᵀu (m(a) rather than w @ û, which can round below -1).
        # For a < 0, m(a) = eᵃ - 1 and 1 + (1 - h²)(eᵃ - 1) = h² + (1 - h²) eᵃ: a sum of two
        # non-negative terms, free of the cancellation that makes the first form -inf when eᵃ
        # rounds to 0 and h is small. Both branches are finite for every input, so torch.where
        # passes finite gradients. (h² and 1 - h² are formed once: each operation costs dispatch time.)
        h_squared = h * h
        slope = 1 - h_squared
        positive = torch.log1p(slope * a.clamp(min=0))
        negative = torch.log(h_squared + slope * torch.exp(a.clamp(max=0)))
        return y, torch.where(a >= 0, positive, negative)

    def inverse(self, y, context=None):
        raise NotImplementedError("a planar flow has no closed-form inverse (Rezende & Mohamed 2015)")

    #: Bisection steps of :meth:`numerical_inverse`: the bracket, 2|m| wide, shrinks to rounding error.
    ROOT_BISECTIONS = 80

    def numerical_inverse(self, y, context=None):
        """z = f⁻¹(y) and log|det dz/dy| = -log|det df/dz|(z), by a one-dimensional root.

        With α = wᵀz + b and m = wᵀû, y = z + û tanh(α) gives wᵀy + b = α + m tanh(α) =: g(α), and
        g' = 1 + m (1 - tanh²α) > 0 (m > -1), so g has one root, inside [c - |m|, c + |m|] with
        c = wᵀy + b (|tanh| <= 1): found by bisection to rounding error; then z = y - û tanh(α).
        Differentiable: one Newton step from the detached root, α = α* - (g(α*) - c) / g'(α*),
        leaves the value unchanged and gives the implicit-function derivatives dα = (dc - dg) / g',
        so gradients with respect to y and to the layer's parameters are exact (a density evaluated
        through this inverse can be trained by maximum likelihood).
        """
        u, w, b = self._planar_parameters(context, y.shape[0])
        u_hat, m, _ = self._constrained(u, w)
        c = _dot(y, w) + b
        with torch.no_grad():
            width = m.abs().detach().expand_as(c)
            low, high = c.detach() - width, c.detach() + width
            m_value = m.detach()
            for _ in range(self.ROOT_BISECTIONS):
                middle = 0.5 * (low + high)
                above = middle + m_value * torch.tanh(middle) > c.detach()
                high = torch.where(above, middle, high)
                low = torch.where(above, low, middle)
            root = 0.5 * (low + high)
            slope = 1 + m_value * (1 - torch.tanh(root) ** 2)
        alpha = root - (root + m * torch.tanh(root) - c) / slope
        z = y - torch.tanh(alpha)[:, None] * u_hat
        _, logabsdet = self.forward(z, context)
        return z, -logabsdet


# --------------------------------------------------------------------------------------------------
# Glow (Kingma & Dhariwal 2018): ActNorm, invertible linear map, and the step combining them
# --------------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """Activation normalisation (Kingma & Dhariwal 2018): a learnable per-feature affine map.

        y = x * exp(log_scale) + shift,        x = (y - shift) * exp(-log_scale),
        log|det dy/dx| = sum_i log_scale_i     (the same for every row).

    Both parameters start at zero (the identity). Glow's data-dependent initialisation is not
    needed: the flow acts in standardised space, where the data already have unit scale.
    """

    def __init__(self, dim=3):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x, context=None):  # unconditional: a context is accepted and ignored (module docstring)
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y, context=None):
        return (y - self.shift) * torch.exp(-self.log_scale), -self.log_scale.sum().expand(y.shape[0])


class LULinear(nn.Module):
    """Invertible linear map with an LU parameterisation (Kingma & Dhariwal 2018, section 3.2).

        y = x Wᵀ,   W = L U,
        L = unit lower-triangular (learnable strictly-lower entries),
        U = upper-triangular, diagonal exp(log_diagonal) > 0, learnable strictly-upper entries,
        log|det dy/dx| = sum_i log_diagonal_i       (the same for every row).

    Inverse by two triangular solves, x = (y L⁻ᵀ) U⁻ᵀ (``torch.linalg.solve_triangular``).
    Glow's W = P L U also has a fixed permutation P; it is left out so that W = I at initialisation
    (all parameters zero), exactly; the learnt W mixes the features, and the couplings of
    consecutive steps alternate their split. The diagonal is exp of a learnable parameter (as in Glow; it is not a network output), so it
    is exactly 1 at initialisation in every dtype and its log-determinant needs no log.
    The ``shift`` Glow's 1x1 convolution lacks too is provided by ``ActNorm``.
    """

    def __init__(self, dim=3):
        super().__init__()
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diagonal = nn.Parameter(torch.zeros(dim))
        self.register_buffer("eye", torch.eye(dim))

    def _factors(self):
        lower = torch.tril(self.lower, diagonal=-1) + self.eye
        upper = torch.triu(self.upper, diagonal=1) + torch.diag(torch.exp(self.log_diagonal))
        return lower, upper

    def forward(self, x, context=None):  # unconditional: a context is accepted and ignored (module docstring)
        lower, upper = self._factors()
        return F.linear(x, lower @ upper), self.log_diagonal.sum().expand(x.shape[0])

    def inverse(self, y, context=None):
        lower, upper = self._factors()
        # y = x Uᵀ Lᵀ: solve z Lᵀ = y, then x Uᵀ = z (right-hand solves, one row per sample).
        z = torch.linalg.solve_triangular(lower.T, y, upper=True, left=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper.T, z, upper=False, left=False)
        return x, -self.log_diagonal.sum().expand(y.shape[0])


class FlowSequence(nn.Module):
    """Composition of flow layers, f = f_K ∘ ... ∘ f_1 (``layers`` in sampling order).

        forward: applies f_1, ..., f_K;   log|det df/dx| = sum_k log|det df_k|  (chain rule).
        inverse: applies the inverses of f_K, ..., f_1; raises ``NotImplementedError`` if a layer has
        none, unless ``numerical=True``: a layer without a closed-form inverse (planar) is then
        inverted by its ``numerical_inverse`` (a root, to rounding error).

    ``context`` is passed to every layer (the unconditional ones ignore it or refuse it).
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, context=None):
        logabsdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_logabsdet = layer(x) if context is None else layer(x, context)
            logabsdet = logabsdet + layer_logabsdet
        return x, logabsdet

    def inverse(self, y, context=None, numerical=False):
        logabsdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            if numerical and hasattr(layer, "numerical_inverse"):
                y, layer_logabsdet = layer.numerical_inverse(y, context)
            elif isinstance(layer, FlowSequence):
                y, layer_logabsdet = layer.inverse(y, context, numerical=numerical)
            else:
                y, layer_logabsdet = layer.inverse(y) if context is None else layer.inverse(y, context)
            logabsdet = logabsdet + layer_logabsdet
        return y, logabsdet


class GlowStep(FlowSequence):
    """One Glow step (Kingma & Dhariwal 2018): ActNorm -> LULinear -> AffineCoupling.

        log|det| = sum(log_scale) + sum(log_diagonal) + sum_{i in B} s_i.

    The coupling transforms ``coupling_mask(dim, index)``, so consecutive steps (index 0, 1, ...)
    transform every feature even before the linear maps have learnt to mix them. ``context=C``:
    only the coupling is conditioned; ActNorm and the LU map stay unconditional (the conditional
    Glow of InvertibleNetworks.jl does the same).
    """

    def __init__(self, dim=3, hidden=32, index=0, context=0):
        super().__init__([
            ActNorm(dim),
            LULinear(dim),
            AffineCoupling(dim, coupling_mask(dim, index), hidden, context=context),
        ])
