"""API keys, roles and per-key rate limits (query/auth.py, catalog/api_keys.py, `mars keys`),
through FastAPI's TestClient on a real engine with a few text-only records."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator

import pytest
from fastapi import Depends, Request
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from catalog import api_keys
from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.models import ApiKey
from ingestion.readers import RawRecord
from mars.cli import app as cli
from mars.settings import get_settings
from postgres_db import fresh_database
from query.app import create_app
from query.auth import Principal, RateLimiter
from query.deps import require

RECORDS = [
    {"id": "lamp-1", "title": "Brass reading lamp", "type": "Floor lamp", "colour": "brass", "text": "A tall lamp."},
    {"id": "sofa-1", "title": "Grey three-seat sofa", "type": "Three-seat sofa", "colour": "grey"},
    {"id": "rug-1", "title": "Striped flatwoven rug", "type": "Rug, flatwoven", "colour": "blue"},
]


def raw(records: list[dict]) -> list[RawRecord]:
    """``records`` as reader output, the way the readers hand them to ``Engine.ingest``."""
    return [RawRecord("test", i + 1, r, raw=r) for i, r in enumerate(records)]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(encoders, tmp_path_factory) -> Iterator[TestClient]:
    """A keys-mode app (no rate limit) on a small catalog, with one key per role in ``c.keys``."""
    from mars.engine import Engine
    from mars.settings import Settings

    engine = Engine(Settings(home=tmp_path_factory.mktemp("auth") / "mars", rate_limit=""), encoders=encoders)
    engine.ingest(raw(RECORDS), "seed")
    app = create_app(engine=engine)

    @app.get("/test/whoami")
    def whoami(request: Request, principal: Principal = Depends(require("viewer"))) -> dict:  # noqa: B008
        return {"state": str(request.state.api_key), "same": request.state.api_key is principal}

    with engine.sessions() as session:
        keys = {role: api_keys.create_key(session, f"{role} key", role)[1] for role in api_keys.ROLES}
    with TestClient(app) as c:
        c.engine, c.keys = engine, keys
        yield c
    engine.close()


def write_request(client: TestClient, endpoint: str, n: int, headers: dict[str, str]):
    """One request to write ``endpoint`` ("bulk", "item" or "delete"); ``n`` keeps ids apart."""
    record = {"id": f"{endpoint}-{n}", "title": f"Oak side table {endpoint} {n}", "type": "Side table"}
    if endpoint == "bulk":
        return client.post("/v1/items:bulk", content=json.dumps(record).encode(),
                           headers={"content-type": "application/x-ndjson", **headers})
    if endpoint == "item":
        return client.post("/v1/items", json=record, headers=headers)
    client.engine.ingest(raw([record]), "doomed")
    return client.delete(f"/v1/items/{record['id']}", headers=headers)


@pytest.mark.parametrize("endpoint", ["bulk", "item", "delete"])
def test_write_endpoints_need_an_editor_key(keyed, endpoint):
    before = keyed.get("/healthz").json()["products"]
    missing = write_request(keyed, endpoint, 1, {})
    assert missing.status_code == 401, missing.text
    assert missing.headers["www-authenticate"] == "Bearer" and "API key is needed" in missing.json()["detail"]
    viewer = write_request(keyed, endpoint, 2, bearer(keyed.keys["viewer"]))
    assert viewer.status_code == 403 and "needs the editor role" in viewer.json()["detail"]
    if endpoint != "delete":  # nothing was written by the refused requests (a refused delete leaves its item)
        assert keyed.get("/healthz").json()["products"] == before
    editor = write_request(keyed, endpoint, 3, bearer(keyed.keys["editor"]))
    assert editor.status_code == (202 if endpoint == "bulk" else 200), editor.text
    admin = write_request(keyed, endpoint, 4, {"X-API-Key": keyed.keys["admin"]})  # the other header, a stronger role
    assert admin.status_code == editor.status_code, admin.text
    if endpoint == "bulk":  # let the jobs end before the next test counts products
        for accepted in (editor, admin):
            deadline = time.monotonic() + 60
            while keyed.get(accepted.json()["status_url"], headers=bearer(keyed.keys["viewer"])).json()["status"] != "done":
                assert time.monotonic() < deadline, "the bulk job did not finish in 60 s"
                time.sleep(0.1)


def test_unknown_revoked_and_malformed_keys_are_401(keyed):
    with keyed.engine.sessions() as session:
        row, key = api_keys.create_key(session, "soon revoked", "editor")
    assert keyed.get("/v1/categories", headers=bearer(key)).status_code == 200
    with keyed.engine.sessions() as session:
        api_keys.revoke_key(session, row.id)
    for headers in (bearer(key), {"X-API-Key": key}, bearer(api_keys.new_key()), bearer("not-a-mars-key"),
                    bearer(key[:-1]), {"Authorization": f"Basic {key}"}, {"X-API-Key": ""}):
        r = keyed.post("/v1/items", json={"id": "x", "title": "x"}, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    revoked = keyed.get("/v1/categories", headers=bearer(key))
    assert "was revoked" in revoked.json()["detail"] and 'error="invalid_token"' in revoked.headers["www-authenticate"]
    assert keyed.get("/v1/items/x", headers=bearer(keyed.keys["viewer"])).status_code == 404  # nothing written


def test_viewer_searches_and_reads_and_healthz_is_open(keyed):
    viewer = bearer(keyed.keys["viewer"])
    hits = keyed.post("/v1/search", json={"text": "brass reading lamp", "mode": "bm25", "auto_lock": False}, headers=viewer)
    assert hits.status_code == 200 and hits.json()["items"][0]["id"] == "lamp-1"
    assert keyed.get("/v1/items/lamp-1", headers=viewer).json()["title"] == "Brass reading lamp"
    assert keyed.get("/v1/categories", headers=viewer).status_code == 200
    jobs = keyed.get("/v1/jobs", headers=viewer).json()
    assert keyed.get(f"/v1/jobs/{jobs[0]['id']}", headers=viewer).status_code == 200
    assert keyed.get("/v1/search/results/nope", headers=viewer).status_code == 404
    for path in ("/v1/items/lamp-1", "/v1/categories", "/v1/jobs", "/v1/search/results/nope"):
        assert keyed.get(path).status_code == 401, path
    assert keyed.post("/v1/search", json={"text": "lamp"}).status_code == 401
    health = keyed.get("/healthz")
    assert health.status_code == 200 and health.json()["auth"] == "keys"
    assert keyed.get("/openapi.json").json()["components"]["securitySchemes"].keys() == {"HTTPBearer", "APIKeyHeader"}
    me = keyed.get("/test/whoami", headers=viewer).json()
    assert me["same"] and me["state"].startswith("key ") and f"({keyed.keys['viewer'][:12]}…, viewer key, viewer)" in me["state"]


def test_admin_manages_keys_over_the_api(keyed):
    assert keyed.get("/v1/keys", headers=bearer(keyed.keys["editor"])).status_code == 403
    admin = bearer(keyed.keys["admin"])
    made = keyed.post("/v1/keys", json={"name": "merch team", "role": "viewer"}, headers=admin)
    assert made.status_code == 201, made.text
    new = made.json()
    assert new["key"].startswith(new["prefix"]) and new["role"] == "viewer" and new["revoked_at"] is None
    assert keyed.get("/v1/categories", headers=bearer(new["key"])).status_code == 200
    listed = keyed.get("/v1/keys", headers=admin).json()
    assert new["id"] in [k["id"] for k in listed]
    assert all("key" not in k and "hash" not in k for k in listed)
    assert keyed.post("/v1/keys", json={"name": "x", "role": "owner"}, headers=admin).status_code == 422
    assert keyed.post("/v1/keys", json={"name": "   ", "role": "viewer"}, headers=admin).status_code == 422
    revoked = keyed.delete(f"/v1/keys/{new['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert keyed.get("/v1/categories", headers=bearer(new["key"])).status_code == 401
    assert keyed.delete("/v1/keys/987654", headers=admin).status_code == 404


def test_keys_are_stored_hashed_and_last_use_is_recorded(keyed):
    keyed.get("/v1/categories", headers=bearer(keyed.keys["admin"]))
    with keyed.engine.sessions() as session:
        rows = {row.name: row for row in session.scalars(select(ApiKey))}
        dump = [tuple(r) for r in session.execute(text("SELECT * FROM api_keys"))]
    admin = rows["admin key"]
    assert admin.hash == hashlib.sha256(keyed.keys["admin"].encode()).hexdigest()
    assert admin.prefix == keyed.keys["admin"][:api_keys.PREFIX_LENGTH] and admin.last_used_at is not None
    for key in keyed.keys.values():
        assert len(key) == 48 and not any(key in str(value) for row in dump for value in row)
    db_file = keyed.engine.settings.home / "catalog.db"
    stored = b"".join(p.read_bytes() for p in db_file.parent.glob("catalog.db*"))  # the database and its WAL
    assert hashlib.sha256(keyed.keys["admin"].encode()).hexdigest().encode() in stored
    assert not any(key.encode() in stored for key in keyed.keys.values())


def test_mars_keys_create_list_revoke_on_a_served_catalog(keyed, monkeypatch):
    monkeypatch.setenv("MARS_HOME", str(keyed.engine.settings.home))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        created = runner.invoke(cli, ["keys", "create", "--name", "cli made", "--role", "editor", "--json"])
        assert created.exit_code == 0, created.output
        made = json.loads(created.output)
        item = {"id": "cli-1", "title": "Walnut desk", "type": "Desk"}
        assert keyed.post("/v1/items", json=item, headers=bearer(made["key"])).status_code == 200  # served at once

        listed = runner.invoke(cli, ["keys", "list", "--json"])
        assert listed.exit_code == 0, listed.output
        row = next(k for k in json.loads(listed.output) if k["id"] == made["id"])
        assert row == {k: v for k, v in made.items() if k != "key"} | {"last_used_at": row["last_used_at"]}
        assert row["last_used_at"] is not None and made["key"] not in listed.output
        table = runner.invoke(cli, ["keys", "list"])
        assert table.exit_code == 0 and made["prefix"] in table.output and made["key"] not in table.output

        plain = runner.invoke(cli, ["keys", "create", "--name", "shown once", "--role", "viewer"])
        assert plain.exit_code == 0 and "only this once" in plain.output
        shown = [line for line in plain.output.splitlines() if line.startswith(api_keys.KEY_MARKER)]
        assert len(shown) == 1 and keyed.get("/v1/categories", headers=bearer(shown[0])).status_code == 200

        revoked = runner.invoke(cli, ["keys", "revoke", str(made["id"])])
        assert revoked.exit_code == 0 and "revoked at" in revoked.output
        assert keyed.post("/v1/items", json=item, headers=bearer(made["key"])).status_code == 401
        after = json.loads(runner.invoke(cli, ["keys", "list", "--json"]).output)
        assert next(k for k in after if k["id"] == made["id"])["revoked_at"] is not None

        unknown = runner.invoke(cli, ["keys", "revoke", "987654"])
        assert unknown.exit_code == 2 and "no API key 987654" in unknown.output
        bad_role = runner.invoke(cli, ["keys", "create", "--name", "x", "--role", "owner"])
        assert bad_role.exit_code == 2 and "unknown role 'owner'" in bad_role.output
    finally:
        get_settings.cache_clear()


def test_open_mode_lets_requests_through_as_admin(make_engine, tmp_path):
    engine = make_engine(tmp_path / "open", api_auth="open", rate_limit="")
    with TestClient(create_app(engine=engine)) as client:
        assert client.get("/healthz").json()["auth"] == "open"
        r = client.post("/v1/items", json={"id": "open-1", "title": "Pine bookcase", "type": "Bookcase"})
        assert r.status_code == 200, r.text
        assert client.delete("/v1/items/open-1").status_code == 200
        assert client.get("/v1/keys").status_code == 200
        ignored = client.get("/v1/categories", headers=bearer("mars_not-a-key"))  # a sent key changes nothing
        assert ignored.status_code == 200


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger after a test that runs `mars serve` (which configures logging)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_mars_serve_open_warns_and_serves_open(monkeypatch, tmp_path, root_logging):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    monkeypatch.setenv("MARS_HOME", str(tmp_path / "served"))
    monkeypatch.setenv("MARS_RATE_LIMIT", "")
    monkeypatch.delenv("MARS_API_AUTH", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["serve", "--open", "--port", "8123"])
        assert result.exit_code == 0, result.output
        warning = [line for line in result.output.splitlines() if line.startswith("WARNING")]
        assert len(warning) == 1 and "acts as admin" in warning[0] and "MARS_API_AUTH=open" in warning[0]
        with TestClient(served["app"]) as client:
            assert client.get("/healthz").json()["auth"] == "open"
            assert client.get("/v1/jobs").status_code == 200
        plain = CliRunner().invoke(cli, ["serve"])
        assert plain.exit_code == 0 and "WARNING" not in plain.output
        with TestClient(served["app"]) as client:
            assert client.get("/healthz").json()["auth"] == "keys" and client.get("/v1/jobs").status_code == 401
    finally:
        get_settings.cache_clear()


def test_rate_limit_per_key_answers_429_with_retry_after(make_engine, tmp_path):
    engine = make_engine(tmp_path / "limited", rate_limit="3/minute")
    with engine.sessions() as session:
        first = api_keys.create_key(session, "first", "viewer")[1]
        second = api_keys.create_key(session, "second", "viewer")[1]
    with TestClient(create_app(engine=engine)) as client:
        for _ in range(3):
            assert client.get("/v1/categories", headers=bearer(first)).status_code == 200
        limited = client.get("/v1/categories", headers=bearer(first))
        assert limited.status_code == 429 and "3/minute" in limited.json()["detail"]
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert client.get("/v1/jobs", headers={"X-API-Key": first}).status_code == 429  # per key, not per route
        assert client.get("/v1/categories", headers=bearer(second)).status_code == 200  # another key's own budget
        assert all(client.get("/healthz").status_code == 200 for _ in range(5))  # health is not limited
        assert client.get("/v1/categories").status_code == 401  # no key: refused before counting


def test_rate_limit_per_client_ip_in_open_mode(make_engine, tmp_path):
    engine = make_engine(tmp_path / "open-limited", api_auth="open", rate_limit="2/minute")
    app = create_app(engine=engine)
    with TestClient(app) as client:
        assert [client.get("/v1/categories").status_code for _ in range(3)] == [200, 200, 429]
        other = TestClient(app, client=("10.0.0.9", 50000))  # the same app, another client IP
        assert other.get("/v1/categories").status_code == 200
        assert client.get("/v1/categories").status_code == 429


def test_rate_limiter_needs_every_limit_and_off_when_blank():
    limiter = RateLimiter("5/minute;2/hour")
    assert [limiter.hit("key:1") for _ in range(2)] == [None, None]
    assert 3000 < limiter.hit("key:1") <= 3600  # the hourly limit is the one exhausted
    assert limiter.hit("key:2") is None
    assert all(RateLimiter(" ").hit("key:1") is None for _ in range(100))
    with pytest.raises(ValueError):
        RateLimiter("lots")


def test_roles_are_ordered_and_checked():
    allowed = {(h, n) for h in api_keys.ROLES for n in api_keys.ROLES if api_keys.role_allows(h, n)}
    assert allowed == {("viewer", "viewer"), ("editor", "viewer"), ("editor", "editor"),
                       ("admin", "viewer"), ("admin", "editor"), ("admin", "admin")}
    with pytest.raises(ValueError):
        require("owner")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        api_keys.role_allows("owner", "viewer")


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path) -> Iterator[str]:
    """A migrated catalog on each dialect."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
        return
    with fresh_database() as url:
        yield url


def test_key_store_on_each_dialect(catalog_url):
    db = make_engine(catalog_url)
    try:
        upgrade_to_head(db)
        sessions = session_factory(db)
        with sessions() as session:
            row, key = api_keys.create_key(session, "  sync job  ", "editor")
            assert row.name == "sync job" and key.startswith("mars_") and len(key) == 48
            assert api_keys.find_key(session, key).id == row.id
            assert api_keys.find_key(session, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
            assert api_keys.find_key(session, "mars_" + "x" * 300) is None
            assert api_keys.mark_used(session, row) and not api_keys.mark_used(session, row)  # once a minute
            assert api_keys.revoke_key(session, row.id).revoked_at is not None
            first = row.revoked_at
            assert api_keys.revoke_key(session, row.id).revoked_at == first and api_keys.revoke_key(session, 999) is None
            with pytest.raises(ValueError):
                api_keys.create_key(session, "", "viewer")
        with sessions() as session:  # timestamps read back timezone-aware on both dialects
            stored = session.get(ApiKey, row.id)
            assert stored.created_at.tzinfo is not None and stored.revoked_at == first
            assert [api_keys.describe(r)["id"] for r in api_keys.list_keys(session)] == [row.id]
            session.add(ApiKey(name="bad", role="owner", prefix="mars_x", hash="0" * 64))
            with pytest.raises(IntegrityError):  # the role check constraint
                session.commit()
    finally:
        db.dispose()
