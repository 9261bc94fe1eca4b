"""compare.py --amortized: every flow amortized and scored on the same test profiles, MCMC on the first of
them, and a table whose columns agree with each other and with the runs they come from.

One quick run (tiny models: their accuracy is not the point; tests/inference/test_amortized.py and the
README's measurements are), on a user's profile of 100 stations; the untrained flows' futile draws are
kept few, as in test_amortized_scripts.py, so that each posterior takes a fraction of MCMC's time and the
break-even formula has a number to give.
"""

import csv
import json
import math

import numpy as np
import pytest

import compare
import forward
from gravity_flows.command import cli
from gravity_flows.inference import amortized, correction
from gravity_flows.scoring import convergence
from gravity_flows.scoring.reference import compute_reference, score
from forward import DataError

FLOWS = [method for method in compare.METHODS if method != "MCMC"]
SEED = 0


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(cell):
    return None if cell == "" else float(cell)


@pytest.fixture(scope="module")
def few_draws():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(correction, "FIRST_DRAWS", 1000)  # an untrained flow: keep its futile draws few
        patch.setattr(correction, "MAX_DRAWS", 2000)
        yield


@pytest.fixture(scope="module")
def quick_amortized(tmp_path_factory, profile_csv, figures_rendered_only_in, few_draws):
    """One ``compare.py --amortized --quick`` of all six flows and MCMC; only its own figure is rendered."""
    out = tmp_path_factory.mktemp("compare-amortized")
    with figures_rendered_only_in(out):
        status = compare.main(["--amortized", "--quick", "--data", str(profile_csv), "--samples", "1000",
                               "--seed", str(SEED), "--out", str(out), "--quiet"])
    return status, out


def flow_summary(out, method):
    return json.loads((out / method / "summary.json").read_text())


def test_the_table_has_the_columns_checks_read_and_one_row_per_flow_and_mcmc(quick_amortized):
    status, out = quick_amortized
    assert status == 0
    with open(out / "table.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == [key for key, _, _ in compare.AMORTIZED_COLUMNS]
    assert {"method", "train_time_s", "median_error", "p90_error", "share_error_le_0.05", "share_khat_le_0.7",
            "posterior_time_s", "mcmc_time_s", "break_even_profiles"} <= set(header)
    assert [row["method"] for row in read_csv(out / "table.csv")] == FLOWS + ["MCMC"]
    text = (out / "table.md").read_text()
    assert "## Goals:" in text and ("PASS" in text or "FAIL" in text)
    assert (out / "cost_vs_survey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "cost_vs_survey.png").stat().st_size > 20_000


def test_break_even_follows_from_the_tables_own_columns(quick_amortized):
    _, out = quick_amortized
    rows = read_csv(out / "table.csv")
    mcmc_times = {row["mcmc_time_s"] for row in rows}
    assert len(mcmc_times) == 1 and number(mcmc_times.pop()) > 0  # one MCMC time, the same for every flow
    broke_even = 0
    for row in rows[:-1]:
        train, posterior, mcmc = (number(row[key]) for key in ("train_time_s", "posterior_time_s", "mcmc_time_s"))
        if mcmc > posterior:
            assert int(row["break_even_profiles"]) == math.ceil(train / (mcmc - posterior))
            # from that many profiles on the flow is cheaper; one fewer, it is not
            n = int(row["break_even_profiles"])
            assert train + n * posterior <= n * mcmc and (n == 1 or train + (n - 1) * posterior > (n - 1) * mcmc)
            broke_even += 1
        else:
            assert row["break_even_profiles"] == ""
    assert broke_even >= 1  # the formula's branch with a number is exercised


def test_every_flow_row_is_its_runs_test_set_summary(quick_amortized):
    _, out = quick_amortized
    for row in read_csv(out / "table.csv")[:-1]:
        summary = flow_summary(out, row["method"])
        test = summary["amortized"]["test"]
        assert summary["amortized"]["iterations"] == compare.QUICK_AMORTIZED["iterations"]
        assert number(row["train_time_s"]) == pytest.approx(summary["amortized"]["train_time_s"])
        assert number(row["posterior_time_s"]) == pytest.approx(test["median_posterior_time_s"])
        for key in ("median_error", "p90_error", "share_error_le_0.05", "share_khat_le_0.7", "share_trustworthy",
                    "silent_failures", "median_vi_error"):
            assert number(row[key]) == pytest.approx(test[key]), key
        errors = [test_row["error"] for test_row in test["rows"]]
        assert number(row["median_error"]) == pytest.approx(np.median(errors))


def test_every_flow_is_scored_on_the_same_test_profiles(quick_amortized, profile_csv):
    _, out = quick_amortized
    survey = amortized.survey_of(cli.load_problem(compare.parse_args(["--data", str(profile_csv)])))
    expected = [profile.truth.tolist() for profile in amortized.simulated_profiles(
        survey, compare.QUICK_AMORTIZED["test_profiles"], SEED)]
    for method in FLOWS:
        rows = flow_summary(out, method)["amortized"]["test"]["rows"]
        assert [row["profile"] for row in rows] == list(range(len(expected)))
        assert [row["truth"] for row in rows] == expected, method


def test_mcmc_runs_on_the_first_test_profiles_scored_against_their_exact_reference(quick_amortized, profile_csv):
    _, out = quick_amortized
    survey = amortized.survey_of(cli.load_problem(compare.parse_args(["--data", str(profile_csv)])))
    profiles = amortized.simulated_profiles(survey, compare.QUICK_AMORTIZED["mcmc_profiles"], SEED)
    times, errors = [], []
    for index, profile in enumerate(profiles):
        path = out / "mcmc" / f"profile_{index:02d}.csv"
        stations, g_obs, sigma = forward.read_profile(path)
        assert np.array_equal(stations, profile.stations) and np.array_equal(g_obs, profile.g_obs)
        assert np.array_equal(sigma, profile.noise_sd_array)
        summary = json.loads((out / "mcmc" / path.stem / "summary.json").read_text())
        assert summary["method"] == "MCMC" and summary["setup_time_s"] > 0
        with np.load(out / "mcmc" / path.stem / "samples.npz") as samples:
            theta = samples["theta"]
        problem = forward.Problem(stations=stations, g_obs=g_obs, noise_sd=sigma, density=profile.density,
                                  bounds=profile.bounds, parameters=profile.parameters)
        reference = compute_reference(problem, forward.laplace_approximation(problem))
        assert summary["error"] == pytest.approx(score(theta, reference)["error"], rel=1e-9)
        seconds, _ = convergence.cost_to_reach(summary["convergence"])
        times.append(math.inf if seconds is None else summary["setup_time_s"] + seconds)
        errors.append(summary["error"])
    mcmc = read_csv(out / "table.csv")[-1]
    assert mcmc["method"] == "MCMC"
    assert number(mcmc["mcmc_time_s"]) == pytest.approx(np.median(times))
    assert number(mcmc["median_error"]) == pytest.approx(np.median(errors))
    assert not (out / "mcmc" / f"profile_{len(profiles):02d}.csv").exists()  # --quick: two profiles


def test_models_rescores_trained_models_without_training(quick_amortized, tmp_path, profile_csv, few_draws,
                                                        unrendered_figures):
    _, trained = quick_amortized
    out = tmp_path / "rescored"
    status = compare.main(["--amortized", "--quick", "--models", str(trained), "--methods", "coupling_Affine",
                           "--mcmc-profiles", "0", "--data", str(profile_csv), "--samples", "1000",
                           "--seed", str(SEED), "--out", str(out), "--quiet"])
    assert status == 0
    assert not (out / "coupling_Affine" / "model.pt").exists()
    before, after = flow_summary(trained, "coupling_Affine"), flow_summary(out, "coupling_Affine")
    assert after["amortized"]["train_time_s"] == before["amortized"]["train_time_s"]
    assert ([row["truth"] for row in after["amortized"]["test"]["rows"]]
            == [row["truth"] for row in before["amortized"]["test"]["rows"]])
    row, = read_csv(out / "table.csv")
    assert row["method"] == "coupling_Affine" and row["mcmc_time_s"] == "" and row["break_even_profiles"] == ""


@pytest.mark.parametrize("option", [["--simulations", "8"], ["--test-profiles", "3"], ["--mcmc-profiles", "1"],
                                    ["--models", "somewhere"]])
def test_amortized_options_need_amortized(option):
    with pytest.raises(DataError, match="only with --amortized"):
        compare.parse_args(option)


def test_break_even_is_none_where_mcmc_is_no_slower():
    assert compare.break_even(100.0, 0.5, 0.5) is None and compare.break_even(100.0, 0.6, 0.5) is None
    assert compare.break_even(100.0, 0.1, 1.1) == 100 and compare.break_even(100.5, 0.1, 1.1) == 101
    assert compare.break_even(None, 0.1, 1.1) is None and compare.break_even(1.0, 0.1, None) is None


def test_the_goals_take_the_best_of_the_accurate_flows():
    rows = [{"method": "cheap_but_wrong", "median_error": 0.5, "posterior_time_s": 0.01, "break_even_profiles": 2},
            {"method": "accurate", "median_error": 0.03, "posterior_time_s": 0.05, "break_even_profiles": 150},
            {"method": "MCMC", "median_error": 0.02, "mcmc_time_s": 1.0}]
    lines, passed, checked = compare.amortized_goals(rows, 1.0, 60.0, ridge=True)
    assert (passed, checked) == (3, 3) and "(accurate)" in lines[0] and "150 profiles" in lines[0]
    rows[1]["break_even_profiles"] = 201  # just past the goal
    lines, passed, checked = compare.amortized_goals(rows, 1.0, 60.0, ridge=True)
    assert (passed, checked) == (2, 3) and "FAIL" in lines[0]
    rows[1]["median_error"] = 0.06  # no flow accurate: no replacement, however cheap
    lines, passed, checked = compare.amortized_goals(rows, 1.0, 60.0, ridge=True)
    assert (passed, checked) == (1, 3) and "no flow" in lines[0]
    _, passed, checked = compare.amortized_goals(rows, 1.0, 60.0, ridge=False)
    assert (passed, checked) == (1, 2)
    rows[1]["median_error"] = 0.03  # the default problem: no break-even goal; a posterior too slow fails alone
    rows[1]["posterior_time_s"] = 0.2
    lines, passed, checked = compare.amortized_goals(rows, 1.0, 60.0, ridge=False)
    assert (passed, checked) == (1, 2) and "FAIL" in lines[1] and "PASS" in lines[2]
    lines, passed, checked = compare.amortized_goals(rows, 1.0, 3600.0, ridge=False)
    assert (passed, checked) == (0, 2)
    # --models: the models' training counts towards the whole comparison's time, beside the scoring here
    lines, passed, checked = compare.amortized_goals(rows, 1.0, 600.0, ridge=False, trained_elsewhere_s=2400.0)
    assert (passed, checked) == (0, 2) and "3000 s" in lines[2] and "600 s here" in lines[2]


def test_models_without_a_trained_model_is_one_line(tmp_path, profile_csv):
    with pytest.raises(DataError, match="no .*coupling_Affine/model.pt"):
        compare.main(["--amortized", "--models", str(tmp_path / "empty"), "--methods", "coupling_Affine",
                      "--data", str(profile_csv), "--out", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("options, steps", [([], str(compare.AMORTIZED_ITERATIONS)), (["--iterations", "500"], "500"),
                                            (["--quick"], str(compare.QUICK_AMORTIZED["iterations"]))])
def test_every_flow_is_amortized_with_the_comparisons_common_budget(tmp_path, options, steps):
    """The flows' --amortize runs get the comparison's common budget (not each script's own 10000 steps),
    --iterations where given, the smoke run's with --quick."""
    args = compare.build_parser().parse_args(["--amortized", *options])
    argv = compare.amortize_argv(args, tmp_path / "coupling_Affine")
    assert argv.count("--iterations") == 1 and argv[argv.index("--iterations") + 1] == steps
