"""`"critic_wait": false`: the fused list comes back at once, the critic's re-ranking is
fetched when it lands; and the critic's timeout surfaces through the API (an OpenAI-compatible
endpoint that stalls: a 200 with the fused order and ``critic: unavailable``, not a 500).

Each test works on its own copy of the session's ingested slice (``slice_home``)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from critic.protocol import Verdict
from query.app import create_app
from test_openai_critic import StallingServer

pytestmark = pytest.mark.slow  # the real encoders and the IKEA slice


class GatedCritic:
    """A critic that answers only once the test opens its gate; it scores by reversed fused rank."""

    name, uses_images = "gated", False

    def __init__(self) -> None:
        self.gate = threading.Event()

    def score(self, pairs):
        assert self.gate.wait(30), "the test never opened the gate"
        n = len(pairs)
        return [Verdict(score=(i + 1) / n, rationale=f"rank {p.fused_rank} reversed", backend="gated", latency_s=0.0)
                for i, p in enumerate(pairs)]


def test_fused_order_first_then_the_critic_reranking(slice_home, make_engine, tmp_path):
    engine = make_engine(shutil.copytree(slice_home, tmp_path / "deferred"), critic="none", api_auth="open", rate_limit="")
    critic = GatedCritic()
    engine.funnel.critic_stage.critic = critic
    assert engine.critic is critic
    with TestClient(create_app(engine=engine)) as client:
        body = {"text": "a lamp for this bedroom", "auto_lock": False, "mode": "full", "top_k": 5, "critic_wait": False}
        first = client.post("/v1/search", json=body)
        assert first.status_code == 200, first.text
        now = first.json()
        hybrid = client.post("/v1/search", json={**body, "mode": "hybrid"}).json()
        assert now["critic"]["status"] == "pending" and now["mode"] == "full"
        assert [i["id"] for i in now["items"]] == [i["id"] for i in hybrid["items"]]
        url = now["critic"]["result_url"]
        assert client.get(url).status_code == 202  # the critic is still waiting at its gate
        critic.gate.set()
        deadline = time.monotonic() + 30
        while (r := client.get(url)).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        final = r.json()
        assert final["critic"]["status"] == "scored" and final["critic"]["backend"] == "gated"
        assert final["items"][0]["provenance"]["critic"]["score"] == 1.0  # the last fused pair scored highest
        assert final["items"][0]["id"] != hybrid["items"][0]["id"]
        assert client.get("/v1/search/results/nope").status_code == 404
        waited = client.post("/v1/search", json={**body, "critic_wait": True}).json()
        assert waited["critic"]["status"] == "scored" and waited["critic"]["result_url"] is None


def test_a_stalled_openai_critic_keeps_the_fused_order_and_says_it_timed_out(slice_home, make_engine, tmp_path):
    """The endpoint accepts the connection and never answers: past ``MARS_CRITIC_TIMEOUT_S`` the
    search answers 200 in the fused order, and the response says the critic is unavailable and why."""
    with StallingServer() as stalled:
        engine = make_engine(
            shutil.copytree(slice_home, tmp_path / "stalled"), critic="openai", critic_endpoint=stalled.url,
            critic_api_model="x", critic_timeout_s=0.5, critic_max_retries=0, api_auth="open", rate_limit="",
        )
        assert engine.critic.name == "openai"
        with TestClient(create_app(engine=engine)) as client:
            body = {"text": "a lamp for this bedroom", "mode": "full"}
            hybrid = client.post("/v1/search", json={**body, "mode": "hybrid"})
            t0 = time.monotonic()
            full = client.post("/v1/search", json=body)
            elapsed = time.monotonic() - t0
        assert stalled.accepted >= 1  # the critic did reach the endpoint, which never answered
    assert hybrid.status_code == 200, hybrid.text
    assert full.status_code == 200, full.text
    assert elapsed < 10
    now, fused = full.json(), hybrid.json()
    assert now["mode"] == "full" and now["items"]
    assert [i["id"] for i in now["items"]] == [i["id"] for i in fused["items"]]
    assert all(i["provenance"]["critic"] is None for i in now["items"])
    critic = now["critic"]
    assert critic["status"] == "unavailable" and critic["backend"] == "openai" and critic["scored"] == 0
    assert critic["detail"].startswith(f"the OpenAI-compatible critic at {stalled.url} (x) timed out: "
                                       "no answer within timeout_s=0.5 s (0 retries)")
