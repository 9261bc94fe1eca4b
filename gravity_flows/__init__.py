"""The shared modules of the gravity-flows scripts, one folder a layer; imports run down this list.

- :mod:`gravity_flows.flows` — the flow building blocks (coupling, planar, ActNorm, LU, Glow, splines, MADE);
- :mod:`gravity_flows.scoring` — the exact reference posterior, the scores and the sampling diagnostics;
- :mod:`gravity_flows.inference` — the flow posterior and its training, the start, the refinement;
- :mod:`gravity_flows.reporting` — figures, the summary of a run, writing results whole;
- :mod:`gravity_flows.command` — the command line shared by the scripts.

The physics (forward model, data, prior, likelihood, Laplace) is the top-level ``forward.py``, below
all of them; the seven ``Gravity_*.py`` scripts and ``compare.py`` sit above them all.
"""
