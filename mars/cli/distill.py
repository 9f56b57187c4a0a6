"""``mars train mine|label|sft|eval-critic``: distil a teacher critic into a small VLM student —
mine (room, product) pairs, label them with the teacher, (Q)LoRA-tune the student on the labels
and measure it (:mod:`training.mine_pairs`, :mod:`training.label`, :mod:`training.sft`,
:mod:`training.eval_critic`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mars.cli.common import console, fail, json_ready, open_engine
from mars.cli.progress import CountedSearches, meter
from mars.settings import get_settings

DISTILL_TASKS_HELP = "Room tasks to use (repeatable); default room-class and room-type."
"""``--task`` help of ``mars train mine`` and ``mars train eval-critic`` (training.mine_pairs.DISTILL_TASKS)."""

app = typer.Typer()


@app.command("mine")
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
        raise fail(exc) from exc
    tasks = tuple(task or DISTILL_TASKS)
    engine = open_engine()
    try:
        total = len(limit_queries(all_queries, judged, tasks, limit, seed))
        with meter("mine: mining pairs", total, unit="queries", quiet=as_json) as progress:
            rows = mine_pairs(engine, all_queries, judged, counts=counts, tasks=tasks, limit=limit, seed=seed,
                              on_query=progress.advance)
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
@app.command("label")
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
        raise fail(exc) from exc
    try:
        with meter(f"label ({teacher})", len(rows), unit="pairs", quiet=as_json) as progress:
            report = label_pairs(critic, rows, out, teacher_name=teacher, teacher_model=model, batch_size=batch_size,
                                 retry_rejected=retry_rejected, on_batch=progress.advance)
            progress.update(len(rows))
    except (OSError, ValueError) as exc:
        raise fail(exc) from exc
    except Exception as exc:  # the teacher's transport errors (openai.APIError, ...): what was answered is saved
        raise fail(f"the {teacher} teacher failed: {exc.__class__.__name__}: {exc}; the labels "
                   f"written so far are in {out}: run the same command again to resume", code=1) from exc
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


@app.command("sft")
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
        with meter("sft", unit="steps", quiet=as_json) as progress:

            def on_step(step: int, total: int, loss: float) -> None:
                progress.update(step, total=total, note=f"loss {loss:.4f}")

            result = train_sft(labels, model, out, config, resume=resume, on_step=on_step)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        raise fail(exc) from exc
    if as_json:
        console.print_json(json.dumps(json_ready(result.as_dict())))
        return
    history = result.loss_history
    first, last = (history[0]["loss"], history[-1]["loss"]) if history else (float("nan"), float("nan"))
    console.print(f"step {result.step} (epoch {result.epoch:.2f}; resumed from step {result.resumed_from}); "
                  f"loss {first:.4f} -> {last:.4f}; adapter: {result.final}")


@app.command("eval-critic")
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
    from evaluation.runner import select_queries
    from training.eval_critic import agreement, held_out_check, ranking_gain
    from training.mine_pairs import DISTILL_TASKS
    from training.rows import read_jsonl

    if (queries is None) != (qrels is None):
        raise fail(ValueError("the nDCG@10 table needs both --queries and --qrels"))
    base = get_settings()
    settings = base.model_copy(update={
        "critic": "vlm", "critic_model": model, "critic_adapter": adapter, "critic_queue": False,
        "critic_rationale_top_k": base.critic_rationale_top_k if rationale_top_k is None else rationale_top_k,
    })
    engine = None
    try:
        rows = read_jsonl(labels, required=("query_id", "product_id", "product_text", "score", "rationale"))
        if queries is not None:
            engine = open_engine(settings)
            student = engine.critic
        else:
            from mars.registry import build_critic

            student, _ = build_critic(settings)
        if max_new_tokens is not None:
            student.max_new_tokens = max_new_tokens
        with meter("eval-critic: agreement with the labels", quiet=as_json):  # no per-pair hook
            agree = agreement(student, rows, generate=generate)
        report: dict = {"model": model, "adapter": str(adapter) if adapter else None, "agreement": agree,
                        "held_out": held_out_check(adapter, rows) if adapter else None}
        if engine is not None:
            tasks = list(task or DISTILL_TASKS)
            chosen, _ = select_queries(queries, qrels, tasks=tasks, limit=limit)
            with meter("eval-critic: hybrid, then full", 2 * len(chosen), unit="queries", quiet=as_json) as progress:
                report["ranking"] = ranking_gain(CountedSearches(engine, progress.advance), queries, qrels,
                                                 tasks=tuple(tasks), limit=limit)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        raise fail(exc) from exc
    finally:
        if engine is not None:
            engine.close()
    if as_json:
        console.print_json(json.dumps(json_ready(report)))
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
        for col in ("task", "queries", "hybrid", "full (student)", "gain", "critic unavailable"):
            gain.add_column(col, justify="left" if col == "task" else "right")
        for t, row in report["ranking"].items():
            gain.add_row(t, str(row["queries"]), f"{row['hybrid']:.4f}", f"{row['full']:.4f}", f"{row['gain']:+.4f}",
                         str(row["unavailable"]))
        console.print(gain)
        for t, row in report["ranking"].items():
            if row["unavailable"]:
                console.print(f"[yellow]{t}: the student could not judge {row['unavailable']} queries[/yellow] (scored "
                              f"with the fused order), e.g. {row['reason']}; rank with --rationale-top-k 0 to use "
                              "its P(yes) only")
