"""Merchandising rules (query/rules.py, catalog/rules.py, /v1/rules in query/routes/rules.py) on a
real engine with the real encoders and the IKEA slice (plus three branded text-only records:
the IKEA corpus has no brand attribute, ABO listings do)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from catalog import api_keys
from catalog import rules as catalog_rules
from critic.protocol import CriticPair, Verdict
from ingestion.readers import RawRecord, apply_mapping
from mars.cli import app as cli
from mars.settings import get_settings
from query.app import create_app
from query.rules import Rule, RuleCache, contains_phrase, place_pins, rewrite

#: Text-only rugs with a brand (unknown record fields go into ``attributes``).
BRANDED = [
    {"id": "acme-rug-1", "title": "Acme jute rug", "type": "Rug, flatwoven", "colour": "natural", "brand": "Acme"},
    {"id": "acme-rug-2", "title": "Acme wool runner", "type": "Rug, low pile", "colour": "grey", "brand": "ACME"},
    {"id": "other-rug-1", "title": "Plain cotton rug", "type": "Rug, flatwoven", "colour": "white", "brand": "Other"},
]
RUGS = "a rug for the living room"
SOFA_BED, NORSBORG, LAMP, OSTED, MULLERUP = "903.007.25", "391.250.99", "702.313.18", "202.703.12", "103.019.55"


def raw(records: list[dict]) -> list[RawRecord]:
    """``records`` as a JSON-lines reader hands them over (``brand`` moved into ``attributes``)."""
    return [RawRecord("test", i + 1, apply_mapping(r, {}, Path.cwd()), raw=r) for i, r in enumerate(records)]


@pytest.fixture(scope="module")
def client(slice_home, encoders, tmp_path_factory) -> Iterator[TestClient]:
    """An open-mode app on a copy of the session's ingested IKEA slice + :data:`BRANDED`."""
    from mars.engine import Engine
    from mars.settings import Settings

    home = shutil.copytree(slice_home, tmp_path_factory.mktemp("rules") / "mars")
    engine = Engine(Settings(home=home, api_auth="open", rate_limit=""), encoders=encoders)
    engine.ingest(raw(BRANDED), "branded")
    with TestClient(create_app(engine=engine)) as c:
        c.engine = engine
        yield c
    engine.close()


@pytest.fixture(autouse=True)
def no_rules_left(request) -> Iterator[None]:
    """Every test starts and ends without rules."""
    yield
    if "client" in request.fixturenames:
        c = request.getfixturevalue("client")
        for rule in c.get("/v1/rules").json():
            assert c.delete(f"/v1/rules/{rule['id']}").status_code == 200


def add(client: TestClient, **rule) -> dict:
    r = client.post("/v1/rules", json=rule)
    assert r.status_code == 201, r.text
    return r.json()


def search(client: TestClient, text: str, **body) -> dict:
    r = client.post("/v1/search", json={"text": text, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ids(response: dict) -> list[str]:
    return [i["id"] for i in response["items"]]


def rules_of(response: dict, pid: str) -> list[str]:
    return next(i["provenance"]["rules"] for i in response["items"] if i["id"] == pid)


def test_pin_moves_an_item_to_first_and_deleting_the_rule_restores_the_order(client):
    before = search(client, RUGS)
    assert before["lock"]["key"] == "rug" and len(ids(before)) >= 5
    last = ids(before)[-1]
    rule = add(client, kind="pin", product_id=last, position=1)
    assert rule["created_by"] == "open mode" and rule["summary"] == f"pin {last} at #1 on every search"
    pinned = search(client, RUGS)
    assert ids(pinned) == [last] + [i for i in ids(before) if i != last]
    first = pinned["items"][0]
    assert first["provenance"]["rules"] == [f"pinned at #1 by rule {rule['id']}"]
    assert first["provenance"]["fused"]["rank"] == len(ids(before))  # its fusion rank is kept in provenance
    assert all(not i["provenance"]["rules"] for i in pinned["items"][1:])
    assert client.delete(f"/v1/rules/{rule['id']}").json()["id"] == rule["id"]
    assert ids(search(client, RUGS)) == ids(before)
    assert client.delete(f"/v1/rules/{rule['id']}").status_code == 404


def test_pin_inserts_a_product_retrieval_did_not_return_within_the_lock_only(client):
    sisal = search(client, "sisal", category="rug", mode="bm25")
    assert ids(sisal) == [OSTED]  # BM25 finds one rug for "sisal"
    mullerup = add(client, kind="pin", product_id=MULLERUP, position=1)
    lamp = add(client, kind="pin", product_id=LAMP, position=2)  # outside the rug lock: never inserted there
    got = search(client, "sisal", category="rug", mode="bm25")
    assert ids(got) == [MULLERUP, OSTED]
    inserted = got["items"][0]
    assert inserted["provenance"]["fused"] is None and inserted["provenance"]["retrievers"] == {}
    assert inserted["provenance"]["rules"] == [f"pinned at #1 by rule {mullerup['id']} (inserted: retrieval did not return it)"]
    assert inserted["score"] == 0.0
    unlocked = search(client, "sisal", mode="bm25")  # no lock: both pins apply
    assert unlocked["lock"]["applied"] is False and ids(unlocked) == [MULLERUP, LAMP, OSTED]
    assert rules_of(unlocked, LAMP) == [f"pinned at #2 by rule {lamp['id']} (inserted: retrieval did not return it)"]


def test_boost_and_bury_reorder_by_multiplying_the_fused_score(client):
    before = search(client, RUGS, top_k=20)
    order = ids(before)
    fused = {i["id"]: i["provenance"]["fused"]["score"] for i in before["items"]}
    low, top = order[5], order[0]
    boost = add(client, kind="boost", product_id=low, factor=3)
    bury = add(client, kind="bury", product_id=top, factor=0.1)
    after = search(client, RUGS, top_k=20)
    assert ids(after)[0] == low and ids(after)[-1] == top
    assert sorted(ids(after)) == sorted(order)
    items = {i["id"]: i for i in after["items"]}
    assert items[low]["score"] == pytest.approx(fused[low] * 3)
    assert items[top]["score"] == pytest.approx(fused[top] * 0.1)
    assert items[low]["provenance"]["rules"] == [f"boosted x3 by rule {boost['id']}"]
    assert items[top]["provenance"]["rules"] == [f"buried x0.1 by rule {bury['id']}"]
    untouched = [i for i in ids(after) if i not in (low, top)]
    assert untouched == [i for i in order if i not in (low, top)]


def test_brand_boost_matches_attributes_case_insensitively(client):
    before = ids(search(client, RUGS, top_k=20))
    assert {"acme-rug-1", "acme-rug-2", "other-rug-1"} <= set(before)
    rule = add(client, kind="boost", brand="acme", factor=5)
    after = search(client, RUGS, top_k=20)
    assert set(ids(after)[:2]) == {"acme-rug-1", "acme-rug-2"}  # "Acme" and "ACME"
    assert rules_of(after, "acme-rug-2") == [f"boosted x5 by rule {rule['id']} (brand acme)"]
    assert rules_of(after, "other-rug-1") == []


def test_category_scope_matches_the_search_lock(client):
    rule = add(client, kind="bury", product_id=OSTED, factor=0.01, category="rug")
    locked = search(client, RUGS, top_k=20)
    assert ids(locked)[-1] == OSTED and rules_of(locked, OSTED) == [f"buried x0.01 by rule {rule['id']}"]
    type_lock = search(client, "rug", category="Rug, flatwoven", top_k=20)  # a type under the class: applies
    assert type_lock["lock"]["key"] == "rug/rug-flatwoven" and ids(type_lock)[-1] == OSTED
    assert rules_of(type_lock, OSTED) == [f"buried x0.01 by rule {rule['id']}"]
    unlocked = search(client, RUGS, auto_lock=False, top_k=50)
    assert unlocked["lock"]["applied"] is False and OSTED in ids(unlocked)
    assert all(not i["provenance"]["rules"] for i in unlocked["items"])
    # a category given by name is stored as its key; a type scope does not apply to its class's lock
    by_name = add(client, kind="pin", product_id="other-rug-1", position=1, category="Rug, flatwoven")
    assert by_name["category"] == "rug/rug-flatwoven"
    assert ids(search(client, "rug", category="rug/rug-flatwoven"))[0] == "other-rug-1"
    assert rules_of(search(client, RUGS, top_k=50), "other-rug-1") == []


def test_query_pattern_scope_is_a_whole_word_phrase(client):
    target = ids(search(client, RUGS))[-1]
    rule = add(client, kind="pin", product_id=target, position=1, query_pattern="Living Room")
    assert ids(search(client, RUGS))[0] == target
    assert ids(search(client, "A RUG for the living-room!"))[0] == target  # case and punctuation do not matter
    for other in ("a rug for the bedroom", "a rug for the livingroom", "a rug for the living rooms"):
        got = search(client, other, top_k=50)
        assert all(not i["provenance"]["rules"] for i in got["items"]), other
    assert client.patch(f"/v1/rules/{rule['id']}", json={"query_pattern": None}).json()["query_pattern"] is None
    assert ids(search(client, "a rug for the bedroom"))[0] == target  # scope cleared: applies everywhere


def test_synonym_rewrites_the_text_before_bm25(client):
    assert search(client, "couch", mode="bm25")["items"] == []  # no product says "couch"
    rule = add(client, kind="synonym", term="couch", replacement="sofa")
    got = search(client, "Couch", mode="bm25")
    assert got["synonyms"] == [f"'couch' → 'sofa' by rule {rule['id']}"] and got["rewritten_text"] == "sofa"
    assert got["text"] == "Couch"  # the response still says what was asked
    assert {SOFA_BED, NORSBORG} <= set(ids(got)) and all("sofa" in i["type"].lower() for i in got["items"])
    assert search(client, "couches", mode="bm25")["items"] == []  # whole words only
    plain = search(client, "a lamp", mode="bm25")
    assert plain["synonyms"] == [] and plain["rewritten_text"] is None
    client.delete(f"/v1/rules/{rule['id']}")
    assert search(client, "couch", mode="bm25")["items"] == []


def test_inactive_rules_do_nothing_and_patch_toggles_them(client):
    before = ids(search(client, RUGS))
    rule = add(client, kind="pin", product_id=before[-1], position=1, active=False)
    assert ids(search(client, RUGS)) == before
    assert [r["id"] for r in client.get("/v1/rules", params={"active": False}).json()] == [rule["id"]]
    assert client.get("/v1/rules", params={"active": True}).json() == []
    on = client.patch(f"/v1/rules/{rule['id']}", json={"active": True})
    assert on.status_code == 200 and on.json()["active"] and on.json()["updated_at"] > rule["updated_at"]
    assert ids(search(client, RUGS))[0] == before[-1]
    assert client.patch(f"/v1/rules/{rule['id']}", json={"position": 2}).json()["position"] == 2
    assert ids(search(client, RUGS))[1] == before[-1]
    client.patch(f"/v1/rules/{rule['id']}", json={"active": False})
    assert ids(search(client, RUGS)) == before
    assert client.get(f"/v1/rules/{rule['id']}").json()["summary"].endswith("(inactive)")


class ReversingCritic:
    """Scores the head in reverse fused order (a stand-in that re-ranks visibly)."""

    name, uses_images = "reversing", False

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        worst = max(p.fused_rank or 0 for p in pairs)
        return [Verdict((p.fused_rank or 0) / worst, "reversed", self.name, 0.0) for p in pairs]


def test_a_pin_keeps_its_position_in_mode_full(client, monkeypatch):
    monkeypatch.setattr(client.engine.funnel.critic_stage, "critic", ReversingCritic())
    hybrid = ids(search(client, RUGS, top_k=20))
    assert 5 <= len(hybrid) < 20  # every rug of the lock: the critic's top 20 holds them all
    full = search(client, RUGS, top_k=20, mode="full")
    assert full["critic"]["status"] == "scored" and ids(full) == hybrid[::-1]
    rule = add(client, kind="pin", product_id=hybrid[2], position=1)
    pinned = search(client, RUGS, top_k=20, mode="full")
    rest = [i for i in hybrid[::-1] if i != hybrid[2]]
    assert ids(pinned) == [hybrid[2]] + rest  # the critic re-ranks the others around the pin
    assert pinned["items"][0]["provenance"]["critic"]["rationale"] == "reversed"
    assert pinned["items"][0]["provenance"]["rules"] == [f"pinned at #1 by rule {rule['id']}"]


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"kind": "pin", "product_id": OSTED}, "needs product_id and position"),
        ({"kind": "pin", "product_id": "no-such-product", "position": 1}, "no product 'no-such-product'"),
        ({"kind": "pin", "product_id": OSTED, "position": 0}, "greater than or equal to 1"),
        ({"kind": "pin", "product_id": OSTED, "position": 1, "factor": 2}, "does not use factor"),
        ({"kind": "boost", "product_id": OSTED, "factor": 0.5}, "boost's factor must be > 1"),
        ({"kind": "bury", "brand": "Acme", "factor": 2}, "between 0 and 1"),
        ({"kind": "boost", "product_id": OSTED, "brand": "Acme", "factor": 2}, "either product_id or brand"),
        ({"kind": "bury", "factor": 0.5}, "either product_id or brand"),
        ({"kind": "boost", "brand": "Acme"}, "needs a factor"),
        ({"kind": "synonym", "term": "couch"}, "needs term and replacement"),
        ({"kind": "synonym", "term": "!!", "replacement": "sofa"}, "must each contain a word"),
        ({"kind": "synonym", "term": "couch", "replacement": "sofa", "query_pattern": ".*(a+)+$"}, None),
        ({"kind": "synonym", "term": "couch", "replacement": "sofa", "query_pattern": "***"}, "query_pattern must contain a word"),
        ({"kind": "synonym", "term": "couch", "replacement": "sofa", "category": "spaceship"}, "no category"),
        ({"kind": "teleport", "product_id": OSTED}, "Input should be"),
        ({"kind": "pin", "product_id": OSTED, "position": 1, "regex": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_rules_are_422_and_store_nothing(client, body, reason):
    r = client.post("/v1/rules", json=body)
    if reason is None:  # a regex-looking pattern is only words to match: ".*(a+)+$" is the word "a"
        assert r.status_code == 201 and contains_phrase("a couch", r.json()["query_pattern"])
        return
    assert r.status_code == 422, r.text
    problem = r.json()
    assert reason in (problem["detail"] if isinstance(problem["detail"], str) else str(problem)), problem
    assert client.get("/v1/rules").json() == []


def test_patch_checks_the_whole_rule_and_unknown_ids_are_404(client):
    rule = add(client, kind="boost", product_id=OSTED, factor=2)
    assert client.patch(f"/v1/rules/{rule['id']}", json={"factor": 0.5}).status_code == 422
    assert client.patch(f"/v1/rules/{rule['id']}", json={"kind": "bury"}).status_code == 422
    assert client.patch(f"/v1/rules/{rule['id']}", json={"product_id": None}).status_code == 422  # neither product nor brand
    assert client.patch(f"/v1/rules/{rule['id']}", json={"active": None}).status_code == 422
    switched = client.patch(f"/v1/rules/{rule['id']}", json={"product_id": None, "brand": "Acme", "factor": 4})
    assert switched.status_code == 200, switched.text
    assert (switched.json()["product_id"], switched.json()["brand"], switched.json()["factor"]) == (None, "Acme", 4)
    assert client.get(f"/v1/rules/{rule['id']}").json()["brand"] == "Acme"
    for call in (client.get, client.delete):
        assert call("/v1/rules/99999").status_code == 404
    assert client.patch("/v1/rules/99999", json={"active": False}).status_code == 404


def test_rule_writes_of_other_processes_show_once_the_cache_is_dropped(client):
    """A rule written to the catalog directly (the CLI, another replica) is read once the cached
    rules expire (MARS_RULES_CACHE_S, 5 s) or are dropped; API writes drop them at once."""
    before = ids(search(client, RUGS))  # caches the (empty) rule set
    with client.engine.sessions() as session:
        catalog_rules.create_rule(session, {"kind": "pin", "product_id": before[-1], "position": 1})
    assert ids(search(client, RUGS)) == before  # still cached
    client.engine.refresh_rules()
    assert ids(search(client, RUGS))[0] == before[-1]
    loads = []
    cache = RuleCache(lambda: loads.append(1) or [Rule(1, "pin", product_id="x", position=1)], ttl_s=60)
    assert cache() == cache() and len(loads) == 1
    cache.invalidate()
    assert cache()[0].product_id == "x" and len(loads) == 2


def test_pure_rule_functions():
    assert place_pins(list("abcdef"), [("e", 1), ("f", 1)]) == list("efabcd")  # the second pin takes the next position
    assert place_pins(list("abc"), [("a", 10)]) == list("bca")  # past the end: last
    assert place_pins(list("abc"), [("zz", 1)]) == list("abc")
    text, notes = rewrite("A grey Couch, by the couch-table", [Rule(5, "synonym", term="couch", replacement="sofa"),
                                                               Rule(6, "synonym", term="grey couch", replacement="grey sofa")])
    assert text == "A grey sofa, by the sofa-table" and notes == ["'couch' → 'sofa' by rule 5",
                                                                 "'grey couch' → 'grey sofa' by rule 6"]
    assert rewrite("sofa couch", [Rule(1, "synonym", term="sofa", replacement="couch"),
                                  Rule(2, "synonym", term="couch", replacement="sofa")])[0] == "couch sofa"  # no chains
    t = time.perf_counter()
    assert not contains_phrase("a" * 5000 + "!", "a a a a a a a a a a b")  # linear word matching, no backtracking
    assert time.perf_counter() - t < 1.0


@pytest.fixture(scope="module")
def keyed(encoders, tmp_path_factory) -> Iterator[TestClient]:
    """A keys-mode app on a few text-only records, with one key per role in ``c.keys``."""
    from mars.engine import Engine
    from mars.settings import Settings

    engine = Engine(Settings(home=tmp_path_factory.mktemp("rules-keys") / "mars", rate_limit=""), encoders=encoders)
    engine.ingest(raw(BRANDED), "seed")
    with engine.sessions() as session:
        keys = {role: api_keys.create_key(session, f"{role} key", role)[1] for role in api_keys.ROLES}
    with TestClient(create_app(engine=engine)) as c:
        c.engine, c.keys = engine, keys
        yield c
    engine.close()


def test_rules_need_an_editor_key_to_write_and_a_viewer_key_to_read(keyed):
    viewer, editor = ({"Authorization": f"Bearer {keyed.keys[r]}"} for r in ("viewer", "editor"))
    body = {"kind": "boost", "brand": "Acme", "factor": 2}
    assert keyed.get("/v1/rules").status_code == 401
    missing = keyed.post("/v1/rules", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    refused = keyed.post("/v1/rules", json=body, headers=viewer)
    assert refused.status_code == 403 and "needs the editor role" in refused.json()["detail"]
    assert keyed.get("/v1/rules", headers=viewer).json() == []
    created = keyed.post("/v1/rules", json=body, headers=editor)
    assert created.status_code == 201 and created.json()["created_by"] == "editor key"
    rule_id = created.json()["id"]
    assert keyed.patch(f"/v1/rules/{rule_id}", json={"active": False}, headers=viewer).status_code == 403
    assert keyed.delete(f"/v1/rules/{rule_id}", headers=viewer).status_code == 403
    assert keyed.delete(f"/v1/rules/{rule_id}").status_code == 401
    assert [r["id"] for r in keyed.get("/v1/rules", headers=viewer).json()] == [rule_id]
    assert keyed.patch(f"/v1/rules/{rule_id}", json={"active": False}, headers=editor).json()["active"] is False
    assert keyed.delete(f"/v1/rules/{rule_id}", headers={"X-API-Key": keyed.keys["admin"]}).status_code == 200
    assert keyed.get("/v1/rules", headers=viewer).json() == []


def test_mars_rules_add_list_remove_on_a_served_catalog(keyed, monkeypatch):
    monkeypatch.setenv("MARS_HOME", str(keyed.engine.settings.home))
    get_settings.cache_clear()
    runner = CliRunner()
    viewer = {"Authorization": f"Bearer {keyed.keys['viewer']}"}
    try:
        added = runner.invoke(cli, ["rules", "add", "pin", "--product", "acme-rug-2", "--position", "1",
                                    "--category", "Rug, low pile", "--query-pattern", "wool"])
        assert added.exit_code == 0, added.output
        assert "pin acme-rug-2 at #1 when the lock is rug/rug-low-pile and the query says 'wool'" in added.output
        listed = json.loads(runner.invoke(cli, ["rules", "list", "--json"]).output)
        assert [(r["kind"], r["category"], r["created_by"]) for r in listed] == [("pin", "rug/rug-low-pile", None)]
        assert [r["id"] for r in keyed.get("/v1/rules", headers=viewer).json()] == [listed[0]["id"]]
        keyed.engine.refresh_rules()  # what MARS_RULES_CACHE_S does for the server within 5 s
        got = keyed.post("/v1/search", json={"text": "wool rug", "category": "rug", "mode": "bm25"}, headers=viewer)
        assert got.json()["items"][0]["provenance"]["rules"] == []  # class lock: the type-scoped pin does not apply
        got = keyed.post("/v1/search", json={"text": "wool rug", "category": "rug/rug-low-pile", "mode": "bm25"},
                         headers=viewer)
        assert got.json()["items"][0]["provenance"]["rules"] == [f"pinned at #1 by rule {listed[0]['id']}"]
        assert "1 merchandising rules" in runner.invoke(cli, ["rules", "list"]).output
        bad = runner.invoke(cli, ["rules", "add", "boost", "--product", "acme-rug-2", "--factor", "0.5"])
        assert bad.exit_code == 2 and "boost's factor must be > 1" in bad.output
        removed = runner.invoke(cli, ["rules", "remove", str(listed[0]["id"])])
        assert removed.exit_code == 0 and "removed rule" in removed.output
        again = runner.invoke(cli, ["rules", "remove", str(listed[0]["id"])])
        assert again.exit_code == 2 and f"no rule {listed[0]['id']}" in again.output
        assert json.loads(runner.invoke(cli, ["rules", "list", "--json"]).output) == []
    finally:
        get_settings.cache_clear()
