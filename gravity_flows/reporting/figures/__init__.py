"""Figures every script writes, one module a subject; this package re-exports the ``plot_*`` functions.

- :mod:`.posterior` — marginals and pairs (every run);
- :mod:`.predictive` — the posterior predictive check (every run);
- :mod:`.chains` — traces, autocorrelation, misfit (MCMC);
- :mod:`.training` — the ELBO history (flows);
- :mod:`.comparison` — every method side by side, cost against accuracy, convergence, the amortized survey cost (``compare.py``);
- :mod:`.style` — colours, headings, ticks and the view limits that every figure shares.

Each function draws one figure and writes it as a PNG with :func:`output.save_figure` (atomic, and
the figure is closed). Units: every parameter axis in its own unit (:class:`forward.Parameter`:
m for x0, z, R; kg/m³ for the density contrast Δρ), anomalies and misfits in µGal, ELBO and KL in
nats. The figures work from the problem's unknowns, ``parameters`` (a tuple of
:class:`forward.Parameter`, :data:`forward.SPHERE` by default, :data:`forward.SPHERE_FREE_DENSITY`
when Δρ is free): one marginal per parameter, one panel per pair i < j. What they compute
(credible levels, predictive bands) lives in :mod:`gravity_flows.scoring.predictive`.
"""

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported by any figure module: no screen is needed

from gravity_flows.reporting.figures.chains import plot_autocorrelation, plot_misfit, plot_trace  # noqa: E402
from gravity_flows.reporting.figures.comparison import (  # noqa: E402
    plot_convergence, plot_cost_accuracy, plot_cost_vs_survey, plot_marginals_grid, plot_pair_grid)
from gravity_flows.reporting.figures.posterior import plot_marginals, plot_pairs  # noqa: E402
from gravity_flows.reporting.figures.predictive import plot_predictive_check  # noqa: E402
from gravity_flows.reporting.figures.training import plot_elbo  # noqa: E402

__all__ = [
    "plot_autocorrelation", "plot_convergence", "plot_cost_accuracy", "plot_cost_vs_survey", "plot_elbo", "plot_marginals",
    "plot_marginals_grid", "plot_misfit", "plot_pair_grid", "plot_pairs", "plot_predictive_check", "plot_trace",
]
