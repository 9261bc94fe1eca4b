"""--init auto: the Laplace Gaussian judged by its own importance diagnostics against the unnormalised posterior."""

import numpy as np
import pytest

import forward
from gravity_flows.inference import start
from gravity_flows.scoring import diagnostics


@pytest.fixture(scope="module")
def ridge_problem():
    return forward.synthetic_problem(density_bounds=(1000.0, 4000.0))


def test_auto_chooses_laplace_where_it_describes_the_posterior(default_problem, default_laplace):
    chosen = start.choose_start("auto", default_problem, default_laplace)
    assert chosen.init == "laplace"
    assert chosen.khat < diagnostics.PSIS_KHAT_LIMIT and chosen.is_ess > 0.95
    assert chosen.likelihood_evaluations == start.N_DRAWS
    assert "describes the posterior" in chosen.reason


def test_auto_chooses_the_prior_on_the_mass_ridge(ridge_problem):
    chosen = start.choose_start("auto", ridge_problem, forward.laplace_approximation(ridge_problem))
    assert chosen.init == "prior"
    assert chosen.is_ess < start.ESS_LIMIT
    assert "misses" in chosen.reason


def test_explicit_choices_are_kept_without_judging(default_problem, default_laplace):
    for init in ("laplace", "prior"):
        chosen = start.choose_start(init, default_problem, default_laplace)
        assert chosen.init == init and chosen.likelihood_evaluations == 0


def test_laplace_log_weights_are_log_p_over_q(default_problem, default_laplace):
    """The weights of the Laplace draws: exact q density in u, Jacobian of the box, unnormalised posterior."""
    theta, log_weights = start.laplace_log_weights(default_problem, default_laplace, n=2000, seed=3)
    assert np.all(default_problem.inside(theta))
    u = np.log((theta - default_problem.bounds[:, 0]) / (default_problem.bounds[:, 1] - theta))
    from scipy.stats import multivariate_normal

    log_q_u = multivariate_normal(default_laplace.u_map, default_laplace.u_cov).logpdf(u)
    width = default_problem.bounds[:, 1] - default_problem.bounds[:, 0]
    sigmoid = 1 / (1 + np.exp(-u))
    log_jacobian = np.sum(np.log(width * sigmoid * (1 - sigmoid)), axis=1)
    expected = default_problem.log_posterior(theta) + log_jacobian - log_q_u
    np.testing.assert_allclose(log_weights, expected, rtol=1e-9, atol=1e-6)
    # where the Laplace Gaussian is nearly exact, the weights are nearly flat: ESS close to 1
    assert diagnostics.importance_ess(log_weights) > 0.95


def test_a_laplace_start_that_is_nearly_the_posterior_trains_the_short_budget():
    """From the Laplace start the default --iterations is at most flow.CLOSE_LAPLACE_ITERATIONS where --init auto
    found its importance ESS >= flow.CLOSE_LAPLACE_ESS; not where it is lower, not where it was not judged
    (--init laplace), not where --iterations is given, and never from the prior."""
    import Gravity_planar
    from gravity_flows.command import flow

    def iterations(argv, init, ess):
        return flow.resolve_defaults(Gravity_planar.build_parser().parse_args(argv), init, ess).iterations

    long = Gravity_planar.build_parser().parse_args([]).start_defaults["iterations"]
    assert flow.CLOSE_LAPLACE_ITERATIONS < long["laplace"]
    assert iterations([], "laplace", 0.999) == flow.CLOSE_LAPLACE_ITERATIONS
    assert iterations([], "laplace", flow.CLOSE_LAPLACE_ESS) == flow.CLOSE_LAPLACE_ITERATIONS
    assert iterations([], "laplace", 0.59) == long["laplace"]  # outside-span's Laplace Gaussian: more to learn
    assert iterations([], "laplace", None) == long["laplace"]
    assert iterations(["--iterations", "2500"], "laplace", 0.999) == 2500
    assert iterations([], "prior", 0.999) == long["prior"]


def test_mass_coordinates_are_the_ridge_default_and_bring_their_own_prior_defaults():
    """With a free density the flows work in mass coordinates, where from the prior the scripts' "mass" defaults
    hold (annealed over flow.ANNEAL_FROM_PRIOR_MASS); --coordinates box restores the box's prior defaults; the
    Laplace start keeps its own; with the density known, or from an amortized model, mass coordinates are refused."""
    import forward
    import Gravity_coupling_NSF
    import Gravity_invertible_Affine
    from gravity_flows.command import flow

    ridge, known = forward.synthetic_problem(density_bounds=(1000, 4000)), forward.synthetic_problem()

    def resolved(script, argv, problem, init):
        args = flow.resolve_coordinates(script.build_parser().parse_args(argv), problem)
        return flow.resolve_defaults(args, init)

    spline = resolved(Gravity_coupling_NSF, [], ridge, "prior")
    assert (spline.coordinates, spline.iterations, spline.flows, spline.clip_norm, spline.anneal) == \
        ("mass", 1500, 3, None, flow.ANNEAL_FROM_PRIOR_MASS)
    glow = resolved(Gravity_invertible_Affine, [], ridge, "prior")
    assert (glow.iterations, glow.flows) == (1500, 4)
    boxed = resolved(Gravity_coupling_NSF, ["--coordinates", "box"], ridge, "prior")
    assert (boxed.coordinates, boxed.iterations, boxed.flows, boxed.clip_norm, boxed.anneal) == \
        ("box", 4000, 5, 10.0, flow.ANNEAL_FROM_PRIOR)
    laplace = resolved(Gravity_coupling_NSF, [], ridge, "laplace")
    assert (laplace.coordinates, laplace.iterations, laplace.flows, laplace.anneal) == ("mass", 2000, 3, 0.0)
    default = resolved(Gravity_coupling_NSF, ["--anneal", "0.5", "--iterations", "900"], known, "prior")
    assert (default.coordinates, default.iterations, default.flows, default.anneal) == ("box", 900, 5, 0.5)
    with pytest.raises(forward.DataError, match="--coordinates mass needs a free density"):
        resolved(Gravity_coupling_NSF, ["--coordinates", "mass"], known, "prior")
    amortized = Gravity_coupling_NSF.build_parser().parse_args(["--init", "amortized", "--coordinates", "mass"])
    with pytest.raises(forward.DataError, match="drop --coordinates mass"):
        flow.resolve_coordinates(amortized, ridge)
    assert flow.resolve_coordinates(Gravity_coupling_NSF.build_parser().parse_args(["--init", "amortized"]),
                                    ridge).coordinates == "box"
