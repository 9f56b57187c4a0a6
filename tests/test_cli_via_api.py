"""`mars serve` as a real process (API keys on, the default); `mars keys create` while it runs,
`mars ingest --via-api` and `mars jobs` against it with that key, and `mars jobs` reading the
catalog directly while the server owns the stores."""

from __future__ import annotations

import json

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
