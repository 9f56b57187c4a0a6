"""The ``mars`` command: setup, ingest, jobs, search, serve, eval, categories, train.

Settings come from ``MARS_*`` environment variables (``mars --help`` lists the common ones);
commands open the engine (the stores the settings name) and apply pending catalog migrations
first; ``ingest --via-api`` and ``jobs --api`` talk to a running server instead (with an API key:
``--api-key`` or ``MARS_API_KEY``); ``keys`` manages those keys in the catalog, ``rules`` the
merchandising rules.

This module only assembles :data:`app` from one module per command group, in the order
``mars --help`` lists them: :mod:`~mars.cli.setup` (setup: ingest + every training stage),
:mod:`~mars.cli.ingest` (ingest, jobs), :mod:`~mars.cli.search`
(search, categories), :mod:`~mars.cli.serve`, :mod:`~mars.cli.evaluate` (eval, lock-accuracy,
tune), the groups :mod:`~mars.cli.keys` and :mod:`~mars.cli.rules`, and ``train`` from
:mod:`~mars.cli.train` (critic, category-head, align, whitening, prior), :mod:`~mars.cli.distill`
(mine, label, sft, eval-critic) and :mod:`~mars.cli.encoders` (encoder, text-embedder). What the
command modules share is in :mod:`mars.cli.common`, and their progress display (a rich bar on a
terminal, plain lines elsewhere) in :mod:`mars.cli.progress`; they never import each other.
"""

from __future__ import annotations

import typer

from mars.cli import distill, encoders, evaluate, ingest, keys, rules, search, serve, setup, train

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
"""The ``mars`` Typer app (the console entry point ``mars = "mars.cli:app"``)."""

train_app = typer.Typer(help="Train MARS models on a catalog's own data.", no_args_is_help=True)
"""The ``mars train`` group."""

for commands in (setup.app, ingest.app, search.app, serve.app, evaluate.app):  # nameless: their commands join `mars`
    app.add_typer(commands)
app.add_typer(keys.app, name="keys")
app.add_typer(rules.app, name="rules")
for commands in (train.app, distill.app, encoders.app):  # nameless: their commands join `mars train`
    train_app.add_typer(commands)
app.add_typer(train_app, name="train")


def main() -> None:  # pragma: no cover - console entry
    """Run the ``mars`` command line (``python -m mars.cli``)."""
    app(prog_name="mars")


__all__ = ["app", "main", "train_app"]
