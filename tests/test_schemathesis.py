"""Schemathesis against the OpenAPI schema of a running `mars serve`: whatever the generated
requests are, no endpoint answers 5xx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server in open mode (every request acts as admin, so writes are exercised too)
    on a small text-only catalog, without rate limits."""
    home = tmp_path_factory.mktemp("schemathesis") / "mars"
    port = _free_port()
    env = {**os.environ, "MARS_HOME": str(home), "MARS_RATE_LIMIT": "", "MARS_LOG_LEVEL": "WARNING"}
    log = home.parent / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "mars.cli", "serve", "--open", "--port", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"mars serve exited: {log.read_text()[-3000:]}")
            try:
                httpx.get(f"{url}/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        rows = [{"id": f"sku-{i}", "title": f"Oak side table {i}", "type": "Side table", "colour": "oak"} for i in range(12)]
        job = httpx.post(f"{url}/v1/items:bulk", content="\n".join(map(json.dumps, rows)),
                         headers={"content-type": "application/x-ndjson"}, timeout=120).json()
        for _ in range(240):
            if httpx.get(f"{url}/v1/jobs/{job['job_id']}").json()["status"] in ("done", "failed"):
                break
            time.sleep(0.5)
        yield {"url": url, "log": log}
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(f"{served['url']}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_endpoint_answers_5xx(case, served):
    case.call_and_validate(checks=[not_a_server_error], timeout=60)
