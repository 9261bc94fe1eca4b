"""Write examples/survey/: a small synthetic survey of 20 parallel lines to try amortized posteriors on.

Every line has the same 81 stations, every 0.5 m on [-20, 20] m, and the same noise, σ = 1 µGal
at every station — as a real survey has, and as an amortized model requires (it is trained for one
set of stations and one σ). Under each line lies a sphere of its own (density contrast 2500 kg/m³),
drawn inside the prior box x0 ∈ [-10, 30] m, z ∈ [1, 15] m, R ∈ [0.5, 5] m, with three made
special on purpose:

- lines 07 and 15 see a weak body (small and deep: a peak of a few µGal, a posterior that the data
  constrain only loosely);
- line 20 has its body off the line's end (x0 = 27 m, beyond the last station at 20 m), so the
  line sees one flank of the anomaly only.

``truth.csv`` lists every line's body. Run from the project root: ``python examples/make_survey.py``.
"""

import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import forward  # noqa: E402

#: The prior box the survey is meant to be inverted with: --bounds -10 30 1 15 0.5 5
BOUNDS = ((-10.0, 30.0), (1.0, 15.0), (0.5, 5.0))
STATIONS = np.linspace(-20.0, 20.0, 81)
SIGMA = 1.0  # µGal
N_LINES = 20
WEAK = {7: (4.0, 12.0, 1.2), 15: (-6.0, 11.0, 1.0)}
OFF_THE_END = {20: (27.0, 6.0, 2.5)}


def bodies(rng):
    """(line number, x0, z, R) of every line: drawn where the line sees them well, the special lines fixed."""
    rows = []
    for line in range(1, N_LINES + 1):
        body = WEAK.get(line) or OFF_THE_END.get(line)
        if body is None:
            body = (rng.uniform(-8.0, 15.0), rng.uniform(3.0, 9.0), rng.uniform(1.5, 3.5))
        rows.append((line, *body))
    return rows


def main():
    folder = Path(__file__).with_name("survey")
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(2026)
    rows = bodies(rng)
    for line, *theta in rows:
        g = forward.sphere_anomaly(STATIONS, np.array(theta)) + SIGMA * rng.standard_normal(STATIONS.size)
        forward.write_profile(folder / f"line_{line:02d}.csv", STATIONS.round(2), g.round(4), SIGMA)
    with open(folder / "truth.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "x0", "z", "R", "peak_uGal"])
        for line, x0, z, radius in rows:
            peak = float(forward.sphere_anomaly(np.array([x0]), np.array([x0, z, radius]))[0])
            writer.writerow([f"line_{line:02d}", round(x0, 3), round(z, 3), round(radius, 3), round(peak, 2)])
    print(f"wrote {N_LINES} lines and truth.csv into {folder}/")


if __name__ == "__main__":
    main()
