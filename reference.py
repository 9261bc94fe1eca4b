"""The exact reference posterior, by quadrature on a grid, and the scores every method gets against it.

With three unknowns the posterior ``p(theta | d) ∝ L(theta) p(theta)`` can be integrated directly on
a grid around its mode: the window spans ``±WINDOW_SDS`` Laplace standard deviations per axis
(clipped to the prior box), with trapezoid weights. The anomaly factorises as
``g = R**3 * h(x0, z)``, so for every (x0, z) node the weighted sum of squares over all R is

    sum w (d - R^3 h)^2 = sum w d^2 - 2 R^3 (sum w d h) + R^6 (sum w h^2),

two inner products per (x0, z) node instead of a forward model per grid point.

Scores: per parameter the Wasserstein-1 distance between a method's samples and the reference
marginal, divided by the reference sd; *the error* of a run is the largest of the three.

``python reference.py`` prints the reference for the default problem.
"""

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import logsumexp

import forward

WINDOW_SDS = 8.0
GRID_POINTS = 121


def _trapezoid_weights(nodes):
    spacing = np.diff(nodes)
    weights = np.zeros_like(nodes)
    weights[:-1] += spacing / 2
    weights[1:] += spacing / 2
    return weights


@dataclass
class Reference:
    """The exact posterior on a grid: nodes and trapezoid weights per axis, and log-density values.

    ``log_density`` is the normalised log posterior density at every grid node (shape n0 × nz × nR),
    so that ``sum(exp(log_density) * w0 w_z w_R) == 1``. ``log_evidence`` is log Z = log ∫ L p dθ,
    with the Gaussian constant and the prior density included.
    """

    nodes: list
    weights: list
    log_density: np.ndarray
    log_evidence: float

    @cached_property
    def cell_mass(self):
        """Probability of each grid cell (density times the trapezoid weights); sums to 1."""
        w0, w1, w2 = self.weights
        return np.exp(self.log_density) * w0[:, None, None] * w1[None, :, None] * w2[None, None, :]

    def __post_init__(self):
        mass = self.cell_mass
        self.mean = np.array([np.sum(mass.sum(axis=tuple(a for a in range(3) if a != i)) * self.nodes[i]) for i in range(3)])
        grids = np.meshgrid(*self.nodes, indexing="ij")
        centred = [grid - m for grid, m in zip(grids, self.mean)]
        self.covariance = np.array([[np.sum(mass * centred[i] * centred[j]) for j in range(3)] for i in range(3)])
        self.sd = np.sqrt(np.diag(self.covariance))
        self.correlation = self.covariance / np.outer(self.sd, self.sd)

    def marginal(self, i):
        """(nodes, density) of the 1-D marginal of parameter ``i``; the density integrates to 1."""
        others = tuple(a for a in range(3) if a != i)
        mass = self.cell_mass.sum(axis=others)
        return self.nodes[i], mass / self.weights[i]

    def joint_marginal(self, i, j):
        """(nodes_i, nodes_j, density[i, j]) of the 2-D marginal of parameters i < j."""
        other = ({0, 1, 2} - {i, j}).pop()
        mass = self.cell_mass.sum(axis=other)
        return self.nodes[i], self.nodes[j], mass / np.outer(self.weights[i], self.weights[j])

    def marginal_cdf(self, i):
        """(nodes, cdf) of parameter ``i``: cumulative trapezoid of the marginal, from 0 to 1."""
        nodes, density = self.marginal(i)
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(nodes))])
        return nodes, cdf / cdf[-1]

    def quantile(self, i, probabilities):
        nodes, cdf = self.marginal_cdf(i)
        keep = np.concatenate([[True], np.diff(cdf) > 0])  # strictly increasing for interpolation
        return np.interp(probabilities, cdf[keep], nodes[keep])

    def sample(self, n, rng):
        """Draw n parameter sets: a grid cell by its probability mass, then uniformly within it."""
        mass = self.cell_mass.ravel()
        cells = rng.choice(mass.size, size=n, p=mass / mass.sum())
        index = np.unravel_index(cells, self.log_density.shape)
        columns = []
        for axis in range(3):
            nodes = self.nodes[axis]
            spacing = nodes[1] - nodes[0]
            value = nodes[index[axis]] + rng.uniform(-0.5, 0.5, size=n) * spacing
            columns.append(np.clip(value, nodes[0], nodes[-1]))
        return np.stack(columns, axis=1)

    def summary(self):
        return {
            "mean": self.mean.tolist(),
            "sd": self.sd.tolist(),
            "correlation": self.correlation.tolist(),
            "log_evidence": float(self.log_evidence),
        }


def compute_reference(problem, laplace=None, grid_points=GRID_POINTS, window_sds=WINDOW_SDS):
    """The exact posterior of ``problem`` on a ``grid_points``³ grid around the Laplace mode."""
    if laplace is None:
        laplace = forward.laplace_approximation(problem)
    low = np.maximum(laplace.theta_map - window_sds * laplace.theta_sd, problem.bounds[:, 0])
    high = np.minimum(laplace.theta_map + window_sds * laplace.theta_sd, problem.bounds[:, 1])
    nodes = [np.linspace(lo, hi, grid_points) for lo, hi in zip(low, high)]
    weights = [_trapezoid_weights(n) for n in nodes]

    w = problem.weights
    d = problem.g_obs
    x0, z, radius = nodes
    # h(x0, z) at every station, one x0 row at a time to bound memory: (nz, n_stations) per row
    inner_dh = np.empty((grid_points, grid_points))
    inner_hh = np.empty((grid_points, grid_points))
    for i, x0_value in enumerate(x0):
        theta_unit = np.stack([np.full_like(z, x0_value), z, np.ones_like(z)], axis=1)
        h = forward.sphere_anomaly(problem.stations, theta_unit, problem.density)
        inner_dh[i] = h @ (w * d)
        inner_hh[i] = (h * h) @ w
    r3 = radius**3
    sum_squares = np.sum(w * d * d) - 2.0 * inner_dh[:, :, None] * r3 + inner_hh[:, :, None] * r3**2
    log_joint = -0.5 * sum_squares + problem.log_likelihood_constant + problem.log_prior_density

    log_cell = np.log(weights[0])[:, None, None] + np.log(weights[1])[None, :, None] + np.log(weights[2])[None, None, :]
    log_evidence = float(logsumexp(log_joint + log_cell))
    return Reference(nodes=nodes, weights=weights, log_density=log_joint - log_evidence, log_evidence=log_evidence)


def wasserstein1_to_marginal(samples, reference, i):
    """W1 between the empirical distribution of ``samples`` and the reference marginal of parameter i.

    Quantile form, W1 = ∫_0^1 |F_n^{-1}(p) - F^{-1}(p)| dp, by the midpoint of each of the n steps
    of the empirical quantile function: robust to samples far outside the grid window.
    """
    ordered = np.sort(np.asarray(samples, dtype=float))
    probabilities = (np.arange(ordered.size) + 0.5) / ordered.size
    return float(np.mean(np.abs(ordered - reference.quantile(i, probabilities))))


def score(theta, reference):
    """``{'w1_over_sd': [3 floats], 'error': max of them}`` for samples theta (n, 3)."""
    theta = np.asarray(theta)
    ratios = [wasserstein1_to_marginal(theta[:, i], reference, i) / reference.sd[i] for i in range(3)]
    return {"w1_over_sd": [float(r) for r in ratios], "error": float(max(ratios))}


def main():
    start = time.perf_counter()
    problem = forward.synthetic_problem()
    reference = compute_reference(problem)
    elapsed = time.perf_counter() - start
    print("Exact posterior of the default problem (grid quadrature, %d^3 nodes, ±%g Laplace sd):" % (GRID_POINTS, WINDOW_SDS))
    print(f"{'':>4} {'truth':>8} {'mean':>10} {'sd':>10}")
    for name, truth, mean, sd in zip(forward.PARAMETERS, problem.truth, reference.mean, reference.sd):
        print(f"{name:>4} {truth:8.3f} {mean:10.5f} {sd:10.5f}")
    print("correlation (x0, z, R):")
    for name, row in zip(forward.PARAMETERS, reference.correlation):
        print(f"{name:>4} " + " ".join(f"{value:7.3f}" for value in row))
    print(f"log evidence: {reference.log_evidence:.4f}")
    print(f"computed in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
