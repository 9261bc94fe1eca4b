"""One smoke-and-accuracy test per flow script: it runs end to end, writes every SPEC file, and is accurate."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import Gravity_auto_Affine
import Gravity_auto_NSF
import Gravity_coupling_Affine
import Gravity_coupling_NSF
import Gravity_invertible_Affine
import Gravity_planar

ROOT = Path(__file__).resolve().parents[2]
FLOW_SCRIPTS = [Gravity_planar, Gravity_coupling_Affine, Gravity_invertible_Affine, Gravity_auto_Affine,
                Gravity_auto_NSF, Gravity_coupling_NSF]
FLOW_FILES = ["marginals.png", "predictive_check.png", "pairs.png", "elbo.png", "summary.json", "samples.npz"]
FLOW_KEYS = ["method", "settings", "parameters", "posterior", "reference", "error", "w1_over_sd", "wall_time_s",
             "iterations", "train_time_s", "elbo", "kl", "is_ess", "khat", "data", "versions", "interrupted"]


@pytest.mark.parametrize("script", FLOW_SCRIPTS, ids=lambda module: module.__name__)
def test_flow_script_writes_every_file_and_is_accurate(script, tmp_path, default_reference):
    # Default settings except fewer iterations and samples, sized for the suite; with the Laplace
    # start this is already accurate (the README's numbers come from the full defaults).
    status = script.main(["--iterations", "800", "--samples", "5000", "--out", str(tmp_path), "--quiet"])
    assert status == 0
    for name in FLOW_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in FLOW_KEYS:
        assert key in summary, key
    assert summary["iterations"] == 800 and summary["interrupted"] is False
    assert summary["error"] <= 0.05
    assert summary["kl"] <= 0.005
    assert summary["is_ess"] >= 0.5
    assert summary["reference"]["log_evidence"] == pytest.approx(default_reference.log_evidence)
    for key in ("mean", "sd", "q05", "q50", "q95"):
        assert len(summary["posterior"][key]) == 3
    samples = np.load(tmp_path / "samples.npz")
    assert samples["theta"].shape == (5000, 3)


@pytest.mark.parametrize("name", ["Gravity_MCMC.py", "Gravity_planar.py", "Gravity_auto_NSF.py", "Gravity_invertible_Affine.py"])
def test_help_states_the_defaults(name):
    result = subprocess.run([sys.executable, name, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--out" in result.stdout and "--seed" in result.stdout and "default" in result.stdout


def test_training_takes_a_flow_from_the_prior_to_the_posterior(tmp_path):
    """From --init prior the start is a hundred times too wide: only training can make the flow accurate
    (from the Laplace start, the end-to-end tests above could not tell a training loop that does nothing)."""
    runs = {}
    for iterations in (1, 1500):
        out = tmp_path / str(iterations)
        argv = ["--init", "prior", "--iterations", str(iterations), "--samples", "2000", "--out", str(out), "--quiet"]
        assert Gravity_coupling_NSF.main(argv) == 0
        runs[iterations] = json.loads((out / "summary.json").read_text())
    assert runs[1]["kl"] > 100 and runs[1]["error"] > 10
    assert runs[1500]["kl"] < 3 and runs[1500]["error"] < 0.5
