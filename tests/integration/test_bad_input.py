"""Bad input: one clear line on stderr and exit status 2, never a traceback (SPEC, 'Quality bar').

Each rule is one case of a parametrised test. Most cases run the script file itself as
``__main__`` inside the test process (``runpy``), exactly what ``python Gravity_X.py ARGS`` runs
after the interpreter has started: starting a fresh interpreter and importing torch costs 2-3 s,
which forty cases cannot afford on every commit. Real subprocesses then check what only a process
shows (its exit status, its whole stderr and stdout, no traceback) for MCMC with ``--iterations 0``
(every script's ``--iterations 0`` runs in this process too), for the output folder that cannot be
written (a flow script) and for the mode-on-bound warning.

Every case runs with cheap settings before its bad option (argparse keeps the last value given), so
a rule that stopped being enforced would fail quickly instead of training for minutes.
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = (
    "Gravity_MCMC.py",
    "Gravity_planar.py",
    "Gravity_auto_Affine.py",
    "Gravity_auto_NSF.py",
    "Gravity_coupling_Affine.py",
    "Gravity_coupling_NSF.py",
    "Gravity_invertible_Affine.py",
)
CHEAP = {"MCMC": ["--iterations", "200", "--burn-in", "50", "--samples", "100"],
         "flow": ["--iterations", "5", "--samples", "100"]}


def cheap_args(script, out):
    return ["--quiet", "--out", str(out), *CHEAP["MCMC" if script == "Gravity_MCMC.py" else "flow"]]


def run_in_process(script, args, monkeypatch, capsys):
    """Run ``script`` as ``__main__`` with ``args``; return (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *map(str, args)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return stopped.value.code, capsys.readouterr().err


def run_process(script, args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kwargs)


def assert_one_line_error(status, stderr, phrase):
    assert status == 2, stderr
    assert "Traceback" not in stderr
    assert "\n" not in stderr.strip(), f"more than one line on stderr:\n{stderr}"
    assert phrase in stderr


def assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


# ----------------------------------------------------------------------------------------------
# --data: the profile file

GOOD_ROWS = "1,2\n2,3\n3,4\n4,5\n"

DATA_CASES = [
    # id, script, file content (None: no file at all), phrase in the message
    ("missing-file", "Gravity_MCMC.py", None, "data file not found"),
    ("empty-file", "Gravity_planar.py", "", "is empty"),
    ("blank-lines-only", "Gravity_MCMC.py", "\n\n  \n", "is empty"),
    ("no-header", "Gravity_auto_Affine.py", GOOD_ROWS, "no 'x' column in the header row ['1', '2']; expected a header 'x,g[,sigma]'"),
    ("no-x-column", "Gravity_MCMC.py", "position,g\n" + GOOD_ROWS, "no 'x' column"),
    ("no-g-column", "Gravity_auto_NSF.py", "x,gravity\n" + GOOD_ROWS, "no 'g' column"),
    ("non-numeric-value", "Gravity_MCMC.py", "x,g\n1,2\n2,abc\n3,4\n4,5\n", "line 3, column 'g': not a number: 'abc'"),
    ("missing-value", "Gravity_coupling_Affine.py", "x,g\n1,2\n2,3\n3\n4,5\n", "line 4, column 'g': not a number"),
    ("nan-station", "Gravity_MCMC.py", "x,g\n1,2\n2,3\nnan,4\n4,5\n", "line 4, column 'x': value is nan"),
    ("infinite-value", "Gravity_coupling_NSF.py", "x,g\n1,2\n2,inf\n3,4\n4,5\n", "line 3, column 'g': value is inf"),
    ("nan-sigma", "Gravity_MCMC.py", "x,g,sigma\n1,2,1\n2,3,1\n3,4,NaN\n4,5,1\n", "line 4, column 'sigma': value is nan"),
    ("too-few-stations", "Gravity_invertible_Affine.py", "x,g\n1,2\n2,3\n3,4\n", "has 3 stations; at least 4"),
    ("duplicate-stations", "Gravity_MCMC.py", "x,g\n1,2\n2,3\n2,4\n4,5\n", "station x = 2 m appears more than once"),
    ("zero-sigma", "Gravity_planar.py", "x,g,sigma\n1,2,1\n2,3,0\n3,4,1\n4,5,1\n", "line 3, column 'sigma': must be > 0"),
    ("negative-sigma", "Gravity_MCMC.py", "x,g,sigma\n1,2,1\n2,3,1\n3,4,1\n4,5,-0.5\n", "line 5, column 'sigma': must be > 0"),
]


@pytest.mark.parametrize("script, content, phrase", [pytest.param(*case[1:], id=case[0]) for case in DATA_CASES])
def test_bad_data_file_is_one_line_and_status_2(script, content, phrase, tmp_path, monkeypatch, capsys):
    data = tmp_path / "profile.csv"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    status, stderr = run_in_process(script, [*cheap_args(script, out), "--data", data], monkeypatch, capsys)
    assert_one_line_error(status, stderr, phrase)
    assert str(data) in stderr  # the message names the file
    assert_nothing_written(out)


def test_a_folder_given_as_data_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    status, stderr = run_in_process("Gravity_MCMC.py", [*cheap_args("Gravity_MCMC.py", out), "--data", tmp_path],
                                    monkeypatch, capsys)
    assert_one_line_error(status, stderr, f"cannot read data file {tmp_path}")


# ----------------------------------------------------------------------------------------------
# Options

OPTION_CASES = [
    # id, script, bad options, phrase in the message
    ("noise-zero", "Gravity_MCMC.py", ["--noise", "0"], "argument --noise: must be > 0"),
    ("noise-negative", "Gravity_planar.py", ["--noise", "-1"], "argument --noise: must be > 0"),
    ("noise-nan", "Gravity_MCMC.py", ["--noise", "nan"], "argument --noise: must be a finite number"),
    ("density-zero", "Gravity_auto_Affine.py", ["--density", "0"], "the density contrast must not be 0"),
    ("bounds-x0-low-equals-high", "Gravity_MCMC.py", ["--bounds", "5", "5", "1", "15", "0.5", "5"],
     "the lower bound of x0 (5) must be below its upper bound (5)"),
    ("bounds-z-low-above-high", "Gravity_coupling_Affine.py", ["--bounds", "0", "10", "15", "1", "0.5", "5"],
     "the lower bound of z (15) must be below its upper bound (1)"),
    ("bounds-depth-not-positive", "Gravity_MCMC.py", ["--bounds", "0", "10", "0", "15", "0.5", "5"],
     "the lower bound of z must be > 0 m"),
    ("bounds-radius-not-positive", "Gravity_auto_NSF.py", ["--bounds", "0", "10", "1", "15", "-1", "5"],
     "the lower bound of R must be > 0 m"),
    ("bounds-nan", "Gravity_MCMC.py", ["--bounds", "0", "10", "1", "nan", "0.5", "5"],
     "argument --bounds: must be a finite number"),
    ("start-outside-bounds", "Gravity_MCMC.py", ["--start", "3", "20", "2"], "--start 3 20 2 lies outside the prior box"),
    ("start-outside-bounds-prior-init", "Gravity_MCMC.py", ["--init", "prior", "--start", "-1", "6", "2"],
     "lies outside the prior box"),
    ("iterations-not-a-number", "Gravity_planar.py", ["--iterations", "many"], "argument --iterations: not a whole number"),
    ("samples-one", "Gravity_MCMC.py", ["--samples", "1"], "argument --samples: must be ≥ 2"),
    ("samples-one-flow", "Gravity_coupling_NSF.py", ["--samples", "1"], "argument --samples: must be ≥ 2"),
    ("batch-zero", "Gravity_planar.py", ["--batch", "0"], "argument --batch: must be ≥ 1"),
    ("flows-zero", "Gravity_auto_Affine.py", ["--flows", "0"], "argument --flows: must be ≥ 1"),
    ("hidden-zero", "Gravity_coupling_Affine.py", ["--hidden", "0"], "argument --hidden: must be ≥ 1"),
    ("chains-zero", "Gravity_MCMC.py", ["--chains", "0"], "argument --chains: must be ≥ 1"),
    ("burn-in-negative", "Gravity_MCMC.py", ["--burn-in", "-1"], "argument --burn-in: must be ≥ 0"),
    ("proposal-scale-zero", "Gravity_MCMC.py", ["--proposal-scale", "0"], "argument --proposal-scale: must be > 0"),
    ("bins-zero", "Gravity_auto_NSF.py", ["--bins", "0"], "argument --bins: must be ≥ 1"),
    ("lr-zero", "Gravity_invertible_Affine.py", ["--lr", "0"], "argument --lr: must be > 0"),
    ("lr-negative", "Gravity_planar.py", ["--lr", "-0.01"], "argument --lr: must be > 0"),
    ("lr-nan", "Gravity_coupling_Affine.py", ["--lr", "nan"], "argument --lr: must be a finite number"),
    ("clip-norm-zero", "Gravity_coupling_Affine.py", ["--clip-norm", "0"], "argument --clip-norm: must be > 0"),
    ("clip-value-negative", "Gravity_auto_Affine.py", ["--clip-value", "-1"], "argument --clip-value: must be > 0"),
    ("clip-norm-and-clip-value", "Gravity_invertible_Affine.py", ["--clip-norm", "10", "--clip-value", "1"],
     "argument --clip-value: not allowed with argument --clip-norm"),
    ("tail-bound-zero", "Gravity_coupling_NSF.py", ["--tail-bound", "0"], "argument --tail-bound: must be > 0"),
    ("seed-negative", "Gravity_MCMC.py", ["--seed", "-1"], "argument --seed: must be ≥ 0"),
    ("seed-too-large", "Gravity_planar.py", ["--seed", str(2**64)], "argument --seed: must be ≤ 18446744073709551615"),
    ("init-unknown", "Gravity_MCMC.py", ["--init", "map"], "argument --init: invalid choice: 'map'"),
    ("coordinates-mass-density-known", "Gravity_planar.py", ["--coordinates", "mass"],
     "--coordinates mass needs a free density (--density-bounds LO HI)"),
]


@pytest.mark.parametrize("script, bad, phrase", [pytest.param(*case[1:], id=case[0]) for case in OPTION_CASES])
def test_bad_option_is_one_line_and_status_2(script, bad, phrase, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    status, stderr = run_in_process(script, [*cheap_args(script, out), *bad], monkeypatch, capsys)
    assert_one_line_error(status, stderr, phrase)
    assert stderr.startswith(f"{script}: error: ")
    assert_nothing_written(out)


def test_cuda_without_a_gpu_says_so_and_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, on any machine
    out = tmp_path / "out"
    script = "Gravity_coupling_Affine.py"
    status, stderr = run_in_process(script, [*cheap_args(script, out), "--device", "cuda"], monkeypatch, capsys)
    assert_one_line_error(status, stderr, "--device cuda: torch sees no GPU here")
    assert "use --device cpu" in stderr
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------
# Real processes


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_rejects_zero_iterations(script, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    status, stderr = run_in_process(script, [*cheap_args(script, out), "--iterations", "0"], monkeypatch, capsys)
    assert_one_line_error(status, stderr, "argument --iterations: must be ≥ 1, got 0")
    assert stderr.startswith(f"{script}: error: ")
    assert_nothing_written(out)


def test_zero_iterations_as_a_process_is_one_line_status_2_and_nothing_on_stdout(tmp_path):
    """MCMC as a real process (every script's rule is checked in this process above; a flow script's
    one-line exit 2 as a process is the output folder's test below)."""
    out = tmp_path / "out"
    completed = run_process("Gravity_MCMC.py", [*cheap_args("Gravity_MCMC.py", out), "--iterations", "0"])
    assert_one_line_error(completed.returncode, completed.stderr, "argument --iterations: must be ≥ 1, got 0")
    assert completed.stderr.startswith("Gravity_MCMC.py: error: ")
    assert completed.stdout == ""
    assert_nothing_written(out)


def test_output_folder_under_a_file_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a folder\n")
    out = blocker / "sub"
    completed = run_process("Gravity_planar.py", cheap_args("Gravity_planar.py", out))
    assert_one_line_error(completed.returncode, completed.stderr, f"cannot write to the output folder {out}")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_names_the_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        completed = run_process("Gravity_MCMC.py", cheap_args("Gravity_MCMC.py", locked))
        assert_one_line_error(completed.returncode, completed.stderr, f"cannot write to the output folder {locked}")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_mode_on_a_prior_bound_warns_and_the_run_completes(tmp_path):
    # the true depth is 6 m: with z in [1, 5.5] the posterior mode of z sits on its upper bound
    out = tmp_path / "out"
    # the script run as __main__ with its figures drawn, not rendered (tests/integration/unrendered.py)
    completed = run_process("tests/integration/unrendered.py", ["Gravity_MCMC.py", "--bounds", "0", "10", "1", "5.5", "0.5",
                                                                "5", "--quiet", "--out", out, "--iterations", "500",
                                                                "--burn-in", "100", "--samples", "500"])
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    warning = [line for line in completed.stderr.splitlines() if "prior bound" in line]
    assert len(warning) == 1
    assert "posterior mode of z sits on its prior bound" in warning[0] and "widen --bounds" in warning[0]
    theta = np.load(out / "samples.npz")["theta"]
    assert theta[:, 1].max() <= 5.5
    assert (out / "summary.json").exists()
