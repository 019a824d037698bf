"""Evaluation: ground-truth attribute accuracy of generated images (the benchmark suite builds on it)."""
