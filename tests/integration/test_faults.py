"""Faults and reproducibility: divergence (the script as ``__main__`` in this process), Ctrl-C (real processes,
and in this process at exact moments), whole-or-nothing files and results, same seed same samples.

Exit statuses (cli.py): 2 bad input, 3 training diverged, 130 interrupted. After any Ctrl-C an output
folder holds a complete result (marked interrupted if its loop was cut short) or nothing of the run,
and never a mix with an earlier run's files.
"""

import hashlib
import importlib
import json
import os
import platform
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import forward
from gravity_flows.command import cli
import Gravity_MCMC
import Gravity_planar
from gravity_flows.command import runner
from gravity_flows.reporting import output
from ctrl_c import WAITING, after_writing

ROOT = Path(__file__).resolve().parents[2]
#: Runs a script as ``__main__`` in a real process with its figures drawn but not rendered.
UNRENDERED = "tests/integration/unrendered.py"
COMMON_FILES = ("marginals.png", "predictive_check.png", "pairs.png", "summary.json", "samples.npz")
FLOW_FILES = COMMON_FILES + ("elbo.png",)
MCMC_FILES = COMMON_FILES + ("trace.png", "autocorrelation.png", "misfit.png")


def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def leftover_temporaries(folder):
    return [path.name for path in folder.rglob(".tmp-*")]


def result_files(folder):
    """The names of the result files (of any run, a comparison or a sweep) in ``folder``."""
    return {path.name for path in folder.iterdir() if path.name in cli.RESULT_FILES} if folder.exists() else set()


def plant_earlier_result(folder, names):
    """An earlier run's result in ``folder`` (files ``names``), and a file of the user's that is no result."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"an earlier run's " + name.encode())
    (folder / "notes.txt").write_text("the user's own file: never removed\n")


# ----------------------------------------------------------------------------------------------
# Divergence


def test_divergence_stops_with_the_iteration_and_what_to_change_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The script file run as ``__main__`` in this process (runpy: what ``python Gravity_X.py ARGS`` runs once
    the interpreter is up; a fresh one costs 3-5 s of imports here). What only a real process shows of an
    error, its exit status and whole stderr, is checked by test_bad_input.py's process cases and the Ctrl-C
    tests below; an exception that escaped runner.run would fail this test as it would show a traceback."""
    out = tmp_path / "out"
    script = ROOT / "Gravity_invertible_Affine.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--lr", "1e6", "--iterations", "200", "--quiet", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    stderr = capsys.readouterr().err
    assert stopped.value.code == 3, stderr
    assert "Traceback" not in stderr
    # the error is one line, the last (a "start: ..." line about the chosen start may come before it)
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and stderr.strip().endswith(errors[0]), stderr
    message = errors[0]
    assert "diverged at iteration 2 of 200" in message
    assert "--lr" in message and "--clip-norm" in message
    assert not out.exists() or not any(out.iterdir()), "a diverged run must leave nothing that looks like a result"


# ----------------------------------------------------------------------------------------------
# Ctrl-C


class Running:
    """A script started with its progress bar on, so that stderr says when the long loop has begun."""

    def __init__(self, *args):
        self.process = subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout, self.stderr = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=pipe, daemon=True)
                        for pipe in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, buffer):
        while chunk := pipe.read1(4096):
            buffer.extend(chunk)

    def wait_for(self, text, timeout=90):
        """Wait until ``text`` (a regular expression) appears on stderr; the timeout only guards against a hang."""
        pattern = re.compile(text.encode())
        deadline = time.monotonic() + timeout
        while not pattern.search(self.stderr):
            assert self.process.poll() is None, f"the script ended before {text!r}:\n{self.stderr.decode()}"
            assert time.monotonic() < deadline, f"no {text!r} on stderr after {timeout} s"
            time.sleep(0.05)

    def wait_for_progress(self, loop):
        """Wait until the progress bar of ``loop`` counts at least one step done: the loop is running and
        has something to keep, however slowly the machine runs (no guess of how long that takes)."""
        self.wait_for(rf"{loop}:[^\r\n]*\| *[1-9][0-9]*/")

    def interrupt(self):
        self.process.send_signal(signal.SIGINT)

    def finish(self, timeout=120):
        """Exit status and stderr, once the process has ended."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        for reader in self.readers:
            reader.join(timeout=10)
        return self.process.returncode, self.stderr.decode()


@pytest.mark.parametrize("script, loop, planned, files", [
    ("Gravity_coupling_Affine.py", "training", 100_000, FLOW_FILES),
    ("Gravity_MCMC.py", "sampling", 10_000_000, MCMC_FILES),
])
def test_ctrl_c_writes_what_was_learnt_marked_interrupted(script, loop, planned, files, tmp_path):
    out = tmp_path / "out"
    # the folder held another method's result: none of its files may be taken for this run's
    plant_earlier_result(out, set(FLOW_FILES + MCMC_FILES) - set(files) | {"summary.json", "samples.npz"})
    # figures drawn, not rendered (tests/integration/unrendered.py): the files are what is checked
    run = Running(UNRENDERED, script, "--iterations", planned, "--samples", 500, "--out", out)
    run.wait_for_progress(loop)
    run.interrupt()
    status, stderr = run.finish()
    assert status == 130, stderr
    assert "Traceback" not in stderr
    assert f"interrupted: stopping {loop}" in stderr
    assert "posterior of (x0, z, R)" in run.stdout.decode()  # what was learnt is reported
    for name in files:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert 1 <= summary["iterations"] < planned
    assert np.all(np.isfinite(summary["posterior"]["mean"]))
    assert np.load(out / "samples.npz")["theta"].shape == (500, 3)
    assert result_files(out) == set(files), "this run's files, and only they"
    assert (out / "notes.txt").exists()
    assert leftover_temporaries(out) == []


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The first Ctrl-C stops the sampling loop; the second, from outside, arrives while the results are
    written (once trace.png, the method's own figure, is in place, the process waits there for it:
    tests/integration/ctrl_c.py --wait) and ends the process at once: a process that waited for the
    results to be written first, or ignored the Ctrl-C, would never end."""
    out = tmp_path / "out"
    plant_earlier_result(out, FLOW_FILES)
    run = Running("tests/integration/ctrl_c.py", "--wait", "trace.png", "Gravity_MCMC.py", "--iterations", 10_000_000,
                  "--burn-in", 200, "--samples", 500, "--out", out)
    run.wait_for_progress("sampling")
    run.interrupt()
    run.wait_for(f"{WAITING} trace.png")
    run.interrupt()
    status, stderr = run.finish(timeout=60)
    assert status == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: stopping sampling" in stderr
    assert stderr.rstrip().endswith("Gravity_MCMC.py: interrupted")
    # it quit before finishing: no summary claims a result, no file is half-written, and the earlier
    # run's result went when this run began with the folder
    assert result_files(out) == set()
    assert (out / "notes.txt").exists()
    assert leftover_temporaries(out) == []


def test_a_second_ctrl_c_while_the_results_are_written_leaves_nothing_of_the_run_in_a_real_process(tmp_path):
    """First Ctrl-C in the sampling loop; the second right after samples.npz is in place, before summary.json."""
    out = tmp_path / "out"
    plant_earlier_result(out, FLOW_FILES)
    run = Running("tests/integration/ctrl_c.py", "samples.npz", "Gravity_MCMC.py", "--iterations", 10_000_000,
                  "--burn-in", 200, "--samples", 500, "--out", out)
    run.wait_for_progress("sampling")
    run.interrupt()
    status, stderr = run.finish()
    assert status == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: stopping sampling" in stderr  # the first Ctrl-C: stop and write the results...
    assert stderr.rstrip().endswith("Gravity_MCMC.py: interrupted")  # ...the second: quit at once
    # samples.npz and the MCMC figures were written, then removed: the result was not complete;
    # the earlier flow result (with its summary.json) is not there to be mixed with them
    assert result_files(out) == set()
    assert (out / "notes.txt").exists()
    assert leftover_temporaries(out) == []


# ----------------------------------------------------------------------------------------------
# Ctrl-C at exact moments, in this process: the real handlers (runner.run installs cli.quit_now,
# cli.interruptible its own), signals sent by the process to itself; only os._exit is replaced, by
# a note of what it would leave behind. Figures are drawn but not rendered, to keep these fast.

#: method: (main, its options but --iterations, its files, short --iterations); a loop cut short by a
#: first Ctrl-C is planned at INTERRUPTED_PLAN iterations, which it never reaches.
CHEAP = {"MCMC": (Gravity_MCMC.main, ["--burn-in", "200", "--samples", "300"], MCMC_FILES, 1000),
         "planar": (Gravity_planar.main, ["--samples", "300"], FLOW_FILES, 20)}
INTERRUPTED_PLAN = 100_000


class Quit(BaseException):
    """Stands for os._exit inside cli.quit_now, which would end the test process."""


@pytest.fixture
def in_process(monkeypatch):
    """Run a method as its script would (runner.run), in this process: ``(exit status, result files left)``.

    A quit at once (cli.quit_now) is seen through os._exit: the files are those left at that moment.
    """
    import matplotlib.pyplot as plt

    def save_figure(figure, path, dpi=130):  # rendering is most of a short run's time; not what is tested
        with output.atomic_path(path) as temporary:
            temporary.write_bytes(b"\x89PNG not rendered")
        plt.close(figure)

    monkeypatch.setattr(output, "save_figure", save_figure)

    def run(method, out, iterations=None):
        main, options, _, short = CHEAP[method]
        left = {}

        def exit_at_once(status):
            left.update(status=status, files=result_files(out), temporaries=leftover_temporaries(out))
            raise Quit

        previous = signal.getsignal(signal.SIGINT)
        monkeypatch.setattr(os, "_exit", exit_at_once)
        try:
            runner.run(main, [*options, "--iterations", str(iterations or short), "--quiet", "--out", str(out)])
        except Quit:
            assert left["temporaries"] == []
            return left["status"], left["files"]
        except SystemExit as exit_:
            return exit_.code, result_files(out)
        finally:
            plt.close("all")  # a figure being drawn when the run quit was never closed
            assert signal.getsignal(signal.SIGINT) is previous  # runner.run put it back
        raise AssertionError("runner.run neither exited nor quit")

    return run


@pytest.fixture
def ctrl_c_in_the_loop(monkeypatch):
    """A first Ctrl-C as the training or sampling loop begins: cli.interruptible's handler takes it."""
    interruptible = cli.interruptible

    @contextmanager
    def interrupted_at_once(*args, **kwargs):
        with interruptible(*args, **kwargs) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            yield stop

    monkeypatch.setattr(cli, "interruptible", interrupted_at_once)


def ctrl_c_after_writing(monkeypatch, name):
    """A Ctrl-C as soon as the file ``name`` is in place."""
    monkeypatch.setattr(output, "atomic_path", after_writing(name, output.atomic_path))


def earlier_result_of_another_method(method):
    files = CHEAP[method][2]
    return set(FLOW_FILES + MCMC_FILES) - set(files) | {"summary.json", "samples.npz"}


@pytest.mark.parametrize("method", sorted(CHEAP))
def test_a_first_ctrl_c_in_the_loop_gives_a_complete_result_marked_interrupted(method, tmp_path, in_process,
                                                                               ctrl_c_in_the_loop):
    out = tmp_path / "out"
    plant_earlier_result(out, earlier_result_of_another_method(method))
    status, files = in_process(method, out, INTERRUPTED_PLAN)
    assert status == cli.EXIT_INTERRUPTED
    assert files == set(CHEAP[method][2]), "this run's files, all of them, and no other run's"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["method"] == method
    assert 1 <= summary["iterations"] < INTERRUPTED_PLAN
    assert (out / "notes.txt").exists()


# moments: the method's own figure (written before report.write_results), samples.npz (its first
# file), predictive_check.png (the last before summary.json)
@pytest.mark.parametrize("method, moment", [("MCMC", "trace.png"), ("MCMC", "samples.npz"), ("planar", "elbo.png"),
                                            ("planar", "predictive_check.png")])
@pytest.mark.parametrize("first_in_the_loop", [True, False], ids=["second-ctrl-c", "ctrl-c-outside-the-loop"])
def test_a_ctrl_c_while_the_results_are_written_leaves_nothing_of_the_run(method, moment, first_in_the_loop, tmp_path,
                                                                          monkeypatch, in_process, request):
    out = tmp_path / "out"
    plant_earlier_result(out, earlier_result_of_another_method(method))
    if first_in_the_loop:
        request.getfixturevalue("ctrl_c_in_the_loop")
    ctrl_c_after_writing(monkeypatch, moment)
    status, files = in_process(method, out, INTERRUPTED_PLAN if first_in_the_loop else None)
    assert (status, files) == (cli.EXIT_INTERRUPTED, set())
    assert (out / "notes.txt").exists()


def test_a_ctrl_c_once_the_result_is_complete_leaves_it_whole(tmp_path, monkeypatch, in_process):
    out = tmp_path / "out"
    ctrl_c_after_writing(monkeypatch, "summary.json")
    status, files = in_process("MCMC", out)
    assert (status, files) == (cli.EXIT_INTERRUPTED, set(MCMC_FILES))
    assert json.loads((out / "summary.json").read_text())["interrupted"] is False  # its loop ran to the end


class QuitNow(Exception):
    """Stands for cli.quit_now, which would end the test process."""


def test_interruptible_sets_a_flag_first_and_quits_on_a_second_ctrl_c(monkeypatch):
    def record(*_):
        raise QuitNow

    monkeypatch.setattr(cli, "quit_now", record)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(QuitNow):
        with cli.interruptible("the test") as stop:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 5
            while not stop.interrupted and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop.interrupted
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler quits here
    assert signal.getsignal(signal.SIGINT) is previous


def test_quitting_at_once_removes_the_files_being_written(tmp_path):
    writing = output.atomic_path(tmp_path / "figure.png")
    temporary = writing.__enter__()  # a write in progress, never finished: the process quits
    temporary.write_bytes(b"half a figure")
    output.discard_temporaries()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def unfinished(monkeypatch):
    """output's record of the results begun and not complete, empty and this test's own."""
    monkeypatch.setattr(output, "_UNFINISHED", {})
    return output._UNFINISHED


def test_a_result_is_discarded_until_its_last_file_is_written(tmp_path, unfinished):
    run, other = tmp_path / "run", tmp_path / "other"
    plant_earlier_result(run, ["summary.json", "elbo.png", "table.md"])
    (run / "sub").mkdir()
    assert sorted(output.begin_result(run)) == ["elbo.png", "summary.json", "table.md"]
    assert sorted(path.name for path in run.iterdir()) == ["notes.txt", "sub"]  # only result files, by name
    output.write_npz(run / "samples.npz", theta=np.zeros((2, 3)))
    other.mkdir()
    output.write_npz(other / "samples.npz", theta=np.zeros((2, 3)))  # a folder no run has begun: not recorded
    assert output.discard_unfinished() == [run / "samples.npz"]  # what a quit now removes
    assert sorted(path.name for path in run.iterdir()) == ["notes.txt", "sub"]
    assert (other / "samples.npz").exists()

    output.begin_result(run)
    output.write_npz(run / "samples.npz", theta=np.zeros((2, 3)))
    output.write_json(run / "summary.json", {"method": "test"})  # the last file: the result is complete
    output.write_json(tmp_path / "run" / "later.json", {})  # not part of it, and not recorded
    assert output.discard_unfinished() == []
    assert {"samples.npz", "summary.json", "later.json"} <= {path.name for path in run.iterdir()}


def test_every_file_a_module_writes_into_an_output_folder_is_a_known_result_file():
    """begin_result removes an earlier result by its files' names: a new output file must be named in RESULT_FILES."""
    import ast

    named = set()
    for path in [*ROOT.glob("*.py"), *ROOT.glob("gravity_flows/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and str(node.right.value).endswith((".png", ".json", ".npz", ".md", ".csv"))):
                named.add(node.right.value)  # out / "summary.json", folder / "table.md", ...
    assert {"summary.json", "elbo.png", "trace.png", "table.md"} <= named
    assert named <= set(output.RESULT_FILES) | {output.MODEL_FILE}
    assert set(output.COMPLETING_FILES) <= set(output.RESULT_FILES)


def test_a_table_completes_a_comparison_or_a_sweep(tmp_path, unfinished):
    from gravity_flows.command import sweep

    output.begin_result(tmp_path)
    (tmp_path / "figure.png").write_bytes(b"")  # not written through output: not this run's to remove
    sweep.write_tables(tmp_path, sweep.COLUMNS[:2], [{"method": "MCMC", "error": 0.01}], "heading")
    assert output.discard_unfinished() == []
    assert {"table.csv", "table.md", "figure.png"} <= {path.name for path in tmp_path.iterdir()}


# ----------------------------------------------------------------------------------------------
# Reproducibility: same options and seed, same samples.npz, byte for byte (CPU)


#: The runs of the reproducibility tests: as short as still makes hundreds of distinct samples.
RUNS = {
    "MCMC": ("Gravity_MCMC.py", "--iterations", 500, "--burn-in", 100, "--samples", 500),
    "flow": ("Gravity_planar.py", "--iterations", 50, "--samples", 500),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def seeded_runs(request, tmp_path_factory, profile_csv, figures_rendered_only_in):
    """Three runs of one method into different folders: seed 7 in a fresh process, and, while it runs,
    seed 7 again and seed 8 in this process (after everything the suite ran before them: a result that
    hung on any state of the process, its random generators included, would differ from the fresh one's).

    MCMC inverts the CSV profile (so its summary must describe the file), the flow the synthetic data.
    """
    folder = tmp_path_factory.mktemp(f"seeded-{request.param}")
    script, *options = RUNS[request.param]
    if request.param == "MCMC":
        options += ["--data", profile_csv]
    outs = [folder / "seed7-process", folder / "seed7", folder / "seed8"]
    # the flow's process renders its figures (the one real process that does), MCMC's draws them only
    launcher = command(UNRENDERED, script) if request.param == "MCMC" else command(script)
    process = subprocess.Popen([*launcher, *map(str, options), "--quiet", "--seed", "7", "--out", str(outs[0])], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        main = importlib.import_module(script.removesuffix(".py")).main
        with figures_rendered_only_in():  # samples.npz is what is compared
            for seed, out in zip((7, 8), outs[1:]):
                assert main([*map(str, options), "--quiet", "--seed", str(seed), "--out", str(out)]) == 0
        _, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    return request.param, outs


def test_same_seed_gives_identical_samples_file(seeded_runs):
    _, (first, second, _) = seeded_runs
    assert (first / "samples.npz").read_bytes() == (second / "samples.npz").read_bytes()
    theta = np.load(first / "samples.npz")["theta"]
    assert np.array_equal(theta, np.load(second / "samples.npz")["theta"])
    assert np.unique(theta, axis=0).shape[0] > 100  # real samples, not one point repeated


def test_another_seed_gives_other_samples(seeded_runs):
    _, (first, _, other) = seeded_runs
    assert not np.array_equal(np.load(first / "samples.npz")["theta"], np.load(other / "samples.npz")["theta"])


def test_summary_records_options_data_source_and_versions(seeded_runs, profile_csv):
    method, (first, _, _) = seeded_runs
    summary = json.loads((first / "summary.json").read_text())
    settings = summary["settings"]
    common = {"data", "noise", "density", "bounds", "seed", "samples", "init", "out", "quiet"}
    own = ({"iterations", "burn_in", "proposal_scale", "chains", "start"} if method == "MCMC" else
           {"iterations", "flows", "lr", "batch", "clip_norm", "clip_value", "device"})
    assert common | own <= set(settings)
    assert settings["seed"] == 7 and settings["iterations"] == RUNS[method][RUNS[method].index("--iterations") + 1]
    assert settings["bounds"] == [v for pair in forward.DEFAULT_BOUNDS for v in pair]
    assert settings["out"] == str(first)

    data = summary["data"]
    if method == "MCMC":
        assert data["kind"] == "file"
        assert data["path"] == str(profile_csv.resolve())
        assert data["sha256"] == hashlib.sha256(profile_csv.read_bytes()).hexdigest()
        assert data["n_stations"] == 100
    else:
        assert data["kind"] == "synthetic"
        assert data["noise_seed"] == forward.DEFAULT_NOISE_SEED
        assert settings["data"] is None

    versions = summary["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["numpy"] == np.__version__
    assert versions["torch"] == torch.__version__
