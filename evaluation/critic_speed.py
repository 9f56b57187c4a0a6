"""Critic speed benchmark (not a test): wall time of the stage-3 Qwen2-VL critic
(:class:`critic.vlm.QwenVLCritic`; Wang et al., "Qwen2-VL", arXiv:2409.12191) for one search.

The model is RANDOM-INIT and built in a temp dir (:mod:`critic.random_qwen2vl`; nothing is
downloaded): timing depends on the architecture, the token counts and the hardware, not on
the weight values.

* ``--size 2b``: the architecture of ``Qwen/Qwen2-VL-2B-Instruct`` as published in its
  ``config.json`` on the Hugging Face hub (text: 28 layers, width 1536, 12 / 2 heads, MLP 8960,
  vocab 151,936, M-RoPE sections [16, 24, 24], tied embeddings; vision: 32 blocks, width 1280,
  16 heads, MLP ratio 4, 14-px patches, 2x2 merge, temporal patch 2; see
  :data:`critic.random_qwen2vl.QWEN2VL_2B_TEXT` / ``QWEN2VL_2B_VISION``; the vision numbers are
  also transformers' ``Qwen2VLVisionConfig`` defaults);
* ``--size tiny``: the test suite's tiny model (2 text layers of width 64, a 1-block vision
  tower): what remains is the critic's own overhead (chat rendering, tokenising, image
  preprocessing, padding, M-RoPE positions, the generate loop).

The tokenizer is a byte-level BPE trained at run time (:func:`critic.random_qwen2vl.train_tokenizer`)
on the prompt words and the workload's product texts, so a prompt's text has about as many
tokens as with Qwen2's own tokenizer (the counts are printed); for ``2b`` every id is below the
real vocabulary of 151,936.

Workload: one real IKEA room photo, its room-class query (default "a rug for this bedroom")
and ``--products`` (20) products: the query's relevant products first, then products of the
same class, then others, each with its catalog photo and the funnel's product text. Photos are
decoded once beforehand (the funnel hands the critic decoded images) and resized by the image
processor itself to ``56*56 .. --max-pixels`` pixels (default 448*448: a 1024x765 room is
26x36 patches = 234 image tokens, a 500x500 product photo 32x32 patches = 256 tokens).

Settings, each timed ``--repeats`` times after ``--warmup`` runs (``torch.cuda.synchronize``
around each run on CUDA), median and p95 of the wall time:

* ``inputs bs=B`` (B the largest batch size): only :meth:`QwenVLCritic.encode` of the fast
  prompts, the CPU side of the fast path (chat rendering, image resize / normalise / patching,
  tokenising, M-RoPE positions): a floor no GPU removes, shown against the fast target;
* ``fast bs=B``: the fast path (P(yes) from one forward pass per pair,
  :meth:`QwenVLCritic.yes_probabilities`) for all products, in batches of B;
* ``full bs=B``: rationales for the top ``--rationale-top-k`` (5): greedy generation of
  EXACTLY ``--max-new-tokens`` tokens (64) per answer (``min_new_tokens`` = ``max_new_tokens``;
  with random weights the tokens are random and the JSON invalid, so the answers are not
  parsed into verdicts and no repair round runs: a trained model's answer stops earlier, at
  ``<|im_end|>``), batches of min(B, k); plus the fast path for the other products in batches
  of B. This is the work of :meth:`QwenVLCritic.score` with ``rationale_top_k=5``.

Reference points, as ratios: the seed system needed about 25 s per query for the top 20 on a
P100 (batches of 4); the targets on one H100 are <= 0.5 s for 20 fast scores and <= 2 s with 5
rationales. Ratios from a CPU run only say how far that machine is from them.

Usage::

    python -m evaluation.critic_speed --size tiny --repeats 2
    python -m evaluation.critic_speed --size 2b --device cuda --repeats 10 --batch-sizes 1,4,20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from critic.prompt import JSON_QUESTION, YES_NO_QUESTION, CriticAnswerError, Prompt, build_prompt, parse_answer
from critic.protocol import CriticPair
from critic.random_qwen2vl import QWEN2VL_MIN_PIXELS, SIZES, save_random_qwen2vl
from critic.vlm import QwenVLCritic

#: The seed system: about 25 s per query to judge the top 20 on a P100 with batches of 4.
SEED_SECONDS_PER_QUERY = 25.0
#: Targets on one H100: the fast path for 20 products, and 5 rationales + 15 fast scores.
TARGET_FAST_S = 0.5
TARGET_FULL_S = 2.0
DEFAULT_QUERY = "a-bed-that-folds-away-to-be-a-sofa-by-day__1364309472525-s4::class::rug"
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evaluation.critic_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="tiny", help="random-init model architecture (default tiny)")
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights / activations (default auto: the critic's own, bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--ikea", type=Path, default=Path(os.environ.get("MARS_IKEA_DIR", REPO.parent / "shared/data/ikea")),
                   help="IKEA benchmark folder (corpus.jsonl, queries.jsonl, qrels/, rooms/, images/)")
    p.add_argument("--query-id", default=DEFAULT_QUERY, help="a room-class query id of queries.jsonl")
    p.add_argument("--products", type=int, default=20, help="products judged per search (default 20)")
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="image processor's max pixels (default 448*448)")
    p.add_argument("--batch-sizes", default="1,4,20", help="comma-separated batch sizes (default 1,4,20)")
    p.add_argument("--rationale-top-k", type=int, default=5, help="products with a generated rationale (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per rationale (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per setting first (default 1)")
    p.add_argument("--paths", default="inputs,fast,full",
                   help="which settings, comma-separated: inputs, fast, full (default all three)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 for --size tiny, whose matrices are too small to split, "
                        "else torch's default)")
    p.add_argument("--tokenizer-vocab", type=int, default=2000, help="BPE vocabulary trained at run time")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="keep the random model here (reused when it already holds one); default a temp dir")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs positive integers")
    if set(args.paths) - {"inputs", "fast", "full"} or not args.paths:
        p.error("--paths takes inputs, fast and / or full")
    if args.products < 1 or args.repeats < 1 or args.warmup < 0 or args.max_new_tokens < 1:
        p.error("--products, --repeats and --max-new-tokens must be >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------- workload


def _product_text(p: dict) -> str:
    """What the funnel gives the critic (query.critic_stage.product_text): type, colour, title, text."""
    return ". ".join(part for part in (p.get("type"), p.get("color"), p.get("title"), p.get("text")) if part)


def load_workload(ikea: Path, query_id: str, n_products: int, seed: int = 0) -> tuple[dict, list[CriticPair]]:
    """The query record and ``n_products`` pairs (room photo + query + one product each).

    Products: the query's relevant ones (qrels/dev.tsv), then products whose type contains the
    query's class (``...::class::rug`` -> "rug"), then random others; all with a photo.

    Raises:
        FileNotFoundError: no IKEA data at ``ikea``.
        KeyError: ``query_id`` is not a query with a room photo.
    """
    if not (ikea / "corpus.jsonl").exists():
        raise FileNotFoundError(f"IKEA benchmark not found at {ikea} (pass --ikea or set MARS_IKEA_DIR)")
    queries = {q["_id"]: q for q in map(json.loads, (ikea / "queries.jsonl").open())}
    query = queries.get(query_id)
    if query is None or not query.get("image"):
        raise KeyError(f"no query with a room photo and id {query_id!r} in {ikea / 'queries.jsonl'}")
    relevant = set()
    for line in (ikea / "qrels" / "dev.tsv").read_text().splitlines()[1:]:
        qid, pid, _ = line.split("\t")
        if qid == query_id:
            relevant.add(pid)
    corpus = [c for c in map(json.loads, (ikea / "corpus.jsonl").open()) if c.get("image")]
    cls = query_id.rsplit("::", 1)[-1].replace("-", " ") if "::class::" in query_id else ""
    same_class = [c for c in corpus if cls and cls in c["type"].lower() and c["_id"] not in relevant]
    others = [c for c in corpus if c["_id"] not in relevant and c not in same_class]
    rng = random.Random(seed)
    rng.shuffle(same_class)
    rng.shuffle(others)
    chosen = ([c for c in corpus if c["_id"] in relevant] + same_class + others)[:n_products]
    with Image.open(ikea / query["image"]) as img:
        room = img.convert("RGB")
    pairs = []
    for c in chosen:
        with Image.open(ikea / c["image"]) as img:
            photo = img.convert("RGB")
        pairs.append(CriticPair(query["text"], room, c["_id"], _product_text(c), photo))
    return query, pairs


# ---------------------------------------------------------------- timing


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; else the CPU model from /proc/cpuinfo and the
    number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads)"


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def generate_exactly(critic: QwenVLCritic, prompts: Sequence[Prompt], n_tokens: int) -> list[str]:
    """:meth:`QwenVLCritic.generate` (same inputs, greedy, batches of ``critic.batch_size``,
    decoded) but forced to ``n_tokens`` new tokens per prompt: ``min_new_tokens`` masks the
    end-of-turn tokens, so a random model never stops early and every run does the same work."""
    from transformers import GenerationConfig

    tok = critic.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = sorted({i for i in (tok.eos_token_id, im_end) if i is not None and i != tok.unk_token_id})
    config = GenerationConfig(do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id)
    texts: list[str] = []
    for start in range(0, len(prompts), critic.batch_size):
        inputs = critic.encode(prompts[start:start + critic.batch_size])
        inputs.pop("position_ids")  # as in QwenVLCritic.generate: generate derives them from the rope deltas
        ids = critic.model.generate(**inputs, generation_config=config)
        new = ids[:, inputs["input_ids"].shape[1]:]
        if new.shape[1] != n_tokens:
            raise RuntimeError(f"generate gave {new.shape[1]} new tokens, expected {n_tokens}")
        texts += tok.batch_decode(new, skip_special_tokens=True)
    return texts


def _valid_json(texts: Sequence[str]) -> int:
    n = 0
    for text in texts:
        try:
            parse_answer(text)
            n += 1
        except CriticAnswerError:
            pass
    return n


def _token_counts(critic: QwenVLCritic, pairs: Sequence[CriticPair], question: str) -> dict[str, float]:
    """Mean prompt tokens per pair, of which image tokens (each pair encoded alone)."""
    total, image = [], []
    for pair in pairs:
        inputs = critic.encode([build_prompt(pair, question)])
        total.append(int(inputs["input_ids"].shape[1]))
        image.append(int(inputs["mm_token_type_ids"].sum()))
    return {"mean_prompt_tokens": float(np.mean(total)), "mean_image_tokens": float(np.mean(image)),
            "mean_text_tokens": float(np.mean(total) - np.mean(image))}


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    """Build (or reuse) the model, time every setting; return the result dict (see :func:`main`)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if args.size == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    query, pairs = load_workload(args.ikea, args.query_id, args.products)
    k = min(args.rationale_top_k, len(pairs))
    with tempfile.TemporaryDirectory(prefix="critic-speed-") as tmp:
        model_dir = args.model_dir or Path(tmp) / f"qwen2vl-{args.size}-random"
        t0 = time.perf_counter()
        if not (model_dir / "config.json").exists():
            texts = [query["text"]] + [p.product_text for p in pairs]
            save_random_qwen2vl(model_dir, args.size, min_pixels=QWEN2VL_MIN_PIXELS, max_pixels=args.max_pixels,
                                tokenizer_vocab=args.tokenizer_vocab, texts=texts)
        build_s = time.perf_counter() - t0
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        critic = QwenVLCritic(model_dir, batch_size=1, rationale_top_k=k, max_new_tokens=args.max_new_tokens,
                              device=str(device), dtype=dtype)
        t0 = time.perf_counter()
        critic.warm_up()
        load_s = time.perf_counter() - t0
        qwen = critic._qwen
        result: dict[str, Any] = {
            "benchmark": "critic_speed",
            "size": args.size,
            "random_init": True,
            "device": device_name(device),
            "device_type": device.type,
            "dtype": str(critic.dtype).removeprefix("torch."),
            "attn_implementation": getattr(qwen.config, "_attn_implementation", None),
            "params": sum(p.numel() for p in qwen.parameters()),
            "query": query["text"],
            "products": len(pairs),
            "rationale_top_k": k,
            "max_new_tokens": args.max_new_tokens,
            "max_pixels": int(critic.image_processor.size["longest_edge"]),  # the saved config's (--model-dir)
            "tokens": _token_counts(critic, pairs, YES_NO_QUESTION),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "build_s": round(build_s, 3),
            "load_s": round(load_s, 3),
            "seed_s_per_query": SEED_SECONDS_PER_QUERY,
            "targets_h100_s": {"fast": TARGET_FAST_S, "full": TARGET_FULL_S},
            "settings": [],
        }
        json_prompts = [build_prompt(p, JSON_QUESTION) for p in pairs[:k]]
        rationales, n = ("rationale" if k == 1 else "rationales"), len(pairs)
        generated: list[str] = []

        def full() -> None:
            critic.batch_size = min(bs, max(k, 1))
            generated[:] = generate_exactly(critic, json_prompts, args.max_new_tokens) if k else []
            critic.batch_size = bs
            if k < len(pairs):
                critic.yes_probabilities(pairs[k:])

        fast_prompts = [build_prompt(p, YES_NO_QUESTION) for p in pairs]

        def inputs() -> None:
            for start in range(0, len(fast_prompts), bs):
                critic.encode(fast_prompts[start:start + bs])

        runs = [("fast", bs) for bs in args.batch_sizes] + [("full", bs) for bs in args.batch_sizes]
        runs = [("inputs", max(args.batch_sizes))] + runs
        for path, bs in runs:
            if path not in args.paths:
                continue
            critic.batch_size = bs
            fn = {"inputs": inputs, "fast": lambda: critic.yes_probabilities(pairs), "full": full}[path]
            times = time_runs(fn, args.repeats, args.warmup, device)
            median, p95 = float(np.median(times)), _pct(times, 95)
            target = TARGET_FULL_S if path == "full" else TARGET_FAST_S
            setting = {
                "name": f"{path} bs={bs}", "path": path, "batch_size": bs,
                "what": {"inputs": f"model inputs only (CPU) for {len(pairs)}", "fast": f"P(yes) for {len(pairs)}",
                         "full": f"{k} {rationales} x {args.max_new_tokens} tokens + P(yes) for {n - k}"}[path],
                "median_s": median, "p95_s": p95, "times_s": times,
                "speedup_vs_seed": SEED_SECONDS_PER_QUERY / median,
                "target_s": target, "median_over_target": median / target,
            }
            if path == "full":
                setting["generated_tokens"] = k * args.max_new_tokens
                setting["valid_json"] = _valid_json(generated)
            result["settings"].append(setting)
        critic.model = None  # free the weights before the temp dir goes
    return result


def format_table(result: dict) -> str:
    """The settings as a fixed-width table with a header naming model, device and workload."""
    tok = result["tokens"]
    lines = [
        f"Qwen2-VL critic speed — size {result['size']} (RANDOM-INIT, {result['params'] / 1e6:,.1f}M params), "
        f"{result['dtype']}, {result['device']}, attention {result['attn_implementation']}",
        f"workload: 1 room photo + {result['query']!r} + {result['products']} products; max_pixels "
        f"{result['max_pixels']}; prompt {tok['mean_prompt_tokens']:.0f} tokens/pair "
        f"({tok['mean_image_tokens']:.0f} image, {tok['mean_text_tokens']:.0f} text); "
        f"{result['repeats']} runs after {result['warmup']} warm-up",
        f"{'setting':<12} {'work':<44} {'median s':>9} {'p95 s':>9} {'seed 25 s /':>12} "
        f"{'target s':>9} {'/ target':>9}",
    ]
    for s in result["settings"]:
        lines.append(
            f"{s['name']:<12} {s['what']:<44} {s['median_s']:>9.3f} {s['p95_s']:>9.3f} "
            f"{s['speedup_vs_seed']:>11.1f}x {s['target_s']:>9.1f} {s['median_over_target']:>8.2f}x"
        )
    full = [s for s in result["settings"] if s["path"] == "full"]
    if full:
        lines.append(
            f"full: generated tokens are RANDOM (random weights; exactly {result['max_new_tokens']} per rationale, "
            f"valid JSON {full[-1]['valid_json']}/{result['rationale_top_k']}); a trained critic stops at <|im_end|>."
        )
    lines.append("seed: ~25 s per query (top 20, P100, batches of 4); targets are for one H100: "
                 f"fast <= {TARGET_FAST_S} s, full <= {TARGET_FULL_S} s.")
    if result["products"] != 20:
        lines.append(f"note: {result['products']} products per search here; the seed and the targets are for 20.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print the table, then the result as one JSON line; return the result.

    The JSON holds device, dtype, size, token counts and, per setting, ``median_s`` / ``p95_s``
    (seconds), ``speedup_vs_seed`` (25 s / median) and ``median_over_target``.
    """
    result = run(parse_args(argv))
    print(format_table(result))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
