"""Retrieval speed benchmark (not a test): ingest items/s and query latency p50/p95, MARS vs a
naive seed-style baseline measured in the same run. (The shipped encoders' own speed, a new room
photo through the API and cold queries, is :mod:`evaluation.speed`.)

Baseline ("as the seed projects did", :class:`evaluation.baseline.NaiveIndex`): embeddings
in numpy, ``rank_bm25.BM25Okapi`` over whitespace tokens, brute-force cosine over all items
(``matrix @ q``), Python RRF, no category lock and no catalog. Query latencies exclude query
encoding on both sides (the query vectors are computed once beforehand), so they compare
retrieval + fusion.

Usage::

    python -m evaluation.retrieval_speed --ikea ../shared/data/ikea [--queries 200] [--synthetic 50000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from evaluation.baseline import NaiveIndex, naive_text
from evaluation.beir import QueryImages, load_queries
from ingestion.images import decode_image, read_image_bytes
from ingestion.readers import RawRecord, open_source
from ingestion.records import ProductRecord
from mars.engine import Engine
from mars.settings import Settings
from query.funnel import SearchQuery
from query.retrievers import max_over_regions
from query.regions import crop_regions


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_catalog(name: str, records: list[RawRecord], queries: list[dict], encoders, out: dict) -> None:
    """Ingest ``records`` with MARS and with the baseline, then time ``queries`` on both."""
    image_enc, text_enc = encoders
    valid = [ProductRecord.model_validate(r.data) for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Settings(home=Path(tmp) / "mars"), encoders=encoders)
        t = time.perf_counter()
        report = engine.ingest(iter(records), name)
        mars_ingest = len(records) / (time.perf_counter() - t)

        t = time.perf_counter()
        text_vecs = text_enc.encode_texts([r.embedding_text() for r in valid])
        image_vecs = {}
        with_image = [r for r in valid if r.image]
        for start in range(0, len(with_image), 8):
            chunk = with_image[start : start + 8]
            imgs = [decode_image(read_image_bytes(r.image, max_bytes=10**8), max_pixels=10**8) for r in chunk]
            for r, v in zip(chunk, image_enc.encode_images(imgs)):
                image_vecs[r.id] = v
        naive = NaiveIndex([r.id for r in valid], [naive_text(r) for r in valid], text_vecs, image_vecs)
        naive_ingest = len(records) / (time.perf_counter() - t)

        prepared = []
        for q in queries:
            regions = image_enc.encode_images(crop_regions(q["image"], engine.funnel.query_vectors.grids)) if q.get("image") else None
            text_vec = text_enc.encode_texts([q["text"]])[0] if q.get("text") else None
            if q.get("image") is not None:
                engine.funnel.query_vectors.region_vectors(q["image"])  # warm the cache: both sides exclude query encoding
            if q.get("text"):
                engine.funnel.query_vectors.text_vector(q["text"])
            prepared.append((q, text_vec, regions))
        mars_ms, naive_ms = [], []
        for q, text_vec, regions in prepared:
            t = time.perf_counter()
            engine.search(SearchQuery(text=q.get("text"), image=q.get("image"), top_k=10))
            mars_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            naive.search(q.get("text"), text_vec, regions)
            naive_ms.append((time.perf_counter() - t) * 1000)
        engine.close()
    row = {
        "items": len(records),
        "ingested": report.ingested,
        "mars_ingest_items_per_s": round(mars_ingest, 1),
        "naive_ingest_items_per_s": round(naive_ingest, 1),
        "ingest_ratio": round(mars_ingest / naive_ingest, 3),
        "queries": len(queries),
        "mars_p50_ms": round(_pct(mars_ms, 50), 2),
        "mars_p95_ms": round(_pct(mars_ms, 95), 2),
        "naive_p50_ms": round(_pct(naive_ms, 50), 2),
        "naive_p95_ms": round(_pct(naive_ms, 95), 2),
        "p50_speedup": round(_pct(naive_ms, 50) / _pct(mars_ms, 50), 2),
        "p95_speedup": round(_pct(naive_ms, 95) / _pct(mars_ms, 95), 2),
    }
    out[name] = row
    print(json.dumps({name: row}), flush=True)


def synthetic_records(n: int, seed: int = 0) -> list[RawRecord]:
    """A text-only catalog of ``n`` products built from IKEA-like types, colours and words."""
    rng = random.Random(seed)
    types = ["Chair", "Armchair", "Table", "Rug, flatwoven", "Pendant lamp", "Sofa", "Wardrobe", "Bowl", "Vase", "Frame",
             "Cushion cover", "Shelving unit", "Bed frame", "Stool", "Mirror", "Basket", "Box with lid", "Curtains, 1 pair"]
    colours = ["white", "black", "birch", "oak", "grey", "beige", "blue", "green", "red", "yellow", "pine", "walnut"]
    words = "soft durable easy clean wood steel glass cotton wool natural modern classic compact storage outdoor".split()
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(8))
        data = {"id": f"syn-{i:06d}", "title": f"PRODUKT{i % 997}", "type": rng.choice(types), "colour": rng.choice(colours), "text": text}
        out.append(RawRecord("synthetic", i + 1, data, raw=data))
    return out


def main() -> None:
    """Run both catalogs and print one JSON line per catalog plus a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ikea", type=Path, default=Path("../shared/data/ikea"))
    parser.add_argument("--queries", type=int, default=200, help="queries timed per catalog")
    parser.add_argument("--synthetic", type=int, default=50_000, help="size of the synthetic text-only catalog (0 to skip)")
    args = parser.parse_args()

    from mars.registry import load_encoders

    encoders = load_encoders("efficientnet-lite0-gem", "all-minilm-l6-v2")  # the shipped encoders, on ONNX Runtime
    out: dict = {}
    records = list(open_source(args.ikea))
    rng = random.Random(1)
    room_queries = [q for q in load_queries(args.ikea / "queries.jsonl") if q.task == "room-class"]
    images = QueryImages(max_bytes=10**8, max_pixels=10**8)
    queries = [{"text": q.text, "image": images(q)} for q in rng.sample(room_queries, min(args.queries, len(room_queries)))]
    bench_catalog("ikea", records, queries, encoders, out)
    if args.synthetic:
        syn = synthetic_records(args.synthetic)
        texts = ["a white chair for this kitchen", "oak table", "blue rug, flatwoven", "soft cotton cushion cover", "grey sofa"]
        bench_catalog("synthetic", syn, [{"text": rng.choice(texts) + f" {rng.choice(['modern', 'classic', 'outdoor'])}"} for _ in range(args.queries)], encoders, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
