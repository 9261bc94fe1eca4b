import functools
import sys
import time
import types
from pathlib import Path

import pytest

# The tests mirror the package (tests/flows/ for gravity_flows/flows/, ...); end-to-end runs of the scripts,
# faults and bad input are in tests/integration/. The project's root (the scripts, forward.py and the
# package), tests/ itself (the shared layer harness) and tests/integration (unrendered.py, figures drawn
# but not rendered) are importable from every folder.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent / "integration"))  # unrendered.py, for every folder


@pytest.fixture(scope="session")
def default_problem():
    import forward

    return forward.synthetic_problem()


@pytest.fixture(scope="session")
def default_laplace(default_problem):
    import forward

    return forward.laplace_approximation(default_problem)


@pytest.fixture(scope="session")
def default_reference(default_problem, default_laplace):
    from gravity_flows.scoring import reference

    return reference.compute_reference(default_problem, default_laplace)


def write_profile(path, problem, every=10, sigma=1.0):
    """A user's profile file (columns x, g, sigma) from every ``every``-th station of ``problem``'s data."""
    import forward

    return forward.write_profile(path, problem.stations[::every], problem.g_obs[::every], sigma)


@pytest.fixture(scope="session")
def profile_csv(tmp_path_factory, default_problem):
    """A user's profile: every tenth station of the synthetic data (100 stations), with a sigma column of 1 µGal."""
    return write_profile(tmp_path_factory.mktemp("profile") / "profile.csv", default_problem)


@pytest.fixture(scope="session")
def ridge_profile(tmp_path_factory):
    """The mass ridge made cheaper for the suite (see tests/integration/test_ridge.py): every tenth station
    of the synthetic data at sigma 3 µGal, the density free in [1000, 4000] kg/m³. A namespace:
    ``path`` (the profile file), ``argv`` (--data and --density-bounds), ``density_bounds``, ``n_stations``."""
    import forward

    density_bounds, every, sigma = (1000.0, 4000.0), 10, 3.0
    problem = forward.synthetic_problem(density_bounds=density_bounds)
    path = write_profile(tmp_path_factory.mktemp("ridge") / "profile.csv", problem, every, sigma)
    return types.SimpleNamespace(path=path, density_bounds=list(density_bounds), n_stations=problem.n_stations // every,
                                 argv=["--data", str(path), "--density-bounds", *map(str, density_bounds)])


class ManualTimer:
    """A wall clock for tests whose time passes when the test says so (``advance``), so that a reading does
    not depend on the machine's load; with ``real=True`` the real time (``time.perf_counter``) runs under it,
    and ``advance`` stands for a slow step (a scorer at a checkpoint) without sleeping."""

    def __init__(self, real=False, now=100.0):
        self.real = real
        self.offset = now

    def __call__(self):
        return self.offset + (time.perf_counter() if self.real else 0.0)

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture
def manual_timer():
    return ManualTimer()


@pytest.fixture
def method_timer(monkeypatch):
    """The timer of every method's clock (convergence.Clock) made during the test: real time plus ``advance``."""
    from gravity_flows.scoring import convergence

    timer = ManualTimer(real=True)
    monkeypatch.setattr(convergence, "Clock", functools.partial(convergence.Clock, timer=timer))
    return timer


@pytest.fixture(scope="session")
def figures_rendered_only_in():
    """``with figures_rendered_only_in(folder, ...):`` renders only the figures written into those folders
    (tests/integration/unrendered.py)."""
    from unrendered import rendered_only_in

    return rendered_only_in


@pytest.fixture
def unrendered_figures():
    """No figure of the test is rendered (each is drawn, and a stand-in file written in its place)."""
    from unrendered import rendered_only_in

    with rendered_only_in():
        yield


# Tests run on small tensors: one thread avoids OpenMP's costly waits on a busy 2-core machine
# (the scripts do the same on the CPU, see flow.device_for).
import torch  # noqa: E402

torch.set_num_threads(1)
