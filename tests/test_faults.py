"""Faults and reproducibility, on real processes: divergence, Ctrl-C, whole-or-nothing files, same seed same samples.

Exit statuses (cli.py): 2 bad input, 3 training diverged, 130 interrupted.
"""

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import forward

ROOT = Path(__file__).resolve().parent.parent
COMMON_FILES = ("marginals.png", "predictive_check.png", "pairs.png", "summary.json", "samples.npz")
FLOW_FILES = COMMON_FILES + ("elbo.png",)
MCMC_FILES = COMMON_FILES + ("trace.png", "autocorrelation.png", "misfit.png")


def command(script, *args):
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run_together(commands, timeout=180):
    """Start every command at once (they are independent), wait for all; CompletedProcess-like results."""
    processes = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def leftover_temporaries(folder):
    return [path.name for path in folder.rglob(".tmp-*")]


# ----------------------------------------------------------------------------------------------
# Divergence


def test_divergence_stops_with_the_iteration_and_what_to_change_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    [completed] = run_together([command("Gravity_invertible_Affine.py", "--lr", "1e6", "--iterations", "200",
                                        "--quiet", "--out", out)])
    assert completed.returncode == 3, completed.stderr
    assert "Traceback" not in completed.stderr
    message = completed.stderr.strip()
    assert "\n" not in message
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
        """Wait until ``text`` appears on stderr (the progress bar's name: the loop is running)."""
        deadline = time.monotonic() + timeout
        while text.encode() not in self.stderr:
            assert self.process.poll() is None, f"the script ended before {text!r}:\n{self.stderr.decode()}"
            assert time.monotonic() < deadline, f"no {text!r} on stderr after {timeout} s"
            time.sleep(0.05)

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
    run = Running(script, "--iterations", planned, "--samples", 2000, "--out", out)
    run.wait_for(loop)
    time.sleep(0.5)
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
    assert np.load(out / "samples.npz")["theta"].shape == (2000, 3)
    assert leftover_temporaries(out) == []


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "out"
    run = Running("Gravity_MCMC.py", "--iterations", 10_000_000, "--out", out)
    run.wait_for("sampling")
    run.interrupt()
    time.sleep(0.2)
    run.interrupt()
    second = time.monotonic()
    status, stderr = run.finish(timeout=30)
    assert time.monotonic() - second < 5, "the second Ctrl-C must not wait for the results to be written"
    assert status == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.rstrip().endswith("Gravity_MCMC.py: interrupted")
    # it quit before finishing: no summary claims a result, and no file is half-written
    assert not (out / "summary.json").exists()
    assert leftover_temporaries(out) == []


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
    import output

    writing = output.atomic_path(tmp_path / "figure.png")
    temporary = writing.__enter__()  # a write in progress, never finished: the process quits
    temporary.write_bytes(b"half a figure")
    output.discard_temporaries()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Reproducibility: same options and seed, same samples.npz, byte for byte (CPU)


@pytest.fixture(scope="module")
def profile_csv(tmp_path_factory):
    """A user's profile: every tenth station of the synthetic data, with a sigma column."""
    problem = forward.synthetic_problem()
    path = tmp_path_factory.mktemp("data") / "profile.csv"
    rows = [f"{float(x)!r},{float(g)!r},1.0" for x, g in zip(problem.stations[::10], problem.g_obs[::10])]
    path.write_text("x,g,sigma\n" + "\n".join(rows) + "\n")
    return path


RUNS = {
    "MCMC": ("Gravity_MCMC.py", "--iterations", 3000, "--burn-in", 200, "--samples", 2000),
    "flow": ("Gravity_planar.py", "--iterations", 200, "--samples", 2000),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def seeded_runs(request, tmp_path_factory, profile_csv):
    """Three runs of one method: seed 7 twice, seed 8 once, into different folders, all at once.

    MCMC inverts the CSV profile (so its summary must describe the file), the flow the synthetic data.
    """
    folder = tmp_path_factory.mktemp(f"seeded-{request.param}")
    script, *options = RUNS[request.param]
    if request.param == "MCMC":
        options += ["--data", profile_csv]
    outs = [folder / "seed7-a", folder / "seed7-b", folder / "seed8"]
    results = run_together([command(script, *options, "--quiet", "--seed", seed, "--out", out)
                            for seed, out in zip((7, 7, 8), outs)])
    for completed in results:
        assert completed.returncode == 0, completed.stderr
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
    assert settings["seed"] == 7 and settings["iterations"] == (3000 if method == "MCMC" else 200)
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
