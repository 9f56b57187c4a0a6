"""``mars keys create|list|revoke``: the HTTP API's keys, managed in the catalog directly."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from mars.cli.common import catalog_session, console, err, fail

app = typer.Typer(
    help="API keys of the HTTP API, stored hashed in the catalog: viewer (search and read), editor "
    "(+ ingest and deletes), admin (+ key management). Works on the catalog directly, also while "
    "`mars serve` runs; a revoked key is refused from its next request on.",
    no_args_is_help=True,
)


@app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for, e.g. 'catalog sync' (1-128 characters).")],
    role: Annotated[str, typer.Option("--role", help="viewer (search, read), editor (+ ingest, deletes) or admin (+ keys).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its record as JSON.")] = False,
) -> None:
    """Create a key and print it ONCE: only its SHA-256 hash is stored, so it cannot be shown again."""
    from catalog import api_keys

    with catalog_session() as session:
        try:
            row, key = api_keys.create_key(session, name, role)
        except ValueError as exc:
            raise fail(exc) from exc
        record = api_keys.describe(row)
    if as_json:
        console.print_json(json.dumps({**record, "key": key}))
        return
    err.print(f"created API key {record['id']} ({record['name']}, {record['role']}); it is shown only this once:")
    typer.echo(key)
    err.print("send it as 'Authorization: Bearer <key>' (or X-API-Key), or set MARS_API_KEY for `mars ... --api-key`")


@app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every key (revoked ones too) without secrets: id, name, role, prefix, created, last used, revoked."""
    from catalog import api_keys

    with catalog_session() as session:
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


@app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (`mars keys list`).")],
) -> None:
    """Revoke a key: the API refuses it (401) from its next request on. The record stays listed."""
    from catalog import api_keys

    with catalog_session() as session:
        row = api_keys.revoke_key(session, key_id)
        if row is None:
            raise fail(LookupError(f"no API key {key_id}"))
        record = api_keys.describe(row)
    console.print(f"API key {record['id']} ({record['prefix']}…, {record['name']}, {record['role']}) "
                  f"revoked at {record['revoked_at']}", highlight=False, soft_wrap=True)
