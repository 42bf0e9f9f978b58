"""Evaluation: benchmarks, responses and offline metrics, the LLM judge, the results table, and the representation
analysis."""
