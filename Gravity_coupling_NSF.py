"""Coupling neural spline flow (Durkan et al. 2019) for the buried-sphere gravity inversion.

A coupling layer (Dinh et al. 2017) whose element-wise transform is a monotone rational-quadratic
spline instead of an affine map:

    y_A = x_A,    y_B = RQS(x_B; widths, heights, derivatives = NN(x_A)),
    log|det dy/dx| = sum_B log RQS'(x_B).

The spline has K bins on [-B, B] (``--bins``, ``--tail-bound``) and is the identity outside, so
it can bend the density — skew it, sharpen or flatten one side — which an affine map cannot.
With three features the split cycles by index lists: transformed [1, 2], [0, 2], [0, 1], ...

From the prior (annealing from a q as wide as the box) the defaults are 5 layers and the gradient's
norm clipped to 10; from the Laplace start 3 layers, unclipped. Measured on the mass ridge
(``--density-bounds 1000 4000``, the flow alone against the exact reference, seeds 0/1/2): 3 layers
0.113/0.097/0.192; clipped at 10, 0.089/0.105/0.088; 4 layers clipped 0.040/0.049/0.070; 5 layers
clipped 0.033/0.032/0.045. Unclipped, one large step can throw the layers into a corner of the
splines' tail bound (seed 0, 64 hidden units: z, R and drho at u = -4.99, -4.96, +4.96 against the
bound 5, error 93) from which training never returns; with 4 layers, 1.23; 5 layers unclipped, 0.147.
(All of these in the box's coordinates, ``--coordinates box``.) In mass coordinates, the default with a free
density, the ridge is a line along which the posterior is nearly normal and 3 layers, unclipped, suffice
from the prior: 0.038/0.031/0.050 at 1500 iterations annealed over 30 %, where 5 clipped layers gave
0.043/0.065/0.059 (a prototype of the same map). There ``--init auto`` starts from the Laplace fit, though,
from which the 3 layers' 1000 iterations give 0.021/0.016/0.020.

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
    return flow.flow_parser(__doc__, "coupling_NSF", iterations={"laplace": 2000, "prior": 4000, "mass": 1500}, flows={"laplace": 3, "prior": 5, "mass": 3},
                            clip_norm={"laplace": None, "prior": 10.0, "mass": None}, hidden=32, lr=0.005, spline=True,
                          amortized_defaults={"flows": 3})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
