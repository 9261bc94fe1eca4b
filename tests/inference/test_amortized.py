"""Amortized posteriors (inference/amortized.py, inference/model_file.py): the simulator draws from the
prior with the noise it says; an amortized flow on a linear-Gaussian conditional problem recovers the
closed-form posterior for every observation, with uniform SBC ranks; the model file round trip gives
the same draws; the corrected posterior's bookkeeping."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import forward
from gravity_flows.flows.layers import AffineCoupling, coupling_mask
from gravity_flows.inference import amortized, correction, model_file
from gravity_flows.scoring.reference import compute_reference, score


def small_survey(n_stations=40, free_density=False, noise=None):
    stations = np.linspace(-20.0, 20.0, n_stations)
    noise_sd = np.linspace(0.5, 2.0, n_stations) if noise is None else noise
    box, parameters = forward.prior_box(forward.DEFAULT_BOUNDS, (1000.0, 4000.0) if free_density else None)
    return forward.Problem(stations=stations, g_obs=np.zeros(n_stations), noise_sd=noise_sd, bounds=box,
                           parameters=parameters)


@pytest.mark.parametrize("free_density", [False, True])
def test_the_simulator_draws_from_the_prior_box_with_the_noise_of_every_station(free_density):
    survey = small_survey(free_density=free_density)
    simulator = amortized.Simulator(survey)
    theta, data = simulator(4000, torch.Generator().manual_seed(0))
    theta, data = theta.numpy(), data.numpy()
    assert theta.shape == (4000, survey.dim) and data.shape == (4000, survey.n_stations)
    for i, (low, high) in enumerate(survey.bounds):
        assert low < theta[:, i].min() and theta[:, i].max() < high
        assert stats.kstest(theta[:, i], stats.uniform(low, high - low).cdf).pvalue > 1e-3
    residual = (data - survey.predict(theta)) / survey.noise_sd_array  # the density column is read when free
    assert abs(residual.mean()) < 0.01
    per_station_sd = residual.std(axis=0)
    assert np.all(np.abs(per_station_sd - 1) < 0.08), "each station's noise must be its own sigma"
    assert stats.kstest(residual.ravel()[:20000], "norm").pvalue > 1e-3
    # the same generator state gives the same simulations; the stream is the generator's alone
    again = simulator(4000, torch.Generator().manual_seed(0))[1].numpy()
    assert np.array_equal(again, data)


def test_simulated_test_profiles_come_from_their_own_stream():
    survey = small_survey()
    first, second = amortized.simulated_profiles(survey, 3, seed=5), amortized.simulated_profiles(survey, 3, seed=5)
    assert all(np.array_equal(a.g_obs, b.g_obs) and np.array_equal(a.truth, b.truth) for a, b in zip(first, second))
    other = amortized.simulated_profiles(survey, 3, seed=6)
    assert not np.array_equal(first[0].truth, other[0].truth)
    assert all(survey.inside(p.truth) for p in first)


# -- a conditional problem whose posterior is known in closed form -----------------------------------

#: Linear-Gaussian: d = A theta + sigma eps, theta uniform on a box; for truths in the middle third of
#: the box (at least 4 posterior sd from its bounds) the posterior is the Gaussian N(mu(d), Sigma) of
#: the closed form, Sigma = sigma^2 (A^T A)^-1, mu = Sigma A^T d / sigma^2 (a truncation of < 1e-4).
LG_DIM, LG_OBSERVATIONS, LG_SIGMA, LG_HALF_WIDTH = 2, 5, 0.5, 2.5


class LinearGaussian:
    def __init__(self):
        rng = np.random.default_rng(3)
        self.design = torch.as_tensor(rng.normal(size=(LG_OBSERVATIONS, LG_DIM)))
        self.covariance = LG_SIGMA**2 * torch.linalg.inv(self.design.T @ self.design)
        self.bounds = np.array([[-LG_HALF_WIDTH, LG_HALF_WIDTH]] * LG_DIM)

    def __call__(self, n, generator):
        theta = (2 * torch.rand(n, LG_DIM, generator=generator, dtype=torch.float64) - 1) * LG_HALF_WIDTH
        return theta, self.observe(theta, generator)

    def observe(self, theta, generator):
        return theta @ self.design.T + LG_SIGMA * torch.randn(len(theta), LG_OBSERVATIONS, generator=generator,
                                                               dtype=torch.float64)

    def log_likelihood(self, data):
        return lambda theta: -0.5 * ((data - theta @ self.design.T) ** 2).sum(-1) / LG_SIGMA**2

    def posterior_mean(self, data):
        return data @ self.design @ self.covariance / LG_SIGMA**2


@pytest.fixture(scope="module")
def linear_gaussian_flow():
    problem = LinearGaussian()
    torch.manual_seed(0)
    layers = [AffineCoupling(LG_DIM, coupling_mask(LG_DIM, k), hidden=16, context=16) for k in range(2)]
    model = amortized.AmortizedPosterior(layers, problem.bounds, np.full(LG_OBSERVATIONS, LG_SIGMA), context=16,
                                         summary_hidden=32).double()
    amortized.train_amortized(model, problem, iterations=2000, simulations=128, lr=1e-2,
                              generator=torch.Generator().manual_seed(1), progress=False)
    return problem, model


def moments(draws):
    covariance = np.cov(np.asarray(draws).T)
    sd = np.sqrt(np.diag(covariance))
    return np.asarray(draws).mean(0), sd, covariance[0, 1] / (sd[0] * sd[1])


def test_an_amortized_flow_recovers_the_closed_form_posterior_of_every_observation(linear_gaussian_flow):
    """Twelve observations of truths in the middle of the box. The flow alone, from 2000 steps: means
    within 0.5 posterior sd on average (1.2 at worst: its location is a learnt function of d, fitted
    to about 1 % of the box), sds within 15 %, correlations within 0.1. Corrected by importance weights
    with the exact likelihood (the application's :func:`correction.corrected_posterior`): means within
    0.08 sd, sds within 6 %, correlations within 0.04 (Monte Carlo error of 4000 effective draws:
    0.016 sd in the mean, 1.1 % in the sd)."""
    problem, model = linear_gaussian_flow
    generator = torch.Generator().manual_seed(7)
    truths = (2 * torch.rand(12, LG_DIM, generator=generator, dtype=torch.float64) - 1) * LG_HALF_WIDTH / 3
    data = problem.observe(truths, generator)
    sd = problem.covariance.diagonal().sqrt().numpy()
    correlation = float(problem.covariance[0, 1]) / (sd[0] * sd[1])
    offsets = []
    for observation in data:
        exact_mean = problem.posterior_mean(observation).numpy()
        corrected, alone, report = correction.corrected_posterior(
            model, observation, problem.log_likelihood(observation), 0.0, 8000,
            generator=torch.Generator().manual_seed(9), rng=np.random.default_rng(9), first_draws=8000)
        mean, draws_sd, draws_correlation = moments(alone)
        offsets.append(np.abs(mean - exact_mean) / sd)
        assert np.all(np.abs(draws_sd / sd - 1) < 0.15) and abs(draws_correlation - correlation) < 0.1
        mean, draws_sd, draws_correlation = moments(corrected)
        assert np.all(np.abs(mean - exact_mean) < 0.08 * sd)
        assert np.all(np.abs(draws_sd / sd - 1) < 0.06) and abs(draws_correlation - correlation) < 0.04
    assert np.mean(offsets) < 0.5 and np.max(offsets) < 1.2


def test_an_amortized_flow_has_uniform_sbc_ranks(linear_gaussian_flow):
    """Talts et al. (2018): for theta ~ prior and d ~ p(d | theta), the rank of theta among L draws of
    q(. | d) is uniform on 0..L when q is the posterior. 300 simulations, 19 draws each, 5 bins: a
    chi-square test at p > 0.001; the same ranks of a q 30 % too narrow fail it."""
    problem, model = linear_gaussian_flow
    truths, data = problem(300, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(12)
    ranks, narrow = [], []
    with torch.no_grad():
        for truth, context in zip(truths, model.context(data)):
            draws, _ = model.sample(19, context[None], generator)
            ranks.append((draws < truth).sum(0).numpy())
            centre = model.sample(200, context[None], generator)[0].mean(0)
            narrow.append(((centre + 0.7 * (draws - centre)) < truth).sum(0).numpy())
    uniform = [stats.chisquare(np.bincount(np.array(ranks)[:, i] // 4, minlength=5)).pvalue for i in range(LG_DIM)]
    too_narrow = [stats.chisquare(np.bincount(np.array(narrow)[:, i] // 4, minlength=5)).pvalue for i in range(LG_DIM)]
    assert min(uniform) > 1e-3, uniform
    assert min(too_narrow) < 1e-3, too_narrow


def test_log_prob_is_the_density_of_the_draws(linear_gaussian_flow):
    """log q from sample() and from log_prob() at the same points agree, and q integrates to 1 on the box."""
    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(13))
    with torch.no_grad():
        context = model.context(data[0])
        draws, log_q = model.sample(500, context, torch.Generator().manual_seed(14))
        torch.testing.assert_close(model.log_prob(draws, context), log_q, atol=1e-9, rtol=1e-9)
        # importance estimate of the integral of q over the box with a uniform proposal near the posterior
        centre = draws.mean(0)
        half = 8 * draws.std(0)
        points = centre + half * (2 * torch.rand(200_000, LG_DIM, generator=torch.Generator().manual_seed(15),
                                                 dtype=torch.float64) - 1)
        inside = (points.abs() < LG_HALF_WIDTH).all(-1)  # q is zero outside the box
        integral = model.log_prob(points[inside], context).exp().sum() / len(points) * torch.prod(2 * half)
    assert abs(float(integral) - 1) < 0.02


# -- the model file -----------------------------------------------------------------------------------


def build_layers(args, dim, context=0):
    return [AffineCoupling(dim, coupling_mask(dim, k), hidden=args.hidden, context=context) for k in range(args.flows)]


OPTIONS = {"flows": 2, "hidden": 8, "context": 8, "summary_hidden": 16, "summary_layers": 2}


def test_a_model_file_round_trip_gives_the_same_draws_for_the_same_seed(tmp_path):
    survey = small_survey()
    model = amortized.build_model(build_layers, OPTIONS, survey, seed=3).float()
    amortized.train_amortized(model, amortized.Simulator(survey, dtype=torch.float32), iterations=5, simulations=16,
                              lr=1e-2, generator=torch.Generator().manual_seed(0), progress=False)
    record = model_file.model_record(model, method="test", flow=OPTIONS, survey=survey, training={"iterations": 5},
                                     versions={"torch": torch.__version__})
    torch.save(record, tmp_path / "model.pt")
    loaded_record = model_file.read_model(tmp_path / "model.pt")
    rebuilt_survey = model_file.survey_from_record(loaded_record)
    assert np.array_equal(rebuilt_survey.stations, survey.stations)
    assert np.array_equal(rebuilt_survey.noise_sd_array, survey.noise_sd_array)
    assert np.array_equal(rebuilt_survey.bounds, survey.bounds) and rebuilt_survey.parameters == survey.parameters
    loaded = amortized.build_model(build_layers, loaded_record["flow"], rebuilt_survey, seed=99)
    loaded.load_state_dict(loaded_record["state_dict"])
    profile = amortized.simulated_profiles(survey, 1, seed=0)[0]
    draws = []
    for network in (model.double(), loaded):
        with torch.no_grad():
            draws.append(network.sample(100, network.context(profile.g_obs), torch.Generator().manual_seed(4))[0])
    assert torch.equal(draws[0], draws[1])


def test_compiled_amortized_training_is_the_uncompiled_one_to_rounding():
    """``train_amortized(compile=True)`` with torch's real compiler (inductor): the same losses as uncompiled,
    float32 rounding apart, for a context per simulation. Before the context's unit-lower factor was written
    into zeros (``AmortizedPosterior.affine``), inductor wrote it into an expanded identity as if every row
    were one: log q was off by up to 10 nats and the compiled model trained to a worse posterior."""
    survey = small_survey(free_density=True)

    def train(compile):
        model = amortized.build_model(build_layers, OPTIONS, survey, seed=3).float()
        torch._dynamo.reset()
        history, _, _, compiled = amortized.train_amortized(
            model, amortized.Simulator(survey, dtype=torch.float32), iterations=20, simulations=32, lr=1e-2,
            generator=torch.Generator().manual_seed(0), progress=False, compile=compile)
        return history, compiled

    eager, _ = train(False)
    compiled_history, compiled = train(True)
    torch._dynamo.reset()
    if not compiled:
        pytest.skip("torch.compile cannot compile here (no C++ compiler)")
    np.testing.assert_allclose(compiled_history, eager, rtol=2e-4)


def test_a_model_file_refuses_what_it_was_not_made_for(tmp_path):
    survey = small_survey()
    model = amortized.build_model(build_layers, OPTIONS, survey, seed=3)
    record = model_file.model_record(model, method="coupling_NSF", flow=OPTIONS, survey=survey, training={},
                                     versions={})
    path = tmp_path / "model.pt"
    torch.save(record, path)
    record = model_file.read_model(path)
    with pytest.raises(forward.DataError, match="a model of Gravity_coupling_NSF.py, not of Gravity_planar.py"):
        model_file.check_method(record, "planar", path)
    bounds = np.array(forward.DEFAULT_BOUNDS)
    model_file.check_prior(record, bounds, forward.DEFAULT_DENSITY, None, path)  # the model's own prior passes
    with pytest.raises(forward.DataError, match="--bounds .* differ from the model's prior box"):
        model_file.check_prior(record, bounds + [[0, 1], [0, 0], [0, 0]], forward.DEFAULT_DENSITY, None, path)
    with pytest.raises(forward.DataError, match="--density 3000 differs from the model's 2500"):
        model_file.check_prior(record, bounds, 3000.0, None, path)
    with pytest.raises(forward.DataError, match="trained with the density known"):
        model_file.check_prior(record, bounds, forward.DEFAULT_DENSITY, (1000.0, 4000.0), path)
    profile = amortized.simulated_profiles(survey, 1, seed=0)[0]
    model_file.check_profile(record, profile, path, "a.csv")
    moved = forward.Problem(stations=survey.stations + 0.01, g_obs=profile.g_obs, noise_sd=survey.noise_sd)
    with pytest.raises(forward.DataError, match="a.csv: station 1 lies at x = -19.99 m"):
        model_file.check_profile(record, moved, path, "a.csv")
    fewer = forward.Problem(stations=survey.stations[:-1], g_obs=profile.g_obs[:-1], noise_sd=1.0)
    with pytest.raises(forward.DataError, match="has 39 stations, the model .* was trained on 40"):
        model_file.check_profile(record, fewer, path, "a.csv")
    noisier = forward.Problem(stations=survey.stations, g_obs=profile.g_obs, noise_sd=survey.noise_sd * 1.01)
    with pytest.raises(forward.DataError, match="the noise sd at station 1 is 0.505 µGal, the model .* 0.5 µGal"):
        model_file.check_profile(record, noisier, path, "a.csv")

    (tmp_path / "text.pt").write_text("x,g\n1,2\n")
    with pytest.raises(forward.DataError, match="is not a model file of gravity-flows, or it is truncated"):
        model_file.read_model(tmp_path / "text.pt")
    (tmp_path / "half.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(forward.DataError, match="is not a model file of gravity-flows, or it is truncated"):
        model_file.read_model(tmp_path / "half.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(forward.DataError, match="is not a model file of gravity-flows"):
        model_file.read_model(tmp_path / "other.pt")
    with pytest.raises(forward.DataError, match="model file not found"):
        model_file.read_model(tmp_path / "missing.pt")


# -- the corrected posterior --------------------------------------------------------------------------


def test_a_corrected_posterior_is_trustworthy_only_with_a_small_k_hat_and_enough_effective_draws(monkeypatch):
    """An untrained model of the gravity survey: its draws are far from any posterior, so the weights
    are degenerate, k-hat is large and the ESS target is missed: flagged, with the remedy named; the
    draws stop at the cap. (Without the adapted proposal: the flow's own draws only.)"""
    survey = small_survey()
    model = amortized.build_model(build_layers, OPTIONS, survey, seed=3)
    profile = amortized.simulated_profiles(survey, 1, seed=1)[0]
    theta, q_draws, report = correction.corrected_profile_posterior(
        model, profile, 500, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0),
        first_draws=1000, max_draws=4000, adapt=False)
    assert theta.shape == (500, 3) and q_draws.shape == (500, 3)
    assert report["draws"] == 4000 and not report["trustworthy"]
    assert "outside what the network learned" in report["warning"] and "per-profile fit" in report["warning"]
    assert report["ess"] < report["ess_target"] == 500
    assert np.all(profile.inside(theta))


@pytest.mark.parametrize("free_density, space", [(False, "u"), (True, "log coordinates")])
def test_a_gravity_profile_the_flow_misses_starts_from_its_laplace_fit(free_density, space):
    """An untrained model of the gravity survey finds nothing of a strong anomaly's posterior. The
    profile's Laplace fit joins the first round: as a t in u with the density known (it describes a
    peak), in the log coordinates on the mass ridge (density free: no peak, but a straight line there);
    either way the corrected draws are trustworthy and agree with the exact reference."""
    survey = small_survey(free_density=free_density)
    model = amortized.build_model(build_layers, OPTIONS, survey, seed=3)
    truth = np.array([3.0, 6.0, 2.0] + ([2500.0] if free_density else []))
    profile = forward.Problem(stations=survey.stations, g_obs=survey.predict(truth), noise_sd=survey.noise_sd,
                              bounds=survey.bounds, parameters=survey.parameters)
    theta, _, report = correction.corrected_profile_posterior(
        model, profile, 500, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0),
        max_draws=16384)
    assert report["vi_is_ess"] * correction.FIRST_DRAWS < survey.dim * (survey.dim + 3)
    assert f"t in {space} at the Laplace fit" in report["proposal"] and report["trustworthy"], report
    reference = compute_reference(profile, forward.laplace_approximation(profile))
    assert score(theta, reference)["error"] < 0.15


@pytest.mark.parametrize("truth, near, limit", [((5.0, 1.0, 5.0), 1e-4, 0.1), ((3.0, 6.0, 2.0), 1e-3, 1e-3)])
def test_the_likelihood_in_the_corrections_precision_rounds_the_log_weights_by_little(truth, near, limit):
    """The correction weighs in ``correction.PRECISION`` (float32). At the same theta, the float32 log-likelihood
    of the default survey differs from the float64 one by an sd below ``limit`` nats over draws near the posterior:
    0.1 for the strongest anomaly of the default box (an 8700 µGal peak at sigma 1; measured 0.02), 1e-3 for
    a moderate one (measured 1e-4). A form that cancels, such as sum d^2 - 2 d g + g^2, misses by nats."""
    assert correction.PRECISION == torch.float32
    problem = forward.synthetic_problem(truth=truth)
    theta = torch.as_tensor(truth) + near * torch.randn(2048, 3, generator=torch.Generator().manual_seed(0),
                                                        dtype=torch.float64)
    theta = theta.to(correction.PRECISION)
    exact = forward.TorchLikelihood(problem).double()(theta.double())
    rounded = forward.TorchLikelihood(problem).to(correction.PRECISION)(theta).double()
    assert float((rounded - exact).std()) < limit
    assert float(exact.std()) > 10 * limit  # the draws' log weights spread far more than their rounding


def test_the_adapted_proposal_weights_use_its_exact_density(linear_gaussian_flow):
    """log r of the adapted proposal's draws, recomputed independently: r(theta) = b(eps) q(theta) / N(eps)
    with b = a N(0, I) + (1 - a) t by scipy, q by the flow's inverse (log_prob), eps by that inverse too;
    the first round(a n) base points are the flow's own, the rest the t's."""
    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(21))
    with torch.no_grad():
        context = model.context(data[0])
    location, scale_tril = np.array([0.3, -0.2]), np.array([[0.4, 0.0], [0.1, 0.3]])
    proposal = correction.AdaptedProposal(model, context, lambda theta: theta.new_zeros(len(theta)), 0.0, location,
                                          scale_tril)
    record = proposal.draw_record(3000, torch.Generator().manual_seed(22))
    theta, log_weights, eps = record["theta"], record["log_joint"] - record["log_r"], record["eps"]
    assert np.all(np.abs(theta) < LG_HALF_WIDTH)
    with torch.no_grad():
        log_q = model.log_prob(torch.as_tensor(theta), context).numpy()
    t = stats.multivariate_t(loc=location, shape=scale_tril @ scale_tril.T, df=correction.T_DEGREES)
    normal = stats.multivariate_normal(np.zeros(2), np.eye(2))
    share = correction.DEFENSIVE_SHARE
    log_base = np.logaddexp(np.log(share) + normal.logpdf(eps), np.log1p(-share) + t.logpdf(eps))
    np.testing.assert_allclose(-log_weights, log_base + log_q - normal.logpdf(eps), rtol=1e-8, atol=1e-8)
    n_flow = int(round(share * 3000))
    assert np.allclose(np.median(eps[n_flow:], axis=0), location, atol=0.05)
    assert np.allclose(np.median(eps[:n_flow], axis=0), 0, atol=0.15)


def test_an_adapted_proposal_rescues_a_flow_that_covers_the_posterior_too_widely(linear_gaussian_flow):
    """A flow of the LG problem applied to data far sharper than it learned (the likelihood of 100
    times more observations): its own draws give a small ESS; the adapted proposal reaches the target
    with a small k-hat, and the corrected mean is the closed form's."""
    problem, model = linear_gaussian_flow
    truth = torch.tensor([[0.4, -0.3]], dtype=torch.float64)
    repeats = 100
    generator = torch.Generator().manual_seed(23)
    data = torch.stack([problem.observe(truth, generator)[0] for _ in range(repeats)])
    mean_data = data.mean(0)

    def log_likelihood(theta):
        return repeats * problem.log_likelihood(mean_data)(theta)  # up to a constant in theta

    exact_mean = problem.posterior_mean(mean_data).numpy()
    exact_sd = (problem.covariance.diagonal() / repeats).sqrt().numpy()
    plain = correction.corrected_posterior(model, mean_data, log_likelihood, 0.0, 4000, generator=torch.Generator().manual_seed(24),
                                          rng=np.random.default_rng(0), max_draws=8192, adapt=False)[2]
    theta, _, report = correction.corrected_posterior(model, mean_data, log_likelihood, 0.0, 4000,
                                                     generator=torch.Generator().manual_seed(24),
                                                     rng=np.random.default_rng(0), max_draws=8192)
    assert plain["ess"] < 0.25 * report["ess"]
    assert report["proposal"].startswith("flow + t") and report["trustworthy"], report
    assert np.all(np.abs(theta.mean(0) - exact_mean) < 0.1 * exact_sd)


class ScaledCoordinates(torch.nn.Module):
    """theta = shift + scale * phi: a bijection for ``pool_coordinates`` (as ``LogCoordinates`` on the ridge)."""

    name = "scaled coordinates"

    def __init__(self, shift, scale):
        super().__init__()
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float64))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float64))

    def forward(self, phi):
        return self.shift + self.scale * phi, torch.log(self.scale).sum().expand(phi.shape[0])

    def inverse(self, theta):
        return (theta - self.shift) / self.scale, -torch.log(self.scale).sum().expand(theta.shape[0])


def test_a_t_fitted_to_the_pool_in_given_coordinates_joins_where_the_flow_found_enough(linear_gaussian_flow):
    """``pool_coordinates`` (the ridge's log coordinates in a gravity profile): where the flow's own draws
    found enough of data 100 times sharper than it learned, a t fitted to the pool in those coordinates
    is tried beside the base-space t. The posterior is Gaussian in theta, so in (scaled) theta the t fits
    it best and is chosen; the corrected mean and sds are the closed form's (a t placed in the wrong
    coordinates, or weighed without their Jacobian, is not)."""
    problem, model = linear_gaussian_flow
    truth = torch.tensor([[0.4, -0.3]], dtype=torch.float64)
    repeats = 100
    generator = torch.Generator().manual_seed(23)
    mean_data = torch.stack([problem.observe(truth, generator)[0] for _ in range(repeats)]).mean(0)

    def log_likelihood(theta):
        return repeats * problem.log_likelihood(mean_data)(theta)

    exact_mean = problem.posterior_mean(mean_data).numpy()
    exact_sd = (problem.covariance.diagonal() / repeats).sqrt().numpy()
    theta, _, report = correction.corrected_posterior(
        model, mean_data, log_likelihood, 0.0, 4000, generator=torch.Generator().manual_seed(24),
        rng=np.random.default_rng(0), pool_coordinates=ScaledCoordinates([0.1, -0.2], [2.0, 0.5]))
    assert report["vi_is_ess"] * correction.FIRST_DRAWS >= LG_DIM * (LG_DIM + 3)  # the flow found enough
    assert report["proposal"].startswith("flow + t in scaled coordinates") and report["trustworthy"], report
    assert np.all(np.abs(theta.mean(0) - exact_mean) < 0.1 * exact_sd)
    assert np.all(np.abs(theta.std(0) / exact_sd - 1) < 0.1)


def test_log_coordinates_invert_and_their_log_determinant_is_the_autograd_jacobians():
    """phi = (x0, log z, log|drho|) with a negative density box: theta(phi(theta)) = theta, and
    log|dtheta/dphi| equals the log-determinant of the autograd Jacobian, the inverse's its negative."""
    coordinates = correction.LogCoordinates([False, True, True], [1.0, 1.0, -1.0])
    theta = torch.tensor([[3.0, 6.0, -1500.0], [-2.0, 0.7, -2.5]], dtype=torch.float64)
    phi, log_dphi_dtheta = coordinates.inverse(theta)
    back, log_dtheta_dphi = coordinates(phi)
    torch.testing.assert_close(back, theta)
    torch.testing.assert_close(log_dphi_dtheta, -log_dtheta_dphi)
    for row in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda v: coordinates(v[None])[0][0], phi[row])
        torch.testing.assert_close(log_dtheta_dphi[row], torch.linalg.slogdet(jacobian)[1])


def test_a_t_in_other_coordinates_weighs_by_its_exact_density_and_gives_nothing_outside_the_box(linear_gaussian_flow):
    """The mixture a q + (1 - a) t(v) |dv/dtheta| with its t in coordinates v other than u (here v = theta
    itself on the linear-Gaussian box, so that a wide t puts draws outside it): log r recomputed by scipy
    and the flow's inverse inside the box, and the draws outside have log p = -inf (weight 0)."""
    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(34))
    with torch.no_grad():
        context = model.context(data[0])
    location, scale_tril = np.array([0.5, -0.5]), np.array([[1.5, 0.0], [0.3, 1.2]])
    proposal = correction.UnconstrainedProposal(model, context, problem.log_likelihood(data[0]), 0.0, location,
                                                scale_tril, coordinates=correction.LogCoordinates([False, False], [1.0, 1.0]))  # v = theta
    record = proposal.draw_record(3000, torch.Generator().manual_seed(35))
    theta = torch.as_tensor(record["theta"])
    inside = np.all(np.abs(record["theta"]) <= LG_HALF_WIDTH, axis=1)
    assert 0.05 < 1 - inside.mean() < 0.6
    assert np.all(record["log_joint"][~inside] == -np.inf) and np.all(np.isfinite(record["log_joint"][inside]))
    with torch.no_grad():
        log_q = model.log_prob(theta[inside], context).numpy()
    t = stats.multivariate_t(loc=location, shape=scale_tril @ scale_tril.T, df=correction.T_DEGREES)
    share = correction.DEFENSIVE_SHARE
    expected = np.logaddexp(np.log(share) + log_q, np.log1p(-share) + t.logpdf(record["theta"][inside]))
    np.testing.assert_allclose(record["log_r"][inside], expected, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(proposal.log_density(record)[inside], expected, rtol=1e-8, atol=1e-8)


def test_a_flow_draw_rounded_onto_the_box_edge_keeps_its_flow_density_under_a_t_in_u(linear_gaussian_flow):
    """A base point far out (eps = 60) maps onto the box's bound in floating point (u infinite): the t in u
    has density 0 there and |du/dtheta| is infinite, so the mixture's density is the flow's share alone,
    a q(theta) — finite, so the draw's deterministic-mixture weight stays finite (not NaN)."""
    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(33))
    with torch.no_grad():
        context = model.context(data[0])
        eps = torch.tensor([[60.0, 0.0], [0.1, -0.2]], dtype=torch.float64)
        theta, log_det = model.push(eps, context)
    assert theta[0, 0] == LG_HALF_WIDTH and torch.isinf(model.box.inverse(theta)[0][0, 0])
    proposal = correction.UnconstrainedProposal(model, context, problem.log_likelihood(data[0]), 0.0,
                                                np.zeros(2), 0.5 * np.eye(2))
    record = {"theta": theta.numpy(), "eps": eps.numpy(), "log_det": log_det.numpy()}
    log_r = proposal.log_density(record)
    log_q = (amortized.standard_normal_log_density(eps) - log_det).numpy()
    assert np.all(np.isfinite(log_r))
    np.testing.assert_allclose(log_r[0], np.log(correction.DEFENSIVE_SHARE) + log_q[0], rtol=1e-12)
    assert log_r[1] > np.log(correction.DEFENSIVE_SHARE) + log_q[1]


def test_a_gaussian_in_u_rescues_a_profile_the_flow_found_too_little_of(linear_gaussian_flow):
    """Data 10000 times sharper than the flow learned: its own 8192 draws hold fewer than dim (dim + 3)
    effective draws, and the proposals adapted from them alone are not to be trusted (the rule of
    :func:`correction.corrected_posterior`). Given the posterior's Gaussian in u (here the closed form's,
    by the delta method; a gravity profile's Laplace fit), its t joins the first round: the corrected
    draws are trustworthy, the mean within 0.1 posterior sd of the closed form and the sds within 10 %."""
    problem, model = linear_gaussian_flow
    truth = torch.tensor([[0.4, -0.3]], dtype=torch.float64)
    repeats = 10_000
    generator = torch.Generator().manual_seed(29)
    mean_data = torch.stack([problem.observe(truth, generator)[0] for _ in range(1000)]).mean(0)
    covariance = (problem.covariance / repeats).numpy()

    def log_likelihood(theta):
        return repeats * problem.log_likelihood(mean_data)(theta)

    exact_mean = problem.posterior_mean(mean_data).numpy()
    fraction = (exact_mean + LG_HALF_WIDTH) / (2 * LG_HALF_WIDTH)
    du_dtheta = 1 / (2 * LG_HALF_WIDTH * fraction * (1 - fraction))

    def gaussian_in_u(theta, log_joint):
        return np.log(fraction / (1 - fraction)), covariance * np.outer(du_dtheta, du_dtheta), None

    runs = {}
    for name, gaussian in (("alone", None), ("with the Gaussian", gaussian_in_u)):
        runs[name] = correction.corrected_posterior(model, mean_data, log_likelihood, 0.0, 4000,
                                                    generator=torch.Generator().manual_seed(30),
                                                    rng=np.random.default_rng(1), gaussian_fit=gaussian)
    assert runs["alone"][2]["vi_is_ess"] * correction.FIRST_DRAWS < LG_DIM * (LG_DIM + 3)
    assert not runs["alone"][2]["trustworthy"]
    theta, _, report = runs["with the Gaussian"]
    assert report["trustworthy"] and "Laplace" in report["proposal"], report
    sd = np.sqrt(np.diag(covariance))
    assert np.all(np.abs(theta.mean(0) - exact_mean) < 0.1 * sd)
    assert np.all(np.abs(theta.std(0) / sd - 1) < 0.1)


def test_a_conditioned_posterior_is_a_flow_posterior_that_vi_can_refine(linear_gaussian_flow):
    """The amortized q of one observation, context fixed, trained further by the per-profile ELBO
    (``vi.train``, as ``--init amortized`` will): same draws as the conditional flow before, a
    gradient for its flow and its correction but none for its summary network or the context's affine
    head, and no lower an ELBO after 100 steps."""
    import copy

    from gravity_flows.inference import vi

    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(31))
    conditioned = amortized.ConditionedPosterior(copy.deepcopy(model), data[0])
    with torch.no_grad():
        expected = model.sample(50, model.context(data[0]), torch.Generator().manual_seed(1))[0]
        torch.testing.assert_close(conditioned.sample(50, torch.Generator().manual_seed(1))[0], expected)
    log_likelihood = problem.log_likelihood(data[0])
    log_prior = -LG_DIM * math.log(2 * LG_HALF_WIDTH)
    before = vi.evaluate(conditioned, log_likelihood, log_prior, 4000, torch.Generator().manual_seed(2))[1].mean()
    frozen = [*conditioned.posterior.summary.parameters(), *conditioned.posterior.location_scale.parameters()]
    frozen_before = [p.clone() for p in frozen]
    layers_before = [p.clone() for p in conditioned.posterior.flow.parameters()]
    vi.train(conditioned, log_likelihood, log_prior, iterations=100, batch=64, lr=1e-3,
             generator=torch.Generator().manual_seed(3), progress=False)
    after = vi.evaluate(conditioned, log_likelihood, log_prior, 4000, torch.Generator().manual_seed(2))[1].mean()
    assert after > before - 0.01
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, frozen))
    assert not all(torch.equal(a, b) for a, b in zip(layers_before, conditioned.posterior.flow.parameters()))
    assert not torch.equal(conditioned.loc, torch.zeros_like(conditioned.loc))


def test_a_conditioned_posterior_with_its_correction_has_the_exact_log_density(linear_gaussian_flow):
    """ConditionedPosterior's affine correction (a, A) moved off the identity: log q of its draws is
    log N(eps) - log|det dtheta/deps| with the Jacobian by autograd, and its draws are the amortized
    flow's own at a = 0, A = I."""
    import copy

    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(32))
    conditioned = amortized.ConditionedPosterior(copy.deepcopy(model), data[0])
    with torch.no_grad():
        expected = model.sample(20, model.context(data[0]), torch.Generator().manual_seed(4))
        got = conditioned.sample(20, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        for parameter, scale in ((conditioned.loc, 0.3), (conditioned.raw_diagonal, 0.5), (conditioned.raw_lower, 0.4)):
            parameter.copy_(scale * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))
    eps = torch.randn(6, conditioned.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    theta, log_q = conditioned.sample(6, torch.Generator().manual_seed(6))
    for row in range(6):
        jacobian = torch.autograd.functional.jacobian(lambda e: conditioned.push(e[None])[0][0], eps[row])
        expected_log_q = amortized.standard_normal_log_density(eps[row:row + 1])[0] - torch.linalg.slogdet(jacobian)[1]
        torch.testing.assert_close(log_q[row], expected_log_q, atol=1e-9, rtol=1e-9)
    assert not torch.allclose(theta, conditioned.posterior.sample(6, conditioned.context, torch.Generator().manual_seed(6))[0])


def test_the_unconstrained_proposal_weights_use_its_exact_density(linear_gaussian_flow):
    """log r of the mixture with its t in u, recomputed independently: a q(theta) + (1 - a) t(u) |du/dtheta|,
    q by the flow's inverse, t by scipy; the base points it returns are the flow's inverse of its draws."""
    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(25))
    with torch.no_grad():
        context = model.context(data[0])
    location, scale_tril = np.array([0.2, -0.1]), np.array([[0.3, 0.0], [0.05, 0.2]])
    proposal = correction.UnconstrainedProposal(model, context, lambda theta: theta.new_zeros(len(theta)), 0.0,
                                                location, scale_tril)
    record = proposal.draw_record(3000, torch.Generator().manual_seed(26))
    theta, log_weights, eps = record["theta"], record["log_joint"] - record["log_r"], record["eps"]
    theta_t = torch.as_tensor(theta)
    with torch.no_grad():
        log_q = model.log_prob(theta_t, context).numpy()
        u, log_du_dtheta = model.box.inverse(theta_t)
        pulled, _ = model.pull(theta_t, context)
    t = stats.multivariate_t(loc=location, shape=scale_tril @ scale_tril.T, df=correction.T_DEGREES)
    share = correction.DEFENSIVE_SHARE
    expected = np.logaddexp(np.log(share) + log_q, np.log1p(-share) + t.logpdf(u.numpy()) + log_du_dtheta.numpy())
    np.testing.assert_allclose(-log_weights, expected, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(eps, pulled.numpy(), atol=1e-8)
    n_flow = int(round(share * 3000))
    assert np.allclose(np.median(u.numpy()[n_flow:], axis=0), location, atol=0.05)


def test_the_pool_weighs_every_draw_by_the_mixture_of_every_proposal(linear_gaussian_flow):
    """The deterministic-mixture weights of a pool of three rounds (the flow's own 2000, an adapted t in the
    base space 1000, a t in u 500, and 1000 more of the first t), recomputed independently: log w =
    log p - log sum_j (n_j / N) r_j with each r_j by scipy and the flow's inverse, at every draw of every
    round. A round counted against the wrong proposal, or the shares left out, moves them by nats."""
    problem, model = linear_gaussian_flow
    _, data = problem(1, torch.Generator().manual_seed(27))
    with torch.no_grad():
        context = model.context(data[0])
    log_likelihood = problem.log_likelihood(data[0])
    base_t = (np.array([0.3, -0.2]), np.array([[0.4, 0.0], [0.1, 0.3]]))
    u_t = (np.array([0.2, -0.1]), np.array([[0.3, 0.0], [0.05, 0.2]]))
    flow = correction.FlowProposal(model, context, log_likelihood, 0.0)
    in_base = correction.AdaptedProposal(model, context, log_likelihood, 0.0, *base_t)
    in_u = correction.UnconstrainedProposal(model, context, log_likelihood, 0.0, *u_t)
    pool, generator = correction.MixturePool(), torch.Generator().manual_seed(28)
    for proposal, n in ((flow, 2000), (in_base, 1000), (in_u, 500), (in_base, 1000)):
        pool.add(proposal, proposal.draw_record(n, generator))
    assert pool.counts == [2000, 2000, 500] and pool.size == 4500
    theta = torch.as_tensor(pool.concatenated("theta"))
    with torch.no_grad():
        log_q = model.log_prob(theta, context).numpy()
        eps = model.pull(theta, context)[0].numpy()
        u, log_du_dtheta = (part.numpy() for part in model.box.inverse(theta))
        log_p = log_likelihood(theta).numpy()
    share = correction.DEFENSIVE_SHARE
    normal = stats.multivariate_normal(np.zeros(2), np.eye(2))

    def t_logpdf(location, scale_tril, x):
        return stats.multivariate_t(loc=location, shape=scale_tril @ scale_tril.T, df=correction.T_DEGREES).logpdf(x)

    log_r = np.stack([
        log_q,
        np.logaddexp(np.log(share) + normal.logpdf(eps), np.log1p(-share) + t_logpdf(*base_t, eps)) + log_q - normal.logpdf(eps),
        np.logaddexp(np.log(share) + log_q, np.log1p(-share) + t_logpdf(*u_t, u) + log_du_dtheta),
    ])
    log_mixture = np.logaddexp.reduce(np.log(np.array([2000, 2000, 500]) / 4500)[:, None] + log_r, axis=0)
    np.testing.assert_allclose(pool.log_weights(), log_p - log_mixture, rtol=1e-7, atol=1e-7)


def test_the_correction_runs_on_one_thread_and_gives_the_threads_back(linear_gaussian_flow):
    """The correction's small tensors run on one thread (correction.one_thread); the caller's setting is restored."""
    problem, model = linear_gaussian_flow
    data = problem.observe(torch.tensor([[0.4, -0.3]], dtype=torch.float64), torch.Generator().manual_seed(5))[0]
    seen = set()

    def log_likelihood(theta):
        seen.add(torch.get_num_threads())
        return problem.log_likelihood(data)(theta)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        correction.corrected_posterior(model, data, log_likelihood, 0.0, 500, generator=torch.Generator().manual_seed(6),
                                       rng=np.random.default_rng(0), first_draws=1000, max_draws=2000)
        assert seen == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
