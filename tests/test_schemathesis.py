"""Schemathesis against the OpenAPI schema of a running `mars serve`: whatever the generated
requests are, no endpoint answers 5xx."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from workers.local import served_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server in open mode (every request acts as admin, so writes are exercised too)
    on a small text-only catalog, without rate limits."""
    home = tmp_path_factory.mktemp("schemathesis") / "mars"
    env = {"MARS_HOME": str(home), "MARS_RATE_LIMIT": "", "MARS_LOG_LEVEL": "WARNING"}
    with served_api(env, home.parent / "serve.log", "--open") as url:
        rows = [{"id": f"sku-{i}", "title": f"Oak side table {i}", "type": "Side table", "colour": "oak"} for i in range(12)]
        job = httpx.post(f"{url}/v1/items:bulk", content="\n".join(map(json.dumps, rows)),
                         headers={"content-type": "application/x-ndjson"}, timeout=120).json()
        for _ in range(240):
            if httpx.get(f"{url}/v1/jobs/{job['job_id']}").json()["status"] in ("done", "failed"):
                break
            time.sleep(0.5)
        yield {"url": url}


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(f"{served['url']}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_endpoint_answers_5xx(case, served):
    case.call_and_validate(checks=[not_a_server_error], timeout=60)
