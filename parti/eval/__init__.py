"""Evaluation: reconstruction metrics, generation metrics, the shapes judge."""
