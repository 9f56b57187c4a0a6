"""``mars search`` and ``mars categories``: query the catalog from the shell, list its category tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mars.cli.common import ModeOpt, console, fail, open_engine, print_response
from mars.settings import get_settings

app = typer.Typer()


@app.command("search")
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
            raise fail(exc) from exc
    engine = open_engine()
    try:
        response = engine.search(
            SearchQuery(text=text, image=photo, category=category, room=room, auto_lock=auto_lock, top_k=top_k, mode=mode)  # type: ignore[arg-type]
        )
    except QueryError as exc:
        raise fail(exc) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(response.model_dump_json())
        return
    print_response(response)


@app.command("categories")
def categories(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the category tree: classes with their types and product counts."""
    engine = open_engine()
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
