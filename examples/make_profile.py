"""Write examples/profile.csv: a 41-station field-style profile to try ``--data`` on.

A sphere at x0 = -2 m, depth 8 m, radius 2.5 m (density contrast 2500 kg/m³) seen at 41 stations
every 1.5 m, with Gaussian noise whose standard deviation (the ``sigma`` column) is 0.5 µGal on
the first half of the line and 1 µGal on the second. Run from the project root:
``python examples/make_profile.py``.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import forward  # noqa: E402

stations = np.linspace(-30.0, 30.0, 41)
sigma = np.where(stations < 0, 0.5, 1.0)
rng = np.random.default_rng(7)
g = forward.sphere_anomaly(stations, np.array([-2.0, 8.0, 2.5])) + sigma * rng.standard_normal(stations.size)
forward.write_profile(Path(__file__).with_name("profile.csv"), stations.round(2), g.round(4), sigma)
