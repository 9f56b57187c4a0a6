"""Shared fixtures: the real IKEA data, the real offline encoders (loaded once), engines in temp dirs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def ikea_dir() -> Path:
    """The IKEA benchmark folder: ``$MARS_IKEA_DIR`` or ``../shared/data/ikea`` beside the repo."""
    return Path(os.environ.get("MARS_IKEA_DIR", REPO.parent / "shared" / "data" / "ikea"))


@pytest.fixture(scope="session")
def ikea() -> Path:
    path = ikea_dir()
    if not (path / "corpus.jsonl").exists():
        pytest.fail(f"IKEA benchmark not found at {path}; set MARS_IKEA_DIR")
    return path


@pytest.fixture(scope="session")
def encoders():
    """The real EfficientNet-Lite0 + MiniLM encoders, shared by every engine in the session."""
    from mars.registry import load_encoders

    return load_encoders("efficientnet-lite0-gem", "all-minilm-l6-v2", batch_size=8)


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory) -> Path:
    """A tiny random-init Qwen2-VL checkpoint (tests/tiny_qwen2vl.py), written once per session."""
    from tiny_qwen2vl import save_tiny_qwen2vl

    return save_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))


@pytest.fixture(scope="session")
def ikea_slice(ikea: Path, tmp_path_factory) -> dict:
    """A small real slice: every product of one bedroom room plus 50 random others.

    Returns {"corpus": path of a corpus.jsonl whose image paths point into the real data,
    "room": the room photo, "room_products": ids shown in the room, "qrels", "queries"}.
    """
    queries = [json.loads(line) for line in (ikea / "queries.jsonl").open()]
    qrels: dict[str, set[str]] = {}
    for line in (ikea / "qrels" / "dev.tsv").read_text().splitlines()[1:]:
        qid, pid, _ = line.split("\t")
        qrels.setdefault(qid, set()).add(pid)
    room_id = "a-bed-that-folds-away-to-be-a-sofa-by-day__1364309472525-s4"
    in_room = qrels[f"{room_id}::scene"]
    corpus = [json.loads(line) for line in (ikea / "corpus.jsonl").open()]
    others = [c for c in corpus if c["_id"] not in in_room]
    chosen = [c for c in corpus if c["_id"] in in_room] + random.Random(7).sample(others, 50)
    out = tmp_path_factory.mktemp("slice")
    with (out / "corpus.jsonl").open("w") as fh:
        for c in chosen:
            c = dict(c)
            if c["image"]:
                c["image"] = str(ikea / c["image"])
            fh.write(json.dumps(c) + "\n")
    room_queries = [q for q in queries if q.get("room_id") == room_id]
    return {
        "corpus": out / "corpus.jsonl",
        "room": ikea / f"rooms/{room_id}.jpg",
        "room_products": in_room,
        "records": chosen,
        "queries": room_queries,
        "qrels": qrels,
    }


@pytest.fixture(scope="session")
def slice_home(ikea_slice, encoders, tmp_path_factory) -> Path:
    """A MARS_HOME with the slice ingested (no training run); copy it before changing it."""
    from ingestion.readers import open_source
    from mars.engine import Engine
    from mars.settings import Settings

    home = tmp_path_factory.mktemp("slice-home") / "mars"
    engine = Engine(Settings(home=home), encoders=encoders)
    engine.ingest(open_source(ikea_slice["corpus"]), source="slice")
    engine.close()
    return home


@pytest.fixture
def make_engine(tmp_path, encoders):
    """Factory of engines on a temp MARS_HOME sharing the session's encoders; closes them after."""
    from mars.engine import Engine
    from mars.settings import Settings

    engines = []

    def factory(home: Path | None = None, **overrides):
        settings = Settings(home=home or tmp_path / "mars", **overrides)
        engine = Engine(settings, encoders=encoders)
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.close()  # a test may have closed it already: closing twice does nothing
