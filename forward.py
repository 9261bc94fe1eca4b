"""The gravity problem: forward model, data, prior, likelihood, posterior, and its Laplace approximation.

Forward model (Blakely 1995, *Potential Theory in Gravity and Magnetic Applications*, eq. 7.2 for a
sphere, which acts as a point mass at its centre)::

    g(x) = G * drho * (4/3) * pi * R**3 * z / (z**2 + (x - x0)**2)**(3/2) * 1e8      [µGal]

Inputs and units: stations ``x`` in m along the profile; ``x0`` the sphere's horizontal position (m),
``z`` the depth of its centre below the profile (m, positive down), ``R`` its radius (m); density
contrast ``drho`` in kg/m³; ``G`` in m³ kg⁻¹ s⁻². Output: the vertical component of the anomaly in
µGal (1 µGal = 1e-8 m/s², hence the factor 1e8), positive (downward pull) for a positive contrast.

The problem owns its unknowns (:attr:`Problem.parameters`, a tuple of :class:`Parameter`): by
default ``theta = (x0, z, R)`` with the density contrast known; with a prior range for the density
(``--density-bounds``) ``theta = (x0, z, R, drho)``. Always in that order. The data see R and drho
only through the excess mass M = (4/3) pi drho R**3, so with a free density the posterior of
(R, drho) is a thin curved ridge along which only the prior box decides. The posterior is a
Gaussian likelihood times a uniform prior on a box; flows work on unconstrained ``u`` in R^dim,
mapped onto the box by :class:`BoxBijection`.

Weakly informative data (an anomaly buried in noise, or a box of spheres too small or too deep to
be seen) have a perfectly good posterior: close to the prior, with only the spheres whose anomaly
would stand out of the noise ruled out. :func:`laplace_approximation` flags them (``Laplace.weak``)
instead of refusing them, and :func:`weak_data_warning` says so in one line. What is refused is what
no posterior can repair: a best fit on the box's bound that still misses the data by many times the
noise, or data that look uninformative only because the stated noise dwarfs their scatter (both
typically wrong units).
"""

import csv
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from scipy import optimize, stats
from scipy.special import expit

G = 6.674e-11  # m^3 kg^-1 s^-2
MICROGAL_PER_SI = 1e8


@dataclass(frozen=True)
class Parameter:
    """One unknown: its name in files (``summary.json``, ``samples.npz``), symbol, unit and description."""

    name: str
    symbol: str
    unit: str
    description: str

    @property
    def label(self):
        """Axis label, e.g. ``"z (m)"``."""
        return f"{self.symbol} ({self.unit})"


X0 = Parameter("x0", "x0", "m", "horizontal position x0")
DEPTH = Parameter("z", "z", "m", "depth of centre z")
RADIUS = Parameter("R", "R", "m", "radius R")
DENSITY = Parameter("drho", "Δρ", "kg/m³", "density contrast Δρ")
#: The unknowns of one sphere of known density, and of one whose density is unknown.
SPHERE = (X0, DEPTH, RADIUS)
SPHERE_FREE_DENSITY = SPHERE + (DENSITY,)
PARAMETERS = tuple(p.name for p in SPHERE)
LABELS = tuple(p.label for p in SPHERE)

DEFAULT_TRUTH = (3.0, 6.0, 2.0)
DEFAULT_DENSITY = 2500.0  # kg/m^3
DEFAULT_NOISE_SD = 1.0  # µGal
DEFAULT_NOISE_SEED = 42
DEFAULT_STATIONS = dict(start=-20.0, stop=20.0, num=1000)  # m
#: The original MCMC's prior box, rows (x0, z, R), columns (low, high), in m.
DEFAULT_BOUNDS = ((0.0, 10.0), (1.0, 15.0), (0.5, 5.0))


class DataError(ValueError):
    """Bad input data or options; scripts report it as one line on stderr and exit with status 2."""


def sphere_anomaly(stations, theta, density=DEFAULT_DENSITY):
    """Vertical gravity anomaly (µGal) of buried spheres at the stations.

    ``stations``: (n,) positions in m. ``theta``: (..., 3) sets of (x0, z, R) in m, numpy array or
    torch tensor (then differentiable, with the tensor's dtype and device); only its first three
    columns are read. ``density``: kg/m³, a number or an array (..., 1) that broadcasts against
    theta's sets. Returns (..., n).
    """
    if isinstance(theta, torch.Tensor):
        stations = torch.as_tensor(stations, dtype=theta.dtype, device=theta.device)
    x0, z, radius = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
    mass_factor = G * density * (4.0 / 3.0) * math.pi * MICROGAL_PER_SI
    distance_squared = z**2 + (stations - x0) ** 2
    return mass_factor * radius**3 * z / (distance_squared * distance_squared**0.5)  # r^3, without a slow pow(1.5)


def sphere_anomaly_gradient(stations, theta, density=DEFAULT_DENSITY):
    """d g / d theta at each station, numpy: (..., n, 3), for the quasi-Newton MAP search.

    With r² = z² + (x - x0)²: dg/dx0 = 3 g (x - x0) / r², dg/dz = g (1/z - 3 z / r²), dg/dR = 3 g / R.
    """
    g = sphere_anomaly(stations, theta, density)
    x0, z, radius = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
    offset = stations - x0
    r2 = z**2 + offset**2
    return np.stack([g * 3.0 * offset / r2, g * (1.0 / z - 3.0 * z / r2), g * 3.0 / radius], axis=-1)


def _density_column(theta, density):
    """The density contrast of each parameter set: theta's 4th column when it has one, else ``density``."""
    return theta[..., 3:4] if theta.shape[-1] == 4 else density


def gaussian_misfit(predicted, observed, weights):
    """-0.5 * sum(weights * (observed - predicted)**2) over stations; numpy or torch."""
    return -0.5 * ((observed - predicted) ** 2 * weights).sum(-1)


@dataclass(frozen=True)
class Problem:
    """A gravity profile and the prior box: everything the posterior needs.

    ``noise_sd`` is a float (µGal, every station) or an (n,) array (per station).
    ``bounds`` is (dim, 2): one row per unknown in the order of ``parameters``, columns low, high
    (m, and kg/m³ for the density). ``parameters`` is :data:`SPHERE` (density known: ``density``
    is the contrast) or :data:`SPHERE_FREE_DENSITY` (density unknown: ``density`` is the true
    contrast of synthetic data, and the likelihood never reads it). ``truth`` (one value per
    parameter) is known only for synthetic data. ``source`` describes where the data came from.
    """

    stations: np.ndarray
    g_obs: np.ndarray
    noise_sd: object
    density: float = DEFAULT_DENSITY
    bounds: np.ndarray = field(default_factory=lambda: np.array(DEFAULT_BOUNDS))
    truth: object = None
    source: dict = field(default_factory=dict)
    parameters: tuple = SPHERE

    def __post_init__(self):
        if np.shape(self.bounds) != (len(self.parameters), 2):
            raise ValueError(f"bounds must be ({len(self.parameters)}, 2) for {self.names}, got {np.shape(self.bounds)}")

    @property
    def n_stations(self):
        return self.stations.size

    @property
    def dim(self):
        """Number of unknowns."""
        return len(self.parameters)

    @property
    def names(self):
        return tuple(p.name for p in self.parameters)

    @property
    def labels(self):
        return tuple(p.label for p in self.parameters)

    @property
    def free_density(self):
        return DENSITY in self.parameters

    @property
    def density_bounds(self):
        """(low, high) of the density prior in kg/m³, or None when the density is known."""
        return tuple(self.bounds[self.parameters.index(DENSITY)]) if self.free_density else None

    @cached_property
    def noise_sd_array(self):
        return np.broadcast_to(np.asarray(self.noise_sd, dtype=float), self.stations.shape)

    @cached_property
    def weights(self):
        """1 / sigma^2 per station."""
        return self.noise_sd_array**-2.0

    @cached_property
    def log_prior_density(self):
        """log of the uniform prior density inside the box."""
        return -float(np.sum(np.log(self.bounds[:, 1] - self.bounds[:, 0])))

    @cached_property
    def log_likelihood_constant(self):
        """The Gaussian normalising constant, -n/2 log(2 pi) - sum log sigma."""
        return -0.5 * self.n_stations * math.log(2 * math.pi) - float(np.sum(np.log(self.noise_sd_array)))

    def predict(self, theta):
        """Predicted anomaly (µGal) at every station, (..., n), for parameter sets theta (..., dim)."""
        return sphere_anomaly(self.stations, theta, _density_column(theta, self.density))

    def predict_gradient(self, theta):
        """d g / d theta at each station, numpy: (..., n, dim). With a free density, dg/ddrho = g / drho."""
        density = _density_column(theta, self.density)
        gradient = sphere_anomaly_gradient(self.stations, theta, density)
        if self.free_density:
            gradient = np.concatenate([gradient, (sphere_anomaly(self.stations, theta, density) / density)[..., None]], axis=-1)
        return gradient

    def inside(self, theta):
        theta = np.asarray(theta)
        return ((theta >= self.bounds[:, 0]) & (theta <= self.bounds[:, 1])).all(axis=-1)

    def misfit(self, theta):
        """Unnormalised log-likelihood, -0.5 * sum(((d - g) / sigma)**2), numpy, batched."""
        return gaussian_misfit(self.predict(theta), self.g_obs, self.weights)

    def log_likelihood(self, theta):
        """Normalised Gaussian log-likelihood, numpy, batched over leading axes."""
        return self.misfit(theta) + self.log_likelihood_constant

    def log_posterior(self, theta):
        """Unnormalised log-posterior, numpy, batched: log-likelihood + log prior; -inf outside the box."""
        theta = np.asarray(theta, dtype=float)
        inside = self.inside(theta)
        if inside.all():
            return self.log_likelihood(theta) + self.log_prior_density
        values = np.full(inside.shape, -np.inf)
        values[inside] = self.log_likelihood(theta[inside]) + self.log_prior_density
        return values



def prior_box(bounds, density_bounds=None):
    """The (dim, 2) prior box and the parameters: the sphere's (3, 2) box, plus the density's row if it is free."""
    bounds = np.asarray(bounds, dtype=float).reshape(3, 2)
    if density_bounds is None:
        return bounds, SPHERE
    return np.vstack([bounds, np.asarray(density_bounds, dtype=float).reshape(1, 2)]), SPHERE_FREE_DENSITY


def synthetic_problem(
    truth=DEFAULT_TRUTH,
    noise_sd=DEFAULT_NOISE_SD,
    density=DEFAULT_DENSITY,
    bounds=DEFAULT_BOUNDS,
    noise_seed=DEFAULT_NOISE_SEED,
    density_bounds=None,
):
    """The default data set: 1000 stations on [-20, 20] m, noise from its own seeded generator.

    ``truth`` is the sphere's (x0, z, R) and ``density`` its true contrast. With ``density_bounds``
    (low, high) the density is a fourth unknown and the truth gains it; the data are the same.
    """
    stations = np.linspace(**DEFAULT_STATIONS)
    geometry = np.asarray(truth, dtype=float)[:3]
    rng = np.random.default_rng(noise_seed)
    g_obs = sphere_anomaly(stations, geometry, density) + rng.normal(0.0, noise_sd, size=stations.shape)
    box, parameters = prior_box(bounds, density_bounds)
    truth = np.append(geometry, float(density)) if density_bounds is not None else geometry
    return Problem(
        stations=stations,
        g_obs=g_obs,
        noise_sd=float(noise_sd),
        density=float(density),
        bounds=box,
        truth=truth,
        source={"kind": "synthetic", "noise_seed": int(noise_seed), "truth": truth.tolist()},
        parameters=parameters,
    )


def read_profile(path):
    """Read a profile CSV with a header row: columns ``x`` (m), ``g`` (µGal), optional ``sigma`` (µGal).

    Returns ``(stations, g_obs, sigma_or_None)`` sorted by station. Raises :class:`DataError`, naming
    the line and column, for anything that is not a usable profile.
    """
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read data file {path}: {error}") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"data file {path} is empty; expected a header row 'x,g[,sigma]' and one row per station")
    header = [cell.strip().lower() for cell in rows[0]]
    for column in ("x", "g"):
        if column not in header:
            raise DataError(
                f"data file {path}: no '{column}' column in the header row {rows[0]!r}; "
                "expected a header 'x,g[,sigma]' (x in m, g and sigma in µGal)"
            )
    columns = ["x", "g"] + (["sigma"] if "sigma" in header else [])
    index = {name: header.index(name) for name in columns}
    values = {name: [] for name in columns}
    for line_number, row in enumerate(rows[1:], start=2):
        for name in columns:
            try:
                value = float(row[index[name]])
            except (IndexError, ValueError):
                cell = row[index[name]] if index[name] < len(row) else ""
                raise DataError(f"data file {path}, line {line_number}, column '{name}': not a number: {cell!r}") from None
            if not math.isfinite(value):
                raise DataError(f"data file {path}, line {line_number}, column '{name}': value is {value}")
            values[name].append(value)
    stations = np.array(values["x"])
    if stations.size < 4:
        raise DataError(f"data file {path} has {stations.size} stations; at least 4 are needed for 3 unknowns")
    if np.unique(stations).size != stations.size:
        duplicate = stations[np.argmax([np.sum(stations == s) > 1 for s in stations])]
        raise DataError(f"data file {path}: station x = {duplicate:g} m appears more than once")
    sigma = np.array(values["sigma"]) if "sigma" in values else None
    if sigma is not None and np.any(sigma <= 0):
        line = 2 + int(np.argmax(sigma <= 0))
        raise DataError(f"data file {path}, line {line}, column 'sigma': must be > 0")
    order = np.argsort(stations)
    return stations[order], np.array(values["g"])[order], (None if sigma is None else sigma[order])


def write_profile(path, stations, g_obs, sigma=None):
    """Write a profile CSV that :func:`read_profile` reads back exactly: columns ``x`` (m), ``g`` and ``sigma`` (µGal).

    ``sigma`` is one number or one per station, or None: no sigma column (``--noise`` then gives it).
    Values are written at full precision (``repr``), so the profile read back is the same to the last
    bit; round them before, for a file meant to be read by people. Returns ``path``."""
    columns = [np.asarray(stations, dtype=float), np.asarray(g_obs, dtype=float)]
    if sigma is not None:
        columns.append(np.broadcast_to(np.asarray(sigma, dtype=float), columns[0].shape))
    rows = [",".join(f"{float(value)!r}" for value in row) for row in zip(*columns)]
    Path(path).write_text(("x,g,sigma" if sigma is not None else "x,g") + "\n" + "\n".join(rows) + "\n")
    return path


def check_bounds(bounds):
    """Validate a (3, 2) prior box; raise DataError with a clear message."""
    bounds = np.asarray(bounds, dtype=float).reshape(3, 2)
    for name, (low, high) in zip(PARAMETERS, bounds):
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DataError(f"--bounds for {name} must be finite numbers, got {low:g} {high:g}")
        if low >= high:
            raise DataError(f"--bounds: the lower bound of {name} ({low:g}) must be below its upper bound ({high:g})")
    for name, low in zip(PARAMETERS[1:], bounds[1:, 0]):
        if low <= 0:
            raise DataError(f"--bounds: the lower bound of {name} must be > 0 m, got {low:g}")
    return bounds


def check_density_bounds(density_bounds, true_density=None):
    """Validate ``--density-bounds LO HI`` (kg/m³); None passes. The true density of synthetic data must lie inside."""
    if density_bounds is None:
        return None
    low, high = (float(v) for v in density_bounds)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DataError(f"--density-bounds must be finite numbers, got {low:g} {high:g}")
    if low >= high:
        raise DataError(f"--density-bounds: the lower bound ({low:g}) must be below the upper bound ({high:g})")
    if low <= 0 <= high:
        raise DataError(f"--density-bounds {low:g} {high:g} spans 0: the contrast must be all positive or all "
                        "negative (a zero contrast has no anomaly)")
    if true_density is not None and not low <= true_density <= high:
        raise DataError(f"--density {true_density:g} (the true contrast that makes the synthetic data) lies outside "
                        f"--density-bounds {low:g} {high:g}")
    return low, high


def _fused_misfit(stations, g_obs, weights, theta, density, with_gradient):
    """The Gaussian misfit of sphere anomalies and, with ``with_gradient``, its analytic gradient, in one pass.

    ``theta`` (batch, 3 or 4) torch; ``density`` a number or (batch, 1); ``weights`` a number (every
    station alike) or (n,). With A = c drho R^3 (c = G 4/3 pi 1e8), r^2 = z^2 + (x - x0)^2, the anomaly
    g = A z r^-3 and the weighted residual w (d - g), the misfit is -1/2 sum w (d - g)^2 and

        d/dx0 = 3 A z S5x,   d/dz = A (S3 - 3 z^2 S5),   d/dR = 3 A z S3 / R,   d/ddrho = A z S3 / drho,

    with S3 = sum w (d - g) r^-3, S5 = sum w (d - g) r^-5, S5x = sum w (d - g) (x - x0) r^-5 over
    stations (the derivatives of ``sphere_anomaly_gradient``, contracted with the residual). About a
    dozen passes over the (batch, n) arrays instead of the several dozen that autograd records.
    Returns ``(misfit (batch,), gradient (batch, dim) or None)``.
    """
    x0, z, radius = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    amplitude = (G * (4.0 / 3.0) * math.pi * MICROGAL_PER_SI) * density * radius**3  # A, (batch, 1)
    amplitude_z = amplitude * z
    offset = stations - x0
    inverse_r = torch.addcmul(z * z, offset, offset).rsqrt_()
    inverse_r2 = inverse_r * inverse_r
    inverse_r3 = inverse_r2.mul_(inverse_r) if not with_gradient else inverse_r2 * inverse_r
    residual = torch.addcmul(g_obs, amplitude_z, inverse_r3, value=-1.0)  # d - g
    weighted = residual * weights if isinstance(weights, torch.Tensor) else residual
    misfit = torch.linalg.vecdot(residual, weighted)
    if not isinstance(weights, torch.Tensor):
        misfit = misfit * weights
    misfit = misfit * -0.5
    if not with_gradient:
        return misfit, None
    if not isinstance(weights, torch.Tensor) and weights != 1.0:
        weighted = weighted * weights
    weighted_r3 = weighted.mul_(inverse_r3)  # w (d - g) r^-3
    s3 = weighted_r3.sum(-1, keepdim=True)
    weighted_r5 = weighted_r3.mul_(inverse_r2)  # w (d - g) r^-5
    s5 = weighted_r5.sum(-1, keepdim=True)
    s5x = torch.linalg.vecdot(weighted_r5, offset)[:, None]
    columns = [3.0 * amplitude_z * s5x, amplitude * (s3 - 3.0 * z * z * s5), 3.0 * amplitude_z * s3 / radius]
    if theta.shape[-1] == 4:
        columns.append(amplitude_z * s3 / theta[:, 3:4])
    return misfit, torch.cat(columns, dim=-1)


class _GaussianMisfit(torch.autograd.Function):
    """-1/2 sum w (d - g(theta))^2 as one autograd node: the forward pass computes the gradient too
    (:func:`_fused_misfit`), the backward pass only scales it. Higher derivatives (a Hessian) are
    taken through the plain, differentiable expression."""

    @staticmethod
    def forward(ctx, theta, stations, g_obs, weights, density):
        ctx.constants = (stations, g_obs, weights, density)
        misfit, gradient = _fused_misfit(stations, g_obs, weights, theta, density, ctx.needs_input_grad[0])
        ctx.save_for_backward(theta, gradient)
        return misfit

    @staticmethod
    def backward(ctx, grad_misfit):
        theta, gradient = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient must itself be differentiable
            stations, g_obs, weights, density = ctx.constants
            with torch.enable_grad():
                misfit = gaussian_misfit(sphere_anomaly(stations, theta, _density_column(theta, density)), g_obs, weights)
                (gradient,) = torch.autograd.grad(misfit.sum(), theta, create_graph=True)
        return grad_misfit[:, None] * gradient, None, None, None, None


class TorchLikelihood(torch.nn.Module):
    """The normalised Gaussian log-likelihood as a differentiable torch function of theta (..., dim).

    The data live in buffers, so ``.to(device, dtype)`` moves them once instead of at every call.
    The value and its gradient come from one fused pass (:func:`_fused_misfit`, a custom autograd
    function): a training step's likelihood costs about a third of what autograd's recorded graph did.
    Noise alike at every station is a number, not an (n,) array of weights.
    """

    def __init__(self, problem):
        super().__init__()
        self.density = problem.density  # not read when theta has a density column
        self.constant = problem.log_likelihood_constant
        weights = np.array(problem.weights)
        self.uniform_weight = float(weights[0]) if np.all(weights == weights[0]) else None
        self.register_buffer("stations", torch.as_tensor(problem.stations))
        self.register_buffer("g_obs", torch.as_tensor(problem.g_obs))
        self.register_buffer("weights", torch.as_tensor(weights))

    def forward(self, theta):
        batch_shape = theta.shape[:-1]
        flat = theta.reshape(-1, theta.shape[-1])
        density = flat[:, 3:4] if flat.shape[-1] == 4 else self.density
        weights = self.weights if self.uniform_weight is None else self.uniform_weight
        misfit = _GaussianMisfit.apply(flat, self.stations, self.g_obs, weights, density)
        return (misfit + self.constant).reshape(batch_shape)


# ----------------------------------------------------------------------------------------------
# The unconstrained space: theta = lo + (hi - lo) * sigmoid(u)


class BoxBijection(torch.nn.Module):
    """Fixed bijection from u in R^dim onto the prior box, theta = lo + (hi - lo) * sigmoid(u).

    ``forward(u) -> (theta, log|det dtheta/du|)`` with
    log|det| = sum_i [log(hi_i - lo_i) - softplus(u_i) - softplus(-u_i)], finite for any u;
    ``inverse(theta) -> (u, log|det du/dtheta|)``. Samples never leave the (closed) box.
    """

    def __init__(self, bounds):
        super().__init__()
        bounds = torch.as_tensor(np.asarray(bounds, dtype=float))
        self.register_buffer("low", bounds[:, 0].clone())
        self.register_buffer("width", (bounds[:, 1] - bounds[:, 0]).clone())
        self.register_buffer("high", self.low + self.width, persistent=False)  # derived: not in the state dict
        self.register_buffer("log_width", torch.log(self.width).sum(), persistent=False)

    def forward(self, u):
        low, width, high = self.low.to(u.dtype), self.width.to(u.dtype), self.high.to(u.dtype)
        theta = torch.minimum(torch.addcmul(low, width, torch.sigmoid(u)), high)  # guard against rounding above hi
        softplus = torch.nn.functional.softplus
        log_det = self.log_width.to(u.dtype) - (softplus(u) + softplus(-u)).sum(-1)
        return theta, log_det

    def inverse(self, theta):
        low, width = self.low.to(theta.dtype), self.width.to(theta.dtype)
        fraction = (theta - low) / width
        u = torch.logit(fraction)
        return u, -self.forward(u)[1]


class MassBijection(torch.nn.Module):
    """Fixed bijection from u in R^4 onto the box of (x0, z, R, drho) through the mass the data see.

    The flows' coordinates on the mass ridge (``--coordinates mass``, the default with a free density).
    With t = |drho| in [t_lo, t_hi], R in [r_lo, r_hi] and the mass m = t R³ in [t_lo r_lo³, t_hi r_hi³]:

        x0, z = lo + (hi - lo) sigmoid(u_0), sigmoid(u_1)        (as :class:`BoxBijection`)
        log m = log m_lo + L sigmoid(u_2),                       L = log(m_hi / m_lo)
        log t = log a + l Phi(u_3),                              l = log(b / a)
        R = (m / t)^(1/3),   drho = sign * t,

    where [a, b] = [max(t_lo, m / r_hi³), min(t_hi, m / r_lo³)] are the contrasts the box allows at mass m
    and Phi is the standard normal CDF. The map is triangular in (m, t), and dR/dm = R / (3 m) at fixed t,
    so log|det dtheta/du| is

        sum_{0,1} [log(hi - lo) - softplus(u) - softplus(-u)] + log L - softplus(u_2) - softplus(-u_2)
            + log l + log phi(u_3) + log t + log R - log 3.

    Why: in the box's own coordinates the ridge t R³ = m is a thin curve (its ends flatten where it meets
    the bounds), which a flow must learn to bend. Here it is a line of constant u_2, and along it
    p(t | m) ∝ t^(-1/3) becomes p(u_3 | m) ∝ phi(u_3) exp((2/3) l Phi(u_3)): a standard normal tilted by a
    factor at most (b / a)^(2/3) (2.5 on the default ridge), which the flows' Gaussian base nearly is
    already. A probit, not a logit, for that reason: a logit would leave a logistic, whose tails a Gaussian
    base must learn. It is the flows' counterpart of the random walk's log coordinates
    (:class:`SamplingCoordinates`), where the same ridge is a straight line; the exact reference integrates
    over (x0, z, m) for the same reason. ``forward(u) -> (theta, log|det dtheta/du|)``, ``inverse(theta)
    -> (u, log|det du/dtheta|)``; samples never leave the box.
    """

    #: What each u coordinate is (in messages): x0, z, the mass, the contrast at that mass.
    NAMES = ("x0", "z", "m", "drho at m")
    #: l never below this (at the two extreme masses the allowed contrasts shrink to one point).
    MIN_LOG_RANGE = 1e-300

    def __init__(self, bounds):
        super().__init__()
        bounds = np.asarray(bounds, dtype=float)
        self.geometry = BoxBijection(bounds[:2])
        (r_lo, r_hi), (d_lo, d_hi) = bounds[2], bounds[3]
        self.sign = 1.0 if d_hi > 0 else -1.0
        t_lo, t_hi = sorted((abs(d_lo), abs(d_hi)))
        self.r_lo, self.r_hi, self.t_lo, self.t_hi = float(r_lo), float(r_hi), t_lo, t_hi
        self.log_t_lo, self.log_t_hi = math.log(t_lo), math.log(t_hi)
        self.log_r_lo, self.log_r_hi = math.log(r_lo), math.log(r_hi)
        self.log_m_lo = self.log_t_lo + 3 * self.log_r_lo
        self.log_m_range = self.log_t_hi + 3 * self.log_r_hi - self.log_m_lo

    def _contrasts(self, log_m):
        """log a and l = log(b / a) at log m."""
        log_a = torch.clamp(log_m - 3 * self.log_r_hi, min=self.log_t_lo)
        log_b = torch.clamp(log_m - 3 * self.log_r_lo, max=self.log_t_hi)
        return log_a, torch.clamp(log_b - log_a, min=self.MIN_LOG_RANGE)

    def forward(self, u):
        softplus = torch.nn.functional.softplus
        xz, log_det = self.geometry(u[..., :2])
        log_m = self.log_m_lo + self.log_m_range * torch.sigmoid(u[..., 2])
        log_a, log_range = self._contrasts(log_m)
        log_t = torch.clamp(log_a + log_range * torch.special.ndtr(u[..., 3]), self.log_t_lo, self.log_t_hi)
        log_r = torch.clamp((log_m - log_t) / 3, self.log_r_lo, self.log_r_hi)
        radius = torch.clamp(torch.exp(log_r), self.r_lo, self.r_hi)  # exp(log r_lo) may round below r_lo
        contrast = self.sign * torch.clamp(torch.exp(log_t), self.t_lo, self.t_hi)
        theta = torch.cat([xz, radius[..., None], contrast[..., None]], -1)
        log_det = (log_det + math.log(self.log_m_range) - softplus(u[..., 2]) - softplus(-u[..., 2])
                   + torch.log(log_range) - 0.5 * u[..., 3].square() - 0.5 * math.log(2 * math.pi)
                   + log_t + log_r - math.log(3.0))
        return theta, log_det

    def inverse(self, theta):
        u_xz, _ = self.geometry.inverse(theta[..., :2])
        log_t = torch.log(self.sign * theta[..., 3])
        log_m = log_t + 3 * torch.log(theta[..., 2])
        log_a, log_range = self._contrasts(log_m)
        u_m = torch.logit((log_m - self.log_m_lo) / self.log_m_range)
        u_t = torch.special.ndtri((log_t - log_a) / log_range)
        u = torch.cat([u_xz, u_m[..., None], u_t[..., None]], -1)
        return u, -self.forward(u)[1]


#: The flows' coordinates (``--coordinates``): "box", u -> theta through :class:`BoxBijection`; "mass",
#: through :class:`MassBijection` (a free density only).
FLOW_COORDINATES = ("box", "mass")


def flow_bijection(coordinates, bounds):
    """The fixed bijection from the flows' u onto the box ``bounds`` in ``coordinates`` (:data:`FLOW_COORDINATES`)."""
    if coordinates == "box":
        return BoxBijection(bounds)
    if coordinates == "mass":
        if len(bounds) != len(SPHERE_FREE_DENSITY):
            raise ValueError("mass coordinates need a free density (theta = x0, z, R, drho)")
        return MassBijection(bounds)
    raise ValueError(f"coordinates must be one of {FLOW_COORDINATES}, got {coordinates!r}")


def default_flow_coordinates(problem):
    """"mass" with a free density, where the ridge needs it; "box" otherwise."""
    return "mass" if problem.free_density else "box"


def to_box(problem, u):
    """numpy: theta = lo + (hi - lo) * sigmoid(u), and dtheta/du per coordinate."""
    sig = expit(np.asarray(u))
    width = problem.bounds[:, 1] - problem.bounds[:, 0]
    return problem.bounds[:, 0] + width * sig, width * sig * (1.0 - sig)


def _misfit_and_gradient(problem, theta):
    residual = problem.g_obs - problem.predict(theta)
    weighted = residual * problem.weights
    return -0.5 * np.sum(residual * weighted), weighted @ problem.predict_gradient(theta)


def _log_posterior_u_and_gradient(problem, u, with_jacobian):
    theta, dtheta_du = to_box(problem, u)
    value, gradient = _misfit_and_gradient(problem, theta)
    gradient = gradient * dtheta_du
    if with_jacobian:  # log|dtheta/du| = sum log(width) - softplus(u) - softplus(-u), up to a constant
        value -= np.sum(np.logaddexp(0.0, u) + np.logaddexp(0.0, -u))
        gradient += 1.0 - 2.0 * expit(u)
    return value, gradient


def _hessian(gradient, point, relative_step=1e-5):
    """Hessian by central differences of an exact gradient (symmetrised)."""
    step = relative_step * np.maximum(1.0, np.abs(point))
    columns = []
    for i in range(point.size):
        shift = np.zeros_like(point)
        shift[i] = step[i]
        columns.append((gradient(point + shift) - gradient(point - shift)) / (2 * step[i]))
    hessian = np.array(columns)
    return 0.5 * (hessian + hessian.T)


#: The u-space Laplace of the uniform prior alone is N(0, 2) in each coordinate (the box's log-Jacobian
#: has curvature -1/2 at u = 0); mapped onto the box by the delta method its sd is sqrt(2)/4 = 0.354 of
#: the prior range, against range / sqrt(12) = 0.289 for the uniform distribution itself.
PRIOR_SD_FRACTION = math.sqrt(2.0) / 4.0
#: The data barely constrain a geometric parameter (x0, z, and R with the density known) where its sd
#: in the u-space Laplace mapped onto the box reaches this fraction of its prior range: 0.42 of what the
#: prior alone gives (flat posteriors: 0.3-0.37; the default problem: 0.002-0.004).
WEAK_SD_FRACTION = 0.15
#: Noise-weighted residuals whose RMS differs from 1 by more than this factor (either way) cannot come
#: from the stated noise: they mark wrong units or a wrong noise level (see :func:`laplace_approximation`).
MISFIT_FACTOR = 5.0
#: ... provided the chi-square distribution says so beyond doubt (its lower tail, with few stations).
MISFIT_P_VALUE = 1e-6


@dataclass(frozen=True)
class Laplace:
    """The Laplace approximation: the MAP and the inverse Hessian, in parameter space and in u-space.

    ``u_map``/``u_cov``: mode and covariance of the posterior density of u (Jacobian included),
    which the flows standardise by; the box's Jacobian makes this density peaked for any data.
    ``theta_map``/``theta_cov``: where ``theta_peak``, the mode and inverse Hessian of the posterior
    of theta at the best fit (the box prior is flat). Otherwise the u-space Laplace mapped onto the
    box (``theta_map = box(u_map)``, covariance by the delta method): with the density free (the
    θ-space Hessian is singular along the mass ridge), with weak data (a θ-space Gaussian of
    sd larger than the box describes nothing), with a best fit pressed against a bound (``on_bound``:
    the gradient there is not zero, and the posterior falls off from the bound over far less than the
    Hessian's sd), and where the θ-space Hessian at the best fit is not negative definite.

    ``seconds``: the wall time the approximation took (a method's setup cost, ``setup_time_s``).
    ``sd_fraction``: {name: sd of the u-space Laplace mapped onto the box / prior range} for every
    parameter. ``weak``: the data barely constrain the body, i.e. ``barely_constrained`` (the
    geometric parameters whose ``sd_fraction`` reaches :data:`WEAK_SD_FRACTION`) is not empty; the
    posterior is then close to the prior, the exact reference must cover the whole box and methods
    start from the prior. ``on_bound`` names parameters whose best fit sits on a prior bound (R and
    Δρ are exempt when the density is free: the ridge's ends lie on bounds by nature; so are the
    barely constrained parameters: where the data hardly see the body its best fit means nothing).
    """

    theta_map: np.ndarray
    theta_cov: np.ndarray
    u_map: np.ndarray
    u_cov: np.ndarray
    on_bound: tuple
    theta_peak: bool = True
    weak: bool = False
    barely_constrained: tuple = ()
    sd_fraction: dict = field(default_factory=dict)
    #: Wall time of the search (both optimisations and Hessians), s: part of the cost of the whole job.
    seconds: float = 0.0

    @property
    def theta_sd(self):
        return np.sqrt(np.diag(self.theta_cov))


def weak_data_warning(laplace):
    """The one-line warning for data that barely constrain the body (``laplace.weak``); None otherwise."""
    if not laplace.weak:
        return None
    names = laplace.barely_constrained
    percents = ", ".join(f"{100 * laplace.sd_fraction[name]:.0f} %" for name in names)
    return (f"warning: the data barely constrain the body: the Laplace sd of {', '.join(names)} is {percents} of "
            f"{'its prior range' if len(names) == 1 else 'their prior ranges'}, against "
            f"{100 * PRIOR_SD_FRACTION:.0f} % with no data at all; the posterior stays close to the prior there "
            "(less noise, or more stations over the anomaly, would tell more)")


def _minimise(problem, starts_u, with_jacobian):
    def objective(u):
        value, gradient = _log_posterior_u_and_gradient(problem, u, with_jacobian)
        return -value, -gradient

    best = None
    for start in starts_u:
        result = optimize.minimize(objective, start, jac=True, method="BFGS", options={"gtol": 1e-9, "maxiter": 2000})
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def _describe(problem, theta):
    """``x0 = 3 m, z = 6 m, ...`` for one parameter set."""
    return ", ".join(f"{p.name} = {value:.4g} {p.unit}" for p, value in zip(problem.parameters, theta))


def _inverse_if_peaked(negative_hessian):
    """The inverse of a positive definite matrix, or None where it is not positive definite."""
    try:
        np.linalg.cholesky(negative_hessian)
    except np.linalg.LinAlgError:
        return None
    return np.linalg.inv(negative_hessian)


def _covariance(negative_hessian, problem, theta_map, space):
    """Inverse of a Hessian that must be positive definite at a mode; DataError where it is not."""
    covariance = _inverse_if_peaked(negative_hessian)
    if covariance is None:
        raise DataError(f"the posterior has no peak at its best fit ({_describe(problem, theta_map)}), not even in "
                        f"{space}: check the profile, its units (x in m, g in µGal), --noise and --density")
    return covariance


def _noise_ratio(problem, theta):
    """(chi2, RMS of the noise-weighted residuals per degree of freedom, degrees of freedom) at theta."""
    chi2 = float(-2.0 * problem.misfit(theta))
    dof = max(problem.n_stations - problem.dim, 1)
    return chi2, math.sqrt(chi2 / dof), dof


def _refuse_unexplained(problem, best_fit, pinned):
    """DataError where the best fit sits on a bound (``pinned``: names) and still misses the data by more
    than MISFIT_FACTOR times the noise: no sphere in the box explains them, typically units (a profile
    in mGal with its noise in mGal, or in nGal, read as µGal). A best fit on a bound that explains the
    data passes: the box is too tight, which the ``on_bound`` warning says."""
    _, rms, _ = _noise_ratio(problem, best_fit)
    if pinned and rms > MISFIT_FACTOR:
        raise DataError(
            f"no sphere in the prior box explains the data: the best fit ({_describe(problem, best_fit)}) sits on the "
            f"bound of {', '.join(pinned)} and still misses the data by {rms:.3g} times the noise (RMS of the "
            "noise-weighted residuals). Check the units (x in m, g in µGal), --noise or the sigma column and "
            "--density, or widen --bounds")


def _refuse_overstated_noise(problem, best_fit):
    """DataError for weak data that scatter about the best fit by less than 1/MISFIT_FACTOR of the stated
    noise beyond doubt (chi-square lower tail below MISFIT_P_VALUE): they look uninformative only because
    the stated noise dwarfs them, typically a profile in mGal read as µGal with a noise in µGal. Weak data
    that scatter as the noise says pass: their posterior is close to the prior, as it should be."""
    chi2, rms, dof = _noise_ratio(problem, best_fit)
    if rms < 1.0 / MISFIT_FACTOR and stats.chi2.cdf(chi2, dof) < MISFIT_P_VALUE:
        raise DataError(
            f"the data scatter about the best fit by only {rms:.2g} times the stated noise: they would look "
            "uninformative only because of that noise. Check the units (g in µGal, not mGal) and --noise or the "
            "sigma column")


def laplace_approximation(problem, n_starts=8, seed=0, starts_u=None):
    """MAP by BFGS from the box centre and a few seeded starts (or from ``starts_u``, points in u already
    near the posterior, such as a sampler's best draws), then inverse Hessians.

    The search runs in u-space, so every iterate lies inside the box. A best fit within 1e-3 of the
    box width of a bound is reported in ``on_bound`` (the prior box is then too tight). The posterior
    of u (Jacobian included) is peaked for any data, so its Laplace always exists; mapped onto the box
    by the delta method it also says how much the data constrain each parameter (``weak``, see
    :class:`Laplace`). With the density known, the data not weak and the best fit inside the box,
    theta's own Laplace at the best fit is kept where its Hessian is negative definite. Data that no
    posterior can make sense of raise DataError: a best fit on a bound that misses the data by many
    times the noise, and weak data that scatter far less than the stated noise (see :data:`MISFIT_FACTOR`).
    """
    began = time.perf_counter()
    if starts_u is None:
        rng = np.random.default_rng(seed)
        starts = [np.zeros(problem.dim)] + [rng.uniform(-2.0, 2.0, size=problem.dim) for _ in range(n_starts - 1)]
    else:  # n_starts and seed are then unused
        starts = [np.asarray(start, dtype=float) for start in starts_u]
    u_best_fit = _minimise(problem, starts, with_jacobian=False)
    best_fit, _ = to_box(problem, u_best_fit)
    width = problem.bounds[:, 1] - problem.bounds[:, 0]
    near = np.minimum(best_fit - problem.bounds[:, 0], problem.bounds[:, 1] - best_fit) < 1e-3 * width
    # with the density free the ridge's ends lie on the bounds of R and drho by nature
    on_a_bound = [p.name for p, flag in zip(problem.parameters, near)
                  if flag and not (problem.free_density and p in (RADIUS, DENSITY))]
    _refuse_unexplained(problem, best_fit, on_a_bound)

    u_map = _minimise(problem, [u_best_fit], with_jacobian=True)
    u_cov = _covariance(-_hessian(lambda u: _log_posterior_u_and_gradient(problem, u, True)[1], u_map),
                        problem, best_fit, "the unconstrained coordinates")
    u_theta_map, dtheta_du = to_box(problem, u_map)
    u_theta_cov = u_cov * np.outer(dtheta_du, dtheta_du)

    sd_fraction = np.sqrt(np.diag(u_theta_cov)) / width
    # the geometry the data must see; with the density free R is a ridge coordinate that only the box decides
    geometric = [p in (X0, DEPTH) or (p is RADIUS and not problem.free_density) for p in problem.parameters]
    barely = tuple(p.name for p, fraction, check in zip(problem.parameters, sd_fraction, geometric)
                   if check and fraction >= WEAK_SD_FRACTION)
    weak = bool(barely)
    if weak:
        _refuse_overstated_noise(problem, best_fit)
    # where the data hardly see a parameter its best fit means nothing, on a bound or not
    on_bound = tuple(name for name in on_a_bound if name not in barely)

    # theta's Hessian at the best fit describes a peak only for informative data fitted inside the box:
    # on a bound the gradient is not zero, and the posterior falls off from the bound much faster
    theta_cov = None
    if not problem.free_density and not weak and not on_bound:
        def theta_gradient(theta):
            return _misfit_and_gradient(problem, np.clip(theta, problem.bounds[:, 0], problem.bounds[:, 1]))[1]

        theta_cov = _inverse_if_peaked(-_hessian(theta_gradient, best_fit))
    theta_peak = theta_cov is not None
    return Laplace(
        theta_map=best_fit if theta_peak else u_theta_map,
        theta_cov=theta_cov if theta_peak else u_theta_cov,
        u_map=u_map,
        u_cov=u_cov,
        on_bound=on_bound,
        theta_peak=theta_peak,
        weak=weak,
        barely_constrained=barely,
        sd_fraction={p.name: float(f) for p, f in zip(problem.parameters, sd_fraction)},
        seconds=time.perf_counter() - began,
    )


#: The coordinates a walk can run in (``--coordinates``): "log" takes the log of the magnitude of every
#: parameter but x0 whose box lies on one side of zero (z, R and Δρ, always), "theta" the parameters themselves.
COORDINATES = ("log", "theta")


class SamplingCoordinates:
    """The coordinates phi the random walk runs in, and the target density in them.

    With ``kind`` "log": phi_i = log|theta_i| for every parameter but x0 whose prior box lies on one
    side of zero (``logged``; z, R and Δρ), phi_i = theta_i otherwise; "theta": phi = theta. The
    posterior density of phi is that of theta times the Jacobian |dtheta/dphi| = prod |theta_i| over
    the logged coordinates, so

        log p(phi | d) = log p(theta(phi) | d) + sum_logged phi_i,

    and the box stays a box in theta: a proposal whose theta falls outside it has zero density and is
    rejected, never reflected. On the mass ridge of a free density the curve Δρ R³ = m is the straight
    line log Δρ + 3 log R = log m in these coordinates, which one Gaussian proposal follows; on the default
    problem they change little (τ about 11 steps either way). The MCMC walks in them (``Gravity_MCMC.py``),
    and the amortized correction places its Laplace t in them on the ridge
    (``gravity_flows.inference.correction.LogCoordinates`` is their torch map).
    """

    def __init__(self, problem, kind):
        if kind not in COORDINATES:
            raise ValueError(f"coordinates must be one of {COORDINATES}, got {kind!r}")
        self.kind = kind
        bounds = np.asarray(problem.bounds, dtype=float)
        one_signed = (bounds[:, 0] > 0) | (bounds[:, 1] < 0)
        self.logged = np.array([kind == "log" and flag and parameter is not X0
                                for parameter, flag in zip(problem.parameters, one_signed)])
        self.sign = np.where(bounds[:, 1] < 0, -1.0, 1.0)
        self.names = tuple(f"log|{p.name}|" if flag and sign < 0 else f"log {p.name}" if flag else p.name
                           for p, flag, sign in zip(problem.parameters, self.logged, self.sign))

    def to_theta(self, phi):
        """theta (..., dim) of phi (..., dim)."""
        phi = np.asarray(phi, dtype=float)
        return np.where(self.logged, self.sign * np.exp(np.where(self.logged, phi, 0.0)), phi)

    def from_theta(self, theta):
        """phi (..., dim) of theta (..., dim) (theta inside the box)."""
        theta = np.asarray(theta, dtype=float)
        return np.where(self.logged, np.log(np.abs(np.where(self.logged, theta, 1.0))), theta)

    def log_jacobian(self, phi):
        """log |dtheta/dphi| = sum of the logged phi_i: (...,)."""
        return np.sum(np.where(self.logged, phi, 0.0), axis=-1)

    def jacobian_diagonal(self, theta):
        """dphi_i/dtheta_i at theta: 1/theta_i where logged, 1 elsewhere (the delta method's factor)."""
        return np.where(self.logged, 1.0 / np.where(self.logged, theta, 1.0), 1.0)

    def covariance_from_theta(self, theta, covariance):
        """The delta method: the covariance in phi of a Gaussian in theta at ``theta``."""
        scale = self.jacobian_diagonal(theta)
        return covariance * np.outer(scale, scale)

    def target(self, problem):
        """The posterior density in phi: an object with ``log_posterior(phi)``, -inf where theta leaves the box."""
        return _TransformedPosterior(problem, self)

    def describe(self):
        return f"{self.kind} ({', '.join(self.names)})"


class _TransformedPosterior:
    """``log_posterior(phi) = problem.log_posterior(theta(phi)) + log|dtheta/dphi|`` (see :class:`SamplingCoordinates`)."""

    def __init__(self, problem, coordinates):
        self.problem, self.coordinates = problem, coordinates

    def log_posterior(self, phi):
        log_post = self.problem.log_posterior(self.coordinates.to_theta(phi))
        return log_post + self.coordinates.log_jacobian(phi)  # -inf outside the box stays -inf
