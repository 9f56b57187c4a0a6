"""Ingest benchmark (not a test): bulk items/s through the Celery queues with 1 vs 2
``ingest,embed`` workers, against the in-process ``mars ingest`` baseline measured in the
same run, and streaming submit→searchable latency p50/p95.

Catalogs: a synthetic text-only catalog (``--synthetic`` items) and the IKEA catalog with its
photos. For each, the baseline runs :meth:`mars.engine.Engine.ingest` in this process; then
for each worker count a fresh PostgreSQL database, ``MARS_HOME`` and Redis database get one
``index`` worker and N ``ingest,embed`` workers (:class:`workers.local.LocalWorkers`, solo
pool, ``OMP_NUM_THREADS`` = cores / N). A warm-up job (one chunk per worker) loads the models
first; items/s is the timed job's size over submit→``done`` wall time.

Streaming, two paths:

* queue: one-record jobs submitted one after another to the running cluster; latency is
  submit → the record ``indexed`` (written by the ``index`` worker);
* API: a real ``mars serve`` process (embedded stores); latency is ``POST /v1/items`` sent →
  a ``POST /v1/search`` for the item's unique title returns it, idle and while a bulk job
  (``POST /v1/items:bulk`` of the IKEA catalog) runs in the same server.

Usage::

    python -m evaluation.ingest_speed --ikea ../shared/data/ikea [--synthetic 2000] [--workers 1,2] [--stream 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from catalog.db import make_engine, session_factory, upgrade_to_head
from ingestion.readers import RawRecord, open_source
from mars.engine import Engine
from mars.settings import Settings
from workers.app import app as celery_app
from catalog.jobs import job_progress
from workers.celery_jobs import CeleryJobs
from workers.local import LocalWorkers, scratch_database, served_api

TYPES = ["Sofa", "Armchair", "Bookcase", "Desk", "Table lamp", "Rug", "Bed frame", "Wardrobe", "Mirror", "Stool"]
WORDS = ["oak", "birch", "linen", "steel", "rattan", "velvet", "walnut", "cotton", "glass", "pine", "wool", "brass"]
COLOURS = ["white", "black", "beige", "grey", "green", "blue", "natural", "brown"]


def synthetic_catalog(n: int, seed: int = 0) -> list[RawRecord]:
    """``n`` text-only product records with ids ``syn-0``.. (deterministic for ``seed``)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind, words, colour = rng.choice(TYPES), rng.sample(WORDS, 3), rng.choice(COLOURS)
        data = {
            "id": f"syn-{i}", "title": f"{words[0].upper()} {kind.lower()} {i}", "type": kind, "colour": colour,
            "text": f"A {colour} {kind.lower()} in {words[1]} and {words[2]}, made to last.",
        }
        out.append(RawRecord("synthetic", i + 1, data, data))
    return out


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (numpy's linear interpolation)."""
    return float(np.percentile(np.asarray(values), q))


def wait_done(sessions, job_id: int, timeout_s: float, workers: LocalWorkers | None = None) -> dict[str, Any]:
    """Poll the job's progress every 50 ms until ``done``/``failed``.

    Raises:
        TimeoutError: not finished in ``timeout_s`` (with the workers' log tails).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as s:
            progress = job_progress(s, job_id)
        if progress["status"] in ("done", "failed"):
            return progress
        time.sleep(0.05)
    tails = workers.log_tails() if workers else {}
    raise TimeoutError(f"job {job_id} not done in {timeout_s} s: {progress}\n{json.dumps(tails, indent=1)}")


def in_process(records: list[RawRecord], name: str) -> float:
    """Items/s of :meth:`Engine.ingest` in this process (models loaded before timing)."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Settings(home=Path(tmp) / "mars"))
        try:
            engine.encoders()
            t = time.perf_counter()
            engine.ingest(iter(records), name)
            return len(records) / (time.perf_counter() - t)
        finally:
            engine.close()


def queued(records: list[RawRecord], warm: list[RawRecord], n_workers: int, args: argparse.Namespace,
           stream: int) -> dict[str, Any]:
    """Items/s of one bulk job through a fresh cluster with ``n_workers`` ingest/embed workers,
    then (``stream`` > 0) the queue's one-record submit→indexed latencies."""
    broker = redis.Redis.from_url(args.broker)
    broker.flushdb()
    celery_app.conf.broker_url = args.broker
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    with scratch_database(args.postgres_admin, "mars_bench") as db_url, tempfile.TemporaryDirectory() as tmp:
        upgrade_to_head(make_engine(db_url))
        sessions = session_factory(make_engine(db_url))
        env = {"MARS_DATABASE_URL": db_url, "MARS_BROKER_URL": args.broker, "MARS_HOME": str(Path(tmp) / "home"),
               "OMP_NUM_THREADS": str(threads)}
        workers = LocalWorkers(env, Path(tmp))
        try:
            workers.start("index", "index")
            for i in range(n_workers):
                workers.start(f"w{i}", "ingest,embed")
            wait_done(sessions, CeleryJobs(sessions, args.chunk).submit(warm, "warm-up"), 600, workers)
            t = time.perf_counter()
            job = CeleryJobs(sessions, args.chunk).submit(records, "timed")
            progress = wait_done(sessions, job, 3600, workers)
            seconds = time.perf_counter() - t
            latencies = []
            for i in range(stream):
                data = {**records[i % len(records)].data, "id": f"stream-q{i}", "title": f"streamed {i}"}
                t0 = time.perf_counter()
                wait_done(sessions, CeleryJobs(sessions, 1).submit([RawRecord("stream", 1, data, data)], "stream"), 60, workers)
                latencies.append(time.perf_counter() - t0)
        finally:
            workers.stop_all()
            broker.flushdb()
    row = {"workers": n_workers, "omp_threads": threads, "items": len(records), "seconds": round(seconds, 1),
           "items_per_s": round(len(records) / seconds, 1), "indexed": progress["indexed"], "rejected": progress["rejected"]}
    if latencies:
        row["queue_submit_to_indexed_ms"] = {"p50": round(pct(latencies, 50) * 1000), "p95": round(pct(latencies, 95) * 1000), "n": len(latencies)}
    return row


def api_streaming(ikea: Path, stream: int) -> dict[str, Any]:
    """submit→searchable latencies of ``POST /v1/items`` on a real ``mars serve``, idle and
    during a bulk job of the IKEA catalog running in the same server."""
    base = [r.data for r in open_source(ikea) if r.data and r.data.get("image")]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MARS_HOME": str(Path(tmp) / "mars"), "MARS_RATE_LIMIT": ""}  # a local benchmark: no keys
        with served_api(env, Path(tmp) / "serve.log", "--open") as url:
            with httpx.Client(base_url=url, timeout=120) as client:

                def one(i: int, tag: str) -> float:
                    token = f"zq{tag}{i}x"
                    item = {**base[i % len(base)], "id": f"stream-{tag}-{i}", "title": f"{token} streamed item"}
                    t0 = time.perf_counter()
                    r = client.post("/v1/items", json=item)
                    r.raise_for_status()
                    while True:
                        hits = client.post("/v1/search", json={"text": token, "mode": "bm25", "auto_lock": False, "top_k": 1})
                        if hits.json()["items"] and hits.json()["items"][0]["id"] == item["id"]:
                            return time.perf_counter() - t0
                        time.sleep(0.01)

                one(0, "warm")  # loads the encoders
                idle = [one(i, "idle") for i in range(stream)]
                lines = "\n".join(json.dumps(r) for r in base).encode()
                job = client.post("/v1/items:bulk", content=lines, headers={"content-type": "application/x-ndjson"}).json()
                busy, searches = [], []
                while client.get(f"/v1/jobs/{job['job_id']}").json()["status"] not in ("done", "failed") and len(busy) < stream:
                    busy.append(one(len(busy), "busy"))
                    t0 = time.perf_counter()
                    client.post("/v1/search", json={"text": "a sofa for the living room"}).raise_for_status()
                    searches.append(time.perf_counter() - t0)

    def summary(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"n": 0}
        return {"p50": round(pct(values, 50) * 1000), "p95": round(pct(values, 95) * 1000), "n": len(values)}

    return {"idle_ms": summary(idle), "during_bulk_ms": summary(busy), "hybrid_search_during_bulk_ms": summary(searches)}


def main() -> None:
    """Run the benchmark and print one JSON line per measurement, then the whole report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ikea", type=Path, default=Path("../shared/data/ikea"), help="IKEA catalog folder.")
    parser.add_argument("--synthetic", type=int, default=2000, help="Items of the synthetic text-only catalog.")
    parser.add_argument("--workers", default="1,2", help="Comma-separated ingest/embed worker counts.")
    parser.add_argument("--chunk", type=int, default=32, help="Records per queued task (MARS_INGEST_CHUNK_SIZE).")
    parser.add_argument("--stream", type=int, default=30, help="Streamed items per latency measurement (0: skip).")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14", help="Redis database to use (flushed!).")
    parser.add_argument("--postgres-admin", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="libpq URL allowed to CREATE DATABASE (a scratch database per run).")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: synthetic, ikea, api.")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    counts = [int(x) for x in args.workers.split(",")]
    ikea = [r for r in open_source(args.ikea)]
    catalogs = {"synthetic text-only": synthetic_catalog(args.synthetic), "ikea with images": ikea}
    report: dict[str, Any] = {"cpu_count": os.cpu_count()}
    for name, records in catalogs.items():
        if name.split()[0] in skip:
            continue
        warm = [RawRecord(r.source, r.position, {**r.data, "id": f"warm-{r.data['id']}"}, r.raw)
                for r in records[: args.chunk * max(counts)]]
        rows: dict[str, Any] = {"in-process (mars ingest)": {"items_per_s": round(in_process(records, name), 1)}}
        print(json.dumps({name: rows}), flush=True)
        for n in counts:
            rows[f"{n} worker(s)"] = queued(records, warm, n, args, args.stream if n == counts[-1] and name.startswith("ikea") else 0)
            print(json.dumps({name: {f"{n} worker(s)": rows[f"{n} worker(s)"]}}), flush=True)
        base = rows[f"{counts[0]} worker(s)"]["items_per_s"]
        for n in counts[1:]:
            rows[f"{n} vs {counts[0]} worker(s)"] = round(rows[f"{n} worker(s)"]["items_per_s"] / base, 2)
        report[name] = rows
    if "api" not in skip and args.stream:
        report["streaming via API (embedded server)"] = api_streaming(args.ikea, args.stream)
        print(json.dumps({"api": report["streaming via API (embedded server)"]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
