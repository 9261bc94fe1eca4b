"""The printed report of a run: a posterior far from the exact reference is called unusable."""

import pytest

from gravity_flows.reporting import report


def _summary(method, w1_over_sd):
    return {
        "method": method, "parameters": ["x0", "z", "R"], "units": ["m", "m", "m"],
        "posterior": {"mean": [3.0, 6.0, 2.0], "sd": [0.03, 0.05, 0.01]},
        "reference": {"mean": [3.0, 6.0, 2.0], "sd": [0.03, 0.05, 0.01]},
        "w1_over_sd": w1_over_sd, "error": max(w1_over_sd), "wall_time_s": 1.0,
    }


@pytest.mark.parametrize("method, remedy", [("MCMC", "--chains"), ("auto_NSF", "Gravity_MCMC.py")])
def test_an_inaccurate_posterior_is_called_unusable_naming_its_worst_parameter(method, remedy, capsys):
    report.print_summary(_summary(method, [5.6, 0.28, 0.32]))
    err = capsys.readouterr().err
    assert err.startswith("warning: this posterior is 5.60 posterior sd from the exact reference in x0")
    assert remedy in err


@pytest.mark.parametrize("w1_over_sd", [[0.02, 0.03, 0.01], [0.02, 0.05, 0.01]])
def test_an_accurate_posterior_gets_no_warning(w1_over_sd, capsys):
    report.print_summary(_summary("planar", w1_over_sd))
    assert capsys.readouterr().err == ""


def test_a_non_finite_error_is_inaccurate(capsys):
    report.print_summary(_summary("planar", [float("nan"), 0.02, 0.01]))
    assert "in x0" in capsys.readouterr().err


@pytest.mark.parametrize("extra, remedy", [({}, "--refine importance"), ({"refine": {}}, "Gravity_MCMC.py"),
                                           ({"mode": "model"}, "per-profile fit")])
def test_a_flow_short_of_the_goal_is_told_how_it_misses_and_what_corrects_it(extra, remedy, capsys):
    """Between the goal (0.05) and unusable (0.1): the worst parameter, too narrow or shifted, and the remedy."""
    summary = _summary("coupling_NSF", [0.02, 0.03, 0.09])
    summary["posterior"]["sd"][2] = 0.0087
    report.print_summary({**summary, **extra})
    err = capsys.readouterr().err
    assert err.startswith("warning: this posterior misses the exact one by 0.090 posterior sd in R, more than the 0.05")
    assert "its sd is 0.87 of the exact one" in err and remedy in err


def test_a_shifted_posterior_short_of_the_goal_says_so(capsys):
    summary = _summary("MCMC", [0.07, 0.03, 0.01])
    summary["posterior"]["mean"][0] = 3.0021
    report.print_summary(summary)
    err = capsys.readouterr().err
    assert "in x0" in err and "its mean is +0.07 sd from the exact one" in err and "--chains" in err
