"""The learned critic on a real slice: mine pairs through the funnel, train, save, and serve --mode full.

Each test works on its own copy of the session's ingested slice (``slice_home``), not a fresh
ingest."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from evaluation.beir import QueryImages, load_qrels, load_queries
from query.funnel import SearchQuery
from training.critic import fit, mine

pytestmark = pytest.mark.slow


def test_mine_train_and_rerank_with_the_learned_critic(ikea, ikea_slice, slice_home, make_engine, tmp_path):
    home = shutil.copytree(slice_home, tmp_path / "mars")
    engine = make_engine(home)
    room_id = ikea_slice["room"].stem
    queries = [q for q in load_queries(ikea / "queries.jsonl") if q.room_id == room_id]
    qrels = load_qrels(ikea / "qrels" / "dev.tsv")
    mined = mine(engine, queries, qrels, depth=10, controls=2)
    assert {m.query.task for m in mined} == {"room-class", "room-type", "room-scene"}
    kinds = {r.split(":")[0] for m in mined for r in m.reasons}
    assert {"positive", "hard negative", "random control"} <= kinds
    for m in mined:
        assert len(m.pairs) == len(m.labels) == len(m.reasons)
        assert all(p.room_regions is not None and p.room_regions.shape[1] == 1280 for p in m.pairs)
        assert [p.product_id in m.relevant for p in m.pairs] == [bool(y) for y in m.labels]
    critic = fit(mined)
    path = tmp_path / "critic.safetensors"
    critic.save(path)
    engine.close()

    served = make_engine(home, critic_checkpoint=path)
    scene = next(q for q in queries if q.task == "room-class")
    room = QueryImages(10**8, 10**8)(scene)
    full = served.search(SearchQuery(text=scene.text, image=room, mode="full", top_k=10))
    hybrid = served.search(SearchQuery(text=scene.text, image=room, mode="hybrid", top_k=20))
    assert full.critic.backend == "learned" and full.critic.status == "scored" and full.critic.scored > 0
    assert {i.id for i in full.items} <= {i.id for i in hybrid.items}  # the critic re-orders the fused top 20
    scores = [i.score for i in full.items if i.provenance.critic]
    assert scores == sorted(scores, reverse=True)  # re-ranked by the critic's score
    assert all(i.provenance.critic.rationale for i in full.items if i.provenance.critic)
    served.close()


def test_cli_train_critic_writes_a_checkpoint(ikea, ikea_slice, slice_home, tmp_path, monkeypatch):
    from mars.cli import app
    from mars.settings import get_settings

    home = shutil.copytree(slice_home, tmp_path / "cli-mars")
    room_id = ikea_slice["room"].stem
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(line for line in (ikea / "queries.jsonl").open() if room_id in line))
    rooms_dir = tmp_path / "rooms"
    rooms_dir.mkdir()
    (rooms_dir / ikea_slice["room"].name).symlink_to(ikea_slice["room"])
    monkeypatch.setenv("MARS_HOME", str(home))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["train", "critic", "--queries", str(queries), "--qrels",
                                          str(ikea / "qrels" / "dev.tsv"), "--folds", "0", "--depth", "10", "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert (home / "critic" / "learned.safetensors").exists()
    assert '"in_sample"' in result.output and '"room-class"' in result.output


def test_vlm_critic_through_the_engine_reads_room_and_product_photos(ikea, ikea_slice, slice_home, make_engine,
                                                                    tiny_qwen2vl_dir, tmp_path):
    engine = make_engine(shutil.copytree(slice_home, tmp_path / "vlm-mars"), critic="vlm",
                         critic_model=str(tiny_qwen2vl_dir), critic_rationale_top_k=0)
    seen = []
    score = engine.critic.score
    engine.critic.score = lambda pairs: seen.extend(pairs) or score(pairs)
    room = QueryImages(10**8, 10**8)(next(q for q in load_queries(ikea / "queries.jsonl") if q.task == "room-class"
                                          and q.room_id == ikea_slice["room"].stem))
    full = engine.search(SearchQuery(text="a lamp for this bedroom", image=room, mode="full", top_k=5))
    assert full.critic.backend == "qwen2-vl" and full.critic.status == "scored" and "Qwen2-VL" in full.critic.detail
    assert seen and all(p.room_image is room and p.product_image is not None for p in seen)
    assert all(0.0 <= i.provenance.critic.score <= 1.0 and "P(yes)=" in i.provenance.critic.rationale
               for i in full.items if i.provenance.critic)


def test_a_critic_past_its_deadline_leaves_the_fused_order(slice_home, make_engine, tmp_path):
    from critic.protocol import CriticTimeout

    engine = make_engine(shutil.copytree(slice_home, tmp_path / "timeout-mars"), critic="none")

    class MissesItsDeadline:  # what QueuedCritic raises when the critic worker answers too late
        name, uses_images = "queued:vlm", False

        def score(self, pairs):
            raise CriticTimeout(f"no verdicts for {len(pairs)} pairs within 5 ms", task_id="t-1", deadline_ms=5)

    engine.funnel.critic_stage.critic = MissesItsDeadline()
    hybrid = engine.search(SearchQuery(text="a lamp for this bedroom", mode="hybrid", top_k=10))
    full = engine.search(SearchQuery(text="a lamp for this bedroom", mode="full", top_k=10))
    # a missed deadline is one way of being unavailable (CriticTimeout is a CriticUnavailable)
    assert full.critic.status == "unavailable" and full.critic.backend == "queued:vlm"
    assert full.critic.detail.startswith("no verdicts for ") and "within 5 ms" in full.critic.detail
    assert full.critic.scored == 0
    assert [i.id for i in full.items] == [i.id for i in hybrid.items]
    assert all(i.provenance.critic is None for i in full.items)


def test_the_ranking_gain_counts_queries_the_critic_could_not_judge(ikea, ikea_slice, slice_home, make_engine, tmp_path):
    from critic.protocol import CriticUnavailable
    from training.eval_critic import ranking_gain

    engine = make_engine(shutil.copytree(slice_home, tmp_path / "gain-mars"), critic="none")

    class Unreadable:  # a student whose answers stay invalid JSON after the repair round
        name, uses_images = "qwen2-vl", False

        def score(self, pairs):
            raise CriticUnavailable("the answer was not valid JSON after one repair")

    engine.funnel.critic_stage.critic = Unreadable()
    room_id = ikea_slice["room"].stem
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(line for line in (ikea / "queries.jsonl").open() if room_id in line))
    (tmp_path / "rooms").mkdir()
    (tmp_path / "rooms" / ikea_slice["room"].name).symlink_to(ikea_slice["room"])  # photos are relative to the file
    gain = ranking_gain(engine, queries, ikea / "qrels" / "dev.tsv", tasks=("room-class",), limit=2)
    row = gain["room-class"]
    assert row["queries"] == 2 and row["unavailable"] == 2 and row["full"] == row["hybrid"] and row["gain"] == 0
    assert row["reason"].startswith("the answer was not valid JSON")
