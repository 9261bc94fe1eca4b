"""Inference: the flow posterior and its training and evaluation, the start (--init), the refinement (--refine)."""
