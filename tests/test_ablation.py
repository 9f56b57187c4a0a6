"""``mars eval --ablation`` on a real slice of the IKEA catalog: every configuration row per task,
metrics in [0, 1], the critic row with and without a critic, the Markdown table and the PNG chart."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from critic.features import FEATURES
from critic.learned import ClassStats, LearnedCritic
from evaluation.ablation import ABLATION_METRICS, CONFIGS, NO_CRITIC, markdown_ablation, run_ablation, write_ablation
from evaluation.baseline import NaiveIndex
from evaluation.runner import run_eval

pytestmark = pytest.mark.slow

#: Which configurations cannot run a task's queries (the slice's room has no text-to-image queries).
NOT_APPLICABLE = {"room-scene": {"bm25", "text", "aligned"}, "room-title": {"image"}}


def _slice_queries(ikea_slice, tmp_path):
    """The slice room's queries as a queries.jsonl with absolute image paths."""
    path = tmp_path / "queries.jsonl"
    with path.open("w") as fh:
        for q in ikea_slice["queries"]:
            q = dict(q)
            if q.get("image"):
                q["image"] = str(ikea_slice["room"])
            fh.write(json.dumps(q) + "\n")
    return path


def _check_rows(report, critic_configured: bool) -> None:
    assert set(report["tasks"]) == {"room-class", "room-type", "room-scene", "room-title"}
    for task, entry in report["tasks"].items():
        assert set(entry["rows"]) == {c.key for c in CONFIGS}, task
        for key, cell in entry["rows"].items():
            if key in NOT_APPLICABLE.get(task, ()):
                assert cell["note"].startswith("n/a"), (task, key, cell)
            elif key == "aligned":  # the slice has no alignment heads (tests/test_align.py trains them)
                assert cell["note"] in ("n/a (no aligned vector: run mars train align)", "n/a (no query text)"), (task, cell)
            elif key == "full" and not critic_configured:
                assert cell == {"note": NO_CRITIC}
            else:
                assert cell["queries"] == entry["queries"], (task, key, cell)
                assert all(0.0 <= cell[m] <= 1.0 for m in ABLATION_METRICS), (task, key, cell)


def test_ablation_on_a_real_slice_with_a_learned_critic(ikea, ikea_slice, slice_home, make_engine, tmp_path):
    # a hand-set learned critic (score rises with the best room-region cosine) through the real checkpoint path
    weights = np.array([1.0 if f == "visual_max" else 0.0 for f in FEATURES], np.float32)
    checkpoint = tmp_path / "critic.safetensors"
    LearnedCritic(weights, 0.0, np.zeros(len(FEATURES), np.float32), np.ones(len(FEATURES), np.float32),
                  ClassStats()).save(checkpoint)
    engine = make_engine(shutil.copytree(slice_home, tmp_path / "mars"), critic_checkpoint=checkpoint)

    naive = NaiveIndex.from_engine(engine)
    assert len(naive.ids) == len(ikea_slice["records"]) and naive.image is not None

    queries, qrels = _slice_queries(ikea_slice, tmp_path), ikea / "qrels" / "dev.tsv"
    report = run_ablation(engine, queries, qrels, limit=2, progress=False, baseline=naive)
    _check_rows(report, critic_configured=True)
    plain = run_eval(engine, queries, qrels, mode="hybrid", limit=2, progress=False)  # what `mars eval` reports
    assert {t: e["rows"]["hybrid"]["nDCG@10"] for t, e in report["tasks"].items()} == {
        t: row["nDCG@10"] for t, row in plain["tasks"].items()}
    assert report["critic"]["backend"] == "learned" and report["critic"]["statuses"].get("scored", 0) > 0
    assert report["tasks"]["room-class"]["queries"] == 2 and report["tasks"]["room-scene"]["queries"] == 1
    # the slice holds every product of the room, so the room-scene photo finds some of them
    assert report["tasks"]["room-scene"]["rows"]["image"]["Success@10"] == 1.0

    md, png = write_ablation(report, tmp_path / "out")
    text = md.read_text()
    assert text == markdown_ablation(report)
    assert text.startswith("| configuration | room-class (2) |")
    assert all(c.label in text for c in CONFIGS) and "Critic: learned" in text
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 400
    assert png.stat().st_size > 20_000


def test_cli_eval_ablation_without_a_critic(ikea, ikea_slice, slice_home, encoders, tmp_path, monkeypatch):
    import mars.engine
    from mars.cli import app
    from mars.settings import get_settings

    home = shutil.copytree(slice_home, tmp_path / "cli-mars")
    monkeypatch.setattr(mars.engine, "encoders_for", lambda *a, **k: encoders)  # reuse the session's encoders
    monkeypatch.setenv("MARS_HOME", str(home))
    monkeypatch.setenv("MARS_CRITIC", "none")
    get_settings.cache_clear()
    out = tmp_path / "docs"
    try:
        result = CliRunner().invoke(app, ["eval", "--ablation", "--queries", str(_slice_queries(ikea_slice, tmp_path)),
                                          "--qrels", str(ikea / "qrels" / "dev.tsv"), "--limit", "1",
                                          "--task", "room-class", "--task", "room-scene", "--out-dir", str(out)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    text = (out / "ablation.md").read_text()
    assert text.startswith("| configuration | room-class (1) | room-scene (1) |")
    assert f"| hybrid + critic (mode full) | {NO_CRITIC} | {NO_CRITIC} |" in text
    assert "| BM25 only |" in text and "n/a (no query text)" in text
    with Image.open(out / "ablation.png") as img:
        assert img.format == "PNG" and img.width > 600
