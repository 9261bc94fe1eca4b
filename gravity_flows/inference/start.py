"""Where a method starts (``--init``): the Laplace approximation, or the prior, chosen from the data.

The Laplace approximation is a Gaussian in the unconstrained coordinates u (``forward.Laplace``).
Where the posterior is nearly Gaussian there (the default problem) it is an excellent start: the
flows refine an already accurate q and the Markov chains start in the bulk with a well-shaped
proposal. Where it is not (the mass ridge of a free density contrast) it describes only the
ridge's tangent at the mode, and a flow trained from it by reverse KL settles on part of the
ridge. ``--init auto`` (the default) finds out which case it is by the Laplace Gaussian's own
importance-sampling diagnostics against the *unnormalised* posterior, so it needs no reference:

    u_s ~ N(u_map, u_cov),   log w_s = log p(d, theta(u_s)) + log|dtheta/du| - log N(u_s),

and the Pareto k-hat of PSIS (Vehtari et al. 2024) and the normalised ESS of the weights
(``diagnostics``). k-hat <= ``diagnostics.PSIS_KHAT_LIMIT`` (0.7) and ESS >= ``ESS_LIMIT``: the Gaussian describes the
posterior, start there; otherwise start from the prior (and anneal the likelihood, see ``vi``).
The judgement costs ``N_DRAWS`` likelihood evaluations (0.1 s on the default problem).

Where the data barely constrain the body (``Laplace.weak``) the posterior is close to the prior, which
is then the natural start, whatever the Laplace Gaussian's diagnostics say: ``auto`` starts from the
prior without judging (no likelihood evaluations).
"""

from dataclasses import dataclass

import numpy as np
import torch

import forward
from gravity_flows.inference import vi
from gravity_flows.scoring import diagnostics

N_DRAWS = 4000
#: Smallest normalised importance ESS at which the Laplace Gaussian counts as a description of the posterior
#: (99.9 % on the default problem; 0.1-10 % on the mass ridge, depending on the draws: a wide margin both ways).
ESS_LIMIT = 0.5


@dataclass(frozen=True)
class Start:
    """The start a run uses: ``init`` ("laplace" or "prior"), why, and the diagnostics (None if not judged)."""

    init: str
    reason: str
    khat: float = None
    is_ess: float = None
    likelihood_evaluations: int = 0

    def summary(self):
        return {"init": self.init, "reason": self.reason, "laplace_khat": self.khat, "laplace_is_ess": self.is_ess,
                "likelihood_evaluations": self.likelihood_evaluations}


def laplace_log_weights(problem, laplace, n=N_DRAWS, seed=0, coordinates="box"):
    """Draws of the Laplace Gaussian mapped onto the box, ``theta`` (n, dim), and their log weights p(d, theta) / q(theta).

    The Gaussian is the one a flow in ``coordinates`` starts from (``vi.standardisation``): the fit itself in
    the box's coordinates, the fit carried into them by the delta method in mass coordinates."""
    rng = np.random.default_rng(seed)
    shift, chol = vi.standardisation("laplace", laplace, coordinates, problem.bounds)
    eps = rng.standard_normal((n, problem.dim))
    u = shift + eps @ chol.T
    log_q_u = -0.5 * np.sum(eps**2, axis=1) - np.sum(np.log(np.diag(chol))) - 0.5 * problem.dim * np.log(2 * np.pi)
    bijection = forward.flow_bijection(coordinates, problem.bounds).double()  # the flows' own map onto the box
    theta, log_jacobian = (value.numpy() for value in bijection(torch.as_tensor(u)))
    inside = problem.inside(theta)
    log_joint = np.full(n, -np.inf)
    log_joint[inside] = problem.log_likelihood(theta[inside]) + problem.log_prior_density
    return theta, log_joint + log_jacobian - log_q_u


def choose_start(init, problem, laplace, coordinates="box"):
    """The :class:`Start` for ``--init`` (``auto``, ``laplace`` or ``prior``), judging the Laplace Gaussian in the
    flows' ``coordinates`` (the random walk's start is judged in the box's: its Laplace start is the fit itself)."""
    if init != "auto":
        return Start(init, f"--init {init}")
    if laplace.weak:
        return Start("prior", f"the data barely constrain the body ({', '.join(laplace.barely_constrained)}): "
                              "the posterior is close to the prior, so start there")
    _, log_weights = laplace_log_weights(problem, laplace, coordinates=coordinates)
    khat = float(diagnostics.psis_khat(log_weights))
    ess = float(diagnostics.importance_ess(log_weights))
    figures = f"importance k-hat {khat:.2f}, ESS {100 * ess:.1f} % of {N_DRAWS} draws against the posterior"
    gaussian = "the Laplace Gaussian" + ("" if coordinates == "box" else f" in {coordinates} coordinates")
    if khat <= diagnostics.PSIS_KHAT_LIMIT and ess >= ESS_LIMIT:
        return Start("laplace", f"{gaussian} describes the posterior ({figures})", khat, ess, N_DRAWS)
    return Start("prior", f"{gaussian} misses much of the posterior ({figures}); starting from the prior",
                 khat, ess, N_DRAWS)
