"""The funnel (plan → BM25 → vectors → fuse → critic), fusion, room regions and the FastAPI app."""
