"""Cost against accuracy: checkpoint spacing, the cost to reach an error, and the MCMC checkpoint clock."""

import numpy as np

import forward
from gravity_flows.scoring import convergence
import Gravity_MCMC as mcmc


def test_checkpoints_are_geometric_distinct_and_end_at_the_last_iteration():
    points = convergence.checkpoint_iterations(4000, 12)
    assert points[0] == 40 and points[-1] == 4000 and points == sorted(set(points))
    ratios = np.diff(np.log(points))
    assert np.allclose(ratios, ratios.mean(), atol=0.02)
    assert convergence.checkpoint_iterations(10, 50) == list(range(1, 11))
    assert convergence.checkpoint_iterations(100, 0) == []


def _points(errors, seconds=None):
    seconds = seconds or [float(k + 1) for k in range(len(errors))]
    return [{"seconds": s, "evaluations": 100 * (k + 1), "error": e} for k, (s, e) in enumerate(zip(seconds, errors))]


def test_cost_to_reach_is_the_first_point_after_which_the_error_stays_below():
    points = _points([0.5, 0.04, 0.2, 0.045, 0.03, 0.049])
    assert convergence.cost_to_reach(points, 0.05) == (4.0, 400)  # the dip at 2 s does not count
    run_seconds, run_evaluations = points[-1]["seconds"], points[-1]["evaluations"]
    seconds, evaluations = convergence.cost_to_reach(points, 0.05)
    assert seconds <= run_seconds and evaluations <= run_evaluations


def test_a_run_that_never_gets_there_has_no_cost():
    assert convergence.cost_to_reach(_points([0.5, 0.2, 0.06]), 0.05) == (None, None)
    assert convergence.cost_to_reach(_points([0.5, 0.01, 0.06]), 0.05) == (None, None)  # ends above
    assert convergence.cost_to_reach([], 0.05) == (None, None)
    assert convergence.cost_to_reach(_points([0.01, float("nan")]), 0.05) == (None, None)


def test_clock_excludes_its_pauses(manual_timer):
    timer = manual_timer
    clock = convergence.Clock(timer=timer)
    timer.advance(2.0)
    assert clock.seconds() == 2.0
    with clock.paused():
        timer.advance(30.0)
    assert clock.seconds() == 2.0
    timer.advance(1.5)
    assert clock.seconds() == 3.5


def test_a_reading_during_a_pause_is_the_pause_s_start_and_the_clock_never_runs_backwards(manual_timer):
    """The checkpoint bookkeeping reads the clock inside the pause (vi.train): a reading 5 s into a pause
    must not count those 5 s, or the pause's end takes them back and a later reading is smaller."""
    timer = manual_timer
    clock = convergence.Clock(timer=timer)
    timer.advance(10.0)
    readings = []
    with clock.paused():
        timer.advance(5.0)
        readings.append(clock.seconds())
        timer.advance(5.0)
        readings.append(clock.seconds())
    timer.advance(1.0)
    readings.append(clock.seconds())
    assert readings == [10.0, 10.0, 11.0]


def test_a_pause_inside_a_pause_is_counted_once_and_synchronize_runs_before_each_reading(manual_timer):
    timer = manual_timer
    synced = []
    clock = convergence.Clock(lambda: synced.append(timer()), timer=timer)
    timer.advance(4.0)
    with clock.paused():
        timer.advance(1.0)
        with clock.paused():
            timer.advance(2.0)
        timer.advance(3.0)
        assert clock.seconds() == 4.0
    assert clock.seconds() == 4.0
    timer.advance(1.0)
    assert clock.seconds() == 5.0
    assert synced == [104.0, 110.0, 111.0]  # at the pause's start and at each reading outside it


def test_mcmc_checkpoint_scoring_is_not_counted_as_sampling_time(method_timer):
    """A slow scorer at every checkpoint (100 s each, on the clock's timer, not slept): the sampler's clock
    must not include it."""
    problem = forward.synthetic_problem()
    laplace = forward.laplace_approximation(problem)
    rng = np.random.default_rng(0)
    starts = laplace.theta_map + 0.01 * rng.standard_normal((4, 3)) * laplace.theta_sd
    calls = []

    def slow_scorer(kept, seconds, evaluations):
        calls.append((kept.shape[0], seconds, evaluations))
        method_timer.advance(100.0)

    began = method_timer()
    run = mcmc.sample(problem, starts, np.linalg.cholesky(laplace.theta_cov * mcmc.optimal_scale(3)), 100, 400, rng,
                      checkpoints=(50, 100, 400), on_checkpoint=slow_scorer)
    elapsed = method_timer() - began
    assert [kept for kept, _, _ in calls] == [50, 100, 400]
    assert elapsed - run.seconds >= 300.0  # the three pauses are not sampling
    assert 0 < run.seconds <= elapsed - 300.0
    assert all(a[1] <= b[1] and a[2] < b[2] for a, b in zip(calls, calls[1:]))
    assert calls[-1][2] <= run.likelihood_evaluations and calls[-1][1] <= run.seconds
