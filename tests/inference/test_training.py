"""The training loop's schedules: the cosine learning rate, the adaptive annealing temperature and
its bookkeeping, and same seed, same results. (The flow posterior's density and training on known
targets are in test_vi.py.)"""

import math

import numpy as np
import pytest
import torch

from gravity_flows.inference import vi
from gravity_flows.scoring import diagnostics

BOUNDS = np.array([[-40.0, 40.0]] * 3)
LOG_PRIOR = -3 * math.log(80.0)
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
SD = torch.tensor([0.05, 0.1, 0.02], dtype=torch.float64)  # far narrower than the box: annealing has work to do


def narrow_gaussian(theta):
    """A Gaussian likelihood whose posterior (the box is flat) is N(MEAN, diag SD^2), log Z = 0."""
    return (-0.5 * ((theta - MEAN) / SD).square() - torch.log(SD) - 0.5 * math.log(2 * math.pi)).sum(-1) - LOG_PRIOR


def bare_flow():
    return vi.FlowPosterior([], BOUNDS, np.zeros(3), np.eye(3)).double()


def test_normalised_ess_equals_the_diagnostics_one():
    log_weights = 3.0 * torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = [diagnostics.importance_ess(row.numpy()) for row in log_weights]
    np.testing.assert_allclose(vi.normalised_ess(log_weights).numpy(), expected, rtol=1e-12)
    assert vi.normalised_ess(torch.zeros(64, dtype=torch.float64)).item() == pytest.approx(1.0)
    assert vi.normalised_ess(torch.tensor([0.0] + [-1e3] * 63, dtype=torch.float64)).item() == pytest.approx(1 / 64)


def ess_at(beta, log_likelihood, log_rest):
    return vi.normalised_ess(beta * log_likelihood + log_rest).item()


def test_next_temperature_is_the_largest_beta_the_weights_allow():
    generator = torch.Generator().manual_seed(1)
    log_likelihood = -500.0 + 40.0 * torch.randn(64, generator=generator, dtype=torch.float64)
    log_rest = 0.3 * torch.randn(64, generator=generator, dtype=torch.float64)
    for target in (0.3, 0.5, 0.8):
        beta = torch.tensor(1e-4, dtype=torch.float64)
        chosen = vi.next_temperature(beta, log_likelihood, log_rest, target).item()
        assert beta.item() < chosen < 1.0
        assert ess_at(chosen, log_likelihood, log_rest) >= target
        # the next candidate of the geometric grid would fall below the target
        step = math.log(beta.item()) / vi.ANNEAL_CANDIDATES
        assert ess_at(chosen * math.exp(-step), log_likelihood, log_rest) < target
    # a flat likelihood constrains nothing: straight to 1 (exactly, so that annealing ends)
    flat = vi.next_temperature(torch.tensor(1e-6, dtype=torch.float64), torch.full((64,), -7.0, dtype=torch.float64),
                               log_rest, 0.5)
    assert flat.item() == 1.0


def test_next_temperature_waits_while_q_misses_the_current_target():
    """Where the draws are already poor at the current beta (ESS below the target), beta stays."""
    generator = torch.Generator().manual_seed(2)
    log_likelihood = -500.0 + 40.0 * torch.randn(64, generator=generator, dtype=torch.float64)
    log_rest = 10.0 * torch.randn(64, generator=generator, dtype=torch.float64)  # q far from p_beta
    beta = torch.tensor(0.01, dtype=torch.float64)
    assert ess_at(beta, log_likelihood, log_rest) < 0.5
    assert vi.next_temperature(beta, log_likelihood, log_rest, 0.5).item() == 0.01


def test_the_cosine_learning_rate_is_torchs_cosine_annealing():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimiser = torch.optim.SGD([parameter], lr=0.005)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=50, eta_min=0.0)
    for step in range(50):
        assert vi._cosine(0.005, step, 50) == pytest.approx(optimiser.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        optimiser.step()
        schedule.step()


def test_adaptive_annealing_reaches_beta_1_and_skips_the_share_it_does_not_need():
    model = bare_flow()
    trace = {}
    history, _ = vi.train(model, narrow_gaussian, LOG_PRIOR, iterations=1000, batch=64, lr=0.02, progress=False,
                          generator=torch.Generator().manual_seed(0), anneal=0.8, anneal_ess=0.5, trace=trace)
    beta, ended = trace["beta"], trace["anneal_iterations"]
    assert np.all(np.diff(beta) >= 0) and beta[0] < 1e-6 and beta[-1] == 1.0
    assert ended < 800 and ended % vi.ANNEAL_CHECK_EVERY == 0  # ended early, seen at a check
    assert history.size == ended + 200  # then the (1 - anneal) share, 200 iterations, and no more
    assert np.all(beta[ended:] == 1.0) and beta[ended - vi.ANNEAL_CHECK_EVERY - 1] < 1.0
    # and it has found the posterior
    theta, log_weights = vi.evaluate(model, narrow_gaussian, LOG_PRIOR, 20_000, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(theta.mean(0), MEAN.numpy(), atol=0.1 * SD.numpy().max())
    np.testing.assert_allclose(theta.std(0), SD.numpy(), rtol=0.1)
    assert -np.mean(log_weights) < 0.02  # KL(q||p), log Z = 0


def test_the_geometric_schedule_keeps_its_share():
    trace = {}
    history, _ = vi.train(bare_flow(), narrow_gaussian, LOG_PRIOR, iterations=300, batch=16, lr=0.01, progress=False,
                          generator=torch.Generator().manual_seed(0), anneal=0.5, trace=trace)
    assert history.size == 300 and trace["anneal_iterations"] == 150
    np.testing.assert_allclose(trace["beta"], vi.anneal_schedule(300, 0.5))


@pytest.mark.parametrize("anneal_ess", [None, 0.5])
def test_same_seed_same_training(anneal_ess):
    def run():
        model = bare_flow()
        history, _ = vi.train(model, narrow_gaussian, LOG_PRIOR, iterations=300, batch=16, lr=0.01, progress=False,
                              generator=torch.Generator().manual_seed(3), anneal=0.6, anneal_ess=anneal_ess)
        return history, [p.detach().clone() for p in model.parameters()]

    (first, first_parameters), (second, second_parameters) = run(), run()
    np.testing.assert_array_equal(first, second)
    for a, b in zip(first_parameters, second_parameters):
        assert torch.equal(a, b)


def test_an_annealing_ess_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="ESS"):
        vi.train(bare_flow(), narrow_gaussian, LOG_PRIOR, iterations=10, batch=4, lr=0.01, progress=False,
                 anneal=0.5, anneal_ess=1.0)


def planar_flow():
    from gravity_flows.flows.layers import Planar
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return vi.FlowPosterior([Planar(3), Planar(3)], BOUNDS, np.zeros(3), np.eye(3)).double()


def train_planar(iterations, **options):
    model, trace = planar_flow(), {}
    history, _ = vi.train(model, narrow_gaussian, LOG_PRIOR, iterations=iterations, batch=16, lr=0.01, progress=False,
                          generator=torch.Generator().manual_seed(4), anneal=0.5, trace=trace, **options)
    return history, [p.detach().clone() for p in model.parameters()], trace


@pytest.fixture
def counting_backend(monkeypatch):
    """A torch.compile backend that runs the captured graphs as they are and counts how many it was given."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(vi, "COMPILE_BACKEND", backend)
    yield graphs
    torch._dynamo.reset()


def test_a_compiled_step_trains_as_the_eager_one_and_compiles_once(counting_backend):
    """Compiled, the step is the same computation: the same ELBOs and weights as eagerly (same seed), and the
    annealing temperature, a tensor, does not make it compile again at every beta."""
    eager, eager_parameters, eager_trace = train_planar(60)
    compiled, compiled_parameters, trace = train_planar(60, compile=True)
    assert trace["compiled"] and not eager_trace["compiled"]
    assert counting_backend, "nothing was compiled"
    np.testing.assert_allclose(compiled, eager, rtol=1e-12)
    for a, b in zip(compiled_parameters, eager_parameters):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    once = len(counting_backend)
    torch._dynamo.reset()
    counting_backend.clear()
    train_planar(2, compile=True)
    assert len(counting_backend) == once  # 60 iterations at 30 temperatures compiled what 2 iterations did


def test_where_the_step_cannot_compile_it_trains_eagerly_with_a_warning(monkeypatch, capsys):
    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    torch._dynamo.reset()
    monkeypatch.setattr(vi, "COMPILE_BACKEND", no_compiler)
    try:
        history, parameters, trace = train_planar(30, compile=True)
    finally:
        torch._dynamo.reset()
    assert not trace["compiled"]
    assert "could not compile" in capsys.readouterr().err
    eager, eager_parameters, _ = train_planar(30)
    np.testing.assert_array_equal(history, eager)  # the failed try drew nothing: the generator was put back
    for a, b in zip(parameters, eager_parameters):
        assert torch.equal(a, b)


def test_the_inductor_compiled_step_agrees_with_the_eager_one():
    """The real backend (C++ on this CPU): the same training to rounding (fused loops reorder sums)."""
    torch._dynamo.reset()
    try:
        compiled, compiled_parameters, trace = train_planar(40, compile=True)
    finally:
        torch._dynamo.reset()
    if not trace["compiled"]:
        pytest.skip("torch.compile cannot compile here (no C++ compiler): the fallback is tested above")
    eager, eager_parameters, _ = train_planar(40)
    np.testing.assert_allclose(compiled, eager, rtol=1e-9)
    for a, b in zip(compiled_parameters, eager_parameters):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
