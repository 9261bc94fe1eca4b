"""The exact reference posterior and the scores every method is judged by, and the sampling diagnostics."""
