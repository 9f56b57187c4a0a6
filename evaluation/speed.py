"""Speed benchmark (not a test) of the shipped encoders, each figure beside a reference timed
in the same run:

* **new room photo → ranked list, through the API**: a ``mars serve`` on ``--home`` (an
  ingested, ideally trained home), then one search per dev room photo it has never seen
  (room-class text + the photo, multipart), timed at the client; p50 and p95, beside one
  PyTorch-eager EfficientNet-Lite0 forward pass at 1408×1888 (the reference the issue's target
  is stated in) timed in this process; the same photos sent again, for contrast;
* **cold text query**: never-seen query texts, one at a time, each its own text: the server
  process's CPU time per query (``/proc/<pid>/stat`` user + system) and the funnel's own
  ``timings_ms.total``;
* **product ingest with photos**: the first ``--ingest`` products of the catalog into fresh
  homes with ``MARS_ENCODER_RUNTIME=torch`` (the path before ONNX Runtime) and ``onnx``, items/s;
  with ``--baseline REF`` also by the MARS of commit ``REF`` (e.g. the one an issue was filed
  against: "today's" ingest), unpacked from git and run in a subprocess in the same run.

Usage::

    python -m evaluation.speed --home .mars --ikea ../shared/data/ikea [--rooms 20] [--texts 50] [--ingest 300] [--baseline REF] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from evaluation.beir import BenchmarkQuery, load_queries


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (numpy's linear interpolation)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def torch_forward_ms(repeats: int = 3) -> float:
    """Median wall time in ms of one PyTorch-eager EfficientNet-Lite0 forward pass (its feature
    map) on a 1×3×1408×1888 input, after one warm-up pass."""
    from indexing.efficientnet import EfficientNetLite0Encoder

    trunk = EfficientNetLite0Encoder(runtime="torch")._trunk
    x = np.random.default_rng(0).normal(size=(1, 3, 1408, 1888)).astype(np.float32)
    trunk.features(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        trunk.features(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def unseen_rooms(ikea: Path, n: int, seed: int = 0) -> list[BenchmarkQuery]:
    """One room-class query for each of ``n`` different dev rooms (random, reproducible)."""
    by_room: dict[str, BenchmarkQuery] = {}
    for q in load_queries(ikea / "queries.jsonl"):
        if q.task == "room-class" and q.image is not None:
            by_room.setdefault(q.room_id or q.id, q)
    rooms = sorted(by_room)
    random.Random(seed).shuffle(rooms)
    return [by_room[r] for r in rooms[:n]]


def cold_texts(ikea: Path, n: int) -> list[str]:
    """``n`` different text-only query texts (the text-to-image task), in file order."""
    seen: list[str] = []
    for q in load_queries(ikea / "queries.jsonl"):
        if q.task == "text-to-image" and q.text and q.text not in seen:
            seen.append(q.text)
        if len(seen) == n:
            break
    return seen


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_figures(home: Path, ikea: Path, rooms: int, texts: int, log: Path) -> dict[str, Any]:
    """Photo searches and cold text queries against a ``mars serve`` on ``home`` (see the module doc)."""
    from workers.local import served_process

    env = {"MARS_HOME": str(home), "MARS_API_AUTH": "open", "MARS_RATE_LIMIT": "", "MARS_LOG_FORMAT": "text"}
    queries = unseen_rooms(ikea, rooms)
    photos = [(q, q.image.read_bytes()) for q in queries]  # type: ignore[union-attr]
    out: dict[str, Any] = {"rooms": len(photos)}
    with served_process(env, log) as (url, proc), httpx.Client(base_url=url, timeout=120) as client:
        def search(q: BenchmarkQuery, data: bytes) -> tuple[float, dict]:
            t = time.perf_counter()
            r = client.post("/v1/search", data={"text": q.text or "", "top_k": "10"},
                            files={"image": (q.image.name, data, "image/jpeg")})  # type: ignore[union-attr]
            r.raise_for_status()
            return (time.perf_counter() - t) * 1000, r.json()

        client.post("/v1/search", json={"text": "warm-up", "top_k": 1}).raise_for_status()
        new = [search(q, data) for q, data in photos]
        again = [search(q, data) for q, data in photos]
        out["new_photo_ms"] = {"p50": round(pct([ms for ms, _ in new], 50), 1), "p95": round(pct([ms for ms, _ in new], 95), 1)}
        out["new_photo_server_ms"] = round(pct([b["timings_ms"]["total"] for _, b in new], 50), 1)
        out["same_photo_again_ms"] = {"p50": round(pct([ms for ms, _ in again], 50), 1),
                                      "p95": round(pct([ms for ms, _ in again], 95), 1)}
        lines = cold_texts(ikea, texts)
        cpu0, wall = process_cpu_s(proc.pid), []
        funnel = []
        for text in lines:
            t = time.perf_counter()
            r = client.post("/v1/search", json={"text": text, "top_k": 10})
            r.raise_for_status()
            wall.append((time.perf_counter() - t) * 1000)
            funnel.append(r.json()["timings_ms"]["total"])
        out["cold_text"] = {"queries": len(lines), "server_cpu_ms_per_query": round((process_cpu_s(proc.pid) - cpu0) * 1000 / len(lines), 2),
                            "funnel_ms_p50": round(pct(funnel, 50), 2), "client_ms_p50": round(pct(wall, 50), 2),
                            "client_ms_p95": round(pct(wall, 95), 2)}
    return out


def ingest_items_per_s(ikea: Path, n: int, runtime: str) -> dict[str, Any]:
    """Items/s of ``mars ingest``'s path for the first ``n`` products with a photo, into a fresh
    home on ``runtime`` in this process (:func:`evaluation.ingest_probe.ingest_items_per_s`)."""
    from evaluation.ingest_probe import ingest_items_per_s as probe

    with tempfile.TemporaryDirectory() as tmp:
        figures = probe(ikea, n, Path(tmp) / "mars", runtime)
    figures.pop("code")  # where the package was imported from: this checkout
    return figures


def baseline_items_per_s(ikea: Path, n: int, ref: str) -> dict[str, Any]:
    """The same ingest as :func:`ingest_items_per_s` by an earlier MARS: the commit ``ref`` of
    this repository (``git archive``) unpacked into a temporary folder and run there by
    :mod:`evaluation.ingest_probe` in a subprocess, on that version's default encoders.

    Raises:
        RuntimeError: ``ref`` is not a commit here, or the probe failed or ran other code
            than the checkout (the message carries its stderr's tail).
    """
    import io
    import subprocess
    import sys
    import tarfile

    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref], capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"--baseline {ref}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        checkout = Path(tmp) / "checkout"
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(checkout, filter="data")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARS_")} | {"PYTHONPATH": str(checkout)}
        run = subprocess.run([sys.executable, str(Path(__file__).with_name("ingest_probe.py")), str(ikea), str(n), str(Path(tmp) / "home")],
                             cwd=checkout, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"--baseline {ref}: the ingest failed: {run.stderr[-2000:]}")
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        if Path(figures.pop("code")) != checkout:
            raise RuntimeError(f"--baseline {ref}: the probe imported mars from elsewhere than the checkout")
    return figures | {"runtime": f"baseline {ref}"}


def main(argv: list[str] | None = None) -> None:
    """Run every part and print the figures (JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m evaluation.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("MARS_HOME", ".mars")),
                        help="an ingested MARS_HOME (the README's first command makes .mars); no other process may own it")
    parser.add_argument("--ikea", type=Path, default=Path("../shared/data/ikea"), help="the IKEA dev data folder")
    parser.add_argument("--rooms", type=int, default=20, help="dev room photos the server has never seen (default 20)")
    parser.add_argument("--texts", type=int, default=50, help="never-seen text queries (default 50)")
    parser.add_argument("--ingest", type=int, default=300, help="products with a photo ingested per runtime (0: skip)")
    parser.add_argument("--baseline", metavar="REF", help="also ingest with the MARS of this git commit (e.g. the one an issue was "
                        "filed against), in a subprocess in the same run: 'today's items/s' beside this version's")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if not (args.home / "index" / "manifest.json").exists():
        parser.error(f"{args.home} holds no index: run `mars ingest {args.ikea}` first (or give --home)")

    figures: dict[str, Any] = {"torch_forward_1408x1888_ms": round(torch_forward_ms(), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        figures["api"] = api_figures(args.home.resolve(), args.ikea.resolve(), args.rooms, args.texts, Path(tmp) / "serve.log")
    figures["new_photo_p50_vs_torch_forward"] = round(figures["api"]["new_photo_ms"]["p50"] / figures["torch_forward_1408x1888_ms"], 3)
    if args.ingest:
        before, after = (ingest_items_per_s(args.ikea, args.ingest, runtime) for runtime in ("torch", "onnx"))
        figures["ingest"] = {"torch": before, "onnx": after, "ratio": round(after["items_per_s"] / before["items_per_s"], 2)}
        if args.baseline:
            base = baseline_items_per_s(args.ikea.resolve(), args.ingest, args.baseline)
            figures["ingest"] |= {"baseline": base, "ratio_vs_baseline": round(after["items_per_s"] / base["items_per_s"], 2)}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    api = figures["api"]
    print(f"reference: one PyTorch-eager EfficientNet-Lite0 forward at 1408x1888: {figures['torch_forward_1408x1888_ms']:.0f} ms")
    print(f"new room photo -> ranked list through the API ({api['rooms']} photos never seen): p50 {api['new_photo_ms']['p50']:.0f} ms, "
          f"p95 {api['new_photo_ms']['p95']:.0f} ms = {figures['new_photo_p50_vs_torch_forward']:.2f}x the reference "
          f"(server funnel p50 {api['new_photo_server_ms']:.0f} ms; the same photos again: p50 {api['same_photo_again_ms']['p50']:.0f} ms)")
    cold = api["cold_text"]
    print(f"cold text queries ({cold['queries']}): server CPU {cold['server_cpu_ms_per_query']:.2f} ms/query, funnel p50 "
          f"{cold['funnel_ms_p50']:.2f} ms, client p50 {cold['client_ms_p50']:.1f} ms, p95 {cold['client_ms_p95']:.1f} ms")
    if "ingest" in figures:
        ing = figures["ingest"]
        print(f"ingest with photos ({ing['onnx']['items']} products): torch {ing['torch']['items_per_s']:.1f} items/s, "
              f"onnx {ing['onnx']['items_per_s']:.1f} items/s = {ing['ratio']:.2f}x")
        if "baseline" in ing:
            print(f"ingest with photos, {ing['baseline']['runtime']}: {ing['baseline']['items_per_s']:.1f} items/s; "
                  f"onnx = {ing['ratio_vs_baseline']:.2f}x")


if __name__ == "__main__":
    main()
