"""The exact reference posterior, by quadrature on a grid, and the scores every method gets against it.

Density known, ``theta = (x0, z, R)``
-------------------------------------
The posterior ``p(theta | d) ∝ L(theta) p(theta)`` is integrated directly on a grid around its mode:
the window spans ``±WINDOW_SDS`` Laplace standard deviations per axis (clipped to the prior box),
with trapezoid weights. Where the data barely constrain the body (``Laplace.weak``: the posterior is
close to the prior, with an edge where the spheres whose anomaly would stand out of the noise are ruled
out), or where theta's Laplace is no peak (a best fit pressed against a bound), no Laplace window can be
trusted: the grid then covers the whole prior box. Whatever the first window, it is then fitted to where
its grid finds probability (``_fit_window``): zoomed in while the support is much narrower than the
window (``SUPPORT_TAIL``, ``ZOOM_BELOW``), moved out where the posterior goes on past a side that the box
does not close, and given more nodes on an axis the grid does not resolve. The result carries its
self-check (``grid_check``, in ``summary()['check']``): the quadrature error of every grid axis's mean
and sd and of log Z, estimated by Richardson's rule from the same grid at every other node, and the
probability at the window's open sides. A posterior pressed on a bound is what this is for: the
marginal falls off from the bound over a fraction of the window the best fit suggests, and on a grid
too coarse there the trapezoid rule puts its mean a tenth of an sd off. The anomaly factorises as
``g = R**3 * h(x0, z)``, so for every (x0, z) node, with c = sum w d h / sum w h^2 its best R^3 and
r = d - c h its residuals, the weighted sum of squares over all R is

    sum w (d - R^3 h)^2 = sum w r^2 + (R^3 - c)^2 sum w h^2,

a few inner products per (x0, z) node instead of a forward model per grid point (:class:`Reference`).
Every term is as small as the sum itself, down to tiny noise (:func:`_sum_of_squares`); expanded about
R = 0 instead (sum w d^2 - 2 R^3 sum w d h + R^6 sum w h^2) it would cancel terms of order sum w d^2.
The ridge below is summed the same way, with m for R^3.

Density free, ``theta = (x0, z, R, drho)``: the mass ridge
----------------------------------------------------------
The data see R and drho only through m = drho * R**3 (g = m h(x0, z), h the anomaly of unit
drho and R), so the posterior of (R, drho) is a thin curved ridge. It is integrated exactly on a
3-D grid over (x0, z, m) instead (:class:`RidgeReference`). The prior is uniform on the 4-D box of
volume V; change variables (R, drho) -> (m, drho), R = (m / drho)**(1/3),
dR/dm = m**(-2/3) drho**(-1/3) / 3, and integrate drho out over the part of the ridge inside the box:

    p(x0, z, m | d) = L(x0, z, m) k(m) / (V Z),
    k(m) = ∫_a^b drho^(-1/3) d(drho) / (3 m^(2/3)) = ½ m^(-2/3) (b^(2/3) - a^(2/3)),
    a(m) = max(drho_lo, m / R_hi^3),  b(m) = min(drho_hi, m / R_lo^3),

with k = 0 where b <= a (m outside [drho_lo R_lo^3, drho_hi R_hi^3]). With weak data the m axis spans
that whole range, with nodes uniform in m^(1/3) (k(m) dm is then smooth and bounded per node, where on
a uniform m grid the prior's m^(-2/3) would crowd a tenth of its mass into the first cell). For a
negative contrast (both density bounds negative) m < 0 and every one of these formulas holds for
|m|, |drho| and the box of |drho|. Trapezoid weights times L k on the (x0, z, m) grid give log Z (V,
the Gaussian constant and all four parameters included) and the posterior of x0, z and m. On the
ridge the conditionals are analytic:

    p(drho | m) = drho^(-1/3) / I(2/3)   on [a, b],
    p(R | m)    = 2 R^(-3) / (R1^-2 - R2^-2) ∝ R^(-3)   on [R1, R2] = [(m/b)^(1/3), (m/a)^(1/3)],

where I(p) = ∫_a^b t^(p-1) dt = a^p ℓ E(p ℓ), ℓ = log(b/a), E(x) = expm1(x)/x (E(0) = 1), a
form that stays accurate as the ridge shrinks to a point (b -> a). Their moments are
E[drho^j | m] = a^j E((j + 2/3) ℓ) / E(2ℓ/3) and E[R^j | m] = (m/a)^(j/3) E((2 - j) ℓ / 3) / E(2ℓ/3),
and E[R drho | m] = m^(1/3) a^(2/3) E(4ℓ/3) / E(2ℓ/3); the means and covariances follow by the law
of total (co)variance over the grid, since given m the pair (R, drho) is independent of (x0, z).

Marginals. With λ(m) = ∫∫ L(x0, z, m) dx0 dz / (V Z), the posterior density of (R, drho) is
p(R, drho) = λ(drho R^3) on the box, which is what the R–drho panel of the pairs figure contours.
A fixed R sees the masses m = drho R^3 for drho in the box, and a fixed drho the masses R^3 drho
for R in the box, so

    p(R) = R^-3 ∫_{drho_lo R^3}^{drho_hi R^3} λ(m) dm,
    p(drho) = drho^(-1/3) ∫_{drho R_lo^3}^{drho R_hi^3} λ(m) m^(-2/3) / 3 dm,

one cumulative integral over the m grid each (λ piecewise linear between nodes, integrated
exactly), free of the staircase a sum of sharp-edged conditionals would leave. The 2-D marginals
of (x0 or z) with (R or drho) are the same integrals with λ not summed over that coordinate, and the
(x0, z) marginal is a sum over m. Exact draws: a grid cell (x0, z, m) by its mass, uniformly within
it, then drho = a (1 + u expm1(2ℓ/3))^(3/2) by inverse CDF of p(drho | m), and R = (m/drho)^(1/3),
which is then distributed as R^-3 on [R1, R2].

Scores: per parameter the Wasserstein-1 distance between a method's samples and the reference
marginal, divided by the reference sd; *the error* of a run is the largest over the parameters.

``python -m gravity_flows.command.reference`` prints the reference for the default problem;
``python -m gravity_flows.command.reference --density-bounds 1000 4000`` for the default data with the density unknown;
``python -m gravity_flows.command.reference --noise 1e4`` for the default sphere buried in noise (weak data).
"""

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import logsumexp

import forward

WINDOW_SDS = 8.0
GRID_POINTS = 121
#: Weak data, or a best fit where theta's Laplace is no peak: the Laplace says little about where the
#: posterior lies, so the first grid covers the whole prior box, and each further one zooms in on the part
#: of the previous window that holds all but SUPPORT_TAIL of the probability on each side of each axis
#: (and one node more), while some axis's support is below ZOOM_BELOW of its window, MAX_ZOOMS times at most.
SUPPORT_TAIL = 1e-9
ZOOM_BELOW = 0.75
MAX_ZOOMS = 6
#: The reference's self-check (:func:`grid_check`): the quadrature error of a grid axis's mean and sd at most
#: GRID_TOLERANCE posterior sd, that of log Z at most LOG_EVIDENCE_TOLERANCE nats, and at most EDGE_TOLERANCE
#: of the probability in an outermost cell of a window side that the box does not close.
GRID_TOLERANCE = 5e-3
LOG_EVIDENCE_TOLERANCE = 2e-3
EDGE_TOLERANCE = 1e-6
#: An axis whose quadrature error exceeds GRID_TOLERANCE gets more nodes, this many at most.
MAX_GRID_POINTS = 601
#: Nodes of the 1-D marginals of R and drho: uniform over their range, plus as many again across
#: each end of the ridge, where the marginal falls to zero over a few posterior sd of the mass.
RIDGE_MARGINAL_POINTS = 601
RIDGE_EDGE_POINTS = 201
#: The R–drho joint density is tabulated on geometric grids, on which the ridge drho R^3 = m has the
#: same width everywhere: NODES_PER_RIDGE_WIDTH nodes across ±2 posterior sd of m, within these limits.
RIDGE_JOINT_POINTS = (201, 801)
NODES_PER_RIDGE_WIDTH = 12


def _trapezoid_weights(nodes):
    spacing = np.diff(nodes)
    weights = np.zeros_like(nodes)
    weights[:-1] += spacing / 2
    weights[1:] += spacing / 2
    return weights


def _cell_mass(log_density, weights):
    """Probability of each cell of a 3-D grid: the density times the trapezoid weights, over their sum.

    The sum is 1 but for the rounding of log Z, about 1e-16 |log Z|. With tiny noise |log Z| is large
    (2e4 at noise 1e-8 µGal), and the few 1e-12 left would move the mean of x0 (3 m) by 2 % of its sd (3e-10 m).
    """
    w0, w1, w2 = weights
    mass = np.exp(log_density) * w0[:, None, None] * w1[None, :, None] * w2[None, None, :]
    return mass / mass.sum()


class ExactReference:
    """What every exact reference offers, whatever grid it is computed on.

    Subclasses set ``mean``, ``sd``, ``covariance``, ``correlation`` (one row per parameter, in the
    problem's order), ``log_evidence``, and provide ``marginal(i)``, ``joint_marginal(i, j)`` and
    ``sample(n, rng)``.
    """

    @property
    def dim(self):
        return len(self.mean)

    def marginal_cdf(self, i):
        """(nodes, cdf) of parameter ``i``: cumulative trapezoid of the marginal, from 0 to 1."""
        nodes, density = self.marginal(i)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(nodes))])
        return nodes, cdf / cdf[-1]

    def quantile(self, i, probabilities):
        nodes, cdf = self.marginal_cdf(i)
        keep = np.concatenate([[True], np.diff(cdf) > 0])  # strictly increasing for interpolation
        return np.interp(probabilities, cdf[keep], nodes[keep])

    def summary(self):
        return {
            "mean": self.mean.tolist(),
            "sd": self.sd.tolist(),
            "correlation": self.correlation.tolist(),
            "log_evidence": float(self.log_evidence),
            "check": getattr(self, "check", None),
        }


@dataclass
class Reference(ExactReference):
    """The exact posterior on a grid in theta: nodes and trapezoid weights per axis, and log-density values.

    ``log_density`` is the normalised log posterior density at every grid node (shape n0 × nz × nR),
    so that ``sum(exp(log_density) * w0 w_z w_R) == 1``. ``log_evidence`` is log Z = log ∫ L p dθ,
    with the Gaussian constant and the prior density included.
    """

    nodes: list
    weights: list
    log_density: np.ndarray
    log_evidence: float
    check: dict = None  # the self-check of its grid (:func:`grid_check`), set by compute_reference

    @cached_property
    def cell_mass(self):
        """Probability of each grid cell (:func:`_cell_mass`); sums to 1."""
        return _cell_mass(self.log_density, self.weights)

    def __post_init__(self):
        mass = self.cell_mass
        dim = len(self.nodes)
        self.mean = np.array([np.sum(mass.sum(axis=tuple(a for a in range(dim) if a != i)) * self.nodes[i]) for i in range(dim)])
        grids = np.meshgrid(*self.nodes, indexing="ij")
        centred = [grid - m for grid, m in zip(grids, self.mean)]
        self.covariance = np.array([[np.sum(mass * centred[i] * centred[j]) for j in range(dim)] for i in range(dim)])
        self.sd = np.sqrt(np.diag(self.covariance))
        self.correlation = self.covariance / np.outer(self.sd, self.sd)

    def marginal(self, i):
        """(nodes, density) of the 1-D marginal of parameter ``i``; the density integrates to 1."""
        others = tuple(a for a in range(self.dim) if a != i)
        mass = self.cell_mass.sum(axis=others)
        return self.nodes[i], mass / self.weights[i]

    def joint_marginal(self, i, j):
        """(nodes_i, nodes_j, density[i, j]) of the 2-D marginal of parameters i < j."""
        others = tuple(a for a in range(self.dim) if a not in (i, j))
        mass = self.cell_mass.sum(axis=others)
        return self.nodes[i], self.nodes[j], mass / np.outer(self.weights[i], self.weights[j])

    def sample(self, n, rng):
        """Draw n parameter sets: a grid cell by its probability mass, then uniformly within it."""
        return _sample_cells(self.cell_mass, self.nodes, n, rng)


def _sample_cells(cell_mass, nodes, n, rng):
    """n points: a grid cell by its probability mass, then uniformly within it: ±half a spacing (clipped)
    on a uniform axis, between the midpoints to the neighbouring nodes on any other."""
    mass = cell_mass.ravel()
    cells = rng.choice(mass.size, size=n, p=mass / mass.sum())
    index = np.unravel_index(cells, cell_mass.shape)
    columns = []
    for axis in range(len(nodes)):
        axis_nodes = nodes[axis]
        spacing = axis_nodes[1] - axis_nodes[0]
        offset = rng.uniform(-0.5, 0.5, size=n)
        if np.allclose(np.diff(axis_nodes), spacing, rtol=1e-9, atol=0):
            value = axis_nodes[index[axis]] + offset * spacing
        else:
            midpoints = 0.5 * (axis_nodes[1:] + axis_nodes[:-1])
            left = np.concatenate([axis_nodes[:1], midpoints])[index[axis]]
            right = np.concatenate([midpoints, axis_nodes[-1:]])[index[axis]]
            value = left + (offset + 0.5) * (right - left)
        columns.append(np.clip(value, axis_nodes[0], axis_nodes[-1]))
    return np.stack(columns, axis=1)


# ----------------------------------------------------------------------------------------------
# The density contrast as a fourth unknown: the exact posterior on the mass ridge


def _expm1_ratio(x):
    """E(x) = expm1(x) / x, with E(0) = 1; x >= 0."""
    safe = np.where(x > 0, x, 1.0)
    return np.where(x > 0, np.expm1(safe) / safe, 1.0)


@dataclass(frozen=True)
class RidgeBox:
    """The ridge's box in magnitudes: |drho| in [t_lo, t_hi], R in [r_lo, r_hi], and the sign of drho and m."""

    t_lo: float
    t_hi: float
    r_lo: float
    r_hi: float
    sign: float

    @classmethod
    def of(cls, problem):
        density_low, density_high = problem.density_bounds
        sign = 1.0 if density_high > 0 else -1.0
        t_lo, t_hi = sorted((abs(density_low), abs(density_high)))
        radius = problem.bounds[problem.parameters.index(forward.RADIUS)]
        return cls(t_lo, t_hi, float(radius[0]), float(radius[1]), sign)

    @property
    def mass_range(self):
        """(low, high) of |m| = |drho| R^3 over the box."""
        return self.t_lo * self.r_lo**3, self.t_hi * self.r_hi**3

    def ends(self, mass):
        """a(|m|), ℓ = log(b/a) (0 where the ridge misses the box) for magnitudes |m| (array)."""
        mass = np.asarray(mass, dtype=float)
        a = np.maximum(self.t_lo, mass / self.r_hi**3)
        b = np.minimum(self.t_hi, mass / self.r_lo**3)
        return a, np.log(np.maximum(b / a, 1.0))

    def log_mass_factor(self, mass):
        """log k(|m|) = log(1/3) - (2/3) log|m| + log I(2/3); -inf where the ridge misses the box."""
        mass = np.asarray(mass, dtype=float)
        a, ell = self.ends(mass)
        with np.errstate(divide="ignore"):
            return (np.log(1.0 / 3.0) - (2.0 / 3.0) * np.log(mass) + (2.0 / 3.0) * np.log(a)
                    + np.log(ell) + np.log(_expm1_ratio(2.0 * ell / 3.0)))

    def conditional_moments(self, mass):
        """E[|drho|], E[|drho|^2], E[R], E[R^2], E[R |drho|] given |m| (arrays), from p(drho | m) ∝ drho^(-1/3)."""
        a, ell = self.ends(mass)
        norm = _expm1_ratio(2.0 * ell / 3.0)
        scale = (np.asarray(mass, dtype=float) / a) ** (1.0 / 3.0)  # R at drho = a
        return (
            a * _expm1_ratio(5.0 * ell / 3.0) / norm,
            a**2 * _expm1_ratio(8.0 * ell / 3.0) / norm,
            scale * _expm1_ratio(ell / 3.0) / norm,
            scale**2 / norm,  # E(0) = 1
            scale * a * _expm1_ratio(4.0 * ell / 3.0) / norm,
        )

    def draw_density(self, mass, uniform):
        """|drho| given |m| by inverse CDF: F(t) = (t^(2/3) - a^(2/3)) / (b^(2/3) - a^(2/3))."""
        a, ell = self.ends(mass)
        return a * (1.0 + uniform * np.expm1(2.0 * ell / 3.0)) ** 1.5


def _cumulative_linear(nodes, values, points):
    """∫ from nodes[0] to each point of the piecewise-linear interpolant of ``values`` (last axis on nodes).

    Points outside [nodes[0], nodes[-1]] are clipped (the integrand is zero beyond the grid).
    ``values``: (..., n); ``points``: any shape; returns (..., *points.shape).
    """
    spacing = np.diff(nodes)
    cumulative = np.concatenate([np.zeros(values.shape[:-1] + (1,)),
                                 np.cumsum(0.5 * (values[..., 1:] + values[..., :-1]) * spacing, axis=-1)], axis=-1)
    points = np.clip(np.asarray(points, dtype=float), nodes[0], nodes[-1])
    cell = np.clip(np.searchsorted(nodes, points, side="right") - 1, 0, nodes.size - 2)
    fraction = (points - nodes[cell]) / spacing[cell]
    left, right = values[..., cell], values[..., cell + 1]
    return cumulative[..., cell] + spacing[cell] * (left * fraction + 0.5 * (right - left) * fraction**2)


def _ridge_axis(low, high, edge_zones):
    """Marginal nodes on [low, high]: uniform, plus dense nodes across each zone where the marginal has an edge."""
    parts = [np.linspace(low, high, RIDGE_MARGINAL_POINTS)]
    for zone_low, zone_high in edge_zones:
        zone_low, zone_high = max(zone_low, low), min(zone_high, high)
        if zone_high > zone_low:
            parts.append(np.linspace(zone_low, zone_high, RIDGE_EDGE_POINTS))
    nodes = np.unique(np.concatenate(parts))
    # nodes a few thousand roundings apart are one (a zone's end on a uniform node); with tiny noise an
    # edge zone is itself only ~1e-7 of the magnitude wide, so nothing coarser may be merged
    keep = np.concatenate([[True], np.diff(nodes) > 1e-12 * high])
    return nodes[keep]


@dataclass
class RidgeReference(ExactReference):
    """The exact posterior of (x0, z, R, drho) with the density free, from a grid over (x0, z, m).

    ``nodes``/``weights``: the (x0, z, m) axes and their trapezoid weights (m = drho R^3, signed
    like the contrast). ``log_theta_density``: log L(x0, z, m) + log p(theta) - log Z at every node,
    the normalised log posterior density of any theta on the ridge through the node (inside the box).
    ``log_mass_factor``: log k(m) per m node, so that ``log_theta_density + log k`` is the normalised
    log density of (x0, z, m). ``box``: the ridge's box (:class:`RidgeBox`). See the module docstring
    for the mathematics.
    """

    nodes: list
    weights: list
    log_theta_density: np.ndarray
    log_mass_factor: np.ndarray
    log_evidence: float
    box: RidgeBox
    check: dict = None  # the self-check of its grid (:func:`grid_check`), set by compute_reference

    @cached_property
    def log_density(self):
        """Normalised log posterior density of (x0, z, m) on the grid."""
        return self.log_theta_density + self.log_mass_factor

    @cached_property
    def cell_mass(self):
        """Probability of each (x0, z, m) grid cell (:func:`_cell_mass`); sums to 1."""
        return _cell_mass(self.log_density, self.weights)

    @property
    def magnitudes(self):
        """|m| at the m nodes, increasing, and the permutation that orders the m axis that way."""
        order = np.argsort(np.abs(self.nodes[2]))
        return np.abs(self.nodes[2])[order], order

    def __post_init__(self):
        mass = self.cell_mass
        x0, z, m = self.nodes
        sign = self.box.sign
        t1, t2, r1, r2, rt = self.box.conditional_moments(np.abs(m))
        # the grid axis each parameter's conditional mean varies along, and that mean on the axis
        axis = (0, 1, 2, 2)
        conditional_mean = (x0, z, r1, sign * t1)
        pair_mass = {(0, 1): mass.sum(axis=2), (0, 2): mass.sum(axis=1), (1, 2): mass.sum(axis=0)}
        p_m = pair_mass[(0, 2)].sum(axis=0)
        single_mass = (pair_mass[(0, 1)].sum(axis=1), pair_mass[(0, 1)].sum(axis=0), p_m, p_m)
        self.mean = np.array([np.sum(single_mass[i] * conditional_mean[i]) for i in range(4)])
        centred = [c - mu for c, mu in zip(conditional_mean, self.mean)]
        # law of total covariance: the spread of the conditional means over the grid, plus the
        # conditional (co)variances of R and drho given m (x0 and z are fixed given the cell)
        covariance = np.empty((4, 4))
        for i in range(4):
            for j in range(i, 4):
                if axis[i] == axis[j]:
                    value = np.sum(single_mass[i] * centred[i] * centred[j])
                else:
                    value = centred[i] @ pair_mass[(axis[i], axis[j])] @ centred[j]
                covariance[i, j] = covariance[j, i] = value
        covariance[2, 2] += np.sum(p_m * (r2 - r1**2))
        covariance[3, 3] += np.sum(p_m * (t2 - t1**2))
        covariance[2, 3] += sign * np.sum(p_m * (rt - r1 * t1))
        covariance[3, 2] = covariance[2, 3]
        self.covariance = covariance
        self.sd = np.sqrt(np.diag(covariance))
        self.correlation = covariance / np.outer(self.sd, self.sd)

    # λ(m) and its variants: the likelihood over the (x0, z) grid, in |m| order

    def _likelihood_over_mass(self, keep_axis=None):
        """λ(|m|) = ∫∫ L / (V Z) dx0 dz on the |m| nodes; with keep_axis 0 or 1 that axis is not integrated."""
        magnitudes, order = self.magnitudes
        density = np.exp(self.log_theta_density[:, :, order])
        w0, w1, _ = self.weights
        if keep_axis == 0:
            return magnitudes, np.einsum("ijk,j->ik", density, w1)
        if keep_axis == 1:
            return magnitudes, np.einsum("ijk,i->jk", density, w0)
        return magnitudes, np.einsum("ijk,i,j->k", density, w0, w1)

    @cached_property
    def _ranges(self):
        """The R and |drho| ranges that the m window reaches inside the box, and the zones of their edges."""
        magnitudes, _ = self.magnitudes
        low, high = magnitudes[0], magnitudes[-1]
        box = self.box
        radius = (max(box.r_lo, (low / box.t_hi) ** (1 / 3)), min(box.r_hi, (high / box.t_lo) ** (1 / 3)))
        density = (max(box.t_lo, low / box.r_hi**3), min(box.t_hi, high / box.r_lo**3))
        radius_edges = [((low / t) ** (1 / 3), (high / t) ** (1 / 3)) for t in (box.t_hi, box.t_lo)]
        density_edges = [(low / r**3, high / r**3) for r in (box.r_hi, box.r_lo)]
        return radius, density, radius_edges, density_edges

    def _radius_density(self, radius, values):
        """p(R) = R^-3 ∫_{t_lo R^3}^{t_hi R^3} λ dm for λ values (..., n_m); zero outside the R box."""
        magnitudes, _ = self.magnitudes
        box = self.box
        inside = (radius >= box.r_lo) & (radius <= box.r_hi)
        cube = radius**3
        integral = _cumulative_linear(magnitudes, values, box.t_hi * cube) - _cumulative_linear(magnitudes, values, box.t_lo * cube)
        return np.where(inside, integral / cube, 0.0)

    def _contrast_density(self, contrast, values):
        """p(|drho|) = |drho|^(-1/3) ∫_{|drho| R_lo^3}^{|drho| R_hi^3} λ |m|^(-2/3) / 3 dm; zero outside the box."""
        magnitudes, _ = self.magnitudes
        box = self.box
        weighted = values * magnitudes ** (-2.0 / 3.0) / 3.0
        inside = (contrast >= box.t_lo) & (contrast <= box.t_hi)
        integral = (_cumulative_linear(magnitudes, weighted, contrast * box.r_hi**3)
                    - _cumulative_linear(magnitudes, weighted, contrast * box.r_lo**3))
        return np.where(inside, integral * contrast ** (-1.0 / 3.0), 0.0)

    @cached_property
    def _radius_nodes(self):
        radius, _, radius_edges, _ = self._ranges
        return _ridge_axis(*radius, radius_edges)

    @cached_property
    def _contrast_nodes(self):
        """|drho| nodes, increasing."""
        _, density, _, density_edges = self._ranges
        return _ridge_axis(*density, density_edges)

    def _signed_contrast(self, magnitudes, density_along_last_axis):
        """Nodes and densities of drho itself from those of |drho| (reversed for a negative contrast)."""
        if self.box.sign > 0:
            return magnitudes, density_along_last_axis
        return -magnitudes[::-1], density_along_last_axis[..., ::-1]

    @cached_property
    def _marginals(self):
        mass = self.cell_mass
        _, lam = self._likelihood_over_mass()
        radius = self._radius_nodes
        contrast, contrast_density = self._signed_contrast(self._contrast_nodes, self._contrast_density(self._contrast_nodes, lam))
        result = [
            (self.nodes[0], mass.sum(axis=(1, 2)) / self.weights[0]),
            (self.nodes[1], mass.sum(axis=(0, 2)) / self.weights[1]),
            (radius, self._radius_density(radius, lam)),
            (contrast, contrast_density),
        ]
        # normalise on the nodes (the analytic densities integrate to 1 up to quadrature error)
        return [(nodes, density / np.trapezoid(density, nodes)) for nodes, density in result]

    def marginal(self, i):
        """(nodes, density) of the 1-D marginal of parameter ``i`` (x0, z, R, drho); integrates to 1."""
        return self._marginals[i]

    def mass_marginal(self):
        """(m nodes, density) of the posterior of m = drho R^3."""
        return self.nodes[2], self.cell_mass.sum(axis=(0, 1)) / self.weights[2]

    @cached_property
    def _ridge_grid(self):
        """Geometric R and |drho| grids on which the ridge is resolved (see NODES_PER_RIDGE_WIDTH)."""
        radius, density, _, _ = self._ranges
        m_nodes, m_density = self.mass_marginal()
        m_mean = np.trapezoid(m_nodes * m_density, m_nodes)
        relative_sd = np.sqrt(np.trapezoid((m_nodes - m_mean) ** 2 * m_density, m_nodes)) / abs(m_mean)
        # the ridge is drho R^3 = m: ±2 sd of log m is 4 relative_sd in log drho and a third of it in log R
        points = int(np.clip(NODES_PER_RIDGE_WIDTH * np.log(density[1] / density[0]) / (4 * relative_sd), *RIDGE_JOINT_POINTS))
        return np.geomspace(*radius, points), np.geomspace(*density, points)

    def joint_marginal(self, i, j):
        """(nodes_i, nodes_j, density[i, j]) of the 2-D marginal of parameters i and j (i < j; i > j transposes)."""
        if i > j:
            nodes_j, nodes_i, density = self.joint_marginal(j, i)
            return nodes_i, nodes_j, density.T
        if (i, j) == (0, 1):
            return self.nodes[0], self.nodes[1], self.cell_mass.sum(axis=2) / np.outer(self.weights[0], self.weights[1])
        if (i, j) == (2, 3):
            radius, contrast = self._ridge_grid
            magnitudes, lam = self._likelihood_over_mass()
            joint = np.interp(contrast[None, :] * radius[:, None] ** 3, magnitudes, lam, left=0.0, right=0.0)
            contrast, joint = self._signed_contrast(contrast, joint)
            nodes_i, nodes_j = radius, contrast
        else:  # one of x0, z with one of R, drho
            _, lam = self._likelihood_over_mass(keep_axis=i)
            if j == 2:
                nodes_j = self._radius_nodes
                joint = self._radius_density(nodes_j, lam)
            else:
                nodes_j, joint = self._signed_contrast(self._contrast_nodes, self._contrast_density(self._contrast_nodes, lam))
            nodes_i = self.nodes[i]
        total = np.trapezoid(np.trapezoid(joint, nodes_j, axis=1), nodes_i)
        return nodes_i, nodes_j, joint / total

    def sample(self, n, rng):
        """n exact draws (n, 4): an (x0, z, m) cell by its mass, uniformly within it, then drho | m and R."""
        cells = _sample_cells(self.cell_mass, self.nodes, n, rng)
        magnitude = np.abs(cells[:, 2])
        contrast = self.box.draw_density(magnitude, rng.uniform(size=n))
        radius = np.clip((magnitude / contrast) ** (1.0 / 3.0), self.box.r_lo, self.box.r_hi)
        return np.column_stack([cells[:, 0], cells[:, 1], radius, self.box.sign * contrast])


# ----------------------------------------------------------------------------------------------
# Computing the references


def compute_reference(problem, laplace=None, grid_points=GRID_POINTS, window_sds=WINDOW_SDS):
    """The exact posterior of ``problem`` on a ``grid_points``³ grid around the Laplace mode.

    With the density known a grid over theta = (x0, z, R) (:class:`Reference`); with the density a
    fourth unknown a grid over (x0, z, m = drho R^3) (:class:`RidgeReference`). The first window is
    ``±window_sds`` Laplace sd, or, where the data are weak or theta's Laplace is no peak
    (``laplace.theta_peak`` false), the whole prior box; then it is fitted to where the posterior lies
    (:func:`_fit_window`) and the result checked (:func:`grid_check`, in ``result.check``).
    """
    if laplace is None:
        laplace = forward.laplace_approximation(problem)
    if problem.free_density:
        return compute_ridge_reference(problem, laplace, grid_points, window_sds)
    box_low, box_high = problem.bounds[:, 0], problem.bounds[:, 1]

    def grid_reference(low, high, points):
        return _theta_grid_reference(problem, low, high, points)

    if not laplace.theta_peak:
        return _fit_window(grid_reference, box_low, box_high, box_low, box_high, grid_points)
    low = np.maximum(laplace.theta_map - window_sds * laplace.theta_sd, box_low)
    high = np.minimum(laplace.theta_map + window_sds * laplace.theta_sd, box_high)
    return _fit_window(grid_reference, low, high, box_low, box_high, grid_points)


def _axis_mass(result, axis):
    """The probability of each node's cell along one axis of a reference's grid."""
    mass = result.cell_mass
    return mass.sum(axis=tuple(a for a in range(mass.ndim) if a != axis))


def _support(result):
    """Per axis of a reference's grid, the (low, high) nodes that hold all but SUPPORT_TAIL of the
    probability on each side, widened by one node (each node's mass spans half a cell either way)."""
    low, high = [], []
    for axis, nodes in enumerate(result.nodes):
        cumulative = np.cumsum(_axis_mass(result, axis))
        cumulative /= cumulative[-1]
        first = max(int(np.searchsorted(cumulative, SUPPORT_TAIL, side="right")) - 1, 0)
        last = min(int(np.searchsorted(cumulative, 1.0 - SUPPORT_TAIL, side="left")) + 1, nodes.size - 1)
        low.append(nodes[first])
        high.append(nodes[last])
    return np.array(low), np.array(high)


def _fit_window(grid_reference, low, high, limit_low, limit_high, grid_points):
    """``grid_reference(low, high, points)`` on the window (low, high) with ``grid_points`` nodes per axis,
    refitted to where it finds the posterior until the window holds it (MAX_ZOOMS times at most), then
    refined where it does not resolve it; ``result.check`` is :func:`grid_check`'s verdict on the last grid.

    Where the outermost cell on a side of the window that is not a limit of the box (``limit_low``,
    ``limit_high``: the prior box, or the masses it allows) holds more than EDGE_TOLERANCE of the
    probability, the window was misplaced: that side moves out by the window's width (up to the limit).
    Where the support (:func:`_support`) is below ZOOM_BELOW of the window on some axis, the grid is
    coarser than it need be: the window shrinks to the support. Then every axis whose quadrature error
    (:func:`grid_check`) exceeds GRID_TOLERANCE gets the nodes that bring it to half of that, by the
    trapezoid rule's h² law (MAX_GRID_POINTS at most). A posterior pressed on a bound is the case all
    of this is for: its best fit and Hessian describe a peak outside the box, the window they give is
    far wider than the mass the box keeps, and a marginal that falls off from the bound over a grid
    spacing or two has its mean a tenth of an sd off.
    """
    low, high = np.array(low, dtype=float), np.array(high, dtype=float)
    limit_low, limit_high = np.asarray(limit_low, dtype=float), np.asarray(limit_high, dtype=float)
    points = np.full(low.size, int(grid_points))
    result = grid_reference(low, high, points)
    for _ in range(MAX_ZOOMS):
        support_low, support_high = _support(result)
        edge_low, edge_high = _edge_mass(result, limit_low, limit_high)
        widen_low, widen_high = edge_low > EDGE_TOLERANCE, edge_high > EDGE_TOLERANCE
        width = high - low
        if not (widen_low.any() or widen_high.any()) and np.all(support_high - support_low >= ZOOM_BELOW * width):
            break
        low = np.where(widen_low, np.maximum(limit_low, low - width), support_low)
        high = np.where(widen_high, np.minimum(limit_high, high + width), support_high)
        result = grid_reference(low, high, points)
    check = grid_check(result, limit_low, limit_high)
    coarse = np.asarray(check["grid_error"]) > GRID_TOLERANCE
    if coarse.any() and np.all(points < MAX_GRID_POINTS):
        factor = np.sqrt(np.asarray(check["grid_error"]) / (GRID_TOLERANCE / 2))
        wanted = 2 * np.ceil((points - 1) * factor / 2).astype(int) + 1  # odd: every other node keeps both ends
        points = np.where(coarse, np.minimum(wanted, MAX_GRID_POINTS), points)
        result = grid_reference(low, high, points)
        check = grid_check(result, limit_low, limit_high)
    result.check = check
    return result


def _edge_mass(result, limit_low, limit_high):
    """Per axis, the probability of the first and of the last node's cell where that side of the window is not
    a limit of the box (0 where it is): ``(low side, high side)``, two (dim,) arrays."""
    low, high = np.zeros(len(result.nodes)), np.zeros(len(result.nodes))
    for axis, nodes in enumerate(result.nodes):
        marginal = _axis_mass(result, axis)
        low[axis] = marginal[0] if nodes[0] > limit_low[axis] else 0.0
        high[axis] = marginal[-1] if nodes[-1] < limit_high[axis] else 0.0
    return low, high


def _grid_axis_moments(nodes, log_density):
    """Mean and sd of every grid axis, and the log of the grid's total (unnormalised) mass, by the trapezoid rule."""
    weights = [_trapezoid_weights(n) for n in nodes]
    log_cell = sum(np.expand_dims(np.log(w), [a for a in range(len(nodes)) if a != k]) for k, w in enumerate(weights))
    log_total = float(logsumexp(log_density + log_cell))
    mass = np.exp(log_density + log_cell - log_total)
    means, sds = [], []
    for axis, axis_nodes in enumerate(nodes):
        marginal = mass.sum(axis=tuple(a for a in range(mass.ndim) if a != axis))
        mean = float(marginal @ axis_nodes)
        means.append(mean)
        sds.append(float(np.sqrt(marginal @ (axis_nodes - mean) ** 2)))
    return np.array(means), np.array(sds), log_total


def grid_check(result, limit_low, limit_high):
    """The reference's self-check: is its window placed and fine enough? A dict with

    - ``grid_error``: the quadrature error of each grid axis's mean and sd (x0, z, and R or m), in
      posterior sd, estimated by Richardson's rule from the same grid at every other node (the
      trapezoid rule's error falls as h², so the full grid's is a third of the difference);
    - ``log_evidence_error``: the same estimate for log Z (nats);
    - ``edge_mass``: the largest probability of an outermost cell on a side of the window that is not a
      limit of the box (``limit_low``, ``limit_high``): the posterior goes on beyond such a side;
    - ``ok``: all three within GRID_TOLERANCE, LOG_EVIDENCE_TOLERANCE and EDGE_TOLERANCE.

    A window too coarse for its posterior (a marginal falling off over a few spacings, as against a
    bound) fails the first; a misplaced one (the posterior cut off by a side of the window) the last.
    """
    nodes = result.nodes
    means, sds, log_total = _grid_axis_moments(nodes, result.log_density)
    half = tuple(slice(None, None, 2) for _ in nodes)
    coarse_means, coarse_sds, coarse_log_total = _grid_axis_moments([n[::2] for n in nodes], result.log_density[half])
    grid_error = (np.abs(means - coarse_means) + np.abs(sds - coarse_sds)) / 3.0 / sds
    edge_mass = float(np.max(_edge_mass(result, limit_low, limit_high)))
    log_evidence_error = abs(log_total - coarse_log_total) / 3.0
    return {
        "grid_points": [int(n.size) for n in nodes],
        "grid_error": grid_error.tolist(),
        "log_evidence_error": float(log_evidence_error),
        "edge_mass": edge_mass,
        "ok": bool(np.all(grid_error <= GRID_TOLERANCE) and log_evidence_error <= LOG_EVIDENCE_TOLERANCE
                   and edge_mass <= EDGE_TOLERANCE),
    }


def check_warning(result):
    """The one-line warning for a reference whose self-check (:func:`grid_check`) failed; None if it passed."""
    check = getattr(result, "check", None)
    if check is None or check["ok"]:
        return None
    return (f"warning: the exact reference's own check fails (quadrature error up to {max(check['grid_error']):.2g} "
            f"sd, {check['log_evidence_error']:.2g} nats in log Z, {check['edge_mass']:.2g} of the probability at an "
            "edge of its window): scores against it are uncertain by as much")


def _sum_of_squares(problem, x0, z, amplitude, density):
    """sum w (d - a h)^2 at every node (x0, z, a) of the grid ``x0`` × ``z`` × ``amplitude``: (n0, nz, na).

    h(x0, z) is the anomaly of a sphere of unit radius and contrast ``density``, so that g = a h with
    a = R^3 (density known) or a = m = drho R^3 (``density`` 1). Per (x0, z) node, with the best
    amplitude c = sum w d h / sum w h^2 and its residuals r = d - c h computed station by station,

        sum w (d - a h)^2 = sum w r^2 + (a - c)^2 sum w h^2,

    since sum w h r = 0. Every term is then as small as the sum itself. Expanded about a = 0 instead
    (sum w d^2 - 2 a sum w d h + a^2 sum w h^2), terms of order sum w d^2 would cancel down to a sum near
    the number of stations: at noise 1e-6 µGal (w = 1e12, sum w d^2 ~ 4e16) leaving rounding errors of
    ~10 nats, a posterior of noise. Rounding makes sum w h r ~ eps c sum w h^2 rather than 0; dropping it
    costs |a - c| times that, eps times the amplitude's signal-to-noise ratio per sd of a, no more than the
    rounding of r itself.
    """
    # h and d scaled by sqrt(w), so that each weighted sum is a plain inner product
    root_w = np.sqrt(problem.weights)
    data = problem.g_obs * root_w
    shape = (x0.size, z.size)
    best, floor, curvature = np.empty(shape), np.empty(shape), np.empty(shape)
    # h at every station, one x0 row at a time to bound memory: (nz, n_stations) per row
    for i, x0_value in enumerate(x0):
        h = forward.sphere_anomaly(problem.stations, np.stack(np.broadcast_arrays(x0_value, z, 1.0), axis=-1), density)
        h *= root_w
        curvature[i] = np.einsum("ks,ks->k", h, h)
        best[i] = h @ data / curvature[i]
        residual = data - best[i][:, None] * h
        floor[i] = np.einsum("ks,ks->k", residual, residual)
    offset = amplitude[None, None, :] - best[:, :, None]
    return floor[:, :, None] + curvature[:, :, None] * offset**2


def _axis_points(grid_points, dim=3):
    """Nodes per axis: one number for every axis, or one per axis."""
    return np.broadcast_to(np.asarray(grid_points, dtype=int), (dim,))


def _theta_grid_reference(problem, low, high, grid_points):
    """The :class:`Reference` on a grid over the window (low, high) of theta = (x0, z, R), ``grid_points`` nodes
    per axis (one number, or one per axis)."""
    nodes = [np.linspace(lo, hi, n) for lo, hi, n in zip(low, high, _axis_points(grid_points))]
    weights = [_trapezoid_weights(n) for n in nodes]

    x0, z, radius = nodes
    sum_squares = _sum_of_squares(problem, x0, z, radius**3, problem.density)
    log_joint = -0.5 * sum_squares + problem.log_likelihood_constant + problem.log_prior_density

    log_cell = np.log(weights[0])[:, None, None] + np.log(weights[1])[None, :, None] + np.log(weights[2])[None, None, :]
    log_evidence = float(logsumexp(log_joint + log_cell))
    return Reference(nodes=nodes, weights=weights, log_density=log_joint - log_evidence, log_evidence=log_evidence)


def _unit_anomaly(problem, x0, z):
    """h(x0, z) at every station: the anomaly of m = drho R^3 = 1, so that g = m h. (..., n)."""
    theta_unit = np.stack(np.broadcast_arrays(x0, z, 1.0), axis=-1)
    return forward.sphere_anomaly(problem.stations, theta_unit, 1.0)


def mass_laplace(problem, start):
    """Best fit and Gauss–Newton covariance of (x0, z, m), m = drho R^3, by Gauss–Newton from ``start``.

    g = m h(x0, z) is linear in m, so the fit is as well posed as with the density known. x0 and z
    stay inside the box; m is free (the caller clips its window to the masses the box allows).
    Returns (mode (3,), covariance (3, 3)) of the likelihood alone: k(m) only shapes the grid's weights.
    """
    w, d = problem.weights, problem.g_obs
    lower, upper = problem.bounds[:2, 0], problem.bounds[:2, 1]

    def fit(params):
        x0, z, m = params
        h = _unit_anomaly(problem, x0, z)
        gradient = forward.sphere_anomaly_gradient(problem.stations, np.array([x0, z, 1.0]), 1.0)
        residual = d - m * h
        jacobian = np.column_stack([m * gradient[:, 0], m * gradient[:, 1], h])
        return np.sum(w * residual**2), residual, jacobian

    params = np.asarray(start, dtype=float).copy()
    misfit, residual, jacobian = fit(params)
    for _ in range(100):
        normal = jacobian.T @ (w[:, None] * jacobian)
        step = np.linalg.solve(normal, jacobian.T @ (w * residual))
        length = 1.0
        while length > 1e-6:  # halve the step until the misfit does not grow
            trial = params + length * step
            trial[:2] = np.clip(trial[:2], lower, upper)
            trial_fit = fit(trial)
            if trial_fit[0] <= misfit:
                break
            length /= 2
        else:
            break
        moved = np.abs(trial - params)
        params, (misfit, residual, jacobian) = trial, trial_fit
        if np.all(moved <= 1e-12 * np.maximum(1.0, np.abs(params))):
            break
    try:
        covariance = np.linalg.inv(jacobian.T @ (w[:, None] * jacobian))
    except np.linalg.LinAlgError:
        raise forward.DataError("the data do not determine the position, depth and mass of the sphere") from None
    return params, covariance


def compute_ridge_reference(problem, laplace=None, grid_points=GRID_POINTS, window_sds=WINDOW_SDS):
    """The exact posterior of (x0, z, R, drho) on a ``grid_points``³ grid over (x0, z, m), m = drho R^3.

    The first window is ``±window_sds`` Gauss–Newton sd of (x0, z, m) around their best fit (started
    from the Laplace mode, ``laplace.theta_map``), clipped to the box in x0 and z and to the masses the
    box allows, [drho_lo R_lo^3, drho_hi R_hi^3] (in magnitude). With weak data (``laplace.weak``) it is
    that whole range and the whole box, with m nodes uniform in m^(1/3). Then it is fitted to where the
    posterior lies and checked (:func:`_fit_window`): a posterior pressed on a bound of x0 or z, whose
    Gauss–Newton window is many times wider than what the box keeps, is resolved there.
    """
    if laplace is None:
        laplace = forward.laplace_approximation(problem)
    box = RidgeBox.of(problem)
    mass_low, mass_high = box.mass_range
    if box.sign < 0:
        mass_low, mass_high = -mass_high, -mass_low
    limit_low = np.array([*problem.bounds[:2, 0], mass_low])
    limit_high = np.array([*problem.bounds[:2, 1], mass_high])

    def grid_reference(low, high, points):
        return _ridge_grid_reference(problem, box, low, high, points, cube_root_mass=laplace.weak)

    if laplace.weak:
        return _fit_window(grid_reference, limit_low, limit_high, limit_low, limit_high, grid_points)
    start = laplace.theta_map
    mode, covariance = mass_laplace(problem, [start[0], start[1], start[3] * start[2] ** 3])
    sd = np.sqrt(np.diag(covariance))
    low = np.maximum(mode - window_sds * sd, limit_low)
    high = np.minimum(mode + window_sds * sd, limit_high)
    if np.any(low >= high):
        raise forward.DataError(
            f"the best-fitting excess mass drho R^3 = {mode[2]:.4g} kg lies outside what the prior box allows "
            f"([{mass_low:.4g}, {mass_high:.4g}]); widen --bounds for R or --density-bounds")
    return _fit_window(grid_reference, low, high, limit_low, limit_high, grid_points)


def _ridge_grid_reference(problem, box, low, high, grid_points, cube_root_mass=False):
    """The :class:`RidgeReference` on a grid over the window (low, high) of (x0, z, m), ``grid_points`` nodes per
    axis (one number, or one per axis); with ``cube_root_mass`` the m nodes are uniform in m^(1/3) (signed)
    instead of in m."""
    points = _axis_points(grid_points)
    nodes = [np.linspace(lo, hi, n) for lo, hi, n in zip(low, high, points)]
    if cube_root_mass:
        nodes[2] = np.linspace(np.cbrt(low[2]), np.cbrt(high[2]), points[2]) ** 3
        nodes[2][[0, -1]] = low[2], high[2]  # exactly the window's ends, whatever the rounding of cube and root
    weights = [_trapezoid_weights(n) for n in nodes]

    x0, z, mass = nodes
    sum_squares = _sum_of_squares(problem, x0, z, mass, 1.0)
    log_joint = -0.5 * sum_squares + problem.log_likelihood_constant + problem.log_prior_density
    log_mass_factor = box.log_mass_factor(np.abs(mass))

    log_cell = np.log(weights[0])[:, None, None] + np.log(weights[1])[None, :, None] + np.log(weights[2])[None, None, :]
    log_evidence = float(logsumexp(log_joint + log_mass_factor + log_cell))
    return RidgeReference(nodes=nodes, weights=weights, log_theta_density=log_joint - log_evidence,
                          log_mass_factor=log_mass_factor, log_evidence=log_evidence, box=box)


# ----------------------------------------------------------------------------------------------
# Scores


def wasserstein1_to_marginal(samples, reference, i):
    """W1 between the empirical distribution of ``samples`` and the reference marginal of parameter i.

    Quantile form, W1 = ∫_0^1 |F_n^{-1}(p) - F^{-1}(p)| dp, by the midpoint of each of the n steps
    of the empirical quantile function: robust to samples far outside the grid window.
    """
    ordered = np.sort(np.asarray(samples, dtype=float))
    probabilities = (np.arange(ordered.size) + 0.5) / ordered.size
    return float(np.mean(np.abs(ordered - reference.quantile(i, probabilities))))


#: The accuracy every method is held to: error (the largest W1/sd of :func:`score`) at most this. The W1/sd of
#: n exact draws is about 1.3 / sqrt(n): 0.013 for 10000, 0.021 for 4000 effective draws.
ERROR_GOAL = 0.05


def score(theta, reference):
    """``{'w1_over_sd': [one float per parameter], 'error': max of them}`` for samples theta (n, dim)."""
    theta = np.asarray(theta)
    ratios = [wasserstein1_to_marginal(theta[:, i], reference, i) / reference.sd[i] for i in range(reference.dim)]
    return {"w1_over_sd": [float(r) for r in ratios], "error": float(max(ratios))}
