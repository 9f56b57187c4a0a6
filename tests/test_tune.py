"""``mars tune``: the offline grid search (exact against weighted_rrf + the eval metrics, and
recovering a known-better weighting), the dotenv writer, Settings reading the written file
(environment variables override it), and the command end to end on a real IKEA slice."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from dotenv import dotenv_values
from typer.testing import CliRunner

from evaluation.metrics import METRICS, score_queries
from evaluation.dotenv_file import settings_env, update_dotenv
from evaluation.folds import cv_fold
from evaluation.fusion_grid import evaluate_weights
from evaluation.query_lists import QueryLists
from evaluation.tune import tune, weight_grid
from query.fusion import weighted_rrf

TUNED_KEYS = ("MARS_RRF_K", "MARS_WEIGHTS_PHOTO", "MARS_WEIGHTS_TEXT")


def _reference(runs, weights, k):
    """Per-query metrics the slow way: weighted_rrf, the eval's cut to 100, evaluation.metrics."""
    fused = {r.id: [f.id for f in weighted_rrf(r.lists, weights, k)][:100] for r in runs}
    _, per_query = score_queries(fused, {r.id: set(r.relevant) for r in runs})
    return np.asarray([[per_query[r.id][m] for m in METRICS] for r in runs])


def _random_runs(seed: int = 3) -> list[QueryLists]:
    """Synthetic queries of two shapes and four tasks over a small id space (so lists overlap
    and fused scores tie), with rooms shared by several queries."""
    rng = random.Random(seed)
    docs = [f"p{i:03d}" for i in range(60)]
    runs = []
    for task, shape, names in (("room-class", "photo", ("bm25", "text", "image")), ("room-type", "photo", ("bm25", "text", "image")),
                               ("room-title", "text", ("bm25", "text")), ("text-to-image", "text", ("bm25", "text"))):
        for i in range(24):
            relevant = rng.sample(docs, rng.randint(1, 6))
            lists = {}
            for name in names:
                # each list finds the relevant docs with its own skill, among distractors
                skill = {"bm25": 0.5, "text": 0.3, "image": 0.7}[name] + rng.uniform(-0.2, 0.2)
                ranked = sorted(docs, key=lambda d: rng.random() - (skill if d in relevant else 0.0))
                lists[name] = ranked[: rng.randint(10, 40)]
            runs.append(QueryLists(f"{task}-{i}", task, shape, f"room-{i % 7}" if shape == "photo" or task == "room-title" else f"{task}-{i}",
                                   lists, sorted(relevant)))
    return runs


def test_offline_scores_equal_weighted_rrf_and_the_eval_metrics():
    runs = _random_runs()
    for weights, k in (({"bm25": 0.25, "image": 1.0, "text": 0.25}, 60.0), ({"bm25": 2.0, "text": 0.0}, 10.0),
                       ({"bm25": 1 / 3, "text": 0.1, "image": 0.5}, 7.5), ({}, 1.0)):
        np.testing.assert_allclose(evaluate_weights(runs, weights, k), _reference(runs, weights, k), atol=1e-12)


def test_grid_search_picks_the_brute_force_optimum():
    runs = _random_runs()
    k_grid, grid = (10.0, 60.0), (0.0, 0.5, 1.0, 2.0)
    baseline = {"photo": {"bm25": 0.25, "image": 1.0, "text": 0.25}, "text": {"bm25": 1.0, "text": 1.0}}
    report = tune(runs, baseline_k=60.0, baseline_weights=baseline, k_grid=k_grid, grid=grid)

    # brute force over the same grid with the slow reference path: macro mean nDCG@10 per shape, k jointly
    anchors = {"photo": "image", "text": "text"}
    best_total, shapes = -1.0, {"photo": ["bm25", "text", "image"], "text": ["bm25", "text"]}
    for k in k_grid:
        total = 0.0
        for shape, names in shapes.items():
            queries = [r for r in runs if r.shape == shape]
            tasks = sorted({r.task for r in queries})
            best = max(
                np.mean([_reference([r for r in queries if r.task == t], dict(zip(names, row)), k)[:, 0].mean() for t in tasks])
                for row in weight_grid(names, anchors[shape], grid)
            )
            total += best * len(tasks)
        best_total = max(best_total, total / 4)
    assert report["chosen"]["objective"] == pytest.approx(best_total, abs=1e-4)

    # the tuned and baseline rows per task are what weighted_rrf + the metrics give for those settings
    chosen = report["chosen"]
    assert chosen["weights"]["photo"]["image"] == 1.0 and chosen["weights"]["text"]["text"] == 1.0  # the anchors
    for task, row in report["tasks"].items():
        queries = [r for r in runs if r.task == task]
        shape = row["shape"]
        tuned = _reference(queries, chosen["weights"][shape], chosen["rrf_k"]).mean(axis=0)
        base = _reference(queries, baseline[shape], 60.0).mean(axis=0)
        assert [row["tuned"][m] for m in METRICS] == pytest.approx(list(tuned), abs=1e-4)
        assert [row["baseline"][m] for m in METRICS] == pytest.approx(list(base), abs=1e-4)
        assert row["best"]["nDCG@10"] >= row["tuned"]["nDCG@10"] - 1e-9  # a task's own optimum is at least the shared one

    # the cross-validation holds every query out once, by room
    cv = report["cross_validation"]
    assert len(cv["folds"]) == 2 and sum(f["test_queries"] for f in cv["folds"]) == len(runs)
    assert {cv_fold(r.group) for r in runs if r.task == "room-class"} == {0, 1}
    assert set(cv["tasks"]) == set(report["tasks"])


def test_grid_search_recovers_a_known_better_weighting():
    """BM25 finds the one relevant product at rank 1; the photo list ranks it 30th behind 29
    distractors; the text list is noise. At k = 60 the shipped weights (BM25 0.25 against image
    1.0) cannot lift it to the top (0.25/61 + 1/90 < 1/61); the grid must find a setting that does."""
    runs = []
    for i in range(12):
        target = f"r{i}"
        image = [f"d{i}-{j}" for j in range(29)] + [target]
        runs.append(QueryLists(f"q{i}", "room-type", "photo", f"room{i}", {
            "bm25": [target] + [f"b{i}-{j}" for j in range(5)],
            "text": [f"e{i}-{j}" for j in range(10)],
            "image": image,
        }, [target]))
        # a room-scene query of the same room: the photo alone, nothing to fuse
        runs.append(QueryLists(f"s{i}", "room-scene", "photo", f"room{i}", {"image": image}, [image[0]]))
    report = tune(runs, baseline_k=60.0, baseline_weights={"photo": {"bm25": 0.25, "image": 1.0, "text": 0.25}})

    row = report["tasks"]["room-type"]
    assert row["baseline"]["nDCG@10"] < 1.0 and row["tuned"]["nDCG@10"] == 1.0
    w, k = report["chosen"]["weights"]["photo"], report["chosen"]["rrf_k"]
    assert w["bm25"] / (k + 1) + w["image"] / (k + 30) > max(w["image"], w["text"]) / (k + 1)
    assert report["shapes"]["photo"]["anchor"] == "image"
    assert report["shapes"]["photo"]["constraining_tasks"] == ["room-type"]  # room-scene has nothing to fuse
    assert report["tasks"]["room-scene"]["fusable"] is False
    assert report["tasks"]["room-scene"]["tuned"] == report["tasks"]["room-scene"]["baseline"]
    # no text-only queries: the text weights stay as they were, and so does every list not seen
    assert report["chosen"]["settings"]["weights_text"] == {}
    assert report["cross_validation"]["tasks"]["room-type"]["held_out"] == 1.0


def test_dotenv_writer_updates_in_place_and_keeps_other_lines(tmp_path):
    path = tmp_path / ".env"
    path.write_text(
        "# deployment settings\n"
        "MARS_HOME=/srv/mars\n"
        "\n"
        "export MARS_RRF_K=5\n"
        "MARS_WEIGHTS_PHOTO='{\"image\": 3.0}'\n"
        "OTHER_TOOL=keep me # trailing comment\n"
        "MARS_WEIGHTS_PHOTO='{\"image\": 4.0}'\n"
    )
    values = settings_env({"rrf_k": 20, "weights_photo": {"bm25": 0.5, "image": 1.0, "text": 0.1},
                           "weights_text": {"bm25": 0.25, "text": 1.0, "aligned": 1.0}})
    update_dotenv(path, values)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# deployment settings", "MARS_HOME=/srv/mars", ""]
    assert lines[3] == "MARS_RRF_K=20"  # replaced where it was
    assert lines[4].startswith("MARS_WEIGHTS_PHOTO='")
    assert lines[5] == "OTHER_TOOL=keep me # trailing comment"
    assert lines[6].startswith("MARS_WEIGHTS_TEXT=")  # new key appended; the duplicate photo line is gone
    assert len(lines) == 7
    parsed = dotenv_values(path)
    assert json.loads(parsed["MARS_WEIGHTS_PHOTO"]) == {"bm25": 0.5, "image": 1.0, "text": 0.1}
    assert parsed["OTHER_TOOL"] == "keep me" and parsed["MARS_HOME"] == "/srv/mars"

    update_dotenv(path, values)  # idempotent
    assert path.read_text().splitlines() == lines
    fresh = tmp_path / "sub" / "new.env"
    update_dotenv(fresh, values)
    assert [line.split("=")[0] for line in fresh.read_text().splitlines()] == list(TUNED_KEYS)


def test_settings_read_the_written_file_and_the_environment_wins(tmp_path, monkeypatch):
    from mars.settings import Settings

    for key in TUNED_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    assert Settings().rrf_k == Settings.model_fields["rrf_k"].default  # no .env here: the defaults
    update_dotenv(tmp_path / ".env", settings_env({"rrf_k": 20, "weights_photo": {"bm25": 0.5, "image": 1.0},
                                                    "weights_text": {"bm25": 0.25, "text": 1.0}}))
    (tmp_path / ".env").write_text((tmp_path / ".env").read_text() + "UNRELATED=1\n")  # not ours: ignored
    s = Settings()  # ./.env is read by default
    assert s.rrf_k == 20.0 and s.weights_photo == {"bm25": 0.5, "image": 1.0} and s.weights_text == {"bm25": 0.25, "text": 1.0}
    monkeypatch.setenv("MARS_RRF_K", "33")
    monkeypatch.setenv("MARS_WEIGHTS_TEXT", '{"bm25": 2.0}')
    s = Settings()  # the environment replaces a field whole: no key of the file's weights_text is merged in
    assert s.rrf_k == 33.0 and s.weights_text == {"bm25": 2.0} and s.weights_photo == {"bm25": 0.5, "image": 1.0}
    assert Settings(_env_file=None).weights_photo == Settings.model_fields["weights_photo"].get_default(call_default_factory=True)


@pytest.mark.slow
def test_cli_tune_on_a_real_slice_writes_the_env_file(ikea, ikea_slice, slice_home, encoders, tmp_path, monkeypatch):
    import shutil

    import mars.engine
    from mars.cli import app
    from mars.settings import Settings, get_settings

    home = shutil.copytree(slice_home, tmp_path / "mars")  # the session's ingested slice
    queries = tmp_path / "queries.jsonl"
    with queries.open("w") as fh:
        for q in ikea_slice["queries"]:
            fh.write(json.dumps({**q, "image": str(ikea_slice["room"]) if q.get("image") else None}) + "\n")

    work = tmp_path / "work"
    work.mkdir()
    # BM25 weighted 0 for photo queries: the funnel would skip that list, the tuner must still see it
    (work / ".env").write_text("# kept\nMARS_CRITIC=none\nMARS_RRF_K=7\nMARS_WEIGHTS_PHOTO='{\"bm25\": 0.0, \"image\": 1.0}'\n")
    monkeypatch.chdir(work)  # the default --env-file is ./.env
    monkeypatch.setattr(mars.engine, "encoders_for", lambda *a, **k: encoders)
    monkeypatch.setenv("MARS_HOME", str(home))
    for key in TUNED_KEYS:
        monkeypatch.delenv(key, raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["tune", "--queries", str(queries), "--qrels", str(ikea / "qrels" / "dev.tsv"),
                                          "--limit", "2", "--write", "--json", str(tmp_path / "report.json"),
                                          "--save-lists", str(tmp_path / "lists.jsonl")])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "best setting per task" in result.output and "cross-validation" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["tasks"]) == {"room-class", "room-type", "room-scene", "room-title"}
    assert report["baseline"]["rrf_k"] == 7  # the settings in effect, read from ./.env
    assert report["baseline"]["weights"]["photo"] == {"bm25": 0.0, "image": 1.0}
    assert "bm25" in report["tasks"]["room-class"]["lists"] and "bm25" in report["shapes"]["photo"]["lists"]
    assert all(0.0 <= row["tuned"][m] <= 1.0 for row in report["tasks"].values() for m in METRICS)

    lines = (work / ".env").read_text().splitlines()
    assert lines[:2] == ["# kept", "MARS_CRITIC=none"] and len(lines) == 5
    s = Settings()
    assert s.rrf_k == float(report["chosen"]["rrf_k"])
    assert s.weights_photo == report["chosen"]["settings"]["weights_photo"]
    assert s.weights_text == report["chosen"]["settings"]["weights_text"]

    # the saved lists replay without opening the stores and give the same report
    replay = CliRunner().invoke(app, ["tune", "--from-lists", str(tmp_path / "lists.jsonl"), "--json", str(tmp_path / "again.json")])
    assert replay.exit_code == 0, replay.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["chosen"] == {**report["chosen"], "settings": again["chosen"]["settings"]}
    assert "nothing written" in replay.output
