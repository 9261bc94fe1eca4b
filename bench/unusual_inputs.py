"""Valid but unusual inputs through every script at its defaults, each scored against the exact posterior.

    python bench/unusual_inputs.py [--out DIR] [--cases NAME,...] [--methods MCMC,planar,...] [--list]

The cases are those a new user meets (issue 17): prior boxes that exclude the original's start
(5.5, 8.5, 4.5) in each parameter, from both starts (``--init auto`` and ``--init prior``); a cavity
(negative contrast) known and free; a sparse irregular profile with per-station sigma; a profile that
sees one flank of the anomaly only; a body outside the station span near a box edge; a very strong
anomaly (R near its upper bound, z near its lower); per-station sigma over two orders of magnitude;
``examples/profile.csv`` (its body outside the default box) with the density known and free. The
profiles are synthetic, made here with their own seeds and written to ``DIR/data/``, so the sweep is
reproducible.

Each script runs as a command (its own process: exit status, stderr and files as a user sees them)
with nothing but the case's options, ``--out`` and ``--quiet``. The table (``DIR/table.md``,
``DIR/table.csv``) has per case and method the exit status, the error against the exact reference
(largest W1/sd; for flows also the flow's own draws before refining), the wall time, whether every
figure was written, and the warnings the run printed.
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import forward  # noqa: E402
from gravity_flows.scoring.reference import ERROR_GOAL  # noqa: E402

METHODS = ("MCMC", "planar", "auto_Affine", "auto_NSF", "coupling_Affine", "coupling_NSF", "invertible_Affine")
#: What every run must write (SPEC, 'What each script writes'); MCMC adds its chain figures, a flow elbo.png.
COMMON_FILES = ("marginals.png", "predictive_check.png", "pairs.png", "summary.json", "samples.npz")
METHOD_FILES = {"MCMC": ("trace.png", "autocorrelation.png", "misfit.png")}
FLOW_FILES = ("elbo.png",)


@dataclass(frozen=True)
class Profile:
    """A synthetic profile to write as CSV: stations (m), the body (x0, z, R) and contrast, sigma per station, seed."""

    stations: tuple
    body: tuple
    sigma: tuple
    seed: int
    density: float = forward.DEFAULT_DENSITY

    def write(self, path):
        stations = np.asarray(self.stations, dtype=float)
        sigma = np.broadcast_to(np.asarray(self.sigma, dtype=float), stations.shape)
        rng = np.random.default_rng(self.seed)
        g = forward.sphere_anomaly(stations, np.asarray(self.body, dtype=float), self.density) + sigma * rng.standard_normal(stations.size)
        path.parent.mkdir(parents=True, exist_ok=True)
        return forward.write_profile(path, np.round(stations, 4), np.round(g, 6), np.round(sigma, 6))


@dataclass(frozen=True)
class Case:
    """One unusual input: its name, what it is, the options, and the profile it reads (None: the default data)."""

    name: str
    description: str
    argv: tuple = ()
    profile: Profile = None
    data_file: str = None  # a profile of the project's own (relative to the root), instead of ``profile``

    def arguments(self, data_folder):
        """The command-line options, with ``--data`` pointing at the case's profile (written if need be)."""
        argv = list(self.argv)
        if self.profile is not None:
            path = data_folder / f"{self.name}.csv"
            if not path.exists():
                self.profile.write(path)
            argv += ["--data", str(path)]
        elif self.data_file is not None:
            argv += ["--data", str(ROOT / self.data_file)]
        return argv


def _irregular_stations(n, low, high, seed):
    rng = np.random.default_rng(seed)
    return tuple(np.sort(rng.uniform(low, high, size=n)).round(2))


def _log_uniform_sigma(n, low, high, seed):
    rng = np.random.default_rng(seed)
    return tuple(np.exp(rng.uniform(np.log(low), np.log(high), size=n)).round(4))


#: Every case of the sweep, in the table's order.
CASES = (
    Case("box-x0-auto", "x0 in [0, 5]: excludes the original start's 5.5; --init auto",
         ("--bounds", "0", "5", "1", "15", "0.5", "5")),
    Case("box-x0-prior", "x0 in [0, 5], --init prior", ("--bounds", "0", "5", "1", "15", "0.5", "5", "--init", "prior")),
    Case("box-z-auto", "z in [1, 8]: excludes 8.5; --init auto", ("--bounds", "0", "10", "1", "8", "0.5", "5")),
    Case("box-z-prior", "z in [1, 8], --init prior", ("--bounds", "0", "10", "1", "8", "0.5", "5", "--init", "prior")),
    Case("box-R-auto", "R in [0.5, 3]: excludes 4.5; --init auto", ("--bounds", "0", "10", "1", "15", "0.5", "3")),
    Case("box-R-prior", "R in [0.5, 3], --init prior (issue 17: exit 2 before)",
         ("--bounds", "0", "10", "1", "15", "0.5", "3", "--init", "prior")),
    Case("ridge-R-cut", "density free in [1000, 4000], R in [0.5, 2] cuts the mass ridge (issue 17: exit 2 before)",
         ("--bounds", "-10", "10", "0.5", "10", "0.5", "2", "--density-bounds", "1000", "4000")),
    Case("cavity-known", "negative contrast, known: --density -2000", ("--density", "-2000")),
    Case("cavity-free", "negative contrast, free in [-2700, -1000]",
         ("--density", "-2000", "--density-bounds", "-2700", "-1000")),
    Case("sparse-irregular", "12 irregular stations on [-25, 25] m, sigma 0.3-1.5 µGal per station", (),
         Profile(_irregular_stations(12, -25, 25, seed=11), (3.0, 6.0, 2.0), _log_uniform_sigma(12, 0.3, 1.5, seed=12),
                 seed=13)),
    Case("one-flank", "200 stations on [-20, 0] m only, sigma 0.5 µGal (issue 17: error 0.58 before)", (),
         Profile(tuple(np.linspace(-20, 0, 200)), (3.0, 6.0, 2.0), 0.5, seed=21)),
    Case("outside-span", "body at x0 = 23 m beyond the stations on [-20, 20] m, box x0 in [0, 25]",
         ("--bounds", "0", "25", "1", "15", "0.5", "5"),
         Profile(tuple(np.linspace(-20, 20, 100)), (23.0, 5.0, 2.5), 0.5, seed=31)),
    Case("strong", "very strong anomaly: R = 4.7 m near its upper bound 5, z = 5.3 m near its lower bound 5",
         ("--bounds", "0", "10", "5", "15", "0.5", "5"),
         Profile(tuple(np.linspace(-20, 20, 200)), (3.0, 5.3, 4.7), 1.0, seed=41)),
    Case("sigma-range", "200 stations, per-station sigma 0.05-5 µGal (two orders of magnitude)", (),
         Profile(tuple(np.linspace(-20, 20, 200)), (3.0, 6.0, 2.0), _log_uniform_sigma(200, 0.05, 5.0, seed=51),
                 seed=52)),
    Case("profile-known", "examples/profile.csv in the default box (x0 pressed on 0)", (), data_file="examples/profile.csv"),
    Case("profile-free", "examples/profile.csv, density free in [1000, 4000] (issue 17: reference wrong before)",
         ("--density-bounds", "1000", "4000"), data_file="examples/profile.csv"),
)


def script_of(method):
    return ROOT / f"Gravity_{method}.py"


def expected_files(method):
    return COMMON_FILES + METHOD_FILES.get(method, FLOW_FILES)


def run_case(case, method, out, timeout=1800):
    """Run one script on one case as a command; a dict row of the table."""
    folder = out / case.name / method
    command = [sys.executable, str(script_of(method)), *case.arguments(out / "data"), "--out", str(folder), "--quiet"]
    began = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        status, stderr = completed.returncode, completed.stderr
    except subprocess.TimeoutExpired as expired:
        status, stderr = "timeout", expired.stderr.decode() if isinstance(expired.stderr, bytes) else (expired.stderr or "")
    seconds = time.perf_counter() - began
    lines = stderr.splitlines()
    warnings = [line.strip() for line in lines if "warning" in line.lower()]
    errors = [line.strip() for line in lines if ": error:" in line or line.startswith("Traceback")]
    row = {"case": case.name, "method": method, "exit": status, "time_s": round(seconds, 1),
           "warnings": " | ".join(warnings), "message": " | ".join(errors[-1:])}
    return scored(row, folder)


def scored(row, folder):
    """``row`` with what the run's summary.json says (nothing where the run wrote none): the error against the
    exact reference, the flow's own draws' error where it refined them, KL and k-hat (flows), the smallest
    ESS and largest split R-hat (MCMC), the start, the wall time, and whether every figure was written."""
    row = {**{key: None for key in SUMMARY_COLUMNS}, **row}
    summary_path = folder / "summary.json"
    if row["exit"] in (0, "0") and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        row["error"] = summary.get("error")
        row["flow_alone"] = (summary.get("vi") or {}).get("error")
        row["kl"], row["khat"] = summary.get("kl"), summary.get("khat")
        row["min_ess"] = min(summary["ess"]) if summary.get("ess") else None
        row["max_rhat"] = max(summary["rhat"]) if summary.get("rhat") else None
        row["time_s"] = round(summary.get("wall_time_s", row["time_s"]), 1)
        row["start"] = (summary.get("start") or {}).get("init")
        row["files"] = all((folder / name).exists() and (folder / name).stat().st_size > 0
                           for name in expected_files(row["method"]))
    return row


SUMMARY_COLUMNS = ("error", "flow_alone", "kl", "khat", "min_ess", "max_rhat", "start", "files")
COLUMNS = ("case", "method", "exit", "error", "flow_alone", "kl", "khat", "min_ess", "max_rhat", "time_s", "start",
           "files", "warnings", "message")


def _format(value, spec="{:.4f}"):
    if value is None:
        return ""
    return spec.format(value) if isinstance(value, float) else str(value)


def write_table(rows, out):
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| case | method | exit | error | flow alone | KL (nats) | k-hat | min ESS | max R-hat | time (s) | start | "
             "files | warnings / message |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|:---|:---|"]
    for row in rows:
        error = _format(row["error"])
        if isinstance(row["error"], float) and row["error"] > ERROR_GOAL:
            error = f"**{error}**"
        note = "; ".join(filter(None, [row["warnings"], row["message"]])).replace("|", "/")
        lines.append(f"| {row['case']} | {row['method']} | {row['exit']} | {error} | {_format(row['flow_alone'])} | "
                     f"{_format(row['kl'])} | {_format(row['khat'], '{:.2f}')} | {_format(row['min_ess'], '{:.0f}')} | "
                     f"{_format(row['max_rhat'])} | {_format(row['time_s'], '{:.1f}')} | {_format(row['start'])} | "
                     f"{_format(row['files'])} | {note} |")
    described = [f"- `{case.name}`: {case.description}" for case in CASES if any(row["case"] == case.name for row in rows)]
    (out / "table.md").write_text("\n".join(lines + ["", "Cases:", *described, ""]))


def rebuild(out):
    """The table again from a sweep's folders: its table.csv's exit status, time and warnings, and the summaries."""
    with open(out / "table.csv", newline="") as handle:
        rows = [scored({key: row.get(key) for key in ("case", "method", "exit", "time_s", "warnings", "message")},
                       out / row["case"] / row["method"]) for row in csv.DictReader(handle)]
    for row in rows:
        row["exit"] = int(row["exit"]) if str(row["exit"]).lstrip("-").isdigit() else row["exit"]
    write_table(rows, out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().partition("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default=str(ROOT / "figures" / "unusual"), help="output folder (default: %(default)s)")
    parser.add_argument("--cases", help="comma-separated case names (default: all; --list shows them)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all seven)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--rebuild", action="store_true",
                        help="rewrite OUT's table from its runs' summaries (after a sweep), running nothing")
    args = parser.parse_args(argv)
    if args.rebuild:
        rebuild(Path(args.out))
        print(f"wrote {args.out}/table.md", file=sys.stderr)
        return 0
    if args.list:
        for case in CASES:
            print(f"{case.name:18s} {case.description}")
        return 0
    names = {case.name for case in CASES}
    wanted = names if args.cases is None else set(args.cases.split(","))
    methods = args.methods.split(",")
    unknown = sorted(wanted - names) + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown case or method: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in (case for case in CASES if case.name in wanted):
        for method in methods:
            row = run_case(case, method, out)
            rows.append(row)
            print(f"{row['case']:18s} {row['method']:18s} exit {row['exit']} error {_format(row['error'])} "
                  f"alone {_format(row['flow_alone'])} {row['time_s']} s {row['warnings'][:150]} {row['message'][:150]}",
                  flush=True)
            write_table(rows, out)
    print(f"wrote {out}/table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
