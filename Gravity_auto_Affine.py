"""Inverse autoregressive flow with affine transforms (Kingma et al. 2016) for the gravity inversion.

Each layer shifts and scales every feature by amounts computed from the features before it in the
layer's order, by a masked network (MADE, Germain et al. 2015):

    y_i = u_i exp(s_i(u_<i)) + t_i(u_<i),        log|det dy/du| = sum_i s_i(u_<i),

with s soft-clipped. The Jacobian is triangular, so sampling and log q of the samples take one
parallel pass (the inverse-autoregressive direction); the order is reversed between layers so
every feature conditions every other.

Germain, M., Gregor, K., Murray, I. & Larochelle, H. (2015). MADE. ICML.
Kingma, D. P. et al. (2016). Improved variational inference with inverse autoregressive flow. NeurIPS.
"""

from gravity_flows.command import flow, runner
from gravity_flows.flows.autoregressive import AutoregressiveAffine, layer_orders


def build_layers(args, dim, context=0):
    return [AutoregressiveAffine(dim=dim, hidden=args.hidden, order=order, context=context)
            for order in layer_orders(dim, args.flows)]


def build_parser():
    return flow.flow_parser(__doc__, "auto_Affine", iterations={"laplace": 3000, "prior": 4000, "mass": 1500}, flows=4, hidden=32, lr=0.005,
                          amortized_defaults={"flows": 4})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
