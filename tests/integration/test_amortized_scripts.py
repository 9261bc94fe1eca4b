"""Amortized runs of the flow scripts end to end: --amortize writes the model, its test scores and
figure; --model applies it to one profile or a survey; every refusal is one line, exit status 2 and
nothing written. The scripts run as ``__main__`` inside the test process (as in test_bad_input.py),
with a tiny model: these tests check the plumbing and the refusals, not the accuracy (that is
tests/inference/test_amortized.py and the README's measurements)."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import forward
from gravity_flows.inference import amortized, correction

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "Gravity_coupling_Affine.py"
TINY = ["--iterations", "30", "--simulations", "32", "--flows", "2", "--samples", "300", "--quiet"]


def run_script(script, args, monkeypatch, capsys):
    """Run ``script`` as ``__main__`` with ``args``; return (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


def write_profile(path, problem, sigma=None, shift=0.0):
    return forward.write_profile(path, problem.stations + shift, problem.g_obs, sigma)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model of the default survey (coupling affine), and three profiles of that survey as CSV."""
    folder = tmp_path_factory.mktemp("amortized")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(correction, "FIRST_DRAWS", 1000)  # an untrained flow: keep its futile draws few
        patch.setattr(correction, "MAX_DRAWS", 2000)
        patch.setattr(sys, "argv", [str(ROOT / SCRIPT), "--amortize", "--test-profiles", "2", "--out",
                                    str(folder / "model"), *TINY])
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(ROOT / SCRIPT), run_name="__main__")
    assert stopped.value.code == 0
    survey = amortized.survey_of(forward.synthetic_problem())
    profiles = [write_profile(folder / f"line{k}.csv", problem)
                for k, problem in enumerate(amortized.simulated_profiles(survey, 3, seed=11))]
    return folder / "model", profiles


def test_amortize_writes_the_model_its_test_scores_and_its_figure(trained):
    model_folder, _ = trained
    assert {"model.pt", "summary.json", "amortized.png"} <= {path.name for path in model_folder.iterdir()}
    summary = json.loads((model_folder / "summary.json").read_text())
    results = summary["amortized"]
    assert results["iterations"] == 30 and results["simulations"] == 30 * 32 and results["train_time_s"] > 0
    test = results["test"]
    assert test["profiles"] == len(test["rows"]) == 2
    for key in ("median_error", "p90_error", "share_error_le_0.05", "share_khat_le_0.7", "median_posterior_time_s",
                "median_vi_error", "silent_failures"):
        assert key in test
    row = test["rows"][0]
    for key in ("error", "vi", "khat", "ess", "trustworthy", "posterior_time_s", "snr", "truth", "sbc_rank",
                "q_cdf_at_truth"):
        assert key in row
    assert summary["settings"]["amortize"] is True and summary["method"] == "coupling_Affine"


@pytest.fixture()
def few_draws(monkeypatch):
    monkeypatch.setattr(correction, "FIRST_DRAWS", 1000)
    monkeypatch.setattr(correction, "MAX_DRAWS", 2000)


def test_a_model_applied_to_a_survey_writes_each_profile_and_the_survey(trained, tmp_path, monkeypatch, capsys, few_draws):
    model_folder, profiles = trained
    out = tmp_path / "survey"
    status, stdout, stderr = run_script(SCRIPT, ["--model", model_folder / "model.pt", "--data", *profiles[:2],
                                                 "--out", out, "--samples", "300", "--quiet", "--no-figures",
                                                 "--proposal", "flow"],
                                        monkeypatch, capsys)
    assert status == 0, stderr
    assert {"line0", "line1", "survey.csv", "survey.md", "survey.png"} <= {path.name for path in out.iterdir()}
    assert sorted(path.name for path in (out / "line0").iterdir()) == ["samples.npz", "summary.json"]  # --no-figures
    summary = json.loads((out / "line0" / "summary.json").read_text())
    for key in ("error", "vi", "khat", "trustworthy", "posterior_time_s", "posterior", "reference"):
        assert key in summary
    assert set(summary["vi"]) >= {"error", "khat", "is_ess"}
    # 30 steps: a flow that learned nothing yet, and its own draws only (--proposal flow): flagged
    assert not summary["trustworthy"] and summary["proposal"] == "flow" and "per-profile fit" in stderr
    table = (out / "survey.md").read_text()
    assert "| line0 |" in table and "| line1 |" in table and "not trustworthy" in table
    assert len((out / "survey.csv").read_text().splitlines()) == 3


def test_a_model_applied_to_one_profile_writes_a_run(trained, tmp_path, monkeypatch, capsys, few_draws):
    model_folder, profiles = trained
    out = tmp_path / "one"
    status, stdout, stderr = run_script(SCRIPT, ["--model", model_folder / "model.pt", "--data", profiles[2],
                                                 "--out", out, "--samples", "300", "--quiet"], monkeypatch, capsys)
    assert status == 0, stderr
    names = {path.name for path in out.iterdir()}
    assert {"summary.json", "samples.npz", "marginals.png", "pairs.png", "predictive_check.png"} <= names
    assert "survey.md" not in names
    assert "posterior time" in stdout


def _refusal_cases(model, profiles, folder):
    default = forward.synthetic_problem()
    survey = amortized.survey_of(default)
    profile = amortized.simulated_profiles(survey, 1, seed=3)[0]
    text = folder / "text.pt"
    text.write_text("x,g\n1,2\n")
    half = folder / "half.pt"
    half.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    fewer = forward.Problem(stations=profile.stations[:-1], g_obs=profile.g_obs[:-1], noise_sd=1.0)
    return {
        "other stations": (SCRIPT, ["--model", model, "--data", write_profile(folder / "moved.csv", profile, shift=0.5)],
                           "station 1 lies at x = -19.5 m"),
        "fewer stations": (SCRIPT, ["--model", model, "--data", write_profile(folder / "fewer.csv", fewer)],
                           "has 999 stations"),
        "other sigma column": (SCRIPT, ["--model", model, "--data", write_profile(folder / "sigma.csv", profile, sigma=2.0)],
                               "the noise sd at station 1 is 2 µGal, the model"),
        "other --noise": (SCRIPT, ["--model", model, "--data", profiles[0], "--noise", "0.5"], "the noise sd at station 1 is 0.5"),
        "other box": (SCRIPT, ["--model", model, "--data", profiles[0], "--bounds", "0", "10", "1", "15", "0.5", "6"],
                      "differ from the model's prior box"),
        "other density": (SCRIPT, ["--model", model, "--data", profiles[0], "--density", "3000"],
                          "--density 3000 differs from the model's 2500"),
        "density free": (SCRIPT, ["--model", model, "--data", profiles[0], "--density-bounds", "1000", "4000"],
                         "trained with the density known"),
        "not a model file": (SCRIPT, ["--model", text, "--data", profiles[0]], "is not a model file of gravity-flows"),
        "truncated": (SCRIPT, ["--model", half, "--data", profiles[0]], "or it is truncated"),
        "another script": ("Gravity_coupling_NSF.py", ["--model", model, "--data", profiles[0]],
                           "is a model of Gravity_coupling_Affine.py, not of Gravity_coupling_NSF.py"),
        "no data": (SCRIPT, ["--model", model], "--model needs --data"),
        "several profiles without a model": (SCRIPT, ["--data", profiles[0], profiles[1], "--iterations", "5"],
                                             "several profiles need --model"),
        "several profiles to train on": (SCRIPT, ["--amortize", "--data", profiles[0], profiles[1], *TINY],
                                         "--amortize takes one --data profile"),
    }


def assert_refused(script, args, phrase, out, monkeypatch, capsys):
    """The script run with ``args`` refuses: exit 2, one line on stderr naming ``phrase``, nothing written."""
    status, stdout, stderr = run_script(script, [*args, "--out", out, "--quiet"], monkeypatch, capsys)
    assert status == 2, stderr
    assert "Traceback" not in stderr and "\n" not in stderr.strip(), stderr
    assert phrase in stderr, stderr
    assert stderr.startswith(f"{script}: error: ")
    assert not out.exists(), "a refused run must write nothing"


REFUSALS = ["other stations", "fewer stations", "other sigma column", "other --noise", "other box", "other density",
            "density free", "not a model file", "truncated", "another script", "no data",
            "several profiles without a model", "several profiles to train on"]


@pytest.mark.parametrize("case", REFUSALS)
def test_a_model_refuses_what_it_was_not_made_for_with_one_line_and_nothing_written(case, trained, tmp_path,
                                                                                     monkeypatch, capsys):
    model_folder, profiles = trained
    script, args, phrase = _refusal_cases(model_folder / "model.pt", profiles, tmp_path)[case]
    out = tmp_path / "out"
    assert_refused(script, args, phrase, out, monkeypatch, capsys)


# ----------------------------------------------------------------------------------------------
# --init amortized --model FILE: a per-profile fit from the model's q of this profile


def test_init_amortized_starts_from_the_models_q_of_this_profile(trained, tmp_path, monkeypatch, capsys):
    """One step at a vanishing rate: the run's draws are ConditionedPosterior's own (the same generator
    after the one training batch), its summary says the start was amortized and which model, the flow's
    options are the model's, and the convergence record starts at iteration 0 with the model's q."""
    import torch

    from gravity_flows.command import amortized as command

    model_folder, profiles = trained
    out = tmp_path / "start"
    status, stdout, stderr = run_script(SCRIPT, ["--init", "amortized", "--model", model_folder / "model.pt",
                                                 "--data", profiles[1], "--iterations", "1", "--lr", "1e-12",
                                                 "--samples", "300", "--checkpoints", "1", "--flows", "2",
                                                 "--out", out, "--quiet"], monkeypatch, capsys)
    assert status == 0, stderr
    assert "start: amortized (the amortized posterior of" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start"]["init"] == "amortized"
    assert summary["start"]["model"]["path"] == str((model_folder / "model.pt").resolve())
    assert summary["start"]["model"]["method"] == "coupling_Affine"
    assert summary["anneal"] == 0.0 and summary["settings"]["flows"] == 2 and np.isfinite(summary["error"])
    assert [point["iteration"] for point in summary["convergence"]][:2] == [0, 1]

    script = runpy.run_path(str(ROOT / SCRIPT), run_name="script")
    options = script["build_parser"]().parse_args(["--model", str(model_folder / "model.pt"), "--data", str(profiles[1])])
    _, network = command.load_model(options, script["build_layers"], torch.device("cpu"), dtype=torch.float64)
    _, g_obs, _ = forward.read_profile(profiles[1])
    conditioned = amortized.ConditionedPosterior(network, g_obs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conditioned.sample(64, generator)  # the one training step's batch
        expected = conditioned.sample(300, generator)[0].numpy()
    np.testing.assert_allclose(np.load(out / "samples.npz")["theta"], expected, rtol=1e-7, atol=1e-9)


def _start_refusal_cases(model, profiles, folder):
    cases = _refusal_cases(model, profiles, folder)
    start = ["--init", "amortized", "--iterations", "5"]
    return {
        "no model": (SCRIPT, [*start, "--data", profiles[0]], "--init amortized needs --model FILE"),
        "several profiles": (SCRIPT, [*start, "--model", model, "--data", profiles[0], profiles[1]],
                             "--init amortized fits one profile, got 2"),
        "other flows": (SCRIPT, [*start, "--model", model, "--data", profiles[0], "--flows", "3"],
                        "--flows 3 differs from the model's 2"),
        "synthetic profile, other noise": (SCRIPT, [*start, "--model", model, "--noise", "0.5"],
                                           "the synthetic profile: the noise sd at station 1 is 0.5"),
        **{name: (cases[name][0], [*start, *cases[name][1]], cases[name][2])
           for name in ("other stations", "other box", "density free", "another script", "not a model file")},
    }


START_REFUSALS = ["no model", "several profiles", "other flows", "synthetic profile, other noise", "other stations",
                  "other box", "density free", "another script", "not a model file"]


@pytest.mark.parametrize("case", START_REFUSALS)
def test_init_amortized_refuses_a_model_not_made_for_this_profile_with_one_line_and_nothing_written(
        case, trained, tmp_path, monkeypatch, capsys):
    model_folder, profiles = trained
    script, args, phrase = _start_refusal_cases(model_folder / "model.pt", profiles, tmp_path)[case]
    out = tmp_path / "out"
    assert_refused(script, args, phrase, out, monkeypatch, capsys)
