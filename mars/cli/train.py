"""``mars train critic|category-head|align|whitening|prior``: fit the learned critic, the
category head, the cross-modal alignment heads, the image whitening and the staging prior on a
catalog's own data (:mod:`training.critic`, :mod:`training.category_head`, :mod:`training.align`,
:mod:`training.whitening`, :mod:`indexing.staging_prior`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mars.cli.common import console, fail, json_ready, open_engine
from mars.cli.progress import meter

app = typer.Typer()


@app.command("critic")
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

    try:
        room_queries = [q for q in load_queries(queries) if q.task in ROOM_TASKS]
        judged = load_qrels(qrels)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(exc) from exc
    engine = open_engine()
    try:
        with meter("critic: mining pairs", sum(1 for q in room_queries if judged.get(q.id)), unit="queries",
                   quiet=as_json) as progress:
            mined = mine_out_of_fold(engine, room_queries, judged, depth=depth, controls=controls,
                                     on_query=progress.advance)
        report: dict = {"pairs": sum(len(m.pairs) for m in mined), "queries": len(mined)}
        with meter(f"critic: {folds}-fold cross-validation and fit" if folds else "critic: fit", quiet=as_json):
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


@app.command("category-head")
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

    engine = open_engine()
    try:
        data = collect(engine)  # the stores are released before training
    except ValueError as exc:
        raise fail(exc) from exc
    finally:
        engine.close()
    try:
        with meter("category-head: L-BFGS fits", quiet=as_json):
            head, report = train(data, holdout=holdout, seed=seed, min_class_size=min_class_size,
                                 l2=DEFAULT_L2 if l2 is None else l2, max_iter=max_iter)
    except ValueError as exc:
        raise fail(exc) from exc
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


@app.command("align")
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
    engine = open_engine()
    try:
        with meter("align", fits * epochs, unit="epochs", quiet=as_json) as progress:

            def on_epoch(phase: str, epoch: int, loss: float) -> None:
                last = progress.done + 1 >= fits * epochs  # then the collection is rewritten, unmetered
                progress.advance(note=f"{phase} · loss {loss:.3f}" + (" · rewriting the vectors" if last else ""))

            report = train_align(engine, config, on_epoch)
    except (RuntimeError, ValueError) as exc:
        raise fail(exc) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(json_ready(asdict(report))))
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


@app.command("whitening")
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
        raise fail(ValueError("--queries and --qrels go together (the learned stage needs both)"))
    engine = open_engine()
    try:
        photos = room_photos(rooms)
        judged = judged_photos(load_queries(queries), load_qrels(qrels)) if queries and qrels else None
        with meter("whitening: room regions", len(photos), unit="photos", quiet=as_json) as progress:

            def on_photo() -> None:
                progress.advance(note="fitting the whitening" if progress.done + 1 >= len(photos) else None)

            white = fit_whitening(engine, photos, judged=judged, dim=dim, eps=eps, learned_dim=learned_dim, shrink=shrink,
                                  region_step=region_step, on_photo=on_photo)
        engine.install_whitening(white)
    except (FileNotFoundError, InvalidImage, RuntimeError, ValueError) as exc:
        raise fail(exc) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(json_ready(white.meta)))
        return
    m = white.meta
    console.print(f"whitening fitted on {m['products']} product photos + {m['regions']} regions of {m['room_photos']} room "
                  f"photos: {m['dim']} of {white.input_dim} dimensions, {m['variance_kept']:.1%} of the variance, eps {m['eps']}")
    if "learned" in m:
        learned = m["learned"]
        console.print(f"learned stage: {learned['pairs']} (region, product) pairs from {learned['judged_photos']} judged "
                      f"photos, {learned['dim']} dimensions, shrink {learned['shrink']}")
    console.print(f"{m['seconds']} s; written to {whitening_path(engine.home)}")


@app.command("prior")
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
        raise fail(exc) from exc
    engine = open_engine()
    try:
        engine.install_prior(prior)
    finally:
        engine.close()
    rooms = ", ".join(f"{k} {n}" for k, n in sorted(prior.rooms.items(), key=lambda kv: -kv[1]))
    console.print(f"staging prior: {sum(prior.rooms.values())} rooms ({rooms}), {len(prior.counts)} products; "
                  f"written to {staging_prior_path(engine.home)}")
