"""Smoke test of the critic speed benchmark (evaluation/critic_speed.py): the tiny random-init
Qwen2-VL on 4 real IKEA products, one timed run per setting. Checks that it runs and reports,
not how fast (timings on a shared CPU are noise)."""

from __future__ import annotations

import json

from evaluation.critic_speed import SEED_SECONDS_PER_QUERY, main


def test_tiny_benchmark_prints_a_table_and_a_json_line_with_positive_timings(ikea, capsys):
    returned = main([
        "--size", "tiny", "--device", "cpu", "--ikea", str(ikea), "--products", "4", "--repeats", "1",
        "--warmup", "0", "--batch-sizes", "1,4", "--rationale-top-k", "2", "--max-new-tokens", "8",
    ])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result == json.loads(json.dumps(returned))
    assert result["size"] == "tiny" and result["random_init"] and result["device_type"] == "cpu"
    assert result["dtype"] == "float32" and result["device"] and result["products"] == 4
    assert result["tokens"]["mean_image_tokens"] > 0 and result["tokens"]["mean_text_tokens"] > 0
    names = [s["name"] for s in result["settings"]]
    assert names == ["inputs bs=4", "fast bs=1", "fast bs=4", "full bs=1", "full bs=4"]
    for s in result["settings"]:
        assert s["median_s"] > 0 and s["p95_s"] >= s["median_s"] and len(s["times_s"]) == 1
        assert s["speedup_vs_seed"] == SEED_SECONDS_PER_QUERY / s["median_s"]
        assert s["median_over_target"] == s["median_s"] / s["target_s"]
        assert s["name"] in out  # the table row
    full = [s for s in result["settings"] if s["path"] == "full"]
    assert all(s["generated_tokens"] == 2 * 8 and s["what"].startswith("2 rationales x 8 tokens") and "note: 4 products" in out for s in full)
    assert "RANDOM" in out and "H100" in out
