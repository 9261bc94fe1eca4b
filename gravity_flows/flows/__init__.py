"""The flow building blocks: every layer maps base to parameters with ``forward(x) -> (y, log|det|)``."""
