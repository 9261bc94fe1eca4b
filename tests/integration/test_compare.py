"""compare.py and --sweep: every method in one table and two figures, sweeps over one option, bad specs refused.

Everything is written under pytest's temporary folders, never over the committed figures.
"""

import csv
import json
import math

import numpy as np
import pytest

from gravity_flows.command import cli
import compare
from gravity_flows.reporting import figures
import Gravity_MCMC
import Gravity_coupling_NSF
import Gravity_planar
from gravity_flows.command import runner, sweep
from forward import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path):
    assert path.exists() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def markdown_rows(path, first_cells):
    """The markdown table lines of ``path`` whose first cell is one of ``first_cells``."""
    return [line for line in path.read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in first_cells]


# ---------------------------------------------------------------------------------------------
# compare.py


#: Flow iterations of the comparisons in the suite: from the Laplace start already accurate; the
#: comparison's own numbers come from its defaults (README).
ITERATIONS = 100


@pytest.fixture(scope="module")
def quick_comparison(tmp_path_factory, profile_csv, figures_rendered_only_in):
    """One quick comparison of all seven methods, read by the tests below, on a user's profile (every
    tenth station of the default data: each method's end-to-end test runs on the default problem itself).

    The comparison's own figures are rendered; each method's are drawn, not rendered (the end-to-end
    test of each script renders them)."""
    out = tmp_path_factory.mktemp("compare")
    with figures_rendered_only_in(out):
        status = compare.main(["--quick", "--data", str(profile_csv), "--iterations", str(ITERATIONS), "--samples", "1000",
                               "--checkpoints", "3", "--out", str(out), "--quiet"])
    return status, out


def test_quick_comparison_writes_both_tables_with_seven_rows_and_both_figures(quick_comparison):
    status, out = quick_comparison
    assert status == 0
    rows = read_csv(out / "table.csv")
    assert [row["method"] for row in rows] == list(compare.METHODS)
    assert all(row["status"] == "ok" for row in rows)
    table = out / "table.md"
    # seven rows in the results table, seven in the goals table
    assert len(markdown_rows(table, compare.METHODS)) == 2 * len(compare.METHODS)
    assert "## Goals" in table.read_text()
    assert_png(out / "marginals.png")
    assert_png(out / "cost_accuracy.png")
    assert_png(out / "pairs.png")
    assert_png(out / "convergence.png")
    assert {"time_to_error_0.05_s", "evaluations_to_error_0.05", "vi_error", "start"} <= set(rows[0])


def test_quick_settings_are_what_quick_promises(tmp_path):
    """--quick's own flow and MCMC lengths (the runs in this file give --iterations, to be shorter still)."""
    args = compare.parse_args(["--quick"])
    flow_argv, mcmc_argv = compare.method_argv(args, "planar", tmp_path), compare.method_argv(args, "MCMC", tmp_path)
    assert flow_argv[flow_argv.index("--iterations") + 1] == str(compare.QUICK_FLOW_ITERATIONS)
    assert mcmc_argv[-len(compare.QUICK_MCMC):] == list(compare.QUICK_MCMC)
    args = compare.parse_args(["--quick", "--iterations", "7"])
    flow_argv = compare.method_argv(args, "coupling_NSF", tmp_path)
    assert flow_argv[flow_argv.index("--iterations") + 1] == "7"


def test_compile_reaches_every_flow_and_no_mcmc(tmp_path):
    args = compare.parse_args(["--compile"])
    assert "--compile" in compare.method_argv(args, "planar", tmp_path)
    assert "--compile" not in compare.method_argv(args, "MCMC", tmp_path)
    assert "--compile" in compare.amortize_argv(compare.parse_args(["--amortized", "--compile"]), tmp_path)
    assert "--compile" not in compare.method_argv(compare.parse_args([]), "planar", tmp_path)


def test_coordinates_reach_every_flow_and_no_mcmc(tmp_path):
    args = compare.parse_args(["--density-bounds", "1000", "4000", "--coordinates", "box"])
    flow_argv = compare.method_argv(args, "coupling_NSF", tmp_path)
    assert flow_argv[flow_argv.index("--coordinates") + 1] == "box"
    assert "--coordinates" not in compare.method_argv(args, "MCMC", tmp_path)
    assert "--coordinates" not in compare.method_argv(compare.parse_args([]), "planar", tmp_path)  # the scripts' own
    with pytest.raises(compare.DataError, match="needs a free density"):
        compare.parse_args(["--coordinates", "mass"])
    with pytest.raises(compare.DataError, match="per-profile flow option"):
        compare.parse_args(["--amortized", "--coordinates", "box"])


def test_quick_comparison_of_the_free_density_writes_every_file(tmp_path, ridge_profile, figures_rendered_only_in):
    """The free density through compare.py: MCMC and one flow (every flow's run on the ridge is in
    test_ridge.py), on the suite's ridge profile."""
    methods = ["MCMC", "coupling_NSF"]
    with figures_rendered_only_in(tmp_path):
            status = compare.main(["--quick", *ridge_profile.argv, "--methods", ",".join(methods), "--iterations",
                               str(ITERATIONS), "--samples", "1000", "--checkpoints", "4", "--no-cost-ratio",
                               "--out", str(tmp_path), "--quiet"])
    assert status == 0
    rows = read_csv(tmp_path / "table.csv")
    assert [row["method"] for row in rows] == methods
    for name in ("marginals.png", "pairs.png", "cost_accuracy.png", "convergence.png"):
        assert_png(tmp_path / name)
    text = (tmp_path / "table.md").read_text()
    assert "flow alone" in text and "Time to reach error 0.05" in text
    for row in rows:
        summary = json.loads((tmp_path / row["method"] / "summary.json").read_text())
        assert summary["parameters"] == ["x0", "z", "R", "drho"]
        assert len(summary["convergence"]) >= 4
        seconds, evaluations = row["time_to_error_0.05_s"], row["evaluations_to_error_0.05"]
        assert (seconds == "") == (evaluations == "")  # both or neither
        if seconds:
            assert float(seconds) <= summary["convergence"][-1]["seconds"]
            assert int(evaluations) <= summary["convergence"][-1]["evaluations"]


def test_quick_comparison_tabulates_each_method_s_own_summary(quick_comparison):
    _, out = quick_comparison
    for row in read_csv(out / "table.csv"):
        summary = json.loads((out / row["method"] / "summary.json").read_text())
        assert float(row["error"]) == pytest.approx(summary["error"])
        assert summary["settings"]["seed"] == 0 and summary["settings"]["samples"] <= 1000
        if row["method"] == "MCMC":
            assert row["kl"] == row["khat"] == row["cost_ratio"] == ""
            assert float(row["ess_per_s"]) > 0 and float(row["rhat_max"]) == pytest.approx(max(summary["rhat"]))
            assert int(row["iterations"]) == 2000  # --quick: kept iterations per chain
        else:
            assert row["ess_per_s"] == row["rhat_max"] == ""
            assert float(row["kl"]) == pytest.approx(summary["kl"])
            assert summary["kl"] > -4 * summary["elbo_se"]  # KL(q||p) >= 0: log q is q's density
            assert float(row["is_ess_percent"]) == pytest.approx(100 * summary["is_ess"])
            assert int(row["iterations"]) == ITERATIONS
            assert math.isfinite(float(row["cost_ratio"])) and float(row["cost_ratio"]) > 0
        # even a short run lands on the posterior: the samples are within a fraction of an sd of it
        assert float(row["error"]) < 0.2


def test_a_method_that_fails_gets_a_row_saying_so_and_compare_exits_non_zero(tmp_path, monkeypatch, unrendered_figures):
    stale = tmp_path / "planar"  # an earlier run's files must not be reported as this run's
    stale.mkdir()
    (stale / "summary.json").write_text(json.dumps({"method": "planar", "error": 0.001}))
    np.savez(stale / "samples.npz", theta=np.zeros((10, 3)))
    monkeypatch.setattr(Gravity_planar, "main", lambda argv: cli.EXIT_DIVERGED)
    status = compare.main(["--quick", "--methods", "MCMC,planar", "--no-cost-ratio", "--samples", "500", "--checkpoints", "0",
                           "--out", str(tmp_path), "--quiet"])
    assert status == cli.EXIT_DIVERGED
    rows = {row["method"]: row for row in read_csv(tmp_path / "table.csv")}
    assert rows["MCMC"]["status"] == "ok"
    assert rows["planar"]["status"].startswith("FAILED") and rows["planar"]["error"] == ""
    assert "FAIL (no result)" in (tmp_path / "table.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "MCMC,kriging"], "unknown method 'kriging'"),
    (["--bounds", "5", "1", "1", "15", "0.5", "5"], "bound"),
])
def test_compare_refuses_bad_input_in_one_line_with_status_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        runner.run(compare.main, argv + ["--out", str(tmp_path / "never")])
    assert exit_.value.code == cli.EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "never").exists()


def test_compare_accepts_methods_by_script_name_and_keeps_their_order():
    assert compare._methods("Gravity_coupling_NSF.py, MCMC,coupling_nsf") == ["coupling_NSF", "MCMC"]


def run_of(method, error, kl=None, train_time_s=None):
    return {"method": method, "summary": {"error": error, "kl": kl, "train_time_s": train_time_s}}


def test_goals_are_judged_against_each_method_s_own_limits():
    runs = [run_of("MCMC", 0.04), run_of("coupling_Affine", 0.02, 0.001, 18.0),
            run_of("coupling_NSF", 0.02, 0.001, 18.0), {"method": "planar", "summary": None}]
    ratios = {"coupling_Affine": 3.5, "coupling_NSF": 3.5}
    text, passed, checked = compare.check_goals(runs, ratios, total_seconds=100.0)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.0400 ≤ 0.03 FAIL" in lines["MCMC"]  # MCMC's error goal is stricter than the flows'
    assert "18.0 s ≤ 15 s FAIL" in lines["coupling_Affine"] and "3.50× ≤ 3× FAIL" in lines["coupling_Affine"]
    assert "18.0 s ≤ 20 s PASS" in lines["coupling_NSF"] and "3.50× ≤ 5× PASS" in lines["coupling_NSF"]
    assert lines["planar"].count("FAIL (no result)") == 4  # a failed flow fails every goal, its cost ratio too
    # MCMC 1 check, three flows 4 each, the total time 1
    assert checked == 1 + 4 + 4 + 4 + 1
    assert passed == 0 + 2 + 4 + 0 + 1


def test_comparison_figures_survive_a_run_that_missed_and_a_negative_kl(tmp_path, default_reference, default_problem):
    import matplotlib.pyplot as plt

    good = default_reference.sample(1000, np.random.default_rng(0))
    missed = good + 100 * default_reference.sd  # a run far off the posterior: counted off view, not drawn
    rows = [("good", good, default_reference), ("missed", missed, default_reference), ("empty", np.empty((0, 3)), default_reference)]
    figures.plot_marginals_grid(tmp_path / "marginals.png", rows, default_problem.truth, error_goal=0.05)
    assert_png(tmp_path / "marginals.png")
    runs = [{"label": "MCMC", "wall_time_s": 1.0, "error": 0.02, "kl": None},
            {"label": "flow", "wall_time_s": 2.0, "error": 0.01, "kl": -2e-4, "kl_se": 3e-4}]
    figures.plot_cost_accuracy(tmp_path / "cost.png", runs, 0.05, 0.005)
    figures.plot_cost_accuracy(tmp_path / "mcmc_only.png", runs[:1])
    assert_png(tmp_path / "cost.png")
    assert_png(tmp_path / "mcmc_only.png")
    assert not plt.get_fignums()


# ---------------------------------------------------------------------------------------------
# --sweep


def test_sweep_over_two_values_writes_its_table_with_two_rows_and_its_figure(tmp_path, figures_rendered_only_in):
    folder = tmp_path / "sweep-flows"
    with figures_rendered_only_in(folder):
        status = sweep.run_sweep(Gravity_planar.main, ["--sweep", "flows=1,2", "--iterations", "50", "--samples", "2000",
                                                       "--out", str(tmp_path), "--quiet"])
    assert status == 0
    rows = read_csv(folder / "table.csv")
    assert [row["flows"] for row in rows] == ["1", "2"]
    assert all(row["iterations"] == "50" and row["status"] == "ok" for row in rows)
    assert len(markdown_rows(folder / "table.md", {"1", "2"})) == 2
    for value, row in zip((1, 2), rows):  # each value reached its own run
        summary = json.loads((folder / f"flows-{value}" / "summary.json").read_text())
        assert summary["settings"]["flows"] == value and float(row["error"]) == pytest.approx(summary["error"])
    assert_png(folder / "marginals.png")


def test_sweep_of_a_comparison_has_a_row_per_value_and_method(tmp_path, profile_csv, figures_rendered_only_in):
    argv = ["--quick", "--data", str(profile_csv), "--methods", "MCMC,coupling_Affine", "--iterations", "30",
            "--checkpoints", "0", "--no-cost-ratio", "--samples", "500", "--sweep", "seed=0,1", "--out", str(tmp_path),
            "--quiet"]
    with figures_rendered_only_in(tmp_path / "sweep-seed"):
        assert sweep.run_sweep(compare.main, argv) == 0
    rows = read_csv(tmp_path / "sweep-seed" / "table.csv")
    assert [(row["seed"], row["method"]) for row in rows] == [("0", "MCMC"), ("0", "coupling_Affine"),
                                                              ("1", "MCMC"), ("1", "coupling_Affine")]
    assert_png(tmp_path / "sweep-seed" / "marginals.png")


@pytest.mark.parametrize("spec, message", [
    ("flowz=1,2", "no option --flowz"),
    ("flows=", "no values"),
    ("flows=1,,2", "empty value"),
    ("flows=2,2", "repeated"),
    ("flows", "NAME=V1,V2"),
    ("flows=1,x", "not a whole number"),
    ("quiet=1", "switch"),
    ("bounds=1", "6 values"),
    ("out=a,b", "no option --out"),
    ("init=prior,posterior", "choose from"),
])
def test_a_bad_sweep_exits_2_with_one_line_and_runs_nothing(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit) as exit_:
        runner.run(Gravity_planar.main, ["--sweep", spec, "--out", str(tmp_path / "never")])
    assert exit_.value.code == cli.EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "never").exists()


def test_a_sweep_that_conflicts_with_another_option_is_refused_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        runner.run(Gravity_planar.main, ["--clip-norm", "1", "--sweep", "clip-value=1,2", "--out", str(tmp_path / "never")])
    assert exit_.value.code == cli.EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv", [
    ["--sweep", "clip_value=10,0.1", "--init", "prior"],
    ["--init", "prior", "--sweep=--clip-value=10,0.1"],
])
def test_sweep_spec_forms(argv):
    name, values, rest = sweep.split_sweep(argv)
    assert (name, values, rest) == ("clip-value", ["10", "0.1"], ["--init", "prior"])


def test_script_parser_gives_the_script_s_own_options():
    flow = sweep.script_parser(Gravity_coupling_NSF.main).parse_args([])
    # --iterations defaults by the start --init chooses (flow.resolve_defaults), 2000 from the Laplace start
    assert (flow.method, flow.bins, flow.iterations, flow.start_defaults["iterations"]["laplace"]) == ("coupling_NSF", 8, None, 2000)
    assert sweep.script_parser(Gravity_MCMC.main).get_default("out").endswith("MCMC")


def test_the_parser_records_every_option_of_its_groups_and_looks_them_up_by_name():
    parser = sweep.script_parser(Gravity_coupling_NSF.main)
    assert parser.option("--bins") is parser.option("bins")  # in the "flow and training" group
    assert parser.option("bins").default == 8
    assert parser.option("clip-value").dest == "clip_value"  # in a mutually exclusive group inside a group
    assert parser.option("--seed").dest == "seed" and parser.option("-h").dest == "help"
    assert parser.option("--no-such-option") is None
    # the record is complete: every action argparse knows of, once, in the order added
    assert parser.actions() == tuple(parser._actions)


def test_a_sweep_looks_options_up_in_the_parser_s_record_not_in_argparse_internals():
    parser = sweep.script_parser(Gravity_coupling_NSF.main)
    for private in ("_option_string_actions", "_actions"):  # argparse's own bookkeeping, not an interface
        delattr(parser, private)
    sweep.check_values(parser, "bins", ["4", "8"])
    sweep.check_values(parser, "clip-value", ["10", "0.1"])
    with pytest.raises(DataError, match="not a whole number"):
        sweep.check_values(parser, "bins", ["4", "x"])
    with pytest.raises(DataError, match="choose from cpu, cuda"):
        sweep.check_values(parser, "device", ["gpu"])
    with pytest.raises(DataError, match=r"no option --binz to sweep over; options that can be swept: .*\bbins\b"):
        sweep.check_values(parser, "binz", ["1"])
    with pytest.raises(DataError, match="6 values"):
        sweep.check_values(parser, "bounds", ["1"])


def test_methods_run_in_one_process_share_one_exact_reference_and_a_new_problem_gets_its_own(profile_csv, monkeypatch,
                                                                                            tmp_path):
    from gravity_flows.scoring import reference

    computed = []
    original = reference.compute_reference

    def counting(problem, laplace):
        computed.append(problem)
        return original(problem, laplace)

    monkeypatch.setattr(reference, "compute_reference", counting)
    monkeypatch.setattr(cli, "_LATEST_REFERENCE", {})
    parser = Gravity_MCMC.build_parser()
    first = cli.setup_run(parser.parse_args(["--data", str(profile_csv), "--out", str(tmp_path / "a")]))
    again = cli.setup_run(parser.parse_args(["--data", str(profile_csv), "--out", str(tmp_path / "b")]))
    assert again[3] is first[3] and len(computed) == 1
    other = cli.setup_run(parser.parse_args(["--data", str(profile_csv), "--bounds", "0", "10", "1", "15", "0.5", "4", "--out", str(tmp_path / "c")]))
    assert len(computed) == 2 and other[3] is not first[3]
    # the reused reference is the one its problem would get afresh
    assert other[3].log_evidence == pytest.approx(original(other[0], other[2]).log_evidence, abs=1e-12)
