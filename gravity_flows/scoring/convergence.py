"""Accuracy against cost while a method runs: checkpoints, their bookkeeping, and the cost to reach an error.

A run with ``--checkpoints N`` scores its current answer against the exact reference at N
iterations spaced geometrically up to its last one: a flow draws ``CHECKPOINT_SAMPLES`` samples
from its current q, a Markov chain sampler pools the kept states so far. Each checkpoint records

    iteration, seconds (the method's own clock), evaluations (likelihood evaluations), error,

where *seconds* stops while the checkpoint is scored (scoring is not the method's work) and an
*evaluation* is one parameter set whose likelihood was computed, which does not depend on the
machine. The cost to reach an error level is that of the first checkpoint from which the error
stays at or below the level until the end of the run (a single lucky dip does not count).
"""

import math
import time
from contextlib import contextmanager

import numpy as np

from gravity_flows.scoring.reference import ERROR_GOAL

#: Samples drawn from a flow at each checkpoint: the error of exact draws of this size is about 0.02.
CHECKPOINT_SAMPLES = 4000


def checkpoint_iterations(total, n, first=None):
    """About ``n`` distinct iterations (1-based), geometrically spaced from ``first`` (default total / 100) to ``total``."""
    if n <= 0 or total <= 0:
        return []
    first = max(1, min(total, first if first is not None else math.ceil(total / 100)))
    return sorted(set(int(round(value)) for value in np.geomspace(first, total, n)))


class Recorder:
    """Collects checkpoints ``{"iteration", "seconds", "evaluations", "error"}`` (and any extra keys)."""

    def __init__(self):
        self.points = []

    def add(self, iteration, seconds, evaluations, error, **extra):
        self.points.append({"iteration": int(iteration), "seconds": float(seconds), "evaluations": int(evaluations),
                            "error": float(error), **extra})


def cost_to_reach(points, level=ERROR_GOAL):
    """``(seconds, evaluations)`` of the first point from which every later error is <= ``level``; (None, None) if none.

    ``points`` are dicts with ``seconds``, ``evaluations`` and ``error``, in the order of the run.
    """
    reached = None
    for point in points:
        error = point.get("error")
        if error is None or not math.isfinite(error) or error > level:
            reached = None
        elif reached is None:
            reached = point
    return (None, None) if reached is None else (reached["seconds"], reached["evaluations"])


class Clock:
    """A method's own clock: wall time since it started, less the pauses (scoring at checkpoints).

    A reading during a pause is the time at the pause's start: the pause is not the method's work,
    so its elapsed part is never counted, and no later reading is smaller than an earlier one (the
    clock never runs backwards). Pauses may nest; only the outermost one counts.

    ``synchronize``: called before each reading, e.g. to wait for a GPU's queued work.
    ``timer``: the wall clock, a function returning seconds (``time.perf_counter``; tests pass their own).
    """

    def __init__(self, synchronize=None, *, timer=time.perf_counter):
        self.synchronize = synchronize
        self.timer = timer
        self.start = timer()
        self.paused_for = 0.0
        self.paused_at = None  # when the current (outermost) pause began; None while running

    def seconds(self):
        if self.paused_at is not None:
            return self.paused_at - self.start - self.paused_for
        if self.synchronize is not None:
            self.synchronize()
        return self.timer() - self.start - self.paused_for

    @contextmanager
    def paused(self):
        if self.paused_at is not None:  # inside another pause: that one counts
            yield
            return
        if self.synchronize is not None:
            self.synchronize()  # the method's queued work belongs before the pause
        self.paused_at = self.timer()
        try:
            yield
        finally:
            self.paused_for += self.timer() - self.paused_at
            self.paused_at = None
