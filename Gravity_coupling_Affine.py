"""Coupling flow with affine coupling layers (RealNVP, Dinh et al. 2017) for the gravity inversion.

Each layer passes some features through unchanged (A) and moves the others (B) by a scale and a
shift computed from A by a small network:

    y_A = x_A,    y_B = x_B exp(s(x_A)) + t(x_A),    log|det dy/dx| = sum_B s(x_A),

with the log-scale soft-clipped, s = 3 tanh(raw / 3). With three features the split is by index
lists, not halves: layer k conditions on one feature and transforms the other two, cycling
(transformed [1, 2], [0, 2], [0, 1], ...), so every feature is transformed and every feature
conditions the others.

Dinh, L., Sohl-Dickstein, J. & Bengio, S. (2017). Density estimation using Real NVP. ICLR.
"""

from gravity_flows.command import flow, runner
from gravity_flows.flows.layers import AffineCoupling, coupling_mask


def build_layers(args, dim, context=0):
    return [AffineCoupling(dim=dim, transformed=coupling_mask(dim, k), hidden=args.hidden, context=context)
            for k in range(args.flows)]


def build_parser():
    return flow.flow_parser(__doc__, "coupling_Affine", iterations={"laplace": 3000, "prior": 4000, "mass": 1500}, flows=4, hidden=32, lr=0.005,
                          amortized_defaults={"flows": 4})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
