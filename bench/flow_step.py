"""Milliseconds per training step of every flow, against the floor a step cannot go below.

A training step draws ``--batch`` parameter sets from q, evaluates the log-likelihood of each at
every station, and back-propagates the negative ELBO into the flow's parameters (Adam). Its floor
is the likelihood's own forward and backward pass for the same batch — the physics, which no flow
can skip; "bare" is the flow with no layers (the learnable Gaussian base), so

    flow ms - bare ms   = what the method's layers cost,
    bare ms - floor ms  = what sampling, the box map, the loss and Adam cost.

Every flow is built as its script builds it (its defaults, the start ``--init auto`` chooses on this
problem) and trained by ``vi.train`` at a fixed temperature. After a warm-up, each repeat times
the floor and every flow once in turn, so that a busy stretch of the machine slows all of them
alike; the median over repeats is printed. Timings on a shared machine are noisy: compare two
versions in the same run (``--code DIR`` times the checkout in DIR instead of this one).

    python bench/flow_step.py                               # the default problem
    python bench/flow_step.py --density-bounds 1000 4000    # the mass ridge (density unknown)
    python bench/flow_step.py --density-bounds 1000 4000 --compile   # and every step compiled, beside it
    python bench/flow_step.py --density-bounds 1000 4000 --coordinates box   # the flows in the box's coordinates
"""

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

FLOWS = ("planar", "auto_Affine", "auto_NSF", "coupling_Affine", "coupling_NSF", "invertible_Affine")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().partition("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density-bounds", nargs=2, type=float, metavar=("LO", "HI"),
                        help="make the density a fourth unknown (the mass ridge); default: the density is known")
    parser.add_argument("--methods", default=",".join(FLOWS), help="comma-separated flows (default: all six)")
    parser.add_argument("--coordinates", choices=("box", "mass"),
                        help="the flows' coordinates (the scripts' --coordinates; default: theirs, mass with "
                             "--density-bounds)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="steps per timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per flow; the median is kept (default: %(default)s)")
    parser.add_argument("--warm-up", type=int, default=30, help="untimed steps per flow first (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every flow's step compiled (vi.train(compile=True)), beside the uncompiled one; "
                             "the first compiled step, which compiles, is timed apart and printed")
    parser.add_argument("--code", metavar="DIR", help="time the checkout in DIR (e.g. an older release) instead of this one")
    parser.add_argument("--json", metavar="FILE", help="also write the medians (ms) to FILE")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    root = Path(args.code).resolve() if args.code else Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    import torch

    import forward
    from gravity_flows.command import flow
    from gravity_flows.inference import start, vi

    device = flow.device_for("cpu")  # one thread, as the scripts train
    problem = forward.synthetic_problem(density_bounds=args.density_bounds)
    laplace = forward.laplace_approximation(problem)
    if hasattr(flow, "resolve_coordinates"):  # older releases judge the start in the box's coordinates only
        coordinates = args.coordinates or forward.default_flow_coordinates(problem)
        init = start.choose_start("auto", problem, laplace, coordinates).init
    else:
        coordinates, init = "box", start.choose_start("auto", problem, laplace).init
    log_likelihood = forward.TorchLikelihood(problem).to(device=device, dtype=torch.float64)

    def build(layers, options):
        return flow.build_flow(options, layers, laplace, problem, device, init)

    runs = {}  # (name, compiled) -> (model, options); with --compile, each flow twice: as it is, and compiled
    for method in args.methods.split(","):
        script = importlib.import_module(f"Gravity_{method}")
        options = script.build_parser().parse_args(["--coordinates", args.coordinates] if args.coordinates else [])
        if hasattr(flow, "resolve_coordinates"):  # older releases have one coordinate system, the box's
            flow.resolve_coordinates(options, problem)
        options = flow.resolve_defaults(options, init)
        for compiled in (False, True) if args.compile else (False,):
            runs[method, compiled] = (build(script.build_layers, options), options)
    for compiled in (False, True) if args.compile else (False,):
        runs["bare", compiled] = (build(lambda options, dim: [], options), options)
    generator = torch.Generator(device=device).manual_seed(0)

    def train(model, options, steps, compiled):
        compiling = {"compile": True} if compiled else {}  # the older releases' train has no compile argument
        return vi.train(model, log_likelihood, problem.log_prior_density, iterations=steps, batch=args.batch,
                        lr=options.lr, clip_norm=options.clip_norm, clip_value=options.clip_value, generator=generator,
                        progress=False, **compiling)[1]

    # the floor: the likelihood's forward and backward pass at parameter sets q would draw
    with torch.no_grad():
        theta_floor, _ = runs["bare", False][0].sample(args.batch, generator)

    def floor(steps):
        for _ in range(steps):
            theta = theta_floor.clone().requires_grad_()
            log_likelihood(theta).sum().backward()

    floor(args.warm_up)
    first_step = {key: train(model, options, 1, key[1]) for key, (model, options) in runs.items()}  # compiles
    for key, (model, options) in runs.items():
        train(model, options, args.warm_up, key[1])
    seconds = {"floor": []} | {key: [] for key in runs}
    for _ in range(args.repeats):
        began = time.perf_counter()
        floor(args.steps)
        seconds["floor"].append(time.perf_counter() - began)
        for key, (model, options) in runs.items():
            began = time.perf_counter()
            train(model, options, args.steps, key[1])
            seconds[key].append(time.perf_counter() - began)
    ms = {key: 1e3 * statistics.median(values) / args.steps for key, values in seconds.items()}
    floor_ms = ms["floor"]

    what = "the mass ridge (density unknown)" if args.density_bounds else "the default problem (density known)"
    print(f"ms per training step, batch {args.batch}, {problem.n_stations} stations, {problem.dim} unknowns, "
          f"{what}, start {init}, {coordinates} coordinates; code {root}")
    print(f"{'':<18} {'ms/step':>8} {'x floor':>8}"
          + (f" {'compiled':>9} {'x floor':>8} {'first compiled step (s)':>24}" if args.compile else ""))
    print(f"{'floor':<18} {floor_ms:8.3f} {1.0:8.2f}")
    for name in dict.fromkeys(name for name, _ in runs):
        line = f"{name:<18} {ms[name, False]:8.3f} {ms[name, False] / floor_ms:8.2f}"
        if args.compile:
            line += f" {ms[name, True]:9.3f} {ms[name, True] / floor_ms:8.2f} {first_step[name, True]:24.1f}"
        print(line)
    print("floor = the likelihood's forward + backward alone; bare = the flow with no layers (its Gaussian base)"
          + ("; compiled: vi.train(compile=True), after its first step, which compiles (the first flow's also starts "
             "the compiler itself; torch's on-disk cache makes all of them shorter on a later run)" if args.compile else ""))
    ms = {(key if isinstance(key, str) else key[0] + (" compiled" if key[1] else "")): value for key, value in ms.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(ms, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
