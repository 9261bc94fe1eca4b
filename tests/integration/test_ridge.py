"""The free-density problem end to end: every script solves the mass ridge, scored against the exact reference.

The mass ridge is the gravity ridge made cheaper for the suite (conftest.ridge_profile): every tenth
station of the synthetic data (100 stations) read as a profile with sigma 3 µGal. Its posterior of (R, Δρ) is the same curved
ridge R = (m / Δρ)^(1/3) across the whole density box as with 1000 stations at 1 µGal — what the
data see is only the mass m, and along the curve only the prior box decides — but thicker across
(m, x0 and z about ten times wider), so that a flow follows it in a few hundred iterations instead of
thousands. The long default-settings runs of the ridge are compare.py's (the README's numbers).

Every flow starts where ``--init auto`` puts it on the ridge: in mass coordinates (the default with a
free density, ``forward.MassBijection``) at the Laplace fit carried into them, without annealing.
Tolerances: a flow refined by importance resampling within REFINED_TOLERANCE, and alone within
ALONE_TOLERANCE. At SHORT iterations (seed 0) the refined errors were 0.023-0.051 and the flows alone
0.030-0.033 (KL 0.003-0.015 nats). Two more paths run once each: the prior start in mass coordinates
(annealed; the coupling affine flow), and the box's own coordinates (``--coordinates box``, where
``auto`` starts from the prior and anneals) for the coupling spline at its box prior-start defaults of 5
layers clipped at 10: alone 0.045, refined 0.041 (with 3 layers unclipped 0.113, which the bound fails);
at 300 iterations the autoregressive affine flow, not yet on the whole ridge, failed the refined bound
there (0.24).
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

SAMPLES = 4000
SHORT = 500
REFINED_TOLERANCE = 0.1
#: Every flow without refining: each meets the project's goal (0.05) on the ridge at its defaults in compare.py;
#: at these short settings twice that bound fails a flow stuck on part of the ridge.
ALONE_TOLERANCE = 0.1
SCRIPTS = (Gravity_planar, Gravity_auto_Affine, Gravity_coupling_Affine, Gravity_invertible_Affine, Gravity_auto_NSF,
           Gravity_coupling_NSF)
#: (script, coordinates, the start --init auto chooses there, or the one given)
CASES = [pytest.param(script, "mass", "laplace", id=script.__name__) for script in SCRIPTS] + [
    pytest.param(Gravity_coupling_Affine, "mass", "prior", id="Gravity_coupling_Affine-prior"),
    pytest.param(Gravity_coupling_NSF, "box", "prior", id="Gravity_coupling_NSF-box")]


@pytest.mark.parametrize("script, coordinates, init", CASES)
def test_every_flow_solves_the_mass_ridge(script, coordinates, init, tmp_path, ridge_profile, unrendered_figures, capsys):
    argv = ridge_profile.argv + ["--iterations", str(SHORT), "--samples", str(SAMPLES), "--refine", "importance",
                                 "--out", str(tmp_path), "--quiet"] + (["--coordinates", "box"] if coordinates == "box" else [])
    if coordinates == "mass" and init == "prior":
        argv += ["--init", "prior"]
    assert script.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parameters"] == ["x0", "z", "R", "drho"]
    assert summary["settings"]["density_bounds"] == ridge_profile.density_bounds
    assert summary["data"]["n_stations"] == ridge_profile.n_stations
    assert summary["start"]["init"] == init and (summary["anneal"] > 0) == (init == "prior")
    assert np.load(tmp_path / "samples.npz")["theta"].shape == (SAMPLES, 4)
    assert summary["error"] <= REFINED_TOLERANCE, summary["error"]
    # KL(q||p) >= 0: a log-determinant that lets log q claim less than q's true density (an ELBO above
    # log Z) shows here even where the importance weights, off by a constant, still resample well
    assert summary["kl"] > -4 * summary["elbo_se"], (summary["kl"], summary["elbo_se"])
    assert summary["vi"]["error"] <= ALONE_TOLERANCE, summary["vi"]
    assert summary["coordinates"] == coordinates == summary["settings"]["coordinates"]
    assert ("in mass coordinates" in capsys.readouterr().err) == (coordinates == "mass")  # the start: line says so
    assert summary["refine"]["method"] == "importance" and "khat" in summary["refine"]
