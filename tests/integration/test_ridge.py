"""The free-density problem end to end: every script solves the mass ridge, scored against the exact reference.

The runs are shortened for the suite (fewer iterations and samples than the defaults, which the
README's numbers come from), so the tolerances are looser than the project's goal of 0.05 and are
stated here: a flow refined by importance resampling within REFINED_TOLERANCE, a spline flow alone
within SPLINE_TOLERANCE. Every flow starts where ``--init auto`` puts it on the ridge: at the prior,
with the likelihood annealed.
"""

import json

import numpy as np
import pytest

import Gravity_auto_Affine
import Gravity_auto_NSF
import Gravity_coupling_Affine
import Gravity_coupling_NSF
import Gravity_invertible_Affine
import Gravity_planar

RIDGE = ["--density-bounds", "1000", "4000"]
SAMPLES = 4000
REFINED_TOLERANCE = 0.1
#: The spline flows without refining. The coupling spline falls short of the project's goal on the
#: ridge (0.11 at its defaults in compare.py, 0.19 at this run's length, seed 0), the autoregressive
#: one meets it (0.037 at its defaults); the looser bound still fails a flow stuck on part of the ridge.
SPLINE_TOLERANCE = {"Gravity_auto_NSF": 0.15, "Gravity_coupling_NSF": 0.3}
#: Iterations per flow in the suite (about half of the defaults from the prior).
SHORT = {Gravity_planar: 2500, Gravity_auto_Affine: 2500, Gravity_coupling_Affine: 2500,
         Gravity_invertible_Affine: 2500, Gravity_auto_NSF: 2500, Gravity_coupling_NSF: 2500}
SPLINES = (Gravity_auto_NSF, Gravity_coupling_NSF)


@pytest.mark.parametrize("script", list(SHORT), ids=lambda module: module.__name__)
def test_every_flow_solves_the_mass_ridge(script, tmp_path):
    argv = RIDGE + ["--iterations", str(SHORT[script]), "--samples", str(SAMPLES), "--refine", "importance",
                    "--out", str(tmp_path), "--quiet"]
    assert script.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parameters"] == ["x0", "z", "R", "drho"]
    assert summary["settings"]["density_bounds"] == [1000.0, 4000.0]
    assert summary["start"]["init"] == "prior" and summary["anneal"] > 0
    assert np.load(tmp_path / "samples.npz")["theta"].shape == (SAMPLES, 4)
    assert summary["error"] <= REFINED_TOLERANCE, summary["error"]
    if script in SPLINES:
        assert summary["vi"]["error"] <= SPLINE_TOLERANCE[script.__name__], summary["vi"]
    assert summary["refine"]["method"] == "importance" and "khat" in summary["refine"]
