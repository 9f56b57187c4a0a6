"""The write side of the API in embedded mode (the server process owns the stores): bulk jobs
from a JSON-lines body and from a server path, job progress, streamed single items and deletes,
on a real slice of the IKEA catalog with the real encoders. The app runs in open mode without a
rate limit (keys, roles and limits are tests/test_api_auth.py's)."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from ingestion.readers import open_source
from query.app import create_app


@pytest.fixture(scope="module")
def client(encoders, tmp_path_factory):
    from mars.engine import Engine
    from mars.settings import Settings

    engine = Engine(Settings(home=tmp_path_factory.mktemp("api-ingest") / "mars", api_auth="open", rate_limit=""), encoders=encoders)
    with TestClient(create_app(engine=engine)) as c:
        c.engine = engine
        yield c
    engine.close()


def wait_for_job(client, job_id: int, timeout_s: float = 120.0, search: bool = False) -> dict:
    """Poll ``GET /v1/jobs/{id}`` until the job ends; with ``search``, query while it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        if search:
            assert client.post("/v1/search", json={"text": "lamp"}).status_code == 200
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}")


def search_ids(client, text: str) -> list[str]:
    r = client.post("/v1/search", json={"text": text, "mode": "bm25", "auto_lock": False})
    assert r.status_code == 200, r.text
    return [i["id"] for i in r.json()["items"]]


def test_bulk_jsonl_with_malformed_lines_then_path_job_is_unchanged(client, ikea_slice):
    records = [raw.data for raw in open_source(ikea_slice["corpus"])]
    lines = [json.dumps(r) for r in records]
    bad = ['{"id": "broken', '[1, 2]', json.dumps({"id": 12345, "title": "numeric id"}), json.dumps({"title": "no id"}),
           json.dumps({**records[0], "id": ""}), json.dumps({**records[1], "image": "/no/such/photo.jpg"})]
    for i, line in enumerate(bad):  # ~10 % malformed, spread through the body
        lines.insert(1 + i * 9, line)
    r = client.post("/v1/items:bulk", content="\n".join(lines).encode(), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["total"] == len(lines) and accepted["status_url"] == f"/v1/jobs/{accepted['job_id']}"
    job = wait_for_job(client, accepted["job_id"], search=True)
    assert job["status"] == "done", job
    assert job["indexed"] == len(records)  # the last bad line repeats records[1]'s id: a duplicate
    assert job["rejected"] == len(bad) and job["queued"] == 0 and job["done"] == job["total"] == len(lines)
    reasons = " | ".join(x["reason"] for x in job["rejections"])
    assert "invalid JSON" in reasons and "JSON object" in reasons and "duplicate id" in reasons
    health = client.get("/healthz").json()
    assert health["products"] == health["bm25_docs"] == health["vectors"] == len(records)
    assert records[5]["id"] in search_ids(client, records[5]["title"])

    again = client.post("/v1/items:bulk", json={"path": str(ikea_slice["corpus"])})
    assert again.status_code == 202, again.text
    job2 = wait_for_job(client, again.json()["job_id"])
    assert job2["status"] == "done" and job2["rejected"] == 0
    assert job2["unchanged"] == len(records) and job2["indexed"] == 0
    listed = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in listed] == [job2["id"], job["id"]]


def test_bulk_bad_requests_are_clear(client, tmp_path):
    assert client.post("/v1/items:bulk", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    empty = client.post("/v1/items:bulk", content=b"\n\n", headers={"content-type": "application/x-ndjson"})
    assert empty.status_code == 422 and "no records" in empty.json()["detail"]
    missing = client.post("/v1/items:bulk", json={"path": str(tmp_path / "nothing.jsonl")})
    assert missing.status_code == 422 and "does not exist" in missing.json()["detail"]
    assert client.post("/v1/items:bulk", json={"path": "x", "mapping": ["nonsense"]}).status_code == 422
    assert client.post("/v1/items:bulk", json={"path": "x", "extra": 1}).status_code == 422
    assert client.get("/v1/jobs/987654").status_code == 404


def test_streamed_item_is_searchable_on_return_and_delete_removes_it(client, ikea_slice):
    base = next(raw.data for raw in open_source(ikea_slice["corpus"]) if raw.data.get("image"))
    item = {**base, "id": "stream-1", "title": "ZORBLAX reading lamp", "text": "A ZORBLAX lamp streamed in."}
    before = client.get("/healthz").json()
    r = client.post("/v1/items", json=item)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "indexed" and r.json()["id"] == "stream-1"
    assert search_ids(client, "zorblax")[:1] == ["stream-1"]
    assert client.get("/v1/items/stream-1").json()["title"] == "ZORBLAX reading lamp"
    after = client.get("/healthz").json()
    assert after["products"] == before["products"] + 1 and after["vectors"] == before["vectors"] + 1

    assert client.post("/v1/items", json=item).json()["status"] == "unchanged"
    renamed = client.post("/v1/items", json={**item, "title": "QUIBBLE reading lamp"})
    assert renamed.json()["status"] == "indexed" and search_ids(client, "quibble")[:1] == ["stream-1"]

    rejected = client.post("/v1/items", json={**item, "id": "stream-2", "image": "/no/such/photo.jpg"})
    assert rejected.status_code == 422 and "photo.jpg" in rejected.json()["detail"]
    assert client.post("/v1/items", json={"title": "no id"}).status_code == 422
    assert client.get("/v1/items/stream-2").status_code == 404

    assert client.delete("/v1/items/stream-1").json() == {"deleted": "stream-1"}
    assert "stream-1" not in search_ids(client, "quibble") and client.get("/v1/items/stream-1").status_code == 404
    assert client.get("/healthz").json() == before
    assert client.delete("/v1/items/stream-1").status_code == 404


def test_closing_the_engine_stops_a_running_job_and_fails_queued_ones(make_engine):
    from catalog.models import IngestJob
    from ingestion.readers import RawRecord

    engine = make_engine()
    rows = [{"id": f"t-{i}", "title": f"Table {i}", "type": "Table"} for i in range(600)]  # 5 batches of 128
    running = engine.submit_bulk([RawRecord("mem", i + 1, r, r) for i, r in enumerate(rows)], "big")
    waiting = engine.submit_bulk([RawRecord("mem", 1, rows[0], rows[0])], "small")
    time.sleep(0.5)
    engine.close()
    with engine.sessions() as session:
        big, small = session.get(IngestJob, running), session.get(IngestJob, waiting)
        assert big.status == "failed" and "submit it again" in big.error and 0 < big.ingested < 600
        assert small.status == "failed" and "before this job ran" in small.error
