import sys
from pathlib import Path

import pytest

# The tests mirror the package (tests/flows/ for gravity_flows/flows/, ...); end-to-end runs of the scripts,
# faults and bad input are in tests/integration/. The project's root (the scripts, forward.py and the
# package) and tests/ itself (the shared layer harness) are importable from every folder.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


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


# Tests run on small tensors: one thread avoids OpenMP's costly waits on a busy 2-core machine
# (the scripts do the same on the CPU, see flow.device_for).
import torch  # noqa: E402

torch.set_num_threads(1)
