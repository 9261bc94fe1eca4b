"""Planar flow (Rezende & Mohamed 2015) for the buried-sphere gravity inversion.

Each layer moves the samples along one direction û by an amount that depends on their position
along another direction w:

    f(z) = z + û tanh(wᵀz + b),        log|det df/dz| = log|1 + (1 - tanh²(wᵀz + b)) wᵀû|.

The map is invertible only when wᵀû ≥ -1; the free vector u is projected so that wᵀû = m(wᵀu) > -1
(see ``layers.Planar``). A planar layer changes the density along one hyperplane at a time, so it
needs many layers for a flexible q and has no closed-form inverse.

Rezende, D. J. & Mohamed, S. (2015). Variational inference with normalizing flows. ICML.
"""

from gravity_flows.command import flow, runner
from gravity_flows.flows.layers import Planar


def build_layers(args, dim, context=0):
    return [Planar(dim=dim, context=context) for _ in range(args.flows)]


def build_parser():
    return flow.flow_parser(__doc__, "planar", iterations={"laplace": 3000, "prior": 4000, "mass": 1500},
                               flows={"laplace": 8, "prior": 16}, hidden=None, lr=0.01,
                          amortized_defaults={"flows": 8})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
