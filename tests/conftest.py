import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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
    import reference

    return reference.compute_reference(default_problem, default_laplace)
