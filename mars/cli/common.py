"""What several ``mars`` command modules share: the two rich consoles, the one-line error,
opening the engine, a session on the catalog, shared option types, JSON-ready values and the
rendering of a search response.

The command modules of :mod:`mars.cli` import from here and from library modules only, never
from each other. Everything heavy (the engine, the catalog, the funnel) is imported inside
the helpers, so ``mars --help`` loads none of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mars.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mars.engine import Engine
    from query.schemas import SearchResponse

console = Console()
"""Standard output: tables, reports, JSON."""

err = Console(stderr=True)
"""Standard error: progress bars, errors, notes that must not mix into piped JSON."""

ModeOpt = Annotated[str, typer.Option("--mode", help="bm25 | vector | hybrid | full (hybrid + critic).")]
"""``--mode``: the search mode of ``mars search`` and ``mars eval``."""

ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option("--api-key", envvar="MARS_API_KEY", show_envvar=True,
                 help="API key for the server (`mars keys create`), sent as 'Authorization: Bearer <key>'."),
]
"""``--api-key`` (or ``MARS_API_KEY``): the key sent to a running server."""


def fail(problem: BaseException | str, code: int = 2) -> typer.Exit:
    """Print ``problem`` as a one-line error on standard error and return the exit to raise.

    Use as ``raise fail(exc) from exc``: the user sees ``error: <message>`` and no traceback.

    Args:
        problem: the error (its ``str()`` is the message) or the message itself.
        code: the process exit status (2, a usage or input error, unless told otherwise).

    Returns:
        ``typer.Exit(code)``, for the caller to raise.
    """
    err.print(f"[red]error:[/red] {problem}")
    return typer.Exit(code)


def open_engine(settings: Settings | None = None) -> Engine:
    """Open the engine (the stores ``settings`` name; default :func:`get_settings`).

    The caller closes it (``engine.close()``), usually in a ``finally``.

    Raises:
        typer.Exit: exit status 2 after a one-line error when the stores are held by another
            process (``StoreBusyError``) or were built with other encoders (``IndexMismatchError``).
    """
    from mars.engine import Engine, IndexMismatchError, StoreBusyError

    try:
        return Engine(settings or get_settings())
    except (StoreBusyError, IndexMismatchError) as exc:
        raise fail(exc) from exc


@contextmanager
def catalog_session() -> Iterator[Session]:
    """A session on the catalog itself (MARS_DATABASE_URL or MARS_HOME), migrated to head first.

    Opens no store, so it works while ``mars serve`` or the workers own them. The database
    engine is disposed of when the block ends.
    """
    from catalog.db import make_engine, session_factory, upgrade_to_head

    db = make_engine(get_settings().catalog_url)
    try:
        upgrade_to_head(db)
        with session_factory(db)() as session:
            yield session
    finally:
        db.dispose()


def json_ready(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None, inside dicts and lists too
    (strict JSON has no NaN); other values are returned as they are."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


def critic_line(critic: Any) -> str:
    """The critic part of a search's status line: ``<status> (<detail>)``, or ``<status>``
    when there is no detail, then the critic backend unless it is ``none``.

    Args:
        critic: a :class:`query.schemas.CriticStatus` (``backend``, ``status``, ``detail``);
            ``status`` is e.g. "scored", "skipped", "not configured" or "unavailable" (the
            critic failed and the fused order stands; ``detail`` says why).
    """
    text = critic.status + (f" ({critic.detail})" if critic.detail else "")
    return text if critic.backend == "none" else f"{text}, backend {critic.backend}"


def print_response(response: SearchResponse) -> None:
    """Render a search response on standard output: the lock, the critic's status (mode full
    only), fusion and time, one line on the trained stages the search lacked (when it lacked
    any), above a table of the ranked items with their rank (score) in each list the search
    fused (the retrievers ``response.fusion`` weighs, in fusion order)."""
    lock = response.lock
    console.print(f"[bold]lock:[/bold] {lock.key if lock.applied else 'none'} — {lock.reason}")
    critic = response.critic
    shown = f"[bold]critic:[/bold] {critic_line(critic)}   " if response.mode == "full" else ""
    console.print(f"{shown}[bold]fusion:[/bold] {response.fusion}   "
                  f"[bold]took:[/bold] {response.timings_ms.get('total', 0):.0f} ms")
    if response.stages.absent:
        console.print(f"[bold]stages:[/bold] {' '.join(response.stages.absent)}", highlight=False)
    if response.synonyms:
        console.print(f"[bold]synonyms:[/bold] {'; '.join(response.synonyms)} (searched as {response.rewritten_text!r})")
    fused_lists = [name for name in response.fusion if name not in ("k", "rrf_k")]
    scored = critic.status == "scored"
    ruled = any(item.provenance.rules for item in response.items)
    table = Table()
    for col in ("#", "id", "title", "type", "colour", "score", *fused_lists, "fused") + (("why",) if scored else ()) + (("rules",) if ruled else ()):
        table.add_column(col)
    for item in response.items:
        p = item.provenance
        fmt = lambda h: f"{h.rank} ({h.score:.2f})" if h else "-"  # noqa: E731
        why = ((p.critic.rationale if p.critic else "-"),) if scored else ()
        why += ("; ".join(p.rules) or "-",) if ruled else ()
        lists = (fmt(p.retrievers.get(name)) for name in fused_lists)
        table.add_row(str(item.rank), item.id, item.title, item.type, item.colour, f"{item.score:.4f}",
                      *lists, str(p.fused.rank) if p.fused else "-", *why)
    console.print(table)


__all__ = [
    "ApiKeyOpt", "ModeOpt", "catalog_session", "console", "critic_line", "err", "fail", "json_ready",
    "open_engine", "print_response",
]
