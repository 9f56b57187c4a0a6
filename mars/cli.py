"""The ``mars`` command: ingest, jobs, search, serve, eval, categories, train.

Settings come from ``MARS_*`` environment variables (``mars --help`` lists the common ones);
commands open the engine (the stores the settings name) and apply pending catalog migrations
first; ``ingest --via-api`` and ``jobs --api`` talk to a running server instead (with an API key:
``--api-key`` or ``MARS_API_KEY``); ``keys`` manages those keys in the catalog, ``rules`` the
merchandising rules.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mars.settings import get_settings

app = typer.Typer(
    help=(
        "MARS — Multimodal Agentic Room Search. Hybrid BM25 + image/text vector search with a "
        "category lock and a critic stage, over a product catalog.\n\n"
        "Data lives under MARS_HOME (default ./.mars). Common settings: MARS_HOME, MARS_DATABASE_URL, "
        "MARS_RRF_K, MARS_WEIGHTS_PHOTO, MARS_WEIGHTS_TEXT, MARS_VECTOR_BACKEND "
        "(qdrant-edge|faiss|qdrant), MARS_LEXICAL_BACKEND (tantivy|opensearch), MARS_IMAGE_ENCODER, "
        "MARS_TEXT_ENCODER, MARS_CRITIC, MARS_API_AUTH (keys|open), MARS_RATE_LIMIT."
    ),
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

ModeOpt = Annotated[str, typer.Option("--mode", help="bm25 | vector | hybrid | full (hybrid + critic).")]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option("--api-key", envvar="MARS_API_KEY", show_envvar=True,
                 help="API key for the server (`mars keys create`), sent as 'Authorization: Bearer <key>'."),
]


def _engine(settings=None):  # noqa: ANN001, ANN202 - lazy import keeps `mars --help` fast
    from mars.engine import Engine, IndexMismatchError, StoreBusyError

    try:
        return Engine(settings or get_settings())
    except (StoreBusyError, IndexMismatchError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _count_lines(path: Path) -> int | None:
    target = path / "corpus.jsonl" if path.is_dir() else path
    if not target.is_file():
        return None
    with target.open("rb") as fh:
        n = sum(1 for line in fh if line.strip())
    return n - 1 if target.suffix.lower() == ".csv" else n


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A BEIR-style folder with corpus.jsonl + images, or a .jsonl/.csv file.")],
    map_: Annotated[
        Optional[list[str]],
        typer.Option("--map", help="Field mapping MARS_FIELD=SOURCE_FIELD (repeatable), e.g. --map id=sku --map colour=color."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    via_api: Annotated[
        Optional[str],
        typer.Option("--via-api", metavar="URL", help="Send the records to a running MARS API (e.g. http://127.0.0.1:8000) "
                     "as one bulk job and follow its progress, instead of opening the stores here."),
    ] = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Ingest a catalog: validate, embed what changed, index, and report.

    Re-running on the same data re-embeds nothing; a malformed record is rejected with its
    reason and the rest goes through.
    """
    from ingestion.readers import open_source, parse_mapping

    try:
        records = open_source(path, parse_mapping(map_ or []))
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if via_api:
        _ingest_via_api(via_api, api_key, records, path, as_json)
        return
    engine = _engine()
    try:
        total = _count_lines(path)
        with Progress(
            TextColumn("[bold]ingest[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=err, disable=as_json,
        ) as progress:
            task = progress.add_task("ingest", total=total, rate="")

            def advance(n: int) -> None:
                progress.advance(task, n)
                elapsed = progress.tasks[task].elapsed or 0
                done = progress.tasks[task].completed
                progress.update(task, rate=f"{done / elapsed:.1f} items/s" if elapsed else "")

            report = engine.ingest(records, str(path.resolve()), total_hint=total, on_progress=advance)
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    table = Table(title=f"ingest job {report.job_id}: {path}")
    for col in ("read", "ingested", "unchanged", "rejected", "without image", "seconds", "items/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(report.total), str(report.ingested), str(report.unchanged), str(report.rejected),
        str(report.without_image), f"{report.seconds:.1f}", f"{report.items_per_s:.1f}",
    )
    console.print(table)
    for rej in report.rejections[:50]:
        console.print(f"[yellow]rejected[/yellow] record {rej.position} ({rej.record_id or 'no id'}): {rej.reason}")
    if len(report.rejections) > 50:
        console.print(f"... and {len(report.rejections) - 50} more (table rejected_records, job {report.job_id})")
    for warning in report.warnings[:20]:
        console.print(f"[cyan]note[/cyan] {warning}")


def _api_client(url: str, api_key: str | None):  # noqa: ANN202 - httpx.Client
    """An HTTP client of the API at ``url`` that sends ``api_key`` (if any) as a Bearer token."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60.0, connect=5.0))


def _api_call(call, what: str):  # noqa: ANN001, ANN202 - a zero-argument httpx request
    """Run one API request; connection failures and error answers become a clear exit 2."""
    import httpx

    try:
        response = call()
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] {what}: {exc.__class__.__name__}: {exc} (is `mars serve` running there?)")
        raise typer.Exit(2) from exc
    if response.status_code >= 400:
        hint = {401: " (pass --api-key or set MARS_API_KEY; `mars keys create` makes a key)",
                403: " (this key's role is too weak: reads need viewer, ingest needs editor)"}.get(response.status_code, "")
        err.print(f"[red]error:[/red] {what}: HTTP {response.status_code}: {response.text[:500]}{hint}")
        raise typer.Exit(2)
    return response.json()


def _ingest_via_api(url: str, api_key: str | None, records, path: Path, as_json: bool) -> None:  # noqa: ANN001 - Iterable[RawRecord]
    """``mars ingest --via-api``: one JSON line per source record (a line that did not parse is
    sent as it was, so the server rejects it with its reason), then follow the job."""
    import time

    lines = []
    for raw in records:
        if raw.data is not None:
            lines.append(json.dumps(raw.data, ensure_ascii=False))
        else:
            lines.append(raw.raw if isinstance(raw.raw, str) and raw.raw.strip() else json.dumps(raw.raw))
    if not lines:
        err.print(f"[red]error:[/red] {path} has no records")
        raise typer.Exit(2)
    with _api_client(url, api_key) as client:
        accepted = _api_call(
            lambda: client.post("/v1/items:bulk", content="\n".join(lines).encode(),
                                headers={"content-type": "application/x-ndjson"}),
            f"submitting {len(lines)} records to {url}",
        )
        job_id = accepted["job_id"]
        with Progress(TextColumn(f"[bold]job {job_id}[/bold]"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err, disable=as_json) as bar:
            task = bar.add_task("job", total=accepted["total"], status="queued")
            while True:
                job = _api_call(lambda: client.get(f"/v1/jobs/{job_id}"), f"reading job {job_id}")
                bar.update(task, completed=job["done"], status=job["status"])
                if job["status"] in ("done", "failed"):
                    break
                time.sleep(0.5)
    _print_jobs([job], as_json, single=True)
    if job["status"] == "failed":
        raise typer.Exit(1)


def _print_jobs(jobs: list[dict], as_json: bool, single: bool) -> None:
    """A list of jobs as a table, one row each; a ``single`` job as its full counts and rejections."""
    if as_json:
        console.print_json(json.dumps(jobs[0] if single else jobs))
        return
    if not single:
        table = Table(title="ingest jobs, newest first")
        for col in ("job", "status", "done", "indexed", "unchanged", "rejected", "eta s"):
            table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
        table.add_column("source", overflow="ellipsis", min_width=10)
        for j in jobs:
            table.add_row(
                str(j["id"]), j["status"], f"{j['done']}/{j['total']}", str(j["indexed"]), str(j["unchanged"]),
                str(j["rejected"]), str(j["eta_s"]) if j["eta_s"] is not None else "-",
                j["source"].rstrip("/").rsplit("/", 1)[-1],
            )
        console.print(table)
        return
    j = jobs[0]
    table = Table(title=f"ingest job {j['id']}: {j['source']}", show_header=False)
    for key in ("status", "total", "queued", "embedded", "indexed", "unchanged", "rejected", "without_image",
                "items_per_s", "eta_s", "started_at", "finished_at"):
        value = j[key]
        table.add_row(key.replace("_", " "), f"{value:.1f}" if isinstance(value, float) else str(value if value is not None else "-"))
    console.print(table)
    if j.get("error"):
        console.print(f"[red]error:[/red] {j['error']}")
    for rej in j["rejections"][:50]:
        console.print(f"[yellow]rejected[/yellow] record {rej['position']} ({rej['record_id'] or 'no id'}): {rej['reason']}")
    if j["rejected"] > 50:
        console.print(f"... {j['rejected']} rejected in all (table rejected_records, job {j['id']})")


@contextmanager
def _catalog() -> Iterator:  # Iterator[sqlalchemy.orm.Session]
    """A session on the catalog itself (MARS_DATABASE_URL or MARS_HOME), migrated to head first.

    Opens no store, so it works while `mars serve` or the workers own them."""
    from catalog.db import make_engine, session_factory, upgrade_to_head

    db = make_engine(get_settings().catalog_url)
    try:
        upgrade_to_head(db)
        with session_factory(db)() as session:
            yield session
    finally:
        db.dispose()


@app.command()
def jobs(
    job_id: Annotated[Optional[int], typer.Argument(help="One job, with its rejections; default: the newest jobs.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="How many of the newest jobs to list.")] = 20,
    api: Annotated[Optional[str], typer.Option("--api", metavar="URL", help="Ask a running MARS API instead of reading the catalog here.")] = None,
    api_key: ApiKeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show ingest jobs (bulk, streamed, `mars ingest`): progress counts, ETA, rejections.

    Reads the catalog (MARS_DATABASE_URL or MARS_HOME) directly, which works while
    `mars serve` or the workers run; --api asks a server elsewhere.
    """
    if api:
        with _api_client(api, api_key) as client:
            if job_id is None:
                found = _api_call(lambda: client.get("/v1/jobs", params={"limit": limit}), "listing jobs")
            else:
                found = [_api_call(lambda: client.get(f"/v1/jobs/{job_id}"), f"reading job {job_id}")]
    else:
        from workers.jobs import job_progress, recent_jobs

        with _catalog() as session:
            found = recent_jobs(session, limit) if job_id is None else [job_progress(session, job_id)]
        if found == [None]:
            err.print(f"[red]error:[/red] no job {job_id}")
            raise typer.Exit(2)
    _print_jobs(found, as_json, single=job_id is not None)


@app.command()
def search(
    text: Annotated[Optional[str], typer.Argument(help='Query text, e.g. "a lamp for this bedroom".')] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Room photo (JPEG/PNG).")] = None,
    category: Annotated[Optional[str], typer.Option("--category", help="Lock to this category (key, name or synonym).")] = None,
    room: Annotated[Optional[str], typer.Option("--room", help='Room type, e.g. "Living Room": context for the text search, never a lock.')] = None,
    auto_lock: Annotated[bool, typer.Option("--lock/--no-lock", help="Lock to a category named in the text (--no-lock for a whole-room query).")] = True,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=1000, help="Results to show.")] = 10,
    mode: ModeOpt = "hybrid",
    as_json: Annotated[bool, typer.Option("--json", help="Print the full response as JSON.")] = False,
) -> None:
    """Search the catalog with text and/or a room photo."""
    from ingestion.images import InvalidImage, decode_image, read_image_bytes
    from query.funnel import QueryError, SearchQuery

    settings = get_settings()
    photo = None
    if image is not None:
        try:
            photo = decode_image(read_image_bytes(image, max_bytes=settings.max_image_bytes), max_pixels=settings.max_image_pixels, what=str(image))
        except InvalidImage as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    engine = _engine()
    try:
        response = engine.search(
            SearchQuery(text=text, image=photo, category=category, room=room, auto_lock=auto_lock, top_k=top_k, mode=mode)  # type: ignore[arg-type]
        )
    except QueryError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(response.model_dump_json())
        return
    print_response(response)


def print_response(response) -> None:  # noqa: ANN001 - query.schemas.SearchResponse
    """Render a search response as a table with the lock and critic status above it."""
    lock = response.lock
    console.print(f"[bold]lock:[/bold] {lock.key if lock.applied else 'none'} — {lock.reason}")
    critic = response.critic
    console.print(f"[bold]critic:[/bold] {critic.backend} ({critic.status}{'; ' + critic.detail if critic.detail else ''})   "
                  f"[bold]fusion:[/bold] {response.fusion}   [bold]took:[/bold] {response.timings_ms.get('total', 0):.0f} ms")
    if response.synonyms:
        console.print(f"[bold]synonyms:[/bold] {'; '.join(response.synonyms)} (searched as {response.rewritten_text!r})")
    scored = critic.status == "scored"
    ruled = any(item.provenance.rules for item in response.items)
    table = Table()
    for col in ("#", "id", "title", "type", "colour", "score", "bm25", "image", "text", "fused") + (("why",) if scored else ()) + (("rules",) if ruled else ()):
        table.add_column(col)
    for item in response.items:
        p = item.provenance
        fmt = lambda h: f"{h.rank} ({h.score:.2f})" if h else "-"  # noqa: E731
        why = ((p.critic.rationale if p.critic else "-"),) if scored else ()
        why += ("; ".join(p.rules) or "-",) if ruled else ()
        table.add_row(str(item.rank), item.id, item.title, item.type, item.colour, f"{item.score:.4f}",
                      fmt(p.bm25), fmt(p.image), fmt(p.text), str(p.fused.rank) if p.fused else "-", *why)
    console.print(table)


@app.command()
def categories(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the category tree: classes with their types and product counts."""
    engine = _engine()
    try:
        tax = engine.taxonomy()
    finally:
        engine.close()
    classes = sorted((c for c in tax.categories.values() if c.level == "class"), key=lambda c: (-c.products, c.key))
    if as_json:
        console.print_json(json.dumps([c.__dict__ for c in tax.categories.values()]))
        return
    table = Table(title=f"{len(classes)} classes, {len(tax.categories) - len(classes)} types")
    for col in ("class", "products", "types"):
        table.add_column(col)
    for c in classes:
        types = sorted(t.name for t in tax.categories.values() if t.parent_key == c.key)
        table.add_row(c.key, str(c.products), ", ".join(types[:6]) + (" ..." if len(types) > 6 else ""))
    console.print(table)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    open_: Annotated[bool, typer.Option("--open", help="No API keys: every request acts as admin "
                                        "(MARS_API_AUTH=open). For a local demo only.")] = False,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs): search, bulk jobs, streamed items. With
    embedded stores this process owns them and runs bulk jobs itself; with Qdrant server +
    OpenSearch, bulk jobs go to the Celery workers.

    Every route but /healthz needs an API key (`mars keys create`) with its role, and each key
    is held to MARS_RATE_LIMIT; --open (or MARS_API_AUTH=open) turns the keys off."""
    import uvicorn

    from query.api import create_app
    from query.auth import OPEN_MODE_WARNING

    settings = get_settings()
    if open_:
        settings = settings.model_copy(update={"api_auth": "open"})
    if settings.api_auth == "open":
        err.print(f"[bold red]WARNING:[/bold red] {OPEN_MODE_WARNING}", highlight=False, soft_wrap=True)  # one line
    from query.observability import configure_logging

    # MARS_LOG_FORMAT lines for every logger; the app writes the access lines (with request ids).
    configure_logging(settings.log_format, settings.log_level)
    # warm_start: models, stores and taxonomy load before the first request, then gc.freeze()
    # (full garbage collections otherwise stall every request for ~200 ms every few seconds).
    uvicorn.run(create_app(settings=settings, warm_start=True), host=host, port=port, log_config=None, access_log=False)


keys_app = typer.Typer(
    help="API keys of the HTTP API, stored hashed in the catalog: viewer (search and read), editor "
    "(+ ingest and deletes), admin (+ key management). Works on the catalog directly, also while "
    "`mars serve` runs; a revoked key is refused from its next request on.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for, e.g. 'catalog sync' (1-128 characters).")],
    role: Annotated[str, typer.Option("--role", help="viewer (search, read), editor (+ ingest, deletes) or admin (+ keys).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its record as JSON.")] = False,
) -> None:
    """Create a key and print it ONCE: only its SHA-256 hash is stored, so it cannot be shown again."""
    from catalog import api_keys

    with _catalog() as session:
        try:
            row, key = api_keys.create_key(session, name, role)
        except ValueError as exc:
            raise _fail(exc) from exc
        record = api_keys.describe(row)
    if as_json:
        console.print_json(json.dumps({**record, "key": key}))
        return
    err.print(f"created API key {record['id']} ({record['name']}, {record['role']}); it is shown only this once:")
    typer.echo(key)
    err.print("send it as 'Authorization: Bearer <key>' (or X-API-Key), or set MARS_API_KEY for `mars ... --api-key`")


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every key (revoked ones too) without secrets: id, name, role, prefix, created, last used, revoked."""
    from catalog import api_keys

    with _catalog() as session:
        records = [api_keys.describe(row) for row in api_keys.list_keys(session)]
    if as_json:
        console.print_json(json.dumps(records))
        return
    table = Table(title=f"{len(records)} API keys (times in UTC)")
    for col in ("id", "name", "role", "prefix", "created", "last used", "revoked"):
        table.add_column(col, justify="right" if col == "id" else "left", no_wrap=col in ("id", "role", "prefix"))
    when = lambda t: t[:16].replace("T", " ") if t else "-"  # noqa: E731 - ISO 8601 UTC to the minute
    for r in records:
        table.add_row(str(r["id"]), r["name"], r["role"], r["prefix"] + "…", when(r["created_at"]),
                      when(r["last_used_at"]), when(r["revoked_at"]))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (`mars keys list`).")],
) -> None:
    """Revoke a key: the API refuses it (401) from its next request on. The record stays listed."""
    from catalog import api_keys

    with _catalog() as session:
        row = api_keys.revoke_key(session, key_id)
        if row is None:
            raise _fail(LookupError(f"no API key {key_id}"))
        record = api_keys.describe(row)
    console.print(f"API key {record['id']} ({record['prefix']}…, {record['name']}, {record['role']}) "
                  f"revoked at {record['revoked_at']}", highlight=False, soft_wrap=True)


rules_app = typer.Typer(
    help="Merchandising rules in the catalog: pin a product at a position, boost or bury a product or a brand "
    "(its fused score times a factor), rewrite query words (synonym); optionally only for one category lock "
    "or queries with a phrase. Works on the catalog directly; a running server applies a change within "
    "MARS_RULES_CACHE_S seconds (API writes, /v1/rules, apply at once).",
    no_args_is_help=True,
)
app.add_typer(rules_app, name="rules")


@rules_app.command("list")
def rules_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every rule, inactive ones too, oldest first."""
    from catalog import rules

    with _catalog() as session:
        records = [rules.describe(row) for row in rules.list_rules(session)]
    if as_json:
        console.print_json(json.dumps(records))
        return
    table = Table(title=f"{len(records)} merchandising rules")
    for col in ("id", "kind", "what", "active", "by", "updated (UTC)"):
        table.add_column(col, justify="right" if col == "id" else "left")
    for r in records:
        table.add_row(str(r["id"]), r["kind"], r["summary"], "yes" if r["active"] else "no", r["created_by"] or "-",
                      r["updated_at"][:16].replace("T", " "))
    console.print(table)


@rules_app.command("add")
def rules_add(
    kind: Annotated[str, typer.Argument(help="pin | boost | bury | synonym")],
    product: Annotated[Optional[str], typer.Option("--product", help="pin, boost, bury: the product id.")] = None,
    brand: Annotated[Optional[str], typer.Option("--brand", help="boost, bury: every product of this brand (attributes.brand).")] = None,
    position: Annotated[Optional[int], typer.Option("--position", help="pin: the 1-based position.")] = None,
    factor: Annotated[Optional[float], typer.Option("--factor", help="boost (> 1), bury (0..1): multiplies the fused score.")] = None,
    term: Annotated[Optional[str], typer.Option("--term", help="synonym: the query words to replace.")] = None,
    replacement: Annotated[Optional[str], typer.Option("--replacement", help="synonym: what replaces them.")] = None,
    category: Annotated[Optional[str], typer.Option("--category", help="Scope: only searches locked to this category (key or name).")] = None,
    query_pattern: Annotated[Optional[str], typer.Option("--query-pattern", help="Scope: only queries with this phrase (whole words).")] = None,
    inactive: Annotated[bool, typer.Option("--inactive", help="Store it switched off.")] = False,
) -> None:
    """Add a rule, e.g. `mars rules add pin --product 903.007.25 --position 1 --query-pattern "sofa bed"`."""
    from catalog import rules
    from catalog.locking import Taxonomy

    with _catalog() as session:
        info = Taxonomy.load(session).find(category) if category else None
        values = {"kind": kind, "product_id": product, "brand": brand, "position": position, "factor": factor,
                  "term": term, "replacement": replacement, "category": info.key if info else category,
                  "query_pattern": query_pattern, "active": not inactive}
        try:
            row = rules.create_rule(session, values)
        except rules.RuleError as exc:
            raise _fail(exc) from exc
        console.print(f"rule {row.id}: {rules.summary(row)}", highlight=False, soft_wrap=True)


@rules_app.command("remove")
def rules_remove(
    rule_id: Annotated[int, typer.Argument(help="The rule's id (`mars rules list`).")],
) -> None:
    """Delete a rule."""
    from catalog import rules

    with _catalog() as session:
        row = rules.delete_rule(session, rule_id)
        if row is None:
            raise _fail(LookupError(f"no rule {rule_id}"))
        console.print(f"removed rule {row.id}: {rules.summary(row)}", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_(
    queries: Annotated[Path, typer.Option("--queries", help="BEIR-style queries.jsonl (image paths relative to it).")],
    qrels: Annotated[Path, typer.Option("--qrels", help="qrels TSV: query-id, corpus-id, score.")],
    mode: ModeOpt = "hybrid",
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only these tasks (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most this many queries per task.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics and per-query scores as JSON.")] = False,
    ablation: Annotated[bool, typer.Option(
        "--ablation", help="One table per task: BM25 only, image vectors alone, text vectors alone, aligned image "
        "vectors alone (text -> image, after `mars train align`), hybrid, hybrid + critic and the seed-style baseline "
        "(nDCG@10 / Recall@10 / Success@10); --mode is ignored.")] = False,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out-dir", help="With --ablation: write ablation.md and ablation.png (grouped bar chart) here.")] = None,
) -> None:
    """Evaluate on BEIR-style queries + qrels: nDCG@10, Recall@10, Recall@50, MRR@10, Success@10 per task."""
    from evaluation.ablation import format_ablation, run_ablation, write_ablation
    from evaluation.runner import format_table, run_eval

    if out_dir is not None and not ablation:
        raise typer.BadParameter("--out-dir needs --ablation", param_hint="--out-dir")
    engine = _engine()
    try:
        if ablation:
            report = run_ablation(engine, queries, qrels, tasks=task, limit=limit, progress=not as_json)
        else:
            report = run_eval(engine, queries, qrels, mode=mode, tasks=task, limit=limit, progress=not as_json)
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(report))
    else:
        console.print(format_ablation(report) if ablation else format_table(report))
    if ablation and out_dir is not None:
        md, png = write_ablation(report, out_dir)
        (err if as_json else console).print(f"wrote {md} and {png}")


@app.command("lock-accuracy")
def lock_accuracy_(
    queries: Annotated[Path, typer.Option("--queries", help="BEIR-style queries.jsonl with room-class / room-type queries.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report with every miss as JSON.")] = False,
) -> None:
    """Share of room-class and room-type queries whose category lock is exactly the class or
    type they ask for (the last `::` part of the query id), with the misses."""
    from catalog.locking import Taxonomy
    from evaluation.beir import load_queries
    from evaluation.lock_accuracy import lock_accuracy

    with _catalog() as session:
        taxonomy = Taxonomy.load(session)
    report = lock_accuracy(taxonomy, load_queries(queries))
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table(title="category-lock accuracy")
    for col in ("task", "queries", "exact", "accuracy"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, row in report.items():
        table.add_row(task, str(row["queries"]), str(row["exact"]), f"{row['accuracy']:.4f}")
    console.print(table)
    for task, row in report.items():
        for miss in row["misses"][:50]:
            console.print(f"[yellow]miss[/yellow] {task}: {miss['text']!r} asks {miss['asked']!r}, locked {miss['locked']!r} ({miss['reason']})")


train_app = typer.Typer(help="Train MARS models on a catalog's own data.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("critic")
def train_critic(
    queries: Annotated[Path, typer.Option("--queries", help="BEIR-style queries.jsonl with room tasks (room_id, room_category).")],
    qrels: Annotated[Path, typer.Option("--qrels", help="qrels TSV: the products staged in each room.")],
    folds: Annotated[int, typer.Option("--folds", help="Room-grouped cross-validation folds (0 to skip).")] = 5,
    depth: Annotated[int, typer.Option("--depth", help="Fused candidates mined per query (hard negatives).")] = 40,
    controls: Annotated[int, typer.Option("--controls", help="Random controls per query.")] = 3,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint path; default MARS_CRITIC_CHECKPOINT or <home>/critic/learned.safetensors.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Train the learned critic on staged rooms: mine pairs with the hybrid funnel (each room
    with a learned whitening stage and prior fitted without it, when the whitening has a
    learned stage), report room-grouped cross-validated nDCG@10 (hybrid vs re-ranked), then
    fit on all rooms and save."""
    from evaluation.beir import load_qrels, load_queries
    from training.critic import ROOM_TASKS, cross_validate, evaluate, fit, mine_out_of_fold

    engine = _engine()
    try:
        room_queries = [q for q in load_queries(queries) if q.task in ROOM_TASKS]
        judged = load_qrels(qrels)
        with Progress(TextColumn("mining pairs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, disable=as_json) as bar:
            task = bar.add_task("mine", total=sum(1 for q in room_queries if judged.get(q.id)))
            mined = mine_out_of_fold(engine, room_queries, judged, depth=depth, controls=controls,
                                     on_query=lambda: bar.advance(task))
        report: dict = {"pairs": sum(len(m.pairs) for m in mined), "queries": len(mined)}
        if folds:
            report["cross_validation"] = cross_validate(mined, folds=folds, top_n=engine.settings.critic_top_n)
        critic = fit(mined)
        critic.meta["folds"] = folds
        path = out or engine.settings.critic_path
        critic.save(path)
        report["in_sample"] = evaluate(critic, mined, engine.settings.critic_top_n)
        report["checkpoint"] = str(path)
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(report))
        return
    for name in ("cross_validation", "in_sample"):
        if name in report:
            table = Table(title=f"nDCG@10, {name.replace('_', ' ')} ({'held-out rooms' if name == 'cross_validation' else 'training rooms'})")
            for col in ("task", "queries", "hybrid", "full (critic)", "gain"):
                table.add_column(col)
            for t, row in report[name].items():
                table.add_row(t, str(row["queries"]), f"{row['hybrid']:.4f}", f"{row['full']:.4f}", f"{row['full'] - row['hybrid']:+.4f}")
            console.print(table)
    console.print(f"{report['pairs']} pairs from {report['queries']} queries; checkpoint written to {report['checkpoint']}")


@train_app.command("category-head")
def train_category_head(
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.99, help="Share of each class held out for the metrics (0 skips them).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the stratified split.")] = 0,
    min_class_size: Annotated[int, typer.Option("--min-class-size", min=1, help="Classes with fewer products are left out (2: the smallest class that can be trained and held out).")] = 2,
    l2: Annotated[Optional[float], typer.Option("--l2", min=0.0, help="L2 strength on the weights; default 1e-5.")] = None,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="L-BFGS iteration cap of each fit.")] = 500,
    out: Annotated[Optional[Path], typer.Option("--out", help="Checkpoint path; default MARS_CATEGORY_HEAD or <home>/category_head.safetensors.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Train the category head: multinomial logistic regression on the stored (frozen) product
    image vectors predicting each product's class; report held-out top-1 / top-5 accuracy and
    macro-F1 on a stratified split, then refit on all products and save. Ingestion then suggests
    a class for items that arrive without a type (attributes.suggested_category)."""
    from catalog.category_head import category_head_path
    from training.category_head import DEFAULT_L2, collect, train

    engine = _engine()
    try:
        data = collect(engine)  # the stores are released before training
    except ValueError as exc:
        raise _fail(exc) from exc
    finally:
        engine.close()
    try:
        head, report = train(data, holdout=holdout, seed=seed, min_class_size=min_class_size,
                             l2=DEFAULT_L2 if l2 is None else l2, max_iter=max_iter)
    except ValueError as exc:
        raise _fail(exc) from exc
    path = out or category_head_path(engine.settings)
    head.save(path)
    report["checkpoint"] = str(path)
    if as_json:
        console.print_json(json.dumps(report))
        return
    m = report["held_out_metrics"]
    if m is not None:
        table = Table(title=f"category head, held-out products ({m['n']} of {report['products']}, {m['classes']} classes)")
        for col in ("top-1", "top-5", "macro-F1"):
            table.add_column(col, justify="right")
        table.add_row(f"{m['top1']:.4f}", f"{m['top5']:.4f}", f"{m['macro_f1']:.4f}")
        console.print(table)
    console.print(f"{report['products']} products in {report['classes']} classes ({report['dropped_classes']} classes with "
                  f"< {min_class_size} products left out, {report['without_image']} products without a photo); "
                  f"L-BFGS steps {report['steps']}; checkpoint written to {path}")


@train_app.command("align")
def train_align_command(
    dim: Annotated[int, typer.Option("--dim", min=8, help="Size of the shared text/image space (the aligned vector).")] = 256,
    hidden: Annotated[int, typer.Option("--hidden", min=8, help="Hidden width of each projection head.")] = 1024,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the catalog, per fit.")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Pairs per step.")] = 256,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate.")] = 1e-3,
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.9, help="Share of products held out of a first fit to report validation Recall@K (0 skips it).")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the initialisation and the batches.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Align the offline encoders across modalities (LiT-style): train projection heads on the
    frozen image and text vectors of the catalog's own products (photo <-> short texts from
    colour, type and title) with the SigLIP sigmoid loss, report text->image Recall@1/5/10 for
    held-out products, fit again on all products, then rebuild the vector collection with the
    `aligned` named vector. Text queries then also search it (the `aligned` RRF list;
    MARS_WEIGHTS_TEXT / MARS_WEIGHTS_PHOTO weigh it). Needs the stores: stop `mars serve` first."""
    from training.align import AlignConfig, train_align

    config = AlignConfig(dim=dim, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr, holdout=holdout, seed=seed)
    fits = 2 if holdout > 0 else 1
    engine = _engine()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                      TimeRemainingColumn(), console=err, disable=as_json) as bar:
            task = bar.add_task("align: load", total=fits * epochs, loss="-")

            def on_epoch(phase: str, epoch: int, loss: float) -> None:
                bar.update(task, advance=1, description=f"align: {phase}", loss=f"{loss:.3f}")

            report = train_align(engine, config, on_epoch)
    except (RuntimeError, ValueError) as exc:
        raise _fail(exc) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(_finite(asdict(report))))
        return
    if report.validation:
        v = report.validation
        table = Table(title=f"text -> aligned image, {report.held_out} held-out products vs the whole catalog")
        for col in ("Recall@1", "Recall@5", "Recall@10", "MRR@10"):
            table.add_column(col, justify="right")
        table.add_row(*(f"{v[k]:.4f}" for k in ("recall@1", "recall@5", "recall@10", "mrr@10")))
        console.print(table)
    console.print(f"{report.products} products; final loss {report.final_loss:.4f}, logit scale {report.logit_scale:.2f}, "
                  f"bias {report.logit_bias:.2f}; {report.points} points rewritten with the aligned vector in {report.seconds} s")


@train_app.command("whitening")
def train_whitening_command(
    rooms: Annotated[Path, typer.Option("--rooms", help="Folder of room photos (e.g. ../shared/data/ikea/rooms).")],
    queries: Annotated[Optional[Path], typer.Option(
        "--queries", help="queries.jsonl with room photos; with --qrels, also fit the learned stage on their judged products.")] = None,
    qrels: Annotated[Optional[Path], typer.Option("--qrels", help="Relevance judgments (TSV) of --queries.")] = None,
    dim: Annotated[int, typer.Option("--dim", min=1, help="Whitened dimensions kept (leading principal components).")] = 512,
    eps: Annotated[float, typer.Option("--eps", min=0.0, help="Ridge on the eigenvalues, as a multiple of their mean.")] = 1.0,
    learned_dim: Annotated[int, typer.Option("--learned-dim", min=1, help="Dimensions the learned stage keeps.")] = 384,
    shrink: Annotated[float, typer.Option("--shrink", min=0.0, max=1.0,
                                          help="Learned stage: shrinkage of the pairs' covariance toward identity.")] = 0.5,
    region_step: Annotated[int, typer.Option("--region-step", min=1, help="Keep every N-th region of each room photo.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the fit report as JSON.")] = False,
) -> None:
    """Fit a PCA whitening of image vectors (Jégou & Chum, ECCV 2012) on the stored product
    photos and the regions of the room photos in --rooms (unsupervised), and with --queries and
    --qrels a learned stage (Mikolajczyk & Matas 2007) on (room region, relevant product photo)
    pairs; store it with the index. The image list then compares room regions with product
    photos as whitened vectors. Needs the stores: stop `mars serve` first; no re-index."""
    from evaluation.beir import load_qrels, load_queries
    from indexing.whitening import whitening_path
    from ingestion.images import InvalidImage
    from training.whitening import fit_whitening, judged_photos, room_photos

    if (queries is None) != (qrels is None):
        raise _fail(ValueError("--queries and --qrels go together (the learned stage needs both)"))
    engine = _engine()
    try:
        photos = room_photos(rooms)
        judged = judged_photos(load_queries(queries), load_qrels(qrels)) if queries and qrels else None
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, disable=as_json) as bar:
            task = bar.add_task("whitening: room regions", total=len(photos))
            white = fit_whitening(engine, photos, judged=judged, dim=dim, eps=eps, learned_dim=learned_dim, shrink=shrink,
                                  region_step=region_step, on_photo=lambda: bar.advance(task))
        engine.install_whitening(white)
    except (FileNotFoundError, InvalidImage, RuntimeError, ValueError) as exc:
        raise _fail(exc) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(_finite(white.meta)))
        return
    m = white.meta
    console.print(f"whitening fitted on {m['products']} product photos + {m['regions']} regions of {m['room_photos']} room "
                  f"photos: {m['dim']} of {white.input_dim} dimensions, {m['variance_kept']:.1%} of the variance, eps {m['eps']}")
    if "learned" in m:
        learned = m["learned"]
        console.print(f"learned stage: {learned['pairs']} (region, product) pairs from {learned['judged_photos']} judged "
                      f"photos, {learned['dim']} dimensions, shrink {learned['shrink']}")
    console.print(f"{m['seconds']} s; written to {whitening_path(engine.home)}")


@train_app.command("prior")
def train_prior_command(
    queries: Annotated[Path, typer.Option("--queries", help="queries.jsonl whose room queries carry room_id and room_category.")],
    qrels: Annotated[Path, typer.Option("--qrels", help="Relevance judgments (TSV): the products each room shows.")],
) -> None:
    """Count, per room type, the staged rooms that show each product (a popularity prior per
    room type) from judged room queries, and store it with the index. Queries with a room type
    (--room) then get the `prior` list, fused with the MARS_WEIGHTS_* weight `prior` (shipped:
    2.0 without a photo, 0 with one). Needs the stores: stop `mars serve` first."""
    from evaluation.beir import load_qrels, load_queries
    from indexing.staging_prior import StagingPrior, staging_prior_path

    try:
        prior = StagingPrior.from_judgments(load_queries(queries), load_qrels(qrels))
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    engine = _engine()
    try:
        engine.install_prior(prior)
    finally:
        engine.close()
    rooms = ", ".join(f"{k} {n}" for k, n in sorted(prior.rooms.items(), key=lambda kv: -kv[1]))
    console.print(f"staging prior: {sum(prior.rooms.values())} rooms ({rooms}), {len(prior.counts)} products; "
                  f"written to {staging_prior_path(engine.home)}")


def _finite(value):  # noqa: ANN001, ANN202 - JSON-ready values
    """``value`` with NaN / infinite floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fail(exc: Exception, code: int = 2) -> typer.Exit:
    """Print ``exc`` as a one-line error and return the exit to raise."""
    err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code)


DISTILL_TASKS_HELP = "Room tasks to use (repeatable); default room-class and room-type."


@train_app.command("mine")
def train_mine(
    queries: Annotated[Path, typer.Option("--queries", help="BEIR-style queries.jsonl with room tasks (room_id, room_category).")],
    qrels: Annotated[Path, typer.Option("--qrels", help="qrels TSV: the products staged in each room.")],
    out: Annotated[Path, typer.Option("--out", help="Pairs JSONL to write (replaced).")] = Path("pairs.jsonl"),
    task: Annotated[Optional[list[str]], typer.Option("--task", help=DISTILL_TASKS_HELP)] = None,
    positives: Annotated[int, typer.Option("--positives", min=0, help="Hard positives per query (staged, ranked lowest).")] = 2,
    negatives: Annotated[int, typer.Option("--negatives", min=0, help="Hard negatives per query (not staged, ranked highest, same class).")] = 4,
    controls: Annotated[int, typer.Option("--controls", min=0, help="Random controls per query.")] = 2,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many queries per task (drawn with --seed).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the query sample and the random controls.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Mine distillation pairs: run judged room queries (room photo + text) through the hybrid
    funnel and write hard positives, hard negatives and random controls, each with its reason."""
    from evaluation.beir import load_qrels, load_queries
    from training.mine_pairs import DISTILL_TASKS, PerQuery, limit_queries, mine_pairs, write_pairs

    try:
        counts = PerQuery(positives, negatives, controls)
        all_queries, judged = load_queries(queries), load_qrels(qrels)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    tasks = tuple(task or DISTILL_TASKS)
    engine = _engine()
    try:
        total = len(limit_queries(all_queries, judged, tasks, limit, seed))
        with Progress(TextColumn("mining pairs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, disable=as_json) as bar:
            progress = bar.add_task("mine", total=total)
            rows = mine_pairs(engine, all_queries, judged, counts=counts, tasks=tasks, limit=limit, seed=seed,
                              on_query=lambda: bar.advance(progress))
    finally:
        engine.close()
    summary = {**write_pairs(rows, out), "pairs": len(rows), "out": str(out), "seed": seed}
    if as_json:
        console.print_json(json.dumps(summary))
        return
    table = Table(title=f"distillation pairs -> {out}")
    for col in ("queries", "hard positives", "hard negatives", "random controls", "pairs"):
        table.add_column(col, justify="right")
    table.add_row(*(str(summary[k]) for k in ("queries", "hard_positive", "hard_negative", "random_control", "pairs")))
    console.print(table)


@train_app.command("label")
def train_label(
    teacher: Annotated[str, typer.Option("--teacher", help="openai (MARS_CRITIC_ENDPOINT / _API_MODEL / _API_KEY) or "
                                         "vlm (a local Qwen2-VL: MARS_CRITIC_MODEL, MARS_CRITIC_ADAPTER).")],
    pairs: Annotated[Path, typer.Option("--pairs", help="Pairs JSONL from `mars train mine`.")],
    out: Annotated[Path, typer.Option("--out", help="Labels JSONL, appended; pairs already in it are skipped (resume).")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Pairs per teacher call.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Generation budget of one answer.")] = 128,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N pairs of --pairs.")] = None,
    retry_rejected: Annotated[bool, typer.Option("--retry-rejected", help="Ask again for the pairs in the rejected file (labels.jsonl -> labels.rejected.jsonl).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Label mined pairs with the teacher critic: a validated {"score", "rationale"} per pair
    with its provenance; invalid answers go to <out stem>.rejected.jsonl with the reason."""
    from training.label import build_teacher, label_pairs
    from training.rows import read_jsonl

    try:
        rows = read_jsonl(pairs, required=("query_id", "product_id", "product_text"))[:limit]
        critic, model = build_teacher(teacher, get_settings(), batch_size=batch_size, max_new_tokens=max_new_tokens)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(exc) from exc
    try:
        with Progress(TextColumn(f"labelling ({teacher})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=err, disable=as_json) as bar:
            progress = bar.add_task("label", total=len(rows))
            report = label_pairs(critic, rows, out, teacher_name=teacher, teacher_model=model, batch_size=batch_size,
                                 retry_rejected=retry_rejected, on_batch=lambda n: bar.advance(progress, n))
            bar.update(progress, completed=len(rows))
    except (OSError, ValueError) as exc:
        raise _fail(exc) from exc
    except Exception as exc:  # the teacher's transport errors (openai.APIError, ...): what was answered is saved
        err.print(f"[red]error:[/red] the {teacher} teacher failed: {exc.__class__.__name__}: {exc}; the labels "
                  f"written so far are in {out}: run the same command again to resume")
        raise typer.Exit(1) from exc
    finally:
        if hasattr(critic, "close"):
            critic.close()
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    table = Table(title=f"labels ({teacher}: {model}) -> {out}")
    for col in ("pairs", "already done", "labelled", "rejected", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(str(report.pairs), str(report.skipped), str(report.labelled), str(report.rejected), f"{report.seconds:.1f}")
    console.print(table)
    if report.rejected:
        console.print(f"[yellow]{report.rejected} pairs rejected[/yellow] with their reasons in {report.rejected_out}")


@train_app.command("sft")
def train_sft_command(
    labels: Annotated[Path, typer.Option("--labels", help="Labels JSONL from `mars train label`.")],
    model: Annotated[str, typer.Option("--model", help="Base Qwen2-VL directory (the student).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoint-<step>/ (adapter + trainer state).")],
    epochs: Annotated[float, typer.Option("--epochs", min=0.0, help="Passes over the labels (ignored with --max-steps).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimizer steps in all (resumed ones included).")] = None,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate (constant after warm-up).")] = 2e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Forward passes per optimizer step.")] = 8,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1, help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", min=1, help="LoRA alpha (update scale alpha/r).")] = 32,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0, help="Dropout on the LoRA input.")] = 0.05,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0, help="Linear learning-rate warm-up steps.")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Checkpoint every N steps (and at the end).")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="LoRA init, data order and dropout seed.")] = 0,
    four_bit: Annotated[bool, typer.Option("--4bit", help="QLoRA: NF4 base weights via bitsandbytes (CUDA only).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for activation memory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out (step counter included).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """(Q)LoRA SFT of the Qwen2-VL student on the teacher's labels: LoRA on q/k/v/o_proj, loss on
    the answer tokens only, checkpoints out/checkpoint-<step>/ usable as MARS_CRITIC_ADAPTER."""
    from training.sft import SFTConfig, train_sft

    try:
        config = SFTConfig(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                           lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, warmup_steps=warmup_steps,
                           save_every=save_every, seed=seed, load_in_4bit=four_bit,
                           gradient_checkpointing=gradient_checkpointing)
        with Progress(TextColumn("sft"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                      TimeRemainingColumn(), console=err, disable=as_json) as bar:
            progress = bar.add_task("sft", total=None, loss="-")

            def on_step(step: int, total: int, loss: float) -> None:
                bar.update(progress, completed=step, total=total, loss=f"{loss:.4f}")

            result = train_sft(labels, model, out, config, resume=resume, on_step=on_step)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        raise _fail(exc) from exc
    if as_json:
        console.print_json(json.dumps(_finite(result.as_dict())))
        return
    history = result.loss_history
    first, last = (history[0]["loss"], history[-1]["loss"]) if history else (float("nan"), float("nan"))
    console.print(f"step {result.step} (epoch {result.epoch:.2f}; resumed from step {result.resumed_from}); "
                  f"loss {first:.4f} -> {last:.4f}; adapter: {result.final}")


@train_app.command("eval-critic")
def train_eval_critic(
    labels: Annotated[Path, typer.Option("--labels", help="Held-out labels JSONL (rooms the student was not trained on).")],
    model: Annotated[str, typer.Option("--model", help="Base Qwen2-VL directory of the student.")],
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter, e.g. out/checkpoint-<step> (none: the base model).")] = None,
    queries: Annotated[Optional[Path], typer.Option("--queries", help="queries.jsonl for the nDCG@10 table (needs --qrels).")] = None,
    qrels: Annotated[Optional[Path], typer.Option("--qrels", help="qrels TSV for the nDCG@10 table.")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", help=DISTILL_TASKS_HELP)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many queries per task in the nDCG table.")] = None,
    rationale_top_k: Annotated[Optional[int], typer.Option("--rationale-top-k", min=0, help="Pairs of each search scored by the generated JSON "
                               "(the rest by P(yes)); default MARS_CRITIC_RATIONALE_TOP_K.")] = None,
    generate: Annotated[bool, typer.Option("--generate/--no-generate", help="Score agreement of the generated JSON too (slow on CPU).")] = True,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Generation budget of one JSON answer "
                              "(default: the critic's, 96).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Agreement of the distilled student with the teacher on held-out labels (MAE, Spearman),
    and, with --queries/--qrels, nDCG@10 of --mode hybrid vs --mode full with the student as critic."""
    from training.eval_critic import agreement, held_out_check, ranking_gain
    from training.mine_pairs import DISTILL_TASKS
    from training.rows import read_jsonl

    if (queries is None) != (qrels is None):
        raise _fail(ValueError("the nDCG@10 table needs both --queries and --qrels"))
    base = get_settings()
    settings = base.model_copy(update={
        "critic": "vlm", "critic_model": model, "critic_adapter": adapter, "critic_queue": False,
        "critic_rationale_top_k": base.critic_rationale_top_k if rationale_top_k is None else rationale_top_k,
    })
    engine = None
    try:
        rows = read_jsonl(labels, required=("query_id", "product_id", "product_text", "score", "rationale"))
        if queries is not None:
            engine = _engine(settings)
            student = engine.critic
        else:
            from mars.registry import build_critic

            student, _ = build_critic(settings)
        if max_new_tokens is not None:
            student.max_new_tokens = max_new_tokens
        report: dict = {"model": model, "adapter": str(adapter) if adapter else None,
                        "agreement": agreement(student, rows, generate=generate),
                        "held_out": held_out_check(adapter, rows) if adapter else None}
        if engine is not None:
            from critic.prompt import CriticAnswerError

            try:
                report["ranking"] = ranking_gain(engine, queries, qrels, tasks=tuple(task or DISTILL_TASKS), limit=limit,
                                                 progress=not as_json)
            except CriticAnswerError as exc:
                report["ranking_error"] = f"{exc} (rank with --rationale-top-k 0 to use the student's P(yes) only)"
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        raise _fail(exc) from exc
    finally:
        if engine is not None:
            engine.close()
    if as_json:
        console.print_json(json.dumps(_finite(report)))
        return
    agree = report["agreement"]
    table = Table(title=f"student vs teacher on {agree['labels']} held-out labels")
    for col in ("read-out", "scored", "MAE", "Spearman"):
        table.add_column(col, justify="left" if col == "read-out" else "right")
    fmt = lambda v: "n/a" if v != v else f"{v:.4f}"  # noqa: E731 - NaN when undefined
    if "json" in agree:
        j = agree["json"]
        table.add_row("generated JSON", f"{j['valid']}/{agree['labels']}", fmt(j["mae"]), fmt(j["spearman"]))
    f = agree["fast"]
    table.add_row("P(yes) fast path", f"{f['pairs']}/{agree['labels']}", fmt(f["mae"]), fmt(f["spearman"]))
    console.print(table)
    if agree.get("json", {}).get("invalid_reasons"):
        console.print(f"invalid JSON answers: {agree['json']['invalid_reasons']}")
    if report["held_out"]:
        h = report["held_out"]
        mark = "[yellow]not held out:[/yellow]" if h["labels_from_train_rooms"] else "held-out check:"
        console.print(f"{mark} {h['labels_from_train_rooms']} of {h['labels']} labels are from the "
                      f"{h['train_rooms']} rooms the adapter was trained on")
    if "ranking" in report:
        gain = Table(title=f"nDCG@10, student as critic (top {settings.critic_top_n} re-ranked, "
                           f"{settings.critic_rationale_top_k} by generated JSON)")
        for col in ("task", "queries", "hybrid", "full (student)", "gain"):
            gain.add_column(col, justify="left" if col == "task" else "right")
        for t, row in report["ranking"].items():
            gain.add_row(t, str(row["queries"]), f"{row['hybrid']:.4f}", f"{row['full']:.4f}", f"{row['gain']:+.4f}")
        console.print(gain)
    if "ranking_error" in report:
        console.print(f"[red]ranking not scored:[/red] {report['ranking_error']}")


from mars.cli_encoders import register as register_encoder_commands  # noqa: E402 - `mars train encoder|text-embedder`
from mars.cli_tune import register as register_tune  # noqa: E402 - `mars tune`

register_tune(app)
register_encoder_commands(train_app)


def main() -> None:  # pragma: no cover - console entry
    """Entry point for ``python -m mars``."""
    app(prog_name="mars")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
