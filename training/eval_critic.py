"""``mars train eval-critic``: how well the distilled student agrees with its teacher, and what
it does to the ranking.

* **Agreement** on held-out label rows (:mod:`training.label`): the student's score against the
  teacher's, as mean absolute error (MAE, score units in [0, 1]) and Spearman's rank
  correlation, for the student's two read-outs — ``json`` (the generated
  ``{"score", "rationale"}``, the sequence it was distilled on; answers that stay invalid after
  the repair round are counted, not scored) and ``fast`` (``P(yes)`` of one forward pass, the
  read-out for pairs outside ``MARS_CRITIC_RATIONALE_TOP_K``).
* **Ranking gain** on qrels: nDCG@10 of ``--mode hybrid`` against ``--mode full`` with the student
  as the critic (:func:`evaluation.runner.run_eval` on an engine whose settings say
  ``MARS_CRITIC=vlm``, ``MARS_CRITIC_MODEL``, ``MARS_CRITIC_ADAPTER``).
* **Held-out check**: when the adapter folder has the ``trainer_state.json`` of
  :mod:`training.sft`, how many evaluated labels come from rooms the student was trained on.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from critic.prompt import CriticAnswerError
from training.label import teacher_answers
from training.rows import RowImages, label_answer, row_pair


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (float64 (n,)), tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation rho of two equally long score lists (float, in [-1, 1]).

    Definition (Spearman, "The proof and measurement of association between two things",
    Am. J. Psychol. 15, 1904): the Pearson correlation of the two rank variables, tied values
    taking the average of the ranks they span. Uses :func:`scipy.stats.spearmanr` when scipy is
    installed (it is, through sentence-transformers), else computes exactly that definition
    here. Returns NaN for fewer than 2 pairs or a constant list (rho is undefined).

    Raises:
        ValueError: the lists differ in length.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equally long lists, got {a.shape} and {b.shape}")
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = _average_ranks(a), _average_ranks(b)
        return float(np.corrcoef(ra, rb)[0, 1])
    return float(spearmanr(a, b).statistic)


def _scored(student: list[float], teacher: list[float]) -> dict[str, float | int]:
    if not student:
        return {"pairs": 0, "mae": float("nan"), "spearman": float("nan")}
    s, t = np.asarray(student), np.asarray(teacher)
    return {"pairs": len(s), "mae": round(float(np.abs(s - t).mean()), 4), "spearman": round(spearman(s, t), 4)}


def agreement(student: Any, rows: Sequence[dict[str, Any]], *, generate: bool = True) -> dict[str, Any]:
    """The student's agreement with the teacher labels ``rows``.

    Args:
        student: a :class:`~critic.vlm.QwenVLCritic` (its ``batch_size`` batches the pairs).
        rows: label rows (each label is validated).
        generate: also score the generated JSON (slow on CPU); False scores P(yes) only.

    Returns:
        ``{"labels": n, "json": {"pairs", "valid", "mae", "spearman", "invalid_reasons"},
        "fast": {"pairs", "mae", "spearman"}}``; MAE in score units, NaN where undefined.

    Raises:
        ValueError: an invalid teacher label. FileNotFoundError / OSError: a photo a row names.
    """
    images = RowImages()
    teacher = [label_answer(r).score for r in rows]
    pairs = [row_pair(r, images) for r in rows]
    report: dict[str, Any] = {"labels": len(rows)}
    if generate:
        got: list[tuple[float, float]] = []
        reasons: Counter[str] = Counter()
        for start in range(0, len(pairs), student.batch_size):
            batch = pairs[start:start + student.batch_size]
            for t, (answer, _) in zip(teacher[start:], teacher_answers(student, batch)):
                if isinstance(answer, CriticAnswerError):
                    reasons[answer.reason] += 1
                else:
                    got.append((answer.score, t))
        report["json"] = {**_scored([s for s, _ in got], [t for _, t in got]), "valid": len(got),
                          "invalid_reasons": dict(reasons.most_common(3))}
    fast = student.yes_probabilities(pairs).tolist() if pairs else []
    report["fast"] = _scored(fast, teacher)
    return report


def held_out_check(adapter: Path, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How many of ``rows`` come from rooms the adapter was trained on (its
    ``trainer_state.json`` lists them), or None when the adapter has no trainer state."""
    path = Path(adapter) / "trainer_state.json"
    if not path.is_file():
        return None
    rooms = set(json.loads(path.read_text()).get("train_rooms", []))
    seen = sum(1 for r in rows if str(r.get("room_id")) in rooms)
    return {"train_rooms": len(rooms), "labels_from_train_rooms": seen, "labels": len(rows)}


def ranking_gain(engine: Any, queries: Path, qrels: Path, *, tasks: Sequence[str], limit: int | None = None,
                 progress: bool = False) -> dict[str, dict[str, float]]:
    """nDCG@10 per task of ``--mode hybrid`` and ``--mode full`` (the engine's critic re-ranks
    its top ``MARS_CRITIC_TOP_N``) on the judged queries of ``tasks`` (at most ``limit`` per task).

    Returns:
        task -> ``{"queries", "hybrid", "full", "gain", "unavailable", "reason"}`` (nDCG@10 in
        [0, 1], gain = full - hybrid; ``unavailable``: queries whose critic could not judge them,
        e.g. an answer still invalid after the repair round, scored with the fused order, so
        they pull the gain towards 0; ``reason``: the first such query's critic detail, or None).

    Raises:
        FileNotFoundError: a queries/qrels file or a query photo is missing.
    """
    from evaluation.beir import load_queries
    from evaluation.runner import run_eval

    runs = {mode: run_eval(engine, queries, qrels, mode=mode, tasks=list(tasks), limit=limit, progress=progress)
            for mode in ("hybrid", "full")}
    task_of = {q.id: q.task for q in load_queries(queries)}
    unavailable: dict[str, list[str]] = {}
    for qid, critic in runs["full"]["critic"].items():
        if critic["status"] == "unavailable":
            unavailable.setdefault(task_of.get(qid, ""), []).append(critic["detail"])
    out = {}
    for task, row in runs["hybrid"]["tasks"].items():
        hybrid, full = row["nDCG@10"], runs["full"]["tasks"][task]["nDCG@10"]
        missed = unavailable.get(task, [])
        out[task] = {"queries": row["queries"], "hybrid": hybrid, "full": full, "gain": round(full - hybrid, 4),
                     "unavailable": len(missed), "reason": missed[0] if missed else None}
    return out
