"""Load benchmark (not a test): N concurrent clients send hybrid searches to a running MARS
API for a fixed time; prints requests/s, latency p50/p95/p99 and the error count.

The queries are the IKEA benchmark's own: text-to-image queries (text only) and room
queries (room photo + text), drawn at random with a fixed seed from ``--queries`` distinct
ones. Each distinct query is sent once before the timed phase, so the funnel's caches of
query encodings (text vectors, room-photo region vectors) are warm, as they are for
merchandisers refining the same rooms and phrasings: the figures measure the search path
and the HTTP stack, not the encoders; ``--text-only`` measures text queries alone. With
embedded stores the warm-up also fills the funnel's per-stage result cache (BM25, text and
image lists by query input, lock and depth; dropped on every write), so in the timed phase
the lists come from it: the plan, fusion, rules, catalog rows and the HTTP stack are what
is measured, as for a repeated query in production. ``MARS_RESULT_CACHE_HITS=0`` turns that
cache off in the server started here, so every request searches BM25 and Qdrant again.

Usage (the catalog must be ingested; the server is started here unless ``--url`` is given)::

    python -m evaluation.load_test --clients 20 --seconds 60 [--url http://127.0.0.1:8000] [--api-key KEY]

A server started here runs with ``--open`` and no rate limit (``MARS_RATE_LIMIT=''``); against
``--url``, send a viewer key whose server's ``MARS_RATE_LIMIT`` allows the load.

The load generator runs on the same cores as the server (here), so it is kept lean: the
bodies are JSON-encoded once (byte for byte as ``httpx``'s ``json=`` encodes them), and the
timed phase sends them over HTTP/1.1 keep-alive connections on asyncio streams, framed by
``h11`` (:class:`RawConnection`; ``httpx`` uses h11 too but spends ~1.7 ms of CPU per request
on its own machinery, as much as a cached search costs the server); ``--client httpx`` uses
``httpx`` instead. The report adds
the CPU time per request of the generator and, read from the server's
``process_cpu_seconds_total`` (``GET /metrics``), of the server: on a shared machine these are
steadier than requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import numpy as np

from evaluation.beir import load_queries
from workers.local import served_api


def load_bodies(ikea: Path, text_only: bool, limit: int) -> list[dict[str, Any]]:
    """``POST /v1/search`` bodies from the benchmark's queries: text-to-image queries as text,
    room queries (room-class / room-type) as text + base64 room photo, mode ``hybrid``."""
    bodies = []
    photos: dict[Path, str] = {}
    for q in load_queries(ikea / "queries.jsonl"):
        if q.task == "text-to-image":
            bodies.append({"text": q.text, "mode": "hybrid", "top_k": 10})
        elif q.task in ("room-class", "room-type") and not text_only and q.image is not None:
            if q.image not in photos:
                photos[q.image] = base64.b64encode(q.image.read_bytes()).decode()
            bodies.append({"text": q.text, "image_base64": photos[q.image], "mode": "hybrid", "top_k": 10})
    random.Random(0).shuffle(bodies)
    return bodies[:limit]


def encode_body(body: dict[str, Any]) -> bytes:
    """``body`` as the JSON bytes ``httpx`` sends for ``json=body``."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


JSON_HEADERS = {"Content-Type": "application/json"}


class RawConnection:
    """One HTTP/1.1 keep-alive connection on asyncio streams that POSTs bodies and reads whole
    responses, framed by ``h11`` (the sans-I/O HTTP/1.1 library under httpx) — the same wire
    format as httpx at a fraction of its per-request CPU, which matters when the load generator
    shares the server's cores.

    Args:
        url: ``http://host:port`` of the server (no TLS).
        headers: extra request headers (e.g. ``Authorization``).
        timeout_s: limit for one request (connect included).

    Raises:
        ValueError: a URL that is not plain http.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"the raw client speaks plain http only, not {url!r}; use --client httpx")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = [(k, v) for k, v in headers.items()]
        self.timeout_s = timeout_s
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._conn: h11.Connection | None = None

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        """POST ``body`` to ``path``; the response's status and body. A broken connection is
        closed (the next call opens a new one) and its error raised."""
        try:
            return await asyncio.wait_for(self._exchange(path, body, content_type), self.timeout_s)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
            self._conn = h11.Connection(h11.CLIENT)
        reader, writer = self._streams
        conn = self._conn
        assert conn is not None
        headers = [("Host", f"{self.host}:{self.port}"), ("Content-Type", content_type),
                   ("Content-Length", str(len(body))), *self.headers]
        writer.write(conn.send(h11.Request(method="POST", target=f"{self.prefix}{path}", headers=headers))
                     + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        status, chunks = 0, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection mid-response")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self.close()
        else:
            conn.start_next_cycle()
        return status, b"".join(chunks)

    def close(self) -> None:
        """Close the connection (a later :meth:`post` opens a new one)."""
        if self._streams is not None:
            self._streams[1].close()
            self._streams, self._conn = None, None


async def client(http: httpx.AsyncClient | RawConnection, bodies: list[tuple[bytes, bool]], stop_at: float, out: list,
                 errors: list, seed: int, path: str = "/v1/search") -> None:
    """One client: POST random bodies (encoded JSON, whether it has a photo) to ``path`` back to
    back until ``stop_at`` (monotonic seconds), through ``http`` (its own connection when raw)."""
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        body, photo = rng.choice(bodies)
        t0 = time.perf_counter()
        try:
            if isinstance(http, RawConnection):
                status, text = await http.post(path, body)
            else:
                r = await http.post(path, content=body, headers=JSON_HEADERS)
                status, text = r.status_code, r.content
            if status != 200:
                errors.append(f"HTTP {status}: {text[:200].decode(errors='replace')}")
                continue
        except (httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            errors.append(f"{exc.__class__.__name__}: {exc}")
            continue
        out.append((time.perf_counter() - t0, photo))


async def server_cpu_s(http: httpx.AsyncClient) -> float | None:
    """The server's ``process_cpu_seconds_total`` from ``GET /metrics``, or None when absent."""
    try:
        r = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    match = re.search(r"^process_cpu_seconds_total ([0-9.e+-]+)$", r.text, re.M) if r.status_code == 200 else None
    return float(match.group(1)) if match else None


async def run(url: str, bodies: list[dict], clients: int, seconds: float, api_key: str | None,
              path: str = "/v1/search", kind: str = "raw") -> dict[str, Any]:
    """Warm up (each distinct query once, with ``httpx``), then ``clients`` concurrent clients
    for ``seconds``, each on its own connection: ``kind`` ``"raw"`` (:class:`RawConnection`) or
    ``"httpx"`` (one pooled ``httpx`` client)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    encoded = [(encode_body(body), "image_base64" in body) for body in bodies]
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers, limits=limits) as http:
        for body, _ in encoded:  # each distinct query once: the funnel's query-encoding caches are warm
            (await http.post(path, content=body, headers=JSON_HEADERS)).raise_for_status()
        latencies: list[tuple[float, bool]] = []
        errors: list[str] = []
        cpu0, server0 = time.process_time(), await server_cpu_s(http)
        conns = [RawConnection(url, headers) if kind == "raw" else http for _ in range(clients)]
        t0 = time.monotonic()
        await asyncio.gather(*(client(c, encoded, t0 + seconds, latencies, errors, i, path) for i, c in enumerate(conns)))
        wall = time.monotonic() - t0
        cpu1, server1 = time.process_time(), await server_cpu_s(http)
        for c in conns:
            if isinstance(c, RawConnection):
                c.close()
    sent = max(len(latencies) + len(errors), 1)

    def summary(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"n": 0}
        ms = np.asarray(values) * 1000
        return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}

    return {
        "clients": clients, "client": kind, "seconds": round(wall, 1), "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1), "errors": len(errors), "first_errors": errors[:5],
        "cpu_ms_per_request": {
            "server": round((server1 - server0) * 1000 / sent, 2) if server0 is not None and server1 is not None else None,
            "load_generator": round((cpu1 - cpu0) * 1000 / sent, 2),
        },
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
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="HTTP client of the timed phase: asyncio streams framed by h11 (lean; default) or httpx.")
    args = parser.parse_args()
    bodies = load_bodies(args.ikea, args.text_only, args.queries)
    if args.url:
        report = asyncio.run(run(args.url, bodies, args.clients, args.seconds, args.api_key, kind=args.client))
    else:  # the ingested MARS_HOME, in open mode without a rate limit: a local benchmark
        with tempfile.TemporaryDirectory() as tmp, served_api({"MARS_RATE_LIMIT": ""}, Path(tmp) / "serve.log", "--open") as url:
            report = asyncio.run(run(url, bodies, args.clients, args.seconds, args.api_key, kind=args.client))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
