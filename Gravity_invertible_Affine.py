"""Glow-like flow (Kingma & Dhariwal 2018) for the buried-sphere gravity inversion.

Each step is ActNorm, an invertible linear map and an affine coupling layer:

    ActNorm:   y = x exp(a) + c,                    log|det| = sum a
    linear:    y = W x,  W = L U,                   log|det| = sum log diag(U)
    coupling:  y_A = x_A,  y_B = x_B exp(s(x_A)) + t(x_A),   log|det| = sum_B s

W is parameterised by its LU factors (unit-lower L, upper U with a positive diagonal exp(s)), so
that inverting it is two triangular solves and its log-determinant is free.
The learnable linear map lets the flow choose which mixtures of (x0, z, R) the couplings act on —
useful here, where depth and radius are strongly correlated. (Glow's fixed permutation is not
needed with three features and a learnt W; the couplings alternate their split instead.)

From the prior the defaults are 5 steps and 4000 iterations in the box's coordinates, 4 steps and 1500
iterations in mass coordinates (the default with a free density). Measured there (the flow alone against
the exact reference), on the mass ridge (``--density-bounds 1000 4000``, seeds 0/1/2) and on
examples/profile.csv with the density free (x0 pressed on its bound 0):

    steps, iterations   ridge                 profile.csv
    4, 1500             0.023/0.047/0.027     0.013
    3, 1500             0.025/0.050/0.025
    3, 2000             0.013/0.020/0.039     0.063 (x0 1.11 times too wide)
    4, 2000             0.020/0.016/0.043     0.037
    5, 1500             0.028/0.075/0.021   (seeds 0 and 2 with a prototype of the same map)

Kingma, D. P. & Dhariwal, P. (2018). Glow: Generative flow with invertible 1x1 convolutions. NeurIPS.
"""

from gravity_flows.command import flow, runner
from gravity_flows.flows.layers import GlowStep


def build_layers(args, dim, context=0):
    return [GlowStep(dim=dim, hidden=args.hidden, index=k, context=context) for k in range(args.flows)]


def build_parser():
    return flow.flow_parser(__doc__, "invertible_Affine", iterations={"laplace": 3000, "prior": 4000, "mass": 1500},
                          flows={"laplace": 3, "prior": 5, "mass": 4}, hidden=32, lr=0.005,
                          amortized_defaults={"flows": 3})


def main(argv=None):
    return flow.run_flow_method(build_parser().parse_args(argv), build_layers)


if __name__ == "__main__":
    runner.run(main)
