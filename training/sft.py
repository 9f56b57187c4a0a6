"""``mars train sft``: distil the teacher's labels into a Qwen2-VL student with (Q)LoRA SFT.

The student is the Qwen2-VL critic (:class:`critic.vlm.QwenVLCritic`) plus a LoRA adapter
(Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) on the
text model's attention projections (:data:`TARGET_MODULES`); with ``load_in_4bit`` the frozen
base weights are 4-bit NormalFloat (NF4, double quantisation) via bitsandbytes, i.e. QLoRA
(Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314), which
needs CUDA.

Each example is the critic's own prompt — :func:`critic.prompt.build_prompt` with
:data:`~critic.prompt.JSON_QUESTION`, rendered, image-expanded and positioned by the same code
the critic uses at inference (:meth:`QwenVLCritic.expand` / :meth:`QwenVLCritic.model_inputs`)
— followed by the teacher's answer ``{"score": x, "rationale": "..."}`` and ``<|im_end|>``.
The loss is the mean token cross-entropy over the answer tokens only: prompt and padding
positions have label -100. This is sequence-level knowledge distillation (Kim & Rush,
"Sequence-Level Knowledge Distillation", arXiv:1606.07947): the student imitates the
teacher's output sequences.

Checkpoints: ``out/checkpoint-<step>/`` every ``save_every`` optimizer steps and at the end,
each with the adapter (``adapter_config.json``, ``adapter_model.safetensors``: usable as
``MARS_CRITIC_ADAPTER``), ``trainer_state.json`` (step, epoch, loss history, config, the rooms
trained on), ``optimizer.pt`` and ``rng_state.pt``. A checkpoint is written to a temporary
folder and renamed, so a crash never leaves a half-written latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from critic.prompt import JSON_QUESTION, build_prompt
from critic.protocol import CriticPair
from training.label import prompt_version
from training.rows import RowImages, answer_json, label_answer, read_jsonl, row_pair

#: The LoRA targets: the attention projections of the Qwen2 text decoder (the vision tower's
#: attention uses ``qkv`` / ``proj`` and stays frozen).
TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Label of a position that carries no loss (PyTorch cross-entropy's ``ignore_index``).
IGNORE_INDEX = -100
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


@dataclass
class SFTConfig:
    """Training options.

    Attributes:
        epochs: passes over the labels (fractions allowed); ignored when ``max_steps`` is set.
        max_steps: optimizer steps in all (counting those before a resume), or None.
        lr: peak AdamW learning rate (constant after ``warmup_steps`` of linear warm-up).
        batch_size: examples per forward pass; ``grad_accum`` passes make one optimizer step.
        grad_accum: gradient-accumulation passes per step.
        lora_r / lora_alpha / lora_dropout: LoRA rank, scale numerator (update scale
            alpha / r) and dropout on the adapter input.
        warmup_steps: linear learning-rate warm-up steps.
        save_every: checkpoint interval in optimizer steps (a checkpoint is also written at the end).
        seed: LoRA initialisation, data order and dropout.
        load_in_4bit: QLoRA (NF4 base weights; CUDA and bitsandbytes only).
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        max_grad_norm: gradient clipping (L2 norm over the adapter weights).
    """

    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 1
    grad_accum: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    warmup_steps: int = 0
    save_every: int = 100
    seed: int = 0
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "lora_r": self.lora_r,
                    "save_every": self.save_every, "lr": self.lr, "epochs": self.epochs}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"max_steps={self.max_steps}")
        if bad:
            raise ValueError(f"these SFT options must be > 0: {', '.join(bad)}")


@dataclass
class SFTResult:
    """The end of a run: the last ``step``, ``epoch`` (fractional passes over the labels), the
    whole ``loss_history`` (one ``{"step", "loss", "lr", "epoch"}`` per step, resumed runs
    included), the checkpoints written by THIS run, the step it ``resumed_from`` (0 when
    fresh) and the final checkpoint directory."""

    step: int
    epoch: float
    loss_history: list[dict[str, float]]
    checkpoints: list[str] = field(default_factory=list)
    resumed_from: int = 0
    final: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def training_batch(critic: Any, pairs: Sequence[CriticPair], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Model inputs and labels of (prompt, answer) examples, left padded (B rows, L tokens).

    Each row is the prompt's tokens exactly as the critic encodes it for inference (rendered
    chat ending with the opened assistant turn, ``<|image_pad|>`` expanded), then the answer's
    tokens, then the end-of-turn token (``<|im_end|>``). The two are tokenised separately, so
    the prompt positions are exactly the inference prompt.

    Returns:
        :meth:`QwenVLCritic.model_inputs` (``input_ids``, ``attention_mask``,
        ``mm_token_type_ids``, ``position_ids``, vision tensors) plus ``labels`` int64 (B, L):
        :data:`IGNORE_INDEX` on padding and prompt positions, the token id on answer positions
        (the model shifts them by one for the next-token loss).

    Raises:
        ValueError: ``pairs`` and ``answers`` differ in length, or the tokenizer has no
            end-of-turn / eos token.
    """
    if len(pairs) != len(answers):
        raise ValueError(f"{len(pairs)} pairs but {len(answers)} answers")
    texts, vision = critic.expand([build_prompt(p, JSON_QUESTION) for p in pairs])
    tok = critic.tokenizer
    end = critic.end_of_turn_id()
    if end is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token to end an answer")
    prompts = tok(texts, add_special_tokens=False)["input_ids"]
    targets = [ids + [end] for ids in tok(list(answers), add_special_tokens=False)["input_ids"]]
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(texts), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(texts), width), dtype=torch.long)
    labels = torch.full((len(texts), width), IGNORE_INDEX, dtype=torch.long)
    for r, (p, t) in enumerate(zip(prompts, targets)):
        start = width - len(p) - len(t)
        input_ids[r, start:] = torch.tensor(p + t)
        attention[r, start:] = 1
        labels[r, start + len(p):] = torch.tensor(t)
    inputs = critic.model_inputs(input_ids, attention, vision)
    inputs["labels"] = labels.to(critic.device)
    return inputs


def latest_checkpoint(out: Path) -> Path | None:
    """The ``checkpoint-<step>`` folder of ``out`` with the highest step (and a trainer state), or None."""
    if not out.is_dir():
        return None
    found = [(int(m.group(1)), d) for d in out.iterdir()
             if (m := _CHECKPOINT.fullmatch(d.name)) and (d / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def load_student(model: str | Path, config: SFTConfig, *, resume_from: Path | None = None,
                 device: str | None = None) -> Any:
    """The :class:`~critic.vlm.QwenVLCritic` on ``model`` whose ``model`` is a trainable
    ``PeftModel``: a fresh LoRA (:data:`TARGET_MODULES`, ``config.lora_r`` / ``lora_alpha`` /
    ``lora_dropout``, initialised with ``config.seed``), or the adapter of ``resume_from``.

    Raises:
        RuntimeError: ``config.load_in_4bit`` without a CUDA device or without bitsandbytes.
        OSError: no Qwen2-VL at ``model``.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    from critic.vlm import QwenVLCritic

    if config.load_in_4bit and not torch.cuda.is_available():
        raise RuntimeError(
            "--4bit (QLoRA: NF4 base weights via bitsandbytes) needs a CUDA GPU, and torch sees none here "
            f"(torch {torch.__version__}, cuda available: False); train without --4bit on full-precision weights"
        )
    student = QwenVLCritic(model, load_in_4bit=config.load_in_4bit, device=device)
    student.warm_up()
    base = student.model
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    torch.manual_seed(config.seed)
    if resume_from is not None:
        peft_model = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(TARGET_MODULES), bias="none")
        peft_model = get_peft_model(base, lora)
    student.model = peft_model.train()
    return student


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batch_order(n: int, batch_size: int, micro: int, seed: int) -> list[int]:
    """Row indices of micro-batch number ``micro``: epoch ``micro // batches_per_epoch`` visits
    the rows in its own seeded shuffle, ``batch_size`` at a time (the last batch may be short)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, pos = divmod(micro, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:epoch{epoch}").shuffle(order)
    return order[pos * batch_size:(pos + 1) * batch_size]


def _save(student: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], out: Path) -> Path:
    final = out / f"checkpoint-{state['step']}"
    tmp = out / f".checkpoint-{state['step']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(str(tmp))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng_state.pt")
    state = {**state, "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def train_sft(
    labels: Path,
    model: str | Path,
    out: Path,
    config: SFTConfig,
    *,
    resume: bool = False,
    device: str | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> SFTResult:
    """LoRA / QLoRA SFT of the Qwen2-VL student on the teacher's ``labels``.

    Args:
        labels: label rows (:mod:`training.label`); each label is re-validated.
        model: the base Qwen2-VL directory (or an id in the local Hugging Face cache).
        out: where ``checkpoint-<step>/`` folders go.
        config: :class:`SFTConfig`.
        resume: continue from :func:`latest_checkpoint` (``out``): adapter, optimizer, RNG and
            step counter; the LoRA shape comes from that checkpoint. Without a checkpoint the run
            starts fresh.
        device: torch device (default CUDA when available).
        on_step: called after each optimizer step with ``(step, total_steps, loss)``.

    Returns:
        :class:`SFTResult`.

    Raises:
        ValueError: no labels, an invalid label, ``out`` already holding checkpoints without
            ``resume``, or resuming with another labels file than the checkpoint's.
        RuntimeError: ``load_in_4bit`` without CUDA / bitsandbytes.
        FloatingPointError: the loss became NaN or infinite.
    """
    rows = read_jsonl(labels, required=("query_id", "product_id", "product_text", "score", "rationale"))
    if not rows:
        raise ValueError(f"{labels} holds no labels")
    answers = [answer_json(label_answer(r)) for r in rows]
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not resume:
        raise ValueError(f"{out} already holds {checkpoint.name}; pass --resume to continue it or choose another --out")
    digest = _file_sha256(labels)
    state: dict[str, Any] = {"step": 0, "epoch": 0.0, "loss_history": []}
    if resume and checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if state.get("labels_sha256") not in (None, digest):
            raise ValueError(f"{checkpoint} was trained on another labels file than {labels} (sha256 differs); "
                             "resume with the same labels or start a new --out")
    else:
        checkpoint = None
    out.mkdir(parents=True, exist_ok=True)
    student = load_student(model, config, resume_from=checkpoint, device=device)
    trainable = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    if checkpoint is not None:
        if (checkpoint / "optimizer.pt").exists():
            optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=student.device))
        if (checkpoint / "rng_state.pt").exists():
            rng = torch.load(checkpoint / "rng_state.pt", weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    per_epoch = math.ceil(len(rows) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))
    resumed_from = step = int(state["step"])
    state.update({
        "base_model": str(model), "labels": str(labels), "labels_sha256": digest, "n_labels": len(rows),
        "train_rooms": sorted({str(r.get("room_id")) for r in rows}), "max_steps": total,
        "config": asdict(config), "target_modules": list(TARGET_MODULES), "prompt_version": prompt_version(),
    })
    lora = student.model.peft_config["default"]
    state["lora"] = {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout}
    images = RowImages()
    result = SFTResult(step, float(state["epoch"]), state["loss_history"], resumed_from=resumed_from)
    micro = step * config.grad_accum
    while step < total:
        lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            idx = _batch_order(len(rows), config.batch_size, micro, config.seed)
            batch = training_batch(student, [row_pair(rows[i], images) for i in idx], [answers[i] for i in idx])
            loss = student.model(**batch, use_cache=False).loss
            (loss / config.grad_accum).backward()
            loss_sum += float(loss.detach()) / config.grad_accum
            micro += 1
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the SFT loss is {loss_sum} at step {step + 1}; lower --lr")
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        step += 1
        epoch = round(micro / per_epoch, 4)
        state["loss_history"].append({"step": step, "loss": round(loss_sum, 6), "lr": lr, "epoch": epoch})
        state.update(step=step, epoch=epoch)
        if step % config.save_every == 0 or step == total:
            result.checkpoints.append(str(_save(student, optimizer, state, out)))
        if on_step:
            on_step(step, total, loss_sum)
    result.step, result.epoch = step, float(state["epoch"])
    last = latest_checkpoint(out)
    result.final = str(last) if last else ""
    return result
