"""`mars serve` as a real process (API keys on, the default); `mars keys create` while it runs,
`mars ingest --via-api` and `mars jobs` against it with that key, and `mars jobs` reading the
catalog directly while the server owns the stores; the job's progress as `--via-api` shows it
(per batch, with an ETA) and a job that waited behind another timed from its own start."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

import httpx
import pytest
from typer.testing import CliRunner

from mars.cli import app
from workers.local import free_port, served_api

pytestmark = pytest.mark.slow  # a real `mars serve` process, which loads the real encoders to ingest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("served") / "mars"
    with served_api({"MARS_HOME": str(home)}, home.parent / "serve.log") as url:
        yield {"url": url, "home": home}


def test_ingest_via_api_then_jobs(server, tmp_path, monkeypatch):
    catalog = tmp_path / "catalog.jsonl"
    good = [{"id": f"sku-{i}", "title": f"Oak side table {i}", "type": "Side table", "colour": "oak"} for i in range(20)]
    lines = [json.dumps(r) for r in good]
    lines[5:5] = ['{"id": "sku-broken"', json.dumps({"id": 7, "title": "numeric id"})]
    catalog.write_text("\n".join(lines) + "\n")

    runner = CliRunner()
    monkeypatch.delenv("MARS_API_KEY", raising=False)
    assert httpx.get(f"{server['url']}/healthz").json()["auth"] == "keys"
    refused = runner.invoke(app, ["ingest", str(catalog), "--via-api", server["url"]])
    assert refused.exit_code == 2 and "HTTP 401" in refused.output and "--api-key" in refused.output.replace("\n", " ")
    monkeypatch.setenv("MARS_HOME", str(server["home"]))
    from mars.settings import get_settings

    get_settings.cache_clear()
    try:  # the key is made in the catalog while the server runs
        created = runner.invoke(app, ["keys", "create", "--name", "cli test", "--role", "editor", "--json"])
    finally:
        get_settings.cache_clear()
    assert created.exit_code == 0, created.output
    key = json.loads(created.output)["key"]

    result = runner.invoke(app, ["ingest", str(catalog), "--via-api", server["url"], "--api-key", key, "--json"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["status"] == "done" and job["total"] == 22
    assert (job["indexed"], job["rejected"], job["queued"]) == (20, 2, 0)
    assert {r["position"] for r in job["rejections"]} == {6, 7}
    assert any("invalid JSON" in r["reason"] for r in job["rejections"])

    hits = httpx.post(f"{server['url']}/v1/search", json={"text": "oak side table 13", "mode": "bm25"},
                      headers={"Authorization": f"Bearer {key}"}).json()["items"]
    assert hits[0]["id"] == "sku-13"

    monkeypatch.setenv("MARS_API_KEY", key)  # the option's environment variable
    via_api = runner.invoke(app, ["jobs", "--api", server["url"], "--json"])
    assert via_api.exit_code == 0, via_api.output
    assert json.loads(via_api.output)[0]["id"] == job["id"]
    get_settings.cache_clear()
    try:  # the server holds the stores; the catalog can still be read
        direct = runner.invoke(app, ["jobs", str(job["id"]), "--json"])
    finally:
        get_settings.cache_clear()
    assert direct.exit_code == 0, direct.output
    assert json.loads(direct.output)["indexed"] == 20
    table = runner.invoke(app, ["jobs", str(job["id"]), "--api", server["url"]])
    assert table.exit_code == 0 and "rejected record 6" in table.output and "indexed" in table.output


def test_via_api_errors_are_clear(tmp_path):
    catalog = tmp_path / "c.jsonl"
    catalog.write_text(json.dumps({"id": "a", "title": "x"}) + "\n")
    result = CliRunner().invoke(app, ["ingest", str(catalog), "--via-api", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2 and "is `mars serve` running there?" in result.output.replace("\n", " ")


def _editor_key(server, monkeypatch) -> str:
    """An editor key made with `mars keys create` in the served catalog while the server runs."""
    from mars.settings import get_settings

    monkeypatch.setenv("MARS_HOME", str(server["home"]))
    get_settings.cache_clear()
    try:
        created = CliRunner().invoke(app, ["keys", "create", "--name", "progress test", "--role", "editor", "--json"])
    finally:
        get_settings.cache_clear()
    assert created.exit_code == 0, created.output
    return json.loads(created.stdout)["key"]


def _shelves(tag: str, n: int) -> str:
    return "".join(json.dumps({"id": f"{tag}-{i}", "title": f"Birch shelf {tag} {i}", "type": "Shelf",
                               "colour": "birch"}) + "\n" for i in range(n))


def test_ingest_via_api_progress_moves_per_batch(server, tmp_path, monkeypatch):
    import mars.cli.ingest

    key = _editor_key(server, monkeypatch)
    catalog = tmp_path / "shelves.jsonl"
    catalog.write_text(_shelves("progress", 1000))  # eight batches of 128 on the server's job thread
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "0")  # a line per poll
    monkeypatch.setattr(mars.cli.ingest, "POLL_S", 0.05)
    result = CliRunner().invoke(app, ["ingest", str(catalog), "--via-api", server["url"], "--api-key", key])
    assert result.exit_code == 0, result.output
    lines = [m for m in map(re.compile(r"^job \d+: (\d+)/1000 \(\d+%\)(.*)$").match, result.stderr.splitlines()) if m]
    done = [int(m[1]) for m in lines]
    assert done[0] == 0 and done[-1] == 1000 and done == sorted(done)
    middle = sorted({d for d in done if 0 < d < 1000})
    assert len(middle) >= 2 and all(d % 128 == 0 for d in middle), done  # the server's count moves per batch
    assert any(re.match(r" · [\d.]+ items/s · about [\d.]+ s left$", m[2]) for m in lines if 0 < int(m[1]) < 1000), \
        result.stderr
    assert "done in" in lines[-1][2] and "ingest job" in result.stdout


def test_a_job_that_waited_is_timed_from_its_own_start(server, monkeypatch):
    key = _editor_key(server, monkeypatch)
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/x-ndjson"}
    ids = [httpx.post(f"{server['url']}/v1/items:bulk", content=_shelves(tag, 300), headers=headers).json()["job_id"]
           for tag in ("first", "second")]  # the second waits behind the first on the job thread
    deadline = time.monotonic() + 120
    while True:
        jobs = [httpx.get(f"{server['url']}/v1/jobs/{i}", headers=headers).json() for i in ids]
        if all(j["status"] in ("done", "failed") for j in jobs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    first, second = jobs
    assert first["status"] == second["status"] == "done"
    assert datetime.fromisoformat(second["started_at"]) >= datetime.fromisoformat(first["finished_at"])
