"""``mars ingest`` and ``mars jobs``: ingest a catalog here or through a running server's bulk
API, and show ingest jobs from the catalog or from a server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from mars.cli.common import ApiKeyOpt, catalog_session, console, fail, open_engine
from mars.cli.progress import meter

if TYPE_CHECKING:
    import httpx

    from ingestion.raw_records import RawRecord

app = typer.Typer()

POLL_S = 0.5
"""Seconds between two reads of a job's progress by ``mars ingest --via-api``."""


def _count_lines(path: Path) -> int | None:
    """Records in ``path`` (a folder's corpus.jsonl, a .jsonl or a .csv less its header), for the
    progress bar; None when it is not a plain file."""
    target = path / "corpus.jsonl" if path.is_dir() else path
    if not target.is_file():
        return None
    with target.open("rb") as fh:
        n = sum(1 for line in fh if line.strip())
    return n - 1 if target.suffix.lower() == ".csv" else n


@app.command("ingest")
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
        raise fail(exc) from exc
    if via_api:
        _ingest_via_api(via_api, api_key, records, path, as_json)
        return
    engine = open_engine()
    try:
        total = _count_lines(path)
        with meter("ingest", total, quiet=as_json) as progress:
            report = engine.ingest(records, str(path.resolve()), total_hint=total, on_progress=progress.advance)
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


def _api_client(url: str, api_key: str | None) -> httpx.Client:
    """An HTTP client of the API at ``url`` that sends ``api_key`` (if any) as a Bearer token."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(60.0, connect=5.0))


def _api_call(call: Callable[[], httpx.Response], what: str) -> Any:
    """Run one API request; connection failures and error answers become a clear exit 2."""
    import httpx

    try:
        response = call()
    except httpx.HTTPError as exc:
        raise fail(f"{what}: {exc.__class__.__name__}: {exc} (is `mars serve` running there?)") from exc
    if response.status_code >= 400:
        hint = {401: " (pass --api-key or set MARS_API_KEY; `mars keys create` makes a key)",
                403: " (this key's role is too weak: reads need viewer, ingest needs editor)"}.get(response.status_code, "")
        raise fail(f"{what}: HTTP {response.status_code}: {response.text[:500]}{hint}")
    return response.json()


def _ingest_via_api(url: str, api_key: str | None, records: Iterable[RawRecord], path: Path, as_json: bool) -> None:
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
        raise fail(f"{path} has no records")
    with _api_client(url, api_key) as client:
        accepted = _api_call(
            lambda: client.post("/v1/items:bulk", content="\n".join(lines).encode(),
                                headers={"content-type": "application/x-ndjson"}),
            f"submitting {len(lines)} records to {url}",
        )
        job_id = accepted["job_id"]
        with meter(f"job {job_id}", accepted["total"], quiet=as_json) as progress:
            while True:
                job = _api_call(lambda: client.get(f"/v1/jobs/{job_id}"), f"reading job {job_id}")
                status = job["status"] if job["status"] in ("queued", "failed") else ""  # running, done: said by the counts
                progress.update(job["done"], total=job["total"], note=status)
                if job["status"] in ("done", "failed"):
                    break
                time.sleep(POLL_S)
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


@app.command("jobs")
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
        from catalog.jobs import job_progress, recent_jobs

        with catalog_session() as session:
            found = recent_jobs(session, limit) if job_id is None else [job_progress(session, job_id)]
        if found == [None]:
            raise fail(f"no job {job_id}")
    _print_jobs(found, as_json, single=job_id is not None)
