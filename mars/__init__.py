"""MARS — Multimodal Agentic Room Search.

This package holds the composition root (settings, the embedded engine that owns the
stores, the ``mars`` command); the stages live in the top-level packages ``catalog``,
``ingestion``, ``indexing``, ``query``, ``critic`` and ``evaluation``.
"""

__version__ = "0.1.0"
