"""Coupling neural spline flow (Durkan et al. 2019) for the buried-sphere gravity inversion.

A coupling layer (Dinh et al. 2017) whose element-wise transform is a monotone rational-quadratic
spline instead of an affine map:

    y_A = x_A,    y_B = RQS(x_B; widths, heights, derivatives = NN(x_A)),
    log|det dy/dx| = sum_B log RQS'(x_B).

The spline has K bins on [-B, B] (``--bins``, ``--tail-bound``) and is the identity outside, so
it can bend the density — skew it, sharpen or flatten one side — which an affine map cannot.
With three features the split cycles by index lists: transformed [1, 2], [0, 2], [0, 1], ...

Durkan, C., Bekasov, A., Murray, I. & Papamakarios, G. (2019). Neural spline flows. NeurIPS.
"""

from gravity_flows.command import flow, runner
from gravity_flows.flows.layers import coupling_mask
from gravity_flows.flows.splines import SplineCoupling


def build_layers(args, dim, context=0):
    return [
        SplineCoupling(dim=dim, transformed=coupling_mask(dim, k), hidden=args.hidden, bins=args.bins, tail_bound=args.tail_bound,
                       context=context)
        for k in range(args.flows)
    ]


def build_parser():
    return flow.flow_parser(__doc__, "coupling_NSF", iterations={"laplace": 2000, "prior": 4000}, flows=3, hidden=32, lr=0.005, spline=True,
                          amortized_defaults={"flows": 3})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
