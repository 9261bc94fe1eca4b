"""Autoregressive neural spline flow (Durkan et al. 2019) for the buried-sphere gravity inversion.

Each layer transforms every feature by a monotone rational-quadratic spline whose bins and knot
derivatives are computed from the features before it in the layer's order (MADE conditioner,
Germain et al. 2015), in the inverse-autoregressive (sampling) direction (Kingma et al. 2016):

    y_i = RQS(u_i; widths, heights, derivatives = MADE_i(u_<i)),
    log|det dy/du| = sum_i log RQS'(u_i).

K bins on [-B, B] (``--bins``, ``--tail-bound``), identity outside; orders alternate between layers.

Durkan, C., Bekasov, A., Murray, I. & Papamakarios, G. (2019). Neural spline flows. NeurIPS.
"""

from gravity_flows.command import flow, runner
from gravity_flows.flows.autoregressive import AutoregressiveSpline, layer_orders


def build_layers(args, dim, context=0):
    return [
        AutoregressiveSpline(dim=dim, hidden=args.hidden, order=order, bins=args.bins, tail_bound=args.tail_bound,
                             context=context)
        for order in layer_orders(dim, args.flows)
    ]


def build_parser():
    return flow.flow_parser(__doc__, "auto_NSF", iterations={"laplace": 2000, "prior": 4000, "mass": 1500}, flows=3, hidden=32, lr=0.005, spline=True,
                          amortized_defaults={"flows": 3})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
