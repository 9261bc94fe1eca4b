"""Print the exact reference posterior of the default synthetic data.

    python -m gravity_flows.command.reference [--noise SIGMA] [--density-bounds LO HI]
"""

import argparse
import time

import forward
from gravity_flows.scoring import reference


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the exact reference posterior of the default data.")
    parser.add_argument("--noise", metavar="SIGMA", type=float, default=forward.DEFAULT_NOISE_SD,
                        help="noise sd of the synthetic data in µGal (default: %(default)s; 1e4 buries the anomaly)")
    parser.add_argument("--density-bounds", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                        help="treat the density contrast (kg/m³) as a fourth unknown, uniform on [LO, HI]")
    args = parser.parse_args(argv)
    try:
        if not args.noise > 0:
            raise forward.DataError(f"--noise must be > 0, got {args.noise:g}")
        density_bounds = forward.check_density_bounds(args.density_bounds, forward.DEFAULT_DENSITY)
    except forward.DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

    start = time.perf_counter()
    problem = forward.synthetic_problem(noise_sd=args.noise, density_bounds=density_bounds)
    laplace = forward.laplace_approximation(problem)
    exact = reference.compute_reference(problem, laplace)
    elapsed = time.perf_counter() - start
    whole_box = laplace.weak or (not problem.free_density and not laplace.theta_peak)
    window = ("over the whole prior box, zoomed in where the posterior lies" if whole_box
              else f"±{reference.WINDOW_SDS:g} sd" if problem.free_density else f"±{reference.WINDOW_SDS:g} Laplace sd")
    noise = "" if args.noise == forward.DEFAULT_NOISE_SD else f" with noise {args.noise:g} µGal"
    if problem.free_density:
        print(f"Exact posterior of the default data{noise} with the density contrast unknown, uniform on "
              f"[{density_bounds[0]:g}, {density_bounds[1]:g}] kg/m³\n(grid quadrature over (x0, z, m = Δρ R³), "
              f"{reference.GRID_POINTS}^3 nodes, {window}; R and Δρ along the ridge analytically):")
    else:
        print(f"Exact posterior of the default problem{noise} (grid quadrature, {reference.GRID_POINTS}^3 nodes, {window}):")
    warning = forward.weak_data_warning(laplace)
    if warning:
        print(warning)
    print(f"{'':>4} {'truth':>8} {'mean':>10} {'sd':>10}")
    for name, truth, mean, sd in zip(problem.names, problem.truth, exact.mean, exact.sd):
        print(f"{name:>4} {truth:8.3f} {mean:10.5f} {sd:10.5f}")
    print(f"correlation ({', '.join(problem.names)}):")
    for name, row in zip(problem.names, exact.correlation):
        print(f"{name:>4} " + " ".join(f"{value:7.3f}" for value in row))
    print(f"log evidence: {exact.log_evidence:.4f}")
    print(f"computed in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
