"""The Qwen2-VL critic (critic/vlm.py) and its prompts (critic/prompt.py), on a tiny random-init
Qwen2-VL of the real architecture saved to a temp dir (tests/tiny_qwen2vl.py; no hub)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from critic.prompt import (
    JSON_QUESTION, YES_NO_QUESTION, CriticAnswerError, build_prompt, extract_json_object, parse_answer, render_chat,
)
from contract_critic import CriticContract
from critic.protocol import Critic, CriticPair, CriticUnavailable
from critic.vlm import QwenVLCritic


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


ROOM = _photo(120, 90, 0)
PAIRS = [
    CriticPair("a cosy bedroom", ROOM, "p1", "white chair", _photo(60, 60, 1)),
    CriticPair("a cosy bedroom", ROOM, "p2", "a long text about an oak table with six chairs", _photo(200, 50, 2)),
    CriticPair("a cosy bedroom", None, "p3", "lamp", None),
    CriticPair(None, ROOM, "p4", "rug, flatwoven", None),
    CriticPair("a cosy bedroom", None, "p5", "bed with storage", _photo(30, 40, 3)),
]


@pytest.fixture(scope="module")
def fast_critic(tiny_qwen2vl_dir):
    critic = QwenVLCritic(tiny_qwen2vl_dir, batch_size=1, rationale_top_k=0, device="cpu")
    critic.warm_up()
    return critic


# ---------------------------------------------------------------- prompts and answers


def test_prompt_puts_room_and_query_first_then_product_then_question():
    prompt = build_prompt(PAIRS[0], YES_NO_QUESTION)
    text = render_chat(prompt.messages)
    assert prompt.images == [PAIRS[0].room_image, PAIRS[0].product_image]
    room = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text.startswith(f"<|im_start|>user\nRoom photo:\n{room}\nRequest: a cosy bedroom\n")
    order = ["Request:", "Product photo:", "Product: white chair", YES_NO_QUESTION]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order)
    assert text.endswith(f"{YES_NO_QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    # the 20 prompts of a search share the room + query prefix
    other = render_chat(build_prompt(PAIRS[1], YES_NO_QUESTION).messages)
    shared = text.split("Product photo:")[0]
    assert other.startswith(shared)


def test_prompt_leaves_out_missing_images():
    text_only = build_prompt(PAIRS[2], JSON_QUESTION)
    assert text_only.images == [] and "<|image_pad|>" not in render_chat(text_only.messages)
    assert "Room photo" not in render_chat(text_only.messages) and JSON_QUESTION in render_chat(text_only.messages)
    no_query = render_chat(build_prompt(PAIRS[3]).messages)
    assert no_query.count("<|image_pad|>") == 1 and "Request: (none" in no_query and "Product photo" not in no_query


def test_parse_answer_finds_the_first_json_object_and_validates_it():
    answer = parse_answer('Sure! ```json\n{"score": 0.8, "rationale": "  Oak matches the floor. "}\n``` {"score": 0}')
    assert answer.score == 0.8 and answer.rationale == "Oak matches the floor."
    assert extract_json_object('{bad {"a": {"b": 1}} tail') == {"a": {"b": 1}}
    for text, reason in [
        ("yes", "no JSON object"),
        ('{"score": 1.5, "rationale": "x"}', "score: Input should be less than or equal to 1"),
        ('{"score": 0.5, "rationale": "  "}', "rationale"),
        (json.dumps({"score": 0.5, "rationale": "x" * 201}), "rationale: String should have at most 200"),
        ('{"rationale": "fine"}', "score: Field required"),
    ]:
        with pytest.raises(CriticAnswerError, match=reason) as err:
            parse_answer(text)
        assert isinstance(err.value, ValueError) and reason.split(":")[0] in err.value.reason


# ---------------------------------------------------------------- fast path

QWEN_LIKE_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_tokenizers_chat_template_is_used_when_it_has_one(tiny_qwen2vl_dir):
    critic = QwenVLCritic(tiny_qwen2vl_dir, device="cpu")
    critic.warm_up()
    critic.tokenizer.chat_template = QWEN_LIKE_TEMPLATE
    prompt = build_prompt(PAIRS[0])
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert critic.render(prompt) == system + render_chat(prompt.messages)
    inputs = critic.encode([prompt])
    n_image_tokens = int((inputs["image_grid_thw"].prod(-1) // 4).sum())
    assert int(inputs["mm_token_type_ids"].sum()) == n_image_tokens and inputs["image_grid_thw"].shape == (2, 3)
    assert 0.0 < critic.yes_probabilities([PAIRS[0]])[0] < 1.0



def test_constructing_is_cheap_and_the_critic_fits_the_protocol(tiny_qwen2vl_dir):
    critic = QwenVLCritic(tiny_qwen2vl_dir)
    assert critic.model is None and isinstance(critic, Critic) and critic.name == "qwen2-vl"
    with pytest.raises(OSError, match="downloads are off"):
        QwenVLCritic(tiny_qwen2vl_dir / "missing").warm_up()
    with pytest.raises(FileNotFoundError, match="no LoRA adapter directory"):
        QwenVLCritic(tiny_qwen2vl_dir, adapter=tiny_qwen2vl_dir / "no-adapter").warm_up()


def test_fast_path_is_the_softmax_over_yes_and_no_logits(tiny_qwen2vl_dir, fast_critic):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    verdicts = fast_critic.score(PAIRS)
    assert len(verdicts) == len(PAIRS)
    assert all(v.backend == "qwen2-vl" and v.latency_s > 0 for v in verdicts)
    assert all(v.rationale == f"P(yes)={v.score:.2f} (fast path)" for v in verdicts)

    tok = AutoTokenizer.from_pretrained(tiny_qwen2vl_dir)
    processor = Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2vl_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir).eval()
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    assert yes != no
    for pair, verdict in zip(PAIRS[:3], verdicts):  # two images, then none
        prompt = build_prompt(pair, YES_NO_QUESTION)
        pieces = render_chat(prompt.messages).split("<|image_pad|>")
        kwargs = {}
        if prompt.images:
            vision = processor(images=prompt.images, return_tensors="pt")
            n_tokens = (vision["image_grid_thw"].prod(-1) // 4).tolist()
            pieces = [pieces[0]] + ["<|image_pad|>" * n + p for n, p in zip(n_tokens, pieces[1:])]
            kwargs = dict(vision)
        ids = tok("".join(pieces), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).int(), **kwargs).logits
        expected = torch.softmax(logits[0, -1, [yes, no]].double(), dim=0)[0].item()
        assert 0.0 < verdict.score < 1.0
        assert verdict.score == pytest.approx(expected, abs=1e-6)


def test_batched_left_padded_scores_equal_unbatched(tiny_qwen2vl_dir, fast_critic):
    batched = QwenVLCritic(tiny_qwen2vl_dir, batch_size=4, rationale_top_k=0, device="cpu")
    batched.warm_up()
    inputs = batched.encode([build_prompt(p) for p in PAIRS[:4]])
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 4  # padding matters: every row has another length
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][:, 0] == 0).any()  # left
    assert inputs["image_grid_thw"].tolist() != [inputs["image_grid_thw"][0].tolist()] * 4  # images of other sizes
    scores, alone = batched.yes_probabilities(PAIRS), fast_critic.yes_probabilities(PAIRS)
    np.testing.assert_allclose(scores, alone, atol=1e-4, rtol=0)


def test_pairs_without_images_score_alone_and_batched(tiny_qwen2vl_dir, fast_critic):
    texts = [("bedroom", "lamp"), (None, "a very long sofa description with many words in it"), ("", "rug")]
    text_only = [CriticPair(q, None, f"t{i}", text, None) for i, (q, text) in enumerate(texts)]
    batched = QwenVLCritic(tiny_qwen2vl_dir, batch_size=3, rationale_top_k=0, device="cpu")
    batched.warm_up()
    inputs = batched.encode([build_prompt(p) for p in text_only])
    assert "pixel_values" not in inputs and inputs["mm_token_type_ids"].sum() == 0
    # M-RoPE positions restart at 0 after the left padding of each row
    first = inputs["attention_mask"].argmax(1)
    assert all(inputs["position_ids"][0, r, first[r]] == 0 for r in range(3))
    scores = [v.score for v in batched.score(text_only)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    np.testing.assert_allclose(scores, fast_critic.yes_probabilities(text_only), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- full path


def test_batched_greedy_generation_equals_unbatched(tiny_qwen2vl_dir):
    prompts = [build_prompt(p, JSON_QUESTION) for p in PAIRS]
    alone = QwenVLCritic(tiny_qwen2vl_dir, batch_size=1, max_new_tokens=8, device="cpu").generate(prompts)
    together = QwenVLCritic(tiny_qwen2vl_dir, batch_size=5, max_new_tokens=8, device="cpu").generate(prompts)
    assert together == alone and len(alone) == len(PAIRS) and all(alone)


def test_full_path_retries_once_then_raises_a_clear_error(tiny_qwen2vl_dir):
    critic = QwenVLCritic(tiny_qwen2vl_dir, batch_size=4, rationale_top_k=2, max_new_tokens=12, device="cpu")
    critic.warm_up()
    calls, prompts = [], []
    model_generate, critic_generate = critic.model.generate, critic.generate

    def count_model_generate(**kwargs):
        calls.append(kwargs["input_ids"].shape)
        return model_generate(**kwargs)

    def record_prompts(batch):
        prompts.append(list(batch))
        return critic_generate(batch)

    critic.model.generate = count_model_generate
    critic.generate = record_prompts
    with pytest.raises(CriticUnavailable, match=r"product p1: .* after one repair retry: no JSON object found") as err:
        critic.score(PAIRS)  # the request cannot be judged: the funnel keeps its fused order
    assert str(err.value).startswith(f"the Qwen2-VL critic ({tiny_qwen2vl_dir}) gave no readable answer: product p1: ")
    assert isinstance(err.value.__cause__, CriticAnswerError) and err.value.__cause__.reason == "no JSON object found"
    assert len(calls) == 2 and calls[0][0] == 2 and calls[1][0] == 2  # both top-2 pairs generated, then repaired
    assert calls[1][1] > calls[0][1]  # the repair prompt holds the first prompt and more
    repair = prompts[1][0].messages
    assert [m["role"] for m in repair] == ["user", "assistant", "user"]
    assert repair[0] == prompts[0][0].messages[0] and "no JSON object found" in repair[2]["content"][0]["text"]


def test_full_path_uses_generated_rationales_for_the_top_k_only(tiny_qwen2vl_dir, fast_critic, monkeypatch):
    critic = QwenVLCritic(tiny_qwen2vl_dir, batch_size=4, rationale_top_k=2, device="cpu")
    scripted = [
        ['{"score": 0.9, "rationale": "The white chair suits the bedroom."}', "maybe"],
        ['Here you go: {"score": 0.2, "rationale": "Oak clashes with the room."}'],
    ]
    seen = []

    def fake_generate(prompts):
        seen.append(prompts)
        return scripted[len(seen) - 1]

    monkeypatch.setattr(critic, "generate", fake_generate)
    verdicts = critic.score(PAIRS)
    assert [len(batch) for batch in seen] == [2, 1]  # the invalid second answer was repaired once
    assert seen[1][0].messages[1]["content"][0]["text"] == "maybe"
    assert (verdicts[0].score, verdicts[0].rationale) == (0.9, "The white chair suits the bedroom.")
    assert (verdicts[1].score, verdicts[1].rationale) == (0.2, "Oak clashes with the room.")
    fast = fast_critic.yes_probabilities(PAIRS[2:])
    for v, p in zip(verdicts[2:], fast):
        assert v.score == pytest.approx(p, abs=1e-6)
        assert v.rationale == f"P(yes)={p:.2f} (no rationale: outside the top 2)"
    assert len({v.latency_s for v in verdicts}) == 1


# ---------------------------------------------------------------- adapter and 4-bit


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_lora_adapter_changes_the_scores(tiny_qwen2vl_dir, fast_critic, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen2vl_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")

    tuned = QwenVLCritic(tiny_qwen2vl_dir, adapter=tmp_path / "adapter", batch_size=4, rationale_top_k=0, device="cpu")
    tuned.warm_up()
    assert isinstance(tuned.model, PeftModel)
    scores = tuned.yes_probabilities(PAIRS)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert np.abs(scores - fast_critic.yes_probabilities(PAIRS)).max() > 1e-3


def test_4bit_on_cpu_is_refused_with_a_clear_error(tiny_qwen2vl_dir):
    with pytest.raises(RuntimeError, match="4-bit loading of the Qwen2-VL critic needs a CUDA device"):
        QwenVLCritic(tiny_qwen2vl_dir, load_in_4bit=True, device="cpu")


class TestQwenVLCriticContract(CriticContract):
    """The critic contract on the tiny random-init Qwen2-VL (fast path: P(yes) for every pair)."""

    @pytest.fixture
    def critic(self, tiny_qwen2vl_dir) -> QwenVLCritic:
        return QwenVLCritic(tiny_qwen2vl_dir, batch_size=4, rationale_top_k=0, device="cpu")

    @pytest.fixture
    def failing_critic(self, tiny_qwen2vl_dir) -> QwenVLCritic:
        """Full path for the top 2: the random model writes no JSON, even after the repair round."""
        return QwenVLCritic(tiny_qwen2vl_dir, batch_size=4, rationale_top_k=2, max_new_tokens=12, device="cpu")
