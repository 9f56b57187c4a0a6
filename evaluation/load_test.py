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

**Cold mode** (``--cold``): after that warm phase, a second timed phase of the same length in
which every request carries a query the server has never been sent before, so nothing comes
from a cache keyed by the query: of the ``--clients``, ``--cold-photo-clients`` (default 1)
send room-photo queries whose photo is new, the others text-only queries whose text is new
(the mix is set in clients, not in a share of requests: a new photo takes ~40 times a new
text, so with a request share the photos would soon hold most clients). Each is handed out
once and never again (a failed request's too):

* **new texts** (:func:`cold_text_pool`, at most ``--seconds`` × 2,000; none is a text the warm
  phase or a cold photo query sends, compared lowercased word by word): first the benchmark's other query texts, then phrasings of
  one product's attributes ("black-brown chest of 3 drawers", "MALM chest of 3 drawers",
  "chest of 3 drawers 80x78 cm"), then each frequent catalog colour with each product type
  ("yellow armchair"), then those with a room ("yellow armchair for the hallway"); each tier
  shuffled with ``--cold-seed``. The server keys its text-vector cache on the exact text and
  its per-stage result cache on the text, so a new text is encoded and searched afresh. A
  text's body is JSON-encoded as it is sent (~10 µs);
* **new photos** (:func:`cold_photo_pool`): the 123 dev room photos, each request a different
  deterministic perturbation of one (a crop of 85-97 % of each side at a random offset, resized
  to 90-100 % of the photo's size, mirrored half the time, JPEG quality 90): no two share
  pixels or bytes, and none is an original. The server keys its photo caches (region vectors,
  decoded base64, image lists) on the SHA-256 of the uploaded bytes or of their base64 text,
  so each new photo's regions are encoded afresh (~0.4 s of CPU at 1408 px on 2 cores). They
  are JPEG-encoded before any timed phase (``--cold-photos``, by default enough for one new
  photo per photo client every 0.2 s), so the generator does not take CPU from the server then.

The report keeps the warm figures as they were and adds ``"cold"``: the cold phase's figures
in the same form (cold text queries as ``text_only``, cold photo queries as
``with_room_photo``, each with its error count), proof that nothing repeated
(``never_sent_before``) and ``side_by_side``, the warm and cold rows together; a plain table of
those rows follows the JSON on stderr.

Usage (the catalog must be ingested; the server is started here unless ``--url`` is given)::

    python -m evaluation.load_test --clients 20 --seconds 60 [--url http://127.0.0.1:8000] [--api-key KEY]
    python -m evaluation.load_test --clients 20 --seconds 60 --cold [--cold-photo-clients 1]

Only this invocation's requests are guaranteed new: a server started here (the default) has seen
nothing else, while a long-running ``--url`` server may have cached texts of an earlier cold run
(pass another ``--cold-seed`` for another order of the pool).

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
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import numpy as np

from evaluation.beir import load_queries
from evaluation.cold_queries import (
    MAX_COLD_TEXTS_PER_S,
    MIN_NEW_PHOTO_S,
    ColdLoad,
    encode_body,
    make_cold_pools,
    text_body,
    text_words,
)
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


async def post_once(http: httpx.AsyncClient | RawConnection, path: str, body: bytes) -> str | None:
    """POST the encoded JSON ``body`` to ``path`` through ``http``; None when it answered 200, else
    the error (``"HTTP <status>: <start of body>"`` or the exception)."""
    try:
        if isinstance(http, RawConnection):
            status, text = await http.post(path, body)
        else:
            r = await http.post(path, content=body, headers=JSON_HEADERS)
            status, text = r.status_code, r.content
    except (httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None if status == 200 else f"HTTP {status}: {text[:200].decode(errors='replace')}"


async def client(http: httpx.AsyncClient | RawConnection, bodies: list[tuple[bytes, bool]], stop_at: float, out: list,
                 errors: list, seed: int, path: str = "/v1/search") -> None:
    """One client: POST random bodies (encoded JSON, whether it has a photo) to ``path`` back to
    back until ``stop_at`` (monotonic seconds), through ``http`` (its own connection when raw).
    Appends ``(seconds, photo)`` to ``out`` per answered request, ``(error, photo)`` to ``errors``."""
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        body, photo = rng.choice(bodies)
        t0 = time.perf_counter()
        error = await post_once(http, path, body)
        if error is None:
            out.append((time.perf_counter() - t0, photo))
        else:
            errors.append((error, photo))


async def cold_client(http: httpx.AsyncClient | RawConnection, next_body: Callable[[], bytes | None], photo: bool,
                      stop_at: float, out: list, errors: list, path: str = "/v1/search") -> None:
    """One cold-mode client: POST ``next_body()`` (a body never sent before; None when the pool is
    spent, which ends the client) to ``path`` back to back until ``stop_at`` (monotonic seconds),
    recording as :func:`client` with ``photo`` for every request."""
    while time.monotonic() < stop_at:
        body = next_body()
        if body is None:
            return
        t0 = time.perf_counter()
        error = await post_once(http, path, body)
        if error is None:
            out.append((time.perf_counter() - t0, photo))
        else:
            errors.append((error, photo))


def summary(values: list[float], errors: int | None = None) -> dict[str, Any]:
    """Count and p50/p95/p99 in ms of latencies ``values`` (seconds); with ``errors``, that count too."""
    out: dict[str, Any] = {"n": len(values)}
    if errors is not None:
        out["errors"] = errors
    if values:
        ms = np.asarray(values) * 1000
        out.update({f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)})
    return out


async def server_cpu_s(http: httpx.AsyncClient) -> float | None:
    """The server's ``process_cpu_seconds_total`` from ``GET /metrics``, or None when absent."""
    try:
        r = await http.get("/metrics")
    except httpx.HTTPError:
        return None
    match = re.search(r"^process_cpu_seconds_total ([0-9.e+-]+)$", r.text, re.M) if r.status_code == 200 else None
    return float(match.group(1)) if match else None


async def timed_phase(url: str, headers: dict[str, str], http: httpx.AsyncClient, kind: str, seconds: float,
                      clients: list[Callable[[httpx.AsyncClient | RawConnection, float, list, list], Any]]
                      ) -> dict[str, Any]:
    """Run ``clients`` concurrently for ``seconds``, each called with its connection (its own
    :class:`RawConnection` for ``kind`` ``"raw"``, else the pooled ``http``), the monotonic
    second to stop at, the latency list and the error list, returning a coroutine. Returns the
    ``latencies`` and ``errors`` lists, the ``wall`` seconds and ``cpu_ms_per_request`` (ms of
    CPU per request sent, of this process and, from ``/metrics``, of the server: None when it
    is not exposed)."""
    latencies: list[tuple[float, bool]] = []
    errors: list[tuple[str, bool]] = []
    cpu0, server0 = time.process_time(), await server_cpu_s(http)
    conns = [RawConnection(url, headers) if kind == "raw" else http for _ in clients]
    t0 = time.monotonic()
    await asyncio.gather(*(run_client(c, t0 + seconds, latencies, errors) for run_client, c in zip(clients, conns)))
    wall = time.monotonic() - t0
    cpu1, server1 = time.process_time(), await server_cpu_s(http)
    for c in conns:
        if isinstance(c, RawConnection):
            c.close()
    sent = max(len(latencies) + len(errors), 1)
    return {"latencies": latencies, "errors": errors, "wall": wall, "cpu_ms_per_request": {
        "server": round((server1 - server0) * 1000 / sent, 2) if server0 is not None and server1 is not None else None,
        "load_generator": round((cpu1 - cpu0) * 1000 / sent, 2)}}


def rows(phase: dict[str, Any], label: str) -> dict[str, dict[str, Any]]:
    """``side_by_side`` rows of a phase: text-only and room-photo queries, errors counted."""
    lat, err = phase["latencies"], phase["errors"]
    return {f"{label} text": summary([t for t, p in lat if not p], sum(1 for _, p in err if not p)),
            f"{label} photo": summary([t for t, p in lat if p], sum(1 for _, p in err if p))}


async def run(url: str, bodies: list[dict], clients: int, seconds: float, api_key: str | None,
              path: str = "/v1/search", kind: str = "raw", cold: ColdLoad | None = None) -> dict[str, Any]:
    """Warm up (each distinct query once, with ``httpx``), then ``clients`` concurrent clients
    for ``seconds``, each on its own connection: ``kind`` ``"raw"`` (:class:`RawConnection`) or
    ``"httpx"`` (one pooled ``httpx`` client). With ``cold``, then the cold phase for ``seconds``
    (see the module doc): ``cold.photo_clients`` clients send its photos, the others its texts,
    reported under ``"cold"``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    encoded = [(encode_body(body), "image_base64" in body) for body in bodies]
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers, limits=limits) as http:
        for body, _ in encoded:  # each distinct query once: the funnel's query-encoding caches are warm
            (await http.post(path, content=body, headers=JSON_HEADERS)).raise_for_status()
        cold_phase: dict[str, Any] | None = None
        warm = await timed_phase(url, headers, http, kind, seconds, [
            lambda c, stop_at, out, err, i=i: client(c, encoded, stop_at, out, err, i, path) for i in range(clients)])
        if cold is not None:
            def next_text() -> bytes | None:
                text = cold.texts.take()
                return None if text is None else encode_body(text_body(text))

            def next_photo() -> bytes | None:
                photo = cold.photos.take()
                return None if photo is None else photo.body

            cold_phase = await timed_phase(url, headers, http, kind, seconds, [
                lambda c, stop_at, out, err, i=i: cold_client(c, next_photo if i < cold.photo_clients else next_text,
                                                              i < cold.photo_clients, stop_at, out, err, path)
                for i in range(clients)])
    latencies, errors, wall = warm["latencies"], warm["errors"], warm["wall"]
    report = {
        "clients": clients, "client": kind, "seconds": round(wall, 1), "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1), "errors": len(errors),
        "first_errors": [e for e, _ in errors[:5]], "cpu_ms_per_request": warm["cpu_ms_per_request"],
        "all": summary([t for t, _ in latencies]),
        "text_only": summary([t for t, photo in latencies if not photo]),
        "with_room_photo": summary([t for t, photo in latencies if photo]),
    }
    if cold is not None and cold_phase is not None:
        report["cold"] = cold_report(cold, cold_phase, clients, rows(warm, "warm"))
    return report


def cold_report(cold: ColdLoad, phase: dict[str, Any], clients: int,
                warm_rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``"cold"`` section of the report (see the module doc) from the cold ``phase``."""
    latencies, errors, wall = phase["latencies"], phase["errors"], phase["wall"]
    texts, digests = [text_words(t) for t in cold.texts.sent], [p.digest for p in cold.photos.sent]
    by_class = rows(phase, "cold")
    return {
        "clients": {"text": clients - cold.photo_clients, "photo": cold.photo_clients},
        "seconds": round(wall, 1), "requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 1),
        "errors": len(errors), "first_errors": [e for e, _ in errors[:5]],
        "cpu_ms_per_request": phase["cpu_ms_per_request"],
        "all": summary([t for t, _ in latencies]),
        "text_only": by_class["cold text"], "with_room_photo": by_class["cold photo"],
        "never_sent_before": {
            "texts_sent": len(texts), "texts_new": len(set(texts) - cold.other_texts),
            "text_pool": len(cold.texts.items), "text_pool_spent": cold.texts.taken == len(cold.texts.items),
            "photos_sent": len(digests), "photos_new": len(set(digests) - cold.warm_digests),
            "photo_pool": len(cold.photos.items), "photo_pool_spent": cold.photos.taken == len(cold.photos.items),
            "photo_pool_s": round(cold.photo_pool_s, 1), "seed": cold.seed,
        },
        "side_by_side": {**warm_rows, **by_class},
    }


def side_by_side_table(report: dict[str, Any]) -> str:
    """The report's warm and cold rows as a plain-text table (latencies in ms, server CPU in ms
    per request of each phase, text and photo requests together)."""
    lines = [f"{'queries':<12}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"]
    for name, row in report["cold"]["side_by_side"].items():
        ms = "".join(f"{row.get(f'p{q}_ms', '-'):>9}" for q in (50, 95, 99))
        lines.append(f"{name:<12}{row['n']:>10}{row['errors']:>8}{ms}")
    cpu = (report["cpu_ms_per_request"]["server"], report["cold"]["cpu_ms_per_request"]["server"])
    lines.append(f"server CPU ms/request: warm {cpu[0]}, cold {cpu[1]} (each phase's text and photo requests together)")
    return "\n".join(lines)


MODES = """modes:
  warm (default)  each distinct query of --queries is sent once, then the timed phase repeats
                  them: the query-encoding and per-stage result caches answer, so it measures
                  the search path and the HTTP stack (see the module doc).
  --cold          the warm phase, then a cold phase of the same --seconds in which every
                  request carries a text or a room photo the server was never sent: new texts
                  (the benchmark's other queries, then phrasings of catalog products' colour,
                  name, type and size) from --clients minus --cold-photo-clients clients, new
                  photos (perturbed crops of the dev room photos, JPEG-encoded before the timed
                  phases) from --cold-photo-clients clients. The JSON report gains "cold": its
                  text and photo queries separately (count, errors, p50/p95/p99 ms), server and
                  generator CPU ms per request, proof that none repeated, and the warm and cold
                  rows side by side (also printed as a table on stderr).
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m evaluation.load_test`` (its ``--help`` explains the modes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=MODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ikea", type=Path, default=Path("../shared/data/ikea"), help="IKEA benchmark folder.")
    parser.add_argument("--clients", type=int, default=20, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=60,
                        help="How long to load the server (each phase: warm, then cold with --cold).")
    parser.add_argument("--url", help="A running MARS API; default: start `mars serve` on the ingested MARS_HOME.")
    parser.add_argument("--api-key", default=os.environ.get("MARS_API_KEY"), help="Key sent as Bearer (MARS_API_KEY).")
    parser.add_argument("--text-only", action="store_true", help="Text queries only (no room photos, warm or cold).")
    parser.add_argument("--queries", type=int, default=500, help="Distinct queries to draw from (warm phase).")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="HTTP client of the timed phase: asyncio streams framed by h11 (lean; default) or httpx.")
    parser.add_argument("--cold", action="store_true",
                        help="After the warm phase, a cold phase: every request a text or photo never sent before.")
    parser.add_argument("--cold-photo-clients", type=int, default=None,
                        help="Cold phase: clients sending new room photos (the others send new texts); default 1 "
                        "(0 with --text-only or one client). A new photo costs ~0.4 s of server CPU.")
    parser.add_argument("--cold-photos", type=int, default=None,
                        help="Cold phase: new photos to make beforehand; default photo clients x seconds / "
                        f"{MIN_NEW_PHOTO_S} (a photo client whose pool is spent stops; reported).")
    parser.add_argument("--cold-seed", type=int, default=0, help="Cold phase: seed of the texts' and photos' order.")
    return parser


def make_cold_load(args: argparse.Namespace, bodies: list[dict[str, Any]]) -> ColdLoad:
    """The never-sent texts and photos of the cold phase for ``args``, none among ``bodies``."""
    photo_clients = args.cold_photo_clients
    if photo_clients is None:
        photo_clients = 0 if args.text_only else min(1, args.clients - 1)
    if not 0 <= photo_clients <= args.clients or (args.text_only and photo_clients):
        raise SystemExit(f"--cold-photo-clients must be 0..{args.clients} (0 with --text-only), not {photo_clients}")
    n = args.cold_photos if args.cold_photos is not None else math.ceil(photo_clients * args.seconds / MIN_NEW_PHOTO_S)
    return make_cold_pools(args.ikea, bodies, n if photo_clients else 0, photo_clients, args.cold_seed,
                           math.ceil(args.seconds * MAX_COLD_TEXTS_PER_S))


def main(argv: list[str] | None = None) -> None:
    """Parse the options, start a server if none is given, run the load and print the report
    (JSON on stdout; with ``--cold``, the side-by-side table on stderr)."""
    args = build_parser().parse_args(argv)
    bodies = load_bodies(args.ikea, args.text_only, args.queries)
    cold = make_cold_load(args, bodies) if args.cold else None
    if args.url:
        report = asyncio.run(run(args.url, bodies, args.clients, args.seconds, args.api_key, kind=args.client, cold=cold))
    else:  # the ingested MARS_HOME, in open mode without a rate limit: a local benchmark
        with tempfile.TemporaryDirectory() as tmp, served_api({"MARS_RATE_LIMIT": ""}, Path(tmp) / "serve.log", "--open") as url:
            report = asyncio.run(run(url, bodies, args.clients, args.seconds, args.api_key, kind=args.client, cold=cold))
    print(json.dumps(report, indent=2))
    if cold is not None:
        print(side_by_side_table(report), file=sys.stderr)


if __name__ == "__main__":
    main()
