"""``mars rules list|add|remove``: merchandising rules, managed in the catalog directly."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from mars.cli.common import catalog_session, console, fail

app = typer.Typer(
    help="Merchandising rules in the catalog: pin a product at a position, boost or bury a product or a brand "
    "(its fused score times a factor), rewrite query words (synonym); optionally only for one category lock "
    "or queries with a phrase. Works on the catalog directly; a running server applies a change within "
    "MARS_RULES_CACHE_S seconds (API writes, /v1/rules, apply at once).",
    no_args_is_help=True,
)


@app.command("list")
def rules_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every rule, inactive ones too, oldest first."""
    from catalog import rules

    with catalog_session() as session:
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


@app.command("add")
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

    with catalog_session() as session:
        info = Taxonomy.load(session).find(category) if category else None
        values = {"kind": kind, "product_id": product, "brand": brand, "position": position, "factor": factor,
                  "term": term, "replacement": replacement, "category": info.key if info else category,
                  "query_pattern": query_pattern, "active": not inactive}
        try:
            row = rules.create_rule(session, values)
        except rules.RuleError as exc:
            raise fail(exc) from exc
        console.print(f"rule {row.id}: {rules.summary(row)}", highlight=False, soft_wrap=True)


@app.command("remove")
def rules_remove(
    rule_id: Annotated[int, typer.Argument(help="The rule's id (`mars rules list`).")],
) -> None:
    """Delete a rule."""
    from catalog import rules

    with catalog_session() as session:
        row = rules.delete_rule(session, rule_id)
        if row is None:
            raise fail(LookupError(f"no rule {rule_id}"))
        console.print(f"removed rule {row.id}: {rules.summary(row)}", highlight=False, soft_wrap=True)
