"""Metrics, the BEIR-style benchmark runner and speed benchmarks (imports the library, never the reverse)."""
