"""``mars train encoder`` and ``mars train text-embedder``: fine-tune the search encoders on the
catalog's own products (:mod:`training.dual_encoder`, :mod:`training.text_embedder`).

Both commands read the catalog only (:func:`mars.cli.common.catalog_session`: no store, no owner
lock), so they run while ``mars serve`` owns the stores; the trained model is used by
re-ingesting with the new encoder settings (the index refuses vectors of other encoders:
``MARS_HOME/index/manifest.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from mars.cli.common import catalog_session, console, fail, json_ready
from mars.cli.progress import Meter, meter

ENCODER_HELP = """Fine-tune a transformers SigLIP or CLIP image-text model (both towers) on the
catalog's own products, for MARS_IMAGE_ENCODER / MARS_TEXT_ENCODER=hf:<out>.

What it trains: LoRA adapters (peft) on the q_proj and v_proj projections of every attention
block of the text AND the vision tower, plus the temperature logit_scale (and logit_bias for
SigLIP); everything else stays frozen. Loss: SigLIP's pairwise sigmoid loss (Zhai et al. 2023)
for a SigLIP base, CLIP's symmetric InfoNCE (Radford et al. 2021) for a CLIP base (detected from
config.model_type). Products with identical texts in a batch are not treated as negatives.

Data: every catalog product with a local photo (URL photos and missing files are skipped),
paired with the text "<colour> <type>, <title>" (colour and type lower-cased, e.g. "white
armchair, POÄNG"). A seeded --holdout share of the products is held out; held-out text->image
Recall@1/5/10, MRR and loss are printed before and after training.

Output: the LoRA weights are merged into the model and --out gets the plain model, tokenizer
and image processor (save_pretrained) plus mars_training.json (the report). Use it with
  MARS_IMAGE_ENCODER=hf:<out> MARS_TEXT_ENCODER=hf:<out> mars ingest ...
into a fresh MARS_HOME (an index built with other encoders refuses the new ones).
--base must be a local directory written by save_pretrained (model, tokenizer, image
processor); nothing is downloaded."""

TEXT_EMBEDDER_HELP = """Fine-tune a sentence-transformers text embedder (default: the packaged
all-MiniLM-L6-v2) on the catalog's own products, for MARS_TEXT_ENCODER=st:<out>.

What it trains: every weight of the model, with sentence-transformers'
MultipleNegativesRankingLoss (Henderson et al. 2017: each short query-like anchor must pick its
product's text among the other products' texts of the batch); batches never repeat a text, so
products sharing an anchor are not each other's negatives.

Data: pairs (anchor, positive) from every catalog product. The positive is the product text as
ingestion embeds it ("<type>, <colour>. <title>. <description>"); the anchor (--anchor) is the
lower-cased "<colour> <type>" ("white frame"), the title ("RIBBA") or both (one pair each,
the default). A seeded --holdout share of the products is held out; held-out text->text
Recall@1/5/10, MRR and MNRL loss are printed before and after training.

Output: --out is a sentence-transformers model directory (plus mars_training.json). Use it with
  MARS_TEXT_ENCODER=st:<out> mars ingest ...
into a fresh MARS_HOME (an index built with other encoders refuses the new one)."""


app = typer.Typer()

ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="torch CPU threads (default: torch's own; 1 is often faster on a busy shared machine).")]


def _metrics_table(title: str, key: str, before: dict | None, after: dict | None) -> Table:
    """Held-out R@1/5/10, MRR and loss before and after training, from the reports' ``key`` metrics."""
    table = Table(title=title)
    for col in ("", "R@1", "R@5", "R@10", "MRR", "loss"):
        table.add_column(col, justify="left" if not col else "right")
    for name, m in (("before", before), ("after", after)):
        if m is None:
            continue
        r = m[key]
        loss = "n/a" if m["loss"] is None else f"{m['loss']:.4f}"
        table.add_row(name, f"{r['R@1']:.4f}", f"{r['R@5']:.4f}", f"{r['R@10']:.4f}", f"{r['MRR']:.4f}", loss)
    return table


def _on_step(progress: Meter) -> Callable[[int, int, float], None]:
    """The ``on_step(step, total, loss)`` callback of the trainers, moving ``progress``."""

    def on_step(step: int, total: int, loss: float) -> None:
        progress.update(step, total=total, note=f"loss {loss:.4f}")

    return on_step


def _threads(threads: Optional[int]) -> None:
    """Set torch's CPU thread count when ``--threads`` was given."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@app.command("encoder", help=ENCODER_HELP)
def train_encoder(
    base: Annotated[Path, typer.Option("--base", help="Local SigLIP or CLIP directory (save_pretrained: model, tokenizer, image processor).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged model (MARS_*_ENCODER=hf:<out>) and mars_training.json.")],
    epochs: Annotated[float, typer.Option("--epochs", min=0.0, help="Passes over the training pairs (ignored with --max-steps).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimizer steps in all.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Pairs per step (in-batch negatives).")] = 32,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate (LoRA weights, logit scale/bias).")] = 1e-4,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1, help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option("--lora-alpha", min=1, help="LoRA alpha (update scale alpha/r).")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", min=0.0, max=0.99, help="Dropout on the LoRA input.")] = 0.05,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0, help="Linear learning-rate warm-up steps.")] = 0,
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.99, help="Share of products held out for the before/after metrics.")] = 0.1,
    max_items: Annotated[Optional[int], typer.Option("--max-items", min=2, help="Use at most this many products (seeded sample).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sample, split, batch order, LoRA init and dropout seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")] = "auto",
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    from training.dual_encoder import DualEncoderConfig, collect_pairs, train_dual_encoder

    _threads(threads)
    try:
        config = DualEncoderConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, lora_r=lora_r,
                                   lora_alpha=lora_alpha, lora_dropout=lora_dropout, warmup_steps=warmup_steps,
                                   holdout=holdout, max_items=max_items, seed=seed, device=device)
        with catalog_session() as session:
            data = collect_pairs(session)
        with meter("encoder", unit="steps", quiet=as_json) as progress:
            report = train_dual_encoder(base, out, data, config, _on_step(progress))
    except (ValueError, RuntimeError, OSError) as exc:  # EncoderConfigError is a ValueError
        raise fail(exc) from exc
    if as_json:
        console.print_json(json.dumps(json_ready(report)))
        return
    _print_encoder(report)


@app.command("text-embedder", help=TEXT_EMBEDDER_HELP)
def train_text_embedder_command(
    out: Annotated[Path, typer.Option("--out", help="Directory for the fine-tuned model (MARS_TEXT_ENCODER=st:<out>) and mars_training.json.")],
    base: Annotated[Optional[str], typer.Option("--base", help="st:<dir> of a sentence-transformers model; default the packaged all-MiniLM-L6-v2.")] = None,
    anchor: Annotated[str, typer.Option("--anchor", help="Anchor texts: colour-type, title or both.")] = "both",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training pairs (ignored with --max-steps).")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimizer steps in all.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Pairs per step (in-batch negatives).")] = 32,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak AdamW learning rate (10% warm-up, then linear decay).")] = 2e-5,
    holdout: Annotated[float, typer.Option("--holdout", min=0.0, max=0.99, help="Share of products held out for the before/after metrics.")] = 0.2,
    max_items: Annotated[Optional[int], typer.Option("--max-items", min=2, help="Use at most this many products (seeded sample).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sample, split, batches and dropout seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda ...")] = "auto",
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    from training.text_embedder import TextEmbedderConfig, collect_text_pairs, train_text_embedder

    _threads(threads)
    try:
        config = TextEmbedderConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                                    holdout=holdout, max_items=max_items, seed=seed, device=device)
        with catalog_session() as session:
            data = collect_text_pairs(session, anchor)
        with meter("text-embedder", unit="steps", quiet=as_json) as progress:
            report = train_text_embedder(base, out, data, config, _on_step(progress))
    except (ValueError, RuntimeError, OSError) as exc:
        raise fail(exc) from exc
    if as_json:
        console.print_json(json.dumps(json_ready(report)))
        return
    _print_text(report)


def _print_encoder(report: dict[str, Any]) -> None:
    """``mars train encoder``'s report: held-out text->image metrics, data, steps, loss and where the model went."""
    if report["before"] is not None:
        n = report["before"]["text_to_image"]
        console.print(_metrics_table(f"{report['model_type']} text->image, held-out products ({report['held_out']}: "
                                     f"{n['queries']} distinct texts, {n['documents']} photos)",
                                     "text_to_image", report["before"], report["after"]))
    d, sb = report["data"], report["logit_scale_bias"]
    scale = ", ".join(f"{k} {sb['before'][k]:.4f} -> {sb['after'][k]:.4f}" for k in sb["after"])
    console.print(f"{d['pairs']} pairs of {d['products']} products ({d['without_image']} without photo, {d['remote_image']} URL "
                  f"photos, {d['missing_file']} missing files); trained on {report['train']}; {report['steps']} steps, loss "
                  f"{report['loss_first']:.4f} -> {report['loss_last']:.4f}; {scale}; "
                  f"{report['trainable_parameters']} trainable parameters")
    console.print(f"model written to {report['out']}: MARS_IMAGE_ENCODER=hf:{report['out']} MARS_TEXT_ENCODER=hf:{report['out']}")


def _print_text(report: dict[str, Any]) -> None:
    """``mars train text-embedder``'s report: held-out text->text metrics, pairs, steps, loss and where the model went."""
    if report["before"] is not None:
        n = report["before"]["text_to_text"]
        console.print(_metrics_table(f"text->text, held-out products ({n['queries']} distinct anchors, {n['documents']} texts)",
                                     "text_to_text", report["before"], report["after"]))
    console.print(f"{report['train']} training pairs ({report['data']['anchor']} anchors) of {report['products']} products; "
                  f"{report['steps']} steps, loss {report['loss_first']:.4f} -> {report['loss_last']:.4f}")
    console.print(f"model written to {report['out']}: MARS_TEXT_ENCODER=st:{report['out']}")
