"""Shared fixtures: the real IKEA data, the real offline encoders (loaded once), engines in temp dirs."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: One BLAS/OpenMP thread per process for the test session (this process and the servers and
#: workers it starts inherit it; set the variables yourself to override). On this busy 2-core
#: machine two threads are many times slower on the suite's small matrices: an L-BFGS fit of
#: the category head on 70 vectors took 20 s with 2 torch threads, 0.15 s with 1; 2,000
#: OpenBLAS products of (60, 1280) @ (1280, 2000) 52 s vs 5.6 s. The README's own guidance is
#: ``OMP_NUM_THREADS=1 mars train align``, and evaluation/ingest_speed.py gives each of N
#: workers cores / N threads. Set before numpy or torch is imported (pytest imports neither).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _name in THREAD_VARIABLES:
    os.environ.setdefault(_name, "1")
if "torch" in sys.modules:  # a plugin imported it first: the variable came too late for it
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def ikea_dir() -> Path:
    """The IKEA benchmark folder: ``$MARS_IKEA_DIR`` or ``../shared/data/ikea`` beside the repo."""
    return Path(os.environ.get("MARS_IKEA_DIR", REPO.parent / "shared" / "data" / "ikea"))


@pytest.fixture(scope="session")
def ikea() -> Path:
    path = ikea_dir()
    if not (path / "corpus.jsonl").exists():
        pytest.fail(f"IKEA benchmark not found at {path}; set MARS_IKEA_DIR")
    return path


_memoized: list = []  # the session's memoizing encoders, for the run's summary line


@pytest.fixture(scope="session")
def real_encoders(tmp_path_factory):
    """The real EfficientNet-Lite0 (GeM) + MiniLM encoders, loaded once per session, on the
    default runtime (ONNX Runtime, exported into this session's own cache folder)."""
    from mars.registry import load_encoders

    return load_encoders("efficientnet-lite0-gem", "all-minilm-l6-v2", batch_size=8,
                         cache_dir=tmp_path_factory.mktemp("onnx-cache"))


@pytest.fixture(scope="session")
def encoders(real_encoders):
    """The session's real encoders behind memoizing wrappers (tests/memo_encoders.py), shared
    by every engine: each product photo, room feature map and text is encoded once per session
    (the wrappers return copies and refuse attribute writes, so no test can change them)."""
    from memo_encoders import memoized

    _memoized.extend(memoized(real_encoders))
    return tuple(_memoized)


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
def slice_ingest(ikea_slice, encoders, tmp_path_factory) -> tuple[Path, object]:
    """The slice ingested once per session with default settings (no training run), by an
    engine closed again: ``(MARS_HOME, its ingestion.pipeline.IngestReport)``."""
    from ingestion.readers import open_source
    from mars.engine import Engine
    from mars.settings import Settings

    home = tmp_path_factory.mktemp("slice-home") / "mars"
    with Engine(Settings(home=home, _env_file=None), encoders=encoders) as engine:  # no ./.env
        report = engine.ingest(open_source(ikea_slice["corpus"]), source="slice")
    return home, report


@pytest.fixture(scope="session")
def slice_home(slice_ingest) -> Path:
    """The session's MARS_HOME holding the ingested slice. Read-only: a test or module opens an
    engine on its own copy, ``shutil.copytree(slice_home, tmp_path / "mars")`` (a few MB)."""
    return slice_ingest[0]


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


#: Fixtures that load the real encoders, the real IKEA slice or a real model: a test that uses
#: one (directly or through another fixture) is marked ``slow`` (pyproject's marker), so
#: ``pytest -m "not slow"`` is the quick loop. Tests that start a server or worker process
#: that loads the encoders carry the mark themselves.
SLOW_FIXTURES = frozenset({"real_encoders", "encoders", "make_engine", "ikea_slice", "slice_ingest", "slice_home",
                           "tiny_qwen2vl_dir"})

#: A test not marked ``slow`` that takes longer than this (setup + call + teardown, seconds) is
#: listed at the end of the run, so a new expensive test does not hide among the quick ones.
UNMARKED_SLOW_S = 5.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


_unmarked_seconds: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    if item.get_closest_marker("slow") is None:
        _unmarked_seconds[item.nodeid] = _unmarked_seconds.get(item.nodeid, 0.0) + outcome.get_result().duration


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if _memoized:
        image, text = _memoized
        maps = f", {image.map_misses} feature maps ({image.map_hits})" if hasattr(image, "map_misses") else ""
        terminalreporter.write_line(
            f"session encoders, computed (answered from the memo): {image.misses} photos ({image.hits}){maps}, "
            f"{text.misses} texts ({text.hits}); tests/memo_encoders.py")
    slow = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > UNMARKED_SLOW_S), reverse=True)
    if slow:
        terminalreporter.section(f"tests over {UNMARKED_SLOW_S:g} s without @pytest.mark.slow")
        for seconds, nodeid in slow:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")
