"""Encoders, the BM25 index and the vector stores, each behind a Protocol."""
