"""Teacher -> student distillation of the stage-3 critic (training/mine_pairs.py, label.py, sft.py,
eval_critic.py and the `mars train mine|label|sft|eval-critic` commands), on a real slice of the
IKEA data, the real funnel, the tiny random-init Qwen2-VL of tests/tiny_qwen2vl.py and a
loopback chat-completions server."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from critic.prompt import JSON_QUESTION, CriticAnswer, build_prompt
from evaluation.beir import load_qrels, load_queries
from test_openai_critic import completion, running_server
from training.eval_critic import spearman
from training.label import prompt_version, rejected_path
from training.mine_pairs import KINDS, PerQuery, mine_pairs
from training.rows import PAIR_FIELDS, RowImages, answer_json, label_answer, read_jsonl, row_pair
from training.sft import IGNORE_INDEX, SFTConfig, load_student, train_sft, training_batch

pytestmark = [pytest.mark.slow,  # peft vs transformers 5:
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
API_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def slice_home(slice_home, ikea, ikea_slice, tmp_path_factory):
    """A copy of the session's ingested slice (tests/conftest.py), its room queries (absolute
    photo paths) and the qrels."""
    home = shutil.copytree(slice_home, tmp_path_factory.mktemp("distill") / "mars")
    queries = home.parent / "queries.jsonl"
    with queries.open("w") as fh:
        for q in ikea_slice["queries"]:
            fh.write(json.dumps({**q, "image": str(ikea / q["image"]) if q.get("image") else None}) + "\n")
    return {"home": home, "queries": queries, "qrels": ikea / "qrels" / "dev.tsv"}


@pytest.fixture(scope="module")
def mined(slice_home, encoders):
    from mars.engine import Engine
    from mars.settings import Settings

    queries, qrels = load_queries(slice_home["queries"]), load_qrels(slice_home["qrels"])
    engine = Engine(Settings(home=slice_home["home"]), encoders=encoders)
    try:
        counts = PerQuery(positives=2, negatives=3, controls=2)
        first = mine_pairs(engine, queries, qrels, counts=counts, seed=3)
        again = mine_pairs(engine, queries, qrels, counts=counts, seed=3)
        limited = mine_pairs(engine, queries, qrels, counts=counts, seed=3, limit=1)
    finally:
        engine.close()
    path = slice_home["home"].parent / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in first))
    return {"rows": first, "again": again, "limited": limited, "path": path, "qrels": qrels}


@pytest.fixture(scope="module")
def model_dir(tiny_qwen2vl_dir):
    """The tiny random-init Qwen2-VL (tests/tiny_qwen2vl.py, written once per session by conftest)."""
    return tiny_qwen2vl_dir


def _cli(args, env, monkeypatch):
    from mars.cli import app
    from mars.settings import get_settings

    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------- mine


def test_mine_picks_every_kind_with_reasons_and_is_deterministic(mined, ikea_slice):
    rows, qrels = mined["rows"], mined["qrels"]
    assert rows and {r["kind"] for r in rows} == set(KINDS)
    assert {r["task"] for r in rows} == {"room-class", "room-type"}
    room = ikea_slice["room_products"]
    for r in rows:
        assert set(r) == set(PAIR_FIELDS)
        assert r["reason"] and r["room_image"].endswith(".jpg") and r["product_text"]
        assert r["query"] and r["room_id"] == ikea_slice["room"].stem and isinstance(r["fused_rank"], int)
        assert r["relevant"] == (r["product_id"] in qrels[r["query_id"]])
        if r["kind"] == "hard_negative":
            assert r["product_id"] not in qrels[r["query_id"]] and r["product_id"] not in room
            assert not r["in_room"] and "not in the room" in r["reason"]
        if r["kind"] == "hard_positive":
            assert r["relevant"] and f"fused rank {r['fused_rank']}" in r["reason"]
    negatives = [r for r in rows if r["kind"] == "hard_negative"]
    assert any(re.match(r"fused rank \d+.*same class '[a-z ]+'", r["reason"]) for r in negatives)
    assert mined["again"] == rows  # same seed, same pairs
    assert {r["task"] for r in mined["limited"]} == {"room-class", "room-type"}
    assert len({r["query_id"] for r in mined["limited"]}) == 2  # --limit: per task
    by_query = {}
    for r in rows:  # within a query: hard positives ranked lowest first, negatives best first
        by_query.setdefault((r["query_id"], r["kind"]), []).append(r["fused_rank"])
    for (_, kind), ranks in by_query.items():
        if kind == "hard_positive":
            assert ranks == sorted(ranks, reverse=True)


# ---------------------------------------------------------------- label


def test_label_with_the_vlm_teacher_rejects_with_reasons_and_resumes(mined, model_dir, tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in mined["rows"][:5]))
    out = tmp_path / "labels.jsonl"
    args = ["train", "label", "--teacher", "vlm", "--pairs", pairs, "--out", out, "--batch-size", 3,
            "--max-new-tokens", 6, "--json"]
    env = {"MARS_CRITIC_MODEL": model_dir, "MARS_HOME": tmp_path / "unused"}
    first = _cli(args, env, monkeypatch)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["labelled"] + report["rejected"] == 5 and report["skipped"] == 0
    labels = read_jsonl(out) if out.exists() else []
    rejected = read_jsonl(rejected_path(out))
    assert rejected_path(out).name == "labels.rejected.jsonl" and len(labels) + len(rejected) == 5
    for row in labels:
        label_answer(row)
    for row in rejected + labels:
        assert row["teacher"] == "vlm" and row["teacher_model"] == str(model_dir)
        assert row["prompt_version"] == prompt_version() and row["labelled_at"]
    assert all(row["error"] and row["detail"] and row["latency_s"] > 0 for row in rejected)
    second = _cli(args, env, monkeypatch)
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert (again["pairs"], again["skipped"], again["labelled"], again["rejected"]) == (5, 5, 0, 0)
    assert len(read_jsonl(rejected_path(out))) == len(rejected)  # nothing asked or written again


@pytest.fixture(scope="module")
def server():
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def openai_labels(mined, server, tmp_path_factory):
    """Labels of the mined pairs by the openai teacher on the loopback server: a staged product
    scores 0.9, another 0.1 + fused rank / 100; one product always answers prose (rejected)."""
    from mars.cli import app
    from mars.settings import get_settings

    rows = mined["rows"]
    bad = rows[1]["product_text"]

    def reply(body, headers, n):
        text = "".join(p.get("text", "") for p in body["messages"][0]["content"])
        if bad in text:
            return 200, completion("I think it fits nicely."), 0.0
        row = next(r for r in rows if f"Request: {r['query']}\n" in text and f"Product: {r['product_text']}\n" in text)
        score = 0.9 if row["relevant"] else round(0.1 + row["fused_rank"] / 100, 3)
        return 200, completion(json.dumps({"score": score, "rationale": f"{row['kind']} at rank {row['fused_rank']}"})), 0.0

    server.reply = reply
    out = tmp_path_factory.mktemp("openai") / "labels.jsonl"
    env = {"MARS_CRITIC_ENDPOINT": server.url, "MARS_CRITIC_API_MODEL": API_MODEL, "MARS_CRITIC_MAX_RETRIES": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(app, ["train", "label", "--teacher", "openai", "--pairs", str(mined["path"]),
                                              "--out", str(out), "--batch-size", "4", "--json"])
        finally:
            get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    return {"out": out, "report": json.loads(result.stdout), "bad": bad, "rows": rows}


def test_label_with_the_openai_teacher_writes_provenance_and_rejects_bad_answers(openai_labels, server):
    labels, report = read_jsonl(openai_labels["out"]), openai_labels["report"]
    bad_rows = [r for r in openai_labels["rows"] if r["product_text"] == openai_labels["bad"]]
    assert report["rejected"] == len(bad_rows) and report["labelled"] == len(openai_labels["rows"]) - len(bad_rows)
    rejected = read_jsonl(rejected_path(openai_labels["out"]))
    assert {r["product_id"] for r in rejected} == {r["product_id"] for r in bad_rows}
    assert all(r["error"] == "no JSON object found" and "repair retry" in r["detail"] for r in rejected)
    for row in labels:
        answer = label_answer(row)
        assert answer.score == (0.9 if row["relevant"] else round(0.1 + row["fused_rank"] / 100, 3))
        assert row["teacher"] == "openai" and API_MODEL in row["teacher_model"] and server.url in row["teacher_model"]
        assert row["prompt_version"] == prompt_version() and row["latency_s"] >= 0 and row["labelled_at"].endswith("+00:00")
        assert row["kind"] in KINDS and row["reason"]
    sent = server.bodies[-1]["messages"][0]["content"]
    assert sum(p["type"] == "image_url" for p in sent) == 2  # room photo and product photo


# ---------------------------------------------------------------- sft


def test_sft_masks_the_prompt_and_targets_the_teachers_json(openai_labels, model_dir):
    rows = read_jsonl(openai_labels["out"])[:3]
    student = load_student(model_dir, SFTConfig(lora_r=4, lora_alpha=8), device="cpu")
    images = RowImages()
    pairs = [row_pair(r, images) for r in rows]
    answers = [answer_json(label_answer(r)) for r in rows]
    batch = training_batch(student, pairs, answers)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape and (labels != IGNORE_INDEX).any()
    lengths = set()
    for r, (pair, answer) in enumerate(zip(pairs, answers)):
        prompt = student.encode([build_prompt(pair, JSON_QUESTION)])["input_ids"][0]  # the inference prompt alone
        pad = int((mask[r] == 0).sum())
        end = pad + len(prompt)
        lengths.add(end)
        assert torch.equal(ids[r, pad:end], prompt)
        assert (labels[r, :end] == IGNORE_INDEX).all()  # padding and every prompt token: no loss
        assert torch.equal(labels[r, end:], ids[r, end:]) and (labels[r, end:] != IGNORE_INDEX).all()
        assert student.tokenizer.decode(ids[r, end:-1]) == answer and ids[r, -1] == student.end_of_turn_id()
        assert CriticAnswer.model_validate_json(answer).score == rows[r]["score"]
    assert len(lengths) > 1  # left padding really differs per row
    loss = student.model(**batch, use_cache=False).loss
    assert torch.isfinite(loss)
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("visual" in n for n in trainable)


def test_sft_checkpoints_and_resumes_through_the_cli(openai_labels, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "student"
    base = ["train", "sft", "--labels", openai_labels["out"], "--model", model_dir, "--out", out, "--batch-size", 2,
            "--grad-accum", 2, "--lora-r", 4, "--lora-alpha", 8, "--lr", "1e-3", "--save-every", 2, "--json"]
    env = {"MARS_HOME": tmp_path / "unused"}
    first = _cli(base + ["--max-steps", 4], env, monkeypatch)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert result["step"] == 4 and result["resumed_from"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "adapter_config.json").exists() and (ckpt / "adapter_model.safetensors").exists()
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == step and len(state["loss_history"]) == step and state["epoch"] > 0
        assert all(math.isfinite(h["loss"]) for h in state["loss_history"])
    refused = _cli(base + ["--max-steps", 6], env, monkeypatch)
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = _cli(base + ["--max-steps", 6, "--resume"], env, monkeypatch)
    assert resumed.exit_code == 0, resumed.output
    result = json.loads(resumed.stdout)
    assert result["resumed_from"] == 4 and result["step"] == 6 and result["final"].endswith("checkpoint-6")
    assert [h["step"] for h in result["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert result["loss_history"][:4] == json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["loss_history"]
    four_bit = _cli(base + ["--max-steps", 1, "--4bit", "--out", tmp_path / "q"], env, monkeypatch)
    assert four_bit.exit_code == 2 and "needs a CUDA GPU" in four_bit.output


def test_sft_loss_goes_down_on_a_repeated_batch(openai_labels, model_dir, tmp_path):
    labels = tmp_path / "two.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(openai_labels["out"])[:2]))
    config = SFTConfig(max_steps=10, lr=5e-2, batch_size=2, grad_accum=1, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                       save_every=100, seed=1)
    result = train_sft(labels, model_dir, tmp_path / "overfit", config, device="cpu")
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    # The tiny model's random lm_head (std 0.02 on a 64-wide RMS-normed state) caps how far the
    # attention-only adapter can move the logits, so the drop is small but steady.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1 and losses[-1] < losses[0], losses
    assert [p.name for p in (tmp_path / "overfit").iterdir()] == ["checkpoint-10"]


# ---------------------------------------------------------------- eval-critic


def test_spearman_matches_the_rank_definition():
    from training.eval_critic import _average_ranks

    x, y = [0.1, 0.4, 0.4, 0.9, 0.3], [1.0, 2.0, 3.0, 5.0, 0.0]
    assert _average_ranks(torch.tensor(x).numpy()).tolist() == [1.0, 3.5, 3.5, 5.0, 2.0]
    rx, ry = _average_ranks(torch.tensor(x).numpy()), _average_ranks(torch.tensor(y).numpy())
    import numpy as np

    assert spearman(x, y) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and math.isnan(spearman([1, 1], [1, 2]))


def test_eval_critic_prints_agreement_and_the_ndcg_table(openai_labels, model_dir, slice_home, tmp_path, monkeypatch):
    out = tmp_path / "student"
    config = SFTConfig(max_steps=2, batch_size=2, grad_accum=1, lora_r=4, lora_alpha=8, save_every=2)
    adapter = train_sft(openai_labels["out"], model_dir, out, config, device="cpu").final
    labels = ["train", "eval-critic", "--labels", openai_labels["out"], "--model", model_dir, "--adapter", adapter]
    ranking = ["--queries", slice_home["queries"], "--qrels", slice_home["qrels"], "--limit", 1, "--rationale-top-k", 0]
    env = {"MARS_HOME": slice_home["home"], "MARS_CRITIC_BATCH_SIZE": 8}
    shown = _cli(labels + ranking + ["--max-new-tokens", 12], env, monkeypatch)
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    n = len(read_jsonl(openai_labels["out"]))
    assert re.search(rf"generated JSON\s+│\s+\d+/{n}\s+│", text) and "MAE" in text and "Spearman" in text
    fast = re.search(rf"P\(yes\) fast path\s+│\s+{n}/{n}\s+│\s+([\d.]+)\s+│\s+(-?[\d.]+|n/a)\s+│", text)
    assert fast and 0 <= float(fast.group(1)) <= 1, text
    assert "nDCG@10" in text and "full (student)" in text
    for task in ("room-class", "room-type"):
        row = re.search(rf"{task}\s+│\s+1\s+│\s+([\d.]+)\s+│\s+([\d.]+)\s+│\s+([+-][\d.]+)\s+│", text)
        assert row, text
        hybrid, full, gain = map(float, row.groups())
        assert 0 <= hybrid <= 1 and 0 <= full <= 1 and gain == pytest.approx(full - hybrid, abs=2e-4)
    assert f"not held out: {n} of {n} labels are from the 1 rooms the adapter was trained on" in text
    # --json, agreement only (no engine): the P(yes) read-out of every label
    as_json = _cli(labels + ["--json", "--no-generate"], env, monkeypatch)
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["agreement"]["fast"]["pairs"] == n and "json" not in report["agreement"] and "ranking" not in report
    assert report["agreement"]["fast"]["mae"] == pytest.approx(float(fast.group(1)), abs=1e-4)
    assert report["held_out"] == {"train_rooms": 1, "labels_from_train_rooms": n, "labels": n}
