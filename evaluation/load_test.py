"""Load benchmark (not a test): N concurrent clients send hybrid searches to a running MARS
API for a fixed time; prints requests/s, latency p50/p95/p99 and the error count.

The queries are the IKEA benchmark's own: text-to-image queries (text only) and room
queries (room photo + text), drawn at random with a fixed seed from ``--queries`` distinct
ones. Each distinct query is sent once before the timed phase, so the funnel's caches of
query encodings (text vectors, room-photo region vectors) are warm, as they are for
merchandisers refining the same rooms and phrasings: the figures measure retrieval,
fusion, the catalog and the HTTP stack, not the encoders; ``--text-only`` measures text
queries alone.

Usage (the catalog must be ingested; the server is started here unless ``--url`` is given)::

    python -m evaluation.load_test --clients 20 --seconds 60 [--url http://127.0.0.1:8000] [--api-key KEY]

A server started here runs with ``--open`` and no rate limit (``MARS_RATE_LIMIT=''``); against
``--url``, send a viewer key whose server's ``MARS_RATE_LIMIT`` allows the load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from workers.local import served_api


def load_bodies(ikea: Path, text_only: bool, limit: int) -> list[dict[str, Any]]:
    """``POST /v1/search`` bodies from the benchmark's queries: text-to-image queries as text,
    room queries (room-class / room-type) as text + base64 room photo, mode ``hybrid``."""
    bodies = []
    photos: dict[str, str] = {}
    for line in (ikea / "queries.jsonl").open():
        q = json.loads(line)
        if q.get("task") == "text-to-image":
            bodies.append({"text": q["text"], "mode": "hybrid", "top_k": 10})
        elif q.get("task") in ("room-class", "room-type") and not text_only and q.get("image"):
            path = ikea / q["image"]
            if str(path) not in photos:
                photos[str(path)] = base64.b64encode(path.read_bytes()).decode()
            bodies.append({"text": q["text"], "image_base64": photos[str(path)], "mode": "hybrid", "top_k": 10})
    random.Random(0).shuffle(bodies)
    return bodies[:limit]


async def client(http: httpx.AsyncClient, bodies: list[dict], stop_at: float, out: list, errors: list, seed: int) -> None:
    """One client: send random bodies back to back until ``stop_at`` (monotonic seconds)."""
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        body = rng.choice(bodies)
        t0 = time.perf_counter()
        try:
            r = await http.post("/v1/search", json=body)
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
        except httpx.HTTPError as exc:
            errors.append(f"{exc.__class__.__name__}: {exc}")
            continue
        out.append((time.perf_counter() - t0, "image_base64" in body))


async def run(url: str, bodies: list[dict], clients: int, seconds: float, api_key: str | None) -> dict[str, Any]:
    """Warm up (each distinct query once), then ``clients`` concurrent clients for ``seconds``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers, limits=limits) as http:
        for body in bodies:  # each distinct query once: the funnel's query-encoding caches are warm
            (await http.post("/v1/search", json=body)).raise_for_status()
        latencies: list[tuple[float, bool]] = []
        errors: list[str] = []
        t0 = time.monotonic()
        await asyncio.gather(*(client(http, bodies, t0 + seconds, latencies, errors, i) for i in range(clients)))
        wall = time.monotonic() - t0

    def summary(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"n": 0}
        ms = np.asarray(values) * 1000
        return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}

    return {
        "clients": clients, "seconds": round(wall, 1), "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1), "errors": len(errors), "first_errors": errors[:5],
        "all": summary([t for t, _ in latencies]),
        "text_only": summary([t for t, photo in latencies if not photo]),
        "with_room_photo": summary([t for t, photo in latencies if photo]),
    }


def main() -> None:
    """Parse the options, start a server if none is given, run the load and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ikea", type=Path, default=Path("../shared/data/ikea"), help="IKEA benchmark folder.")
    parser.add_argument("--clients", type=int, default=20, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=60, help="How long to load the server.")
    parser.add_argument("--url", help="A running MARS API; default: start `mars serve` on the ingested MARS_HOME.")
    parser.add_argument("--api-key", default=os.environ.get("MARS_API_KEY"), help="Key sent as Bearer (MARS_API_KEY).")
    parser.add_argument("--text-only", action="store_true", help="Text queries only (no room photos).")
    parser.add_argument("--queries", type=int, default=500, help="Distinct queries to draw from.")
    args = parser.parse_args()
    bodies = load_bodies(args.ikea, args.text_only, args.queries)
    if args.url:
        report = asyncio.run(run(args.url, bodies, args.clients, args.seconds, args.api_key))
    else:  # the ingested MARS_HOME, in open mode without a rate limit: a local benchmark
        with tempfile.TemporaryDirectory() as tmp, served_api({"MARS_RATE_LIMIT": ""}, Path(tmp) / "serve.log", "--open") as url:
            report = asyncio.run(run(url, bodies, args.clients, args.seconds, args.api_key))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
