"""Reporting: the figures, the summary a run writes, and writing a result whole or not at all."""
