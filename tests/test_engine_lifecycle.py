"""The engine's lifetime: what a failed start releases, what closing does to queued jobs."""

from __future__ import annotations

import logging
import threading

import pytest
from filelock import FileLock
from sqlalchemy import select

import mars.engine
from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.models import IngestJob
from ingestion.raw_records import RawRecord
from mars.engine import Engine
from mars.settings import Settings
from workers.inprocess_jobs import InProcessJobs, JobInterrupted


def test_an_engine_whose_critic_cannot_be_built_releases_the_lock_and_the_database(tmp_path, monkeypatch):
    disposed = []
    real_make_engine = mars.engine.make_engine

    def watched_make_engine(url):  # noqa: ANN001, ANN202 - records that the pool is disposed
        db = real_make_engine(url)
        dispose = db.dispose
        monkeypatch.setattr(db, "dispose", lambda *a, **k: (disposed.append(url), dispose(*a, **k))[1])
        return db

    monkeypatch.setattr(mars.engine, "make_engine", watched_make_engine)
    with pytest.raises(ValueError, match="MARS_CRITIC=vlm needs MARS_CRITIC_MODEL"):
        Engine(Settings(home=tmp_path, critic="vlm", _env_file=None))
    assert len(disposed) == 1
    lock = FileLock(str(tmp_path.resolve() / "owner.lock"))
    lock.acquire(timeout=0)  # nobody holds MARS_HOME any more
    lock.release()
    engine = Engine(Settings(home=tmp_path, critic="none", _env_file=None))  # and the next engine opens it
    engine.close()
    engine.close()  # closing twice does nothing


def test_closing_stops_the_running_job_and_fails_the_queued_ones_without_a_traceback(tmp_path, caplog):
    db = make_engine(f"sqlite:///{tmp_path / 'catalog.db'}")
    upgrade_to_head(db)
    sessions = session_factory(db)
    started, release = threading.Event(), threading.Event()

    def run(records, source, total, on_progress, job_id):  # noqa: ANN001, ANN202 - a job of two batches
        with sessions() as session:
            session.get(IngestJob, job_id).status = "running"
            session.commit()
        started.set()
        release.wait(10)
        try:
            on_progress(1)  # the batch boundary: raises once the queue is closing
        except JobInterrupted as exc:
            with sessions() as session:
                job = session.get(IngestJob, job_id)
                job.status, job.error = "failed", str(exc)
                session.commit()
            raise

    jobs = InProcessJobs(sessions, run)
    records = [RawRecord("test", 1, {"id": "a", "title": "A"})]
    first, second = jobs.submit(records, "first"), jobs.submit(records, "second")
    assert started.wait(10) and jobs.counts() == {"waiting": 1, "running": 1}
    caplog.set_level(logging.DEBUG)
    threading.Timer(0.2, release.set).start()
    jobs.close()
    with sessions() as session:
        rows = {j.id: (j.status, j.error) for j in session.execute(select(IngestJob)).scalars()}
    assert rows[first] == ("failed", "the server stopped during this job; submit it again (stored items are skipped as unchanged)")
    assert rows[second] == ("failed", "the server stopped before this job ran; submit it again")
    assert not [r for r in caplog.records if "exception calling callback" in r.getMessage()]
    failures = [r for r in caplog.records if r.name == "mars.jobs"]
    assert [r.getMessage() for r in failures] == ["bulk job failed: JobInterrupted: the server stopped during this job; "
                                                  "submit it again (stored items are skipped as unchanged)"]
    assert jobs.counts() == {"waiting": 0, "running": 0}
    db.dispose()
