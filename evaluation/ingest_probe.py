"""One timed product ingest, written against the engine API every MARS version shares
(``Engine(Settings(home=..., critic="none"))``, ``engine.encoders()``, ``engine.ingest(records,
source)``, ``ingestion.readers.open_source``), so :mod:`evaluation.speed` can run it on this
checkout in process and on an earlier checkout (``--baseline REF``) in a subprocess, in the
same benchmark run.

As a script (``python ingest_probe.py IKEA N HOME [RUNTIME]``, run with the checkout under test
first on ``sys.path``) it prints the figures as one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def ingest_items_per_s(ikea: Path, n: int, home: Path, runtime: str | None = None) -> dict[str, Any]:
    """Ingest the first ``n`` products of ``ikea`` that have a photo into the fresh ``home``,
    the encoders loaded and warmed (two grey 500×500 photos, one text) before the clock starts.

    Args:
        ikea: a BEIR-style catalog folder (``corpus.jsonl`` + images).
        n: products with a photo to ingest.
        home: an empty ``MARS_HOME``.
        runtime: ``MARS_ENCODER_RUNTIME`` (``onnx`` / ``torch``); None for a version without that setting.

    Returns:
        ``{"runtime", "items", "ingested", "seconds", "items_per_s", "code"}``; seconds are wall
        time, ``code`` the folder the ``mars`` package was imported from.
    """
    from PIL import Image

    from catalog.taxonomy import singular
    from ingestion.readers import open_source
    from mars.engine import Engine
    from mars.settings import Settings

    singular("lamps")  # inflect's one-time set-up, outside the clock
    records = [r for r in open_source(ikea) if (r.data or {}).get("image")][:n]
    extra = {"encoder_runtime": runtime} if runtime else {}
    engine = Engine(Settings(home=home, critic="none", _env_file=None, **extra))
    try:
        image, text = engine.encoders()
        image.encode_images([Image.new("RGB", (500, 500), (128, 128, 128))] * 2)
        text.encode_texts(["warm-up"])
        t = time.perf_counter()
        report = engine.ingest(iter(records), f"speed-{runtime or 'baseline'}")
        seconds = time.perf_counter() - t
    finally:
        engine.close()
    import mars

    return {"runtime": runtime or "baseline", "items": len(records), "ingested": report.ingested,
            "seconds": round(seconds, 1), "items_per_s": round(len(records) / seconds, 1), "code": str(Path(mars.__file__).parent.parent)}


if __name__ == "__main__":
    ikea_arg, n_arg, home_arg, *runtime_arg = sys.argv[1:]
    print(json.dumps(ingest_items_per_s(Path(ikea_arg), int(n_arg), Path(home_arg), runtime_arg[0] if runtime_arg else None)))
