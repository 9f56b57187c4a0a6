"""`"critic_wait": false`: the fused list comes back at once, the critic's re-ranking is
fetched when it lands; and the critic's timeout surfaces through the API."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from critic.protocol import Verdict
from ingestion.readers import open_source
from query.app import create_app


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


def test_fused_order_first_then_the_critic_reranking(ikea_slice, make_engine, tmp_path):
    engine = make_engine(tmp_path / "deferred", critic="none", api_auth="open", rate_limit="")
    engine.ingest(open_source(ikea_slice["corpus"]), "slice")
    critic = GatedCritic()
    engine.critic = engine.funnel.critic = critic
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
