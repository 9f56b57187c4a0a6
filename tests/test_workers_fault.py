"""Server mode on real Redis + PostgreSQL: bulk jobs through Celery worker processes.

Two ``ingest,embed`` workers and one ``index`` worker (the store owner) run as real
processes. One ingest worker is SIGKILLed mid-run and restarted; afterwards every item is
indexed exactly once and the job's counts add up. A second job mixes 10% malformed records
into a bulk upload: they are rejected with reasons, the rest is indexed, and what was
stored before does not change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.models import Product
from ingestion.readers import RawRecord, open_source
from postgres_db import fresh_database
from redis_db import flushed_redis
from workers.app import app
from catalog.jobs import job_progress
from workers.celery_jobs import CeleryJobs
from workers.local import LocalWorkers

pytestmark = pytest.mark.slow

BROKER = "redis://127.0.0.1:6379/13"


def _text_only(records: list[RawRecord]) -> list[RawRecord]:
    """IKEA records without their photos (text-only keeps the test within its time budget)."""
    return [RawRecord(r.source, r.position, {k: v for k, v in r.data.items() if k != "image"}, r.raw) for r in records]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[LocalWorkers, str]]:
    app.conf.broker_url = BROKER  # this process submits the jobs
    with flushed_redis(BROKER), fresh_database() as db_url:
        upgrade_to_head(make_engine(db_url))
        env = {
            "MARS_DATABASE_URL": db_url,
            "MARS_BROKER_URL": BROKER,
            "MARS_HOME": str(tmp_path_factory.mktemp("mars-home")),
            "MARS_TASK_VISIBILITY_TIMEOUT_S": "8",
            "MARS_INGEST_CHUNK_SIZE": "16",
        }
        c = LocalWorkers(env, tmp_path_factory.mktemp("worker-logs"))
        c.start("index", "index")
        c.start("w1", "ingest,embed")
        c.start("w2", "ingest,embed")
        try:
            yield c, db_url
        finally:
            c.stop_all()


def _wait(sessions, job_id: int, until, timeout_s: float, cluster: LocalWorkers) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as s:
            progress = job_progress(s, job_id)
        if until(progress):
            return progress
        time.sleep(0.5)
    tails = cluster.log_tails()
    pytest.fail(f"job {job_id} did not get there in {timeout_s} s: {progress}\n{json.dumps(tails, indent=1)}")


def _store_counts(cluster: LocalWorkers, db_url: str) -> tuple[int, int, int, set[str]]:
    """(catalog, vector, BM25) counts and the catalog ids, read with the index worker stopped."""
    from mars.engine import Engine
    from mars.settings import Settings

    engine = Engine(Settings(home=Path(cluster.env["MARS_HOME"]), database_url=db_url))
    try:
        with engine.sessions() as s:
            ids = set(s.execute(select(Product.id)).scalars())
        return len(ids), engine.vector_store().count(), engine.lexical.count(), ids
    finally:
        engine.close()


def test_sigkilled_worker_loses_nothing_and_duplicates_nothing(cluster, ikea):
    c, db_url = cluster
    sessions = session_factory(make_engine(db_url))
    records = _text_only(list(open_source(ikea / "corpus.jsonl")))
    assert len(records) >= 2000
    job = CeleryJobs(sessions, chunk_size=16).submit(records, "ikea text-only")

    _wait(sessions, job, lambda p: p["done"] >= 300, 240, c)
    c.kill("w1")  # mid-run: its reserved chunk is neither acknowledged nor finished
    c.start("w1", "ingest,embed")
    progress = _wait(sessions, job, lambda p: p["status"] == "done", 420, c)

    assert progress["total"] == len(records)
    assert progress["indexed"] + progress["unchanged"] + progress["rejected"] == progress["total"]
    assert progress["indexed"] == len(records) and progress["rejected"] == 0 and progress["queued"] == 0
    c.stop("index")  # release the stores so this process can count them
    catalog, vectors, bm25, ids = _store_counts(c, db_url)
    assert catalog == vectors == bm25 == len(records) == len(ids)
    c.start("index", "index")


def test_malformed_records_are_rejected_and_stored_items_do_not_change(cluster, ikea):
    c, db_url = cluster
    sessions = session_factory(make_engine(db_url))
    with sessions() as s:
        before = {p.id: (p.title, p.content_hash) for p in s.execute(select(Product).limit(40)).scalars()}
    ids = list(before)
    good = [{"id": f"new-{i}", "title": f"GRUNDTAL rail {i}", "type": "Rail", "text": "Stainless steel rail."} for i in range(180)]
    bad = (
        [{"id": pid, "title": 123} for pid in ids[:8]]  # existing ids with a wrong type: must not touch them
        + [{"title": "no id"}] * 4
        + [{"id": "x/y", "title": "slash"}] * 4
        + [{"id": f"nul-{i}", "text": "bad\x00text"} for i in range(4)]
    )
    rows = good[:90] + bad + good[90:]
    records = [RawRecord("mixed.jsonl", i + 1, row, row) for i, row in enumerate(rows)]
    records.append(RawRecord("mixed.jsonl", len(records) + 1, None, "{not json", error="invalid JSON: Expecting property name"))
    job = CeleryJobs(sessions, chunk_size=16).submit(records, "mixed")
    progress = _wait(sessions, job, lambda p: p["status"] == "done", 300, c)

    assert (progress["total"], progress["indexed"], progress["rejected"]) == (len(records), 180, len(bad) + 1)
    assert len(bad) + 1 >= 0.1 * len(records)
    reasons = {r["position"]: r["reason"] for r in progress["rejections"]}
    assert len(reasons) == len(bad) + 1 and all(reasons.values())
    assert "title" in reasons[91] and "NUL" in reasons[91 + 16] and "JSON" in reasons[len(records)]
    with sessions() as s:
        after = {p.id: (p.title, p.content_hash) for p in s.execute(select(Product).where(Product.id.in_(ids))).scalars()}
        assert after == before
        assert s.execute(select(func.count()).where(Product.id.like("new-%"))).scalar_one() == 180
