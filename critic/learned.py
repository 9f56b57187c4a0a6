"""The learned critic: the offline default stage 3.

A logistic model over the pair features of :mod:`critic.features` plus two class
statistics learned from staged rooms (:class:`ClassStats`). It scores each (room, query,
product) pair in [0, 1] and states the signals that drove the score, computed from the
pair's own values (each feature's contribution ``w_i * z_i`` to the logit).

Trained by ``mars train critic`` (:mod:`training.critic`); stored as safetensors with its
configuration, class statistics and step counters in the metadata.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from critic.features import FEATURES, vector_feature_matrix
from critic.protocol import CriticPair, Verdict
from mars.checkpoints import write_checkpoint

#: Strength of the Beta prior that shrinks class and class-in-room rates toward their parent
#: rate (additive smoothing as in Zhai & Lafferty, "A study of smoothing methods for language
#: models", SIGIR 2001, Dirichlet prior form).
PRIOR_STRENGTH = 10.0
FORMAT = "mars-learned-critic/2"


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _readable(key: str | None, fallback: str) -> str:
    """A taxonomy key as words for a rationale ("lamp/pendant-lamp" -> "pendant lamp")."""
    return key.rsplit("/", 1)[-1].replace("-", " ") if key else fallback


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@dataclass
class ClassStats:
    """How often a candidate of a product class or type is staged in the room, overall and per
    room type, counted over the critic's mined candidates.

    ``counts``: key -> [positives, candidates] for keys ``c:<class>``, ``c:<class>|<room>``,
    ``t:<type>`` and ``t:<type>|<room>``; ``room_words``: room-type names as they appear in
    queries (e.g. "bedroom", "living room"), longest matched first. Rates are smoothed toward
    their parent rate (overall -> class -> type; class -> class in room; type -> type in room).
    """

    positives: int = 0
    candidates: int = 0
    counts: dict[str, list[int]] = field(default_factory=dict)
    room_words: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, product_classes: Sequence[str | None], product_types: Sequence[str | None],
            room_types: Sequence[str | None], labels: Sequence[int]) -> "ClassStats":
        """Count positives and candidates per class, type, (class, room type) and (type, room type).

        Raises:
            ValueError: the sequences differ in length.
        """
        if not len(product_classes) == len(product_types) == len(room_types) == len(labels):
            raise ValueError("product_classes, product_types, room_types and labels must have one entry per pair")
        stats = cls()
        for c, t, room, y in zip(product_classes, product_types, room_types, labels):
            stats.positives += int(y)
            stats.candidates += 1
            keys = [f"c:{c}"] * (c is not None) + [f"t:{t}"] * (t is not None)
            for key in keys + [f"{k}|{room}" for k in keys if room]:
                row = stats.counts.setdefault(key, [0, 0])
                row[0] += int(y)
                row[1] += 1
        stats.room_words = sorted({r for r in room_types if r}, key=lambda r: (-len(r.split()), r))
        return stats

    def without(self, part: "ClassStats") -> "ClassStats":
        """These counts minus ``part``'s (leave-one-room-out features while fitting: a pair's
        own room must not count toward the rates it is scored with)."""
        counts = {k: [v[0] - part.counts.get(k, [0, 0])[0], v[1] - part.counts.get(k, [0, 0])[1]] for k, v in self.counts.items()}
        return ClassStats(self.positives - part.positives, self.candidates - part.candidates, counts, self.room_words)

    def room_in(self, text: str | None) -> str | None:
        """The room type named in the query text (longest known name, whole words), else None."""
        if not text:
            return None
        padded = f" {' '.join(_words(text))} "
        return next((r for r in self.room_words if f" {r} " in padded), None)

    def _smoothed(self, key: str, parent: float) -> float:
        pos, n = self.counts.get(key, [0, 0])
        return (pos + PRIOR_STRENGTH * parent) / (n + PRIOR_STRENGTH)

    def rate(self, product_class: str | None, room: str | None = None) -> tuple[float, float]:
        """(smoothed rate, parent rate): the class rate against the overall rate, or with a
        room, the class-in-room rate against the class rate. Rates are in (0, 1)."""
        overall = (self.positives + 1.0) / (self.candidates + 2.0)
        class_rate = self._smoothed(f"c:{product_class}", overall)
        if room is None:
            return class_rate, overall
        return self._smoothed(f"c:{product_class}|{room}", class_rate), class_rate

    def type_rate(self, product_class: str | None, product_type: str | None, room: str | None = None) -> tuple[float, float]:
        """(smoothed rate, parent rate): the type rate against its class rate, or with a room,
        the type-in-room rate against the type rate. Rates are in (0, 1)."""
        class_rate = self.rate(product_class)[0]
        type_rate = self._smoothed(f"t:{product_type}", class_rate)
        if room is None:
            return type_rate, class_rate
        return self._smoothed(f"t:{product_type}|{room}", type_rate), type_rate

    def features(self, pairs: Sequence[CriticPair]) -> np.ndarray:
        """float32 (n, 4): the ``class_prior``, ``class_room_fit``, ``type_prior`` and
        ``type_room_fit`` log-odds lifts of each pair (0 where the query names no known room)."""
        out = np.zeros((len(pairs), 4), dtype=np.float32)
        for i, p in enumerate(pairs):
            room = self.room_in(p.query_text)
            cells = [(0, self.rate(p.product_class)), (2, self.type_rate(p.product_class, p.product_type))]
            if room is not None:
                cells += [(1, self.rate(p.product_class, room)), (3, self.type_rate(p.product_class, p.product_type, room))]
            for col, (rate, parent) in cells:
                out[i, col] = _logit(rate) - _logit(parent)
        return out

    def to_json(self) -> str:
        return json.dumps({"positives": self.positives, "candidates": self.candidates, "counts": self.counts,
                           "room_words": self.room_words}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ClassStats":
        return cls(**json.loads(text))


def feature_matrix(pairs: Sequence[CriticPair], stats: ClassStats) -> np.ndarray:
    """All :data:`critic.features.FEATURES` of the pairs, float32 (n, 10)."""
    return np.concatenate([vector_feature_matrix(pairs), stats.features(pairs)], axis=1)


@dataclass
class LearnedCritic:
    """Logistic critic: ``score = sigmoid(w . (x - mean) / std + b)`` over :data:`FEATURES`.

    Attributes:
        weights: float32 (10,); bias: float; mean, std: float32 (10,) feature standardisation.
        stats: the class statistics; meta: training provenance (pairs, steps, folds ...).
    """

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    std: np.ndarray
    stats: ClassStats
    meta: dict = field(default_factory=dict)
    name: str = "learned"
    uses_images: bool = False

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        """One :class:`Verdict` per pair, in order; the rationale names the two strongest signals.

        Raises:
            CriticUnavailable: never: the critic computes in process from the pairs' own vectors
                and the loaded statistics (no transport, no generated answer to misread).
            ValueError: a pair whose vectors disagree in dimension
                (:func:`critic.features.vector_features`): bad input, not an outage.
        """
        t0 = time.perf_counter()
        x = feature_matrix(pairs, self.stats)
        contributions = (x - self.mean) / self.std * self.weights  # (n, 10) terms of the logit
        scores = 1.0 / (1.0 + np.exp(-(contributions.sum(axis=1) + self.bias)))
        latency = time.perf_counter() - t0
        return [
            Verdict(float(s), self._rationale(p, row, c), self.name, latency)
            for p, row, c, s in zip(pairs, x, contributions, scores)
        ]

    def _rationale(self, pair: CriticPair, x: np.ndarray, contrib: np.ndarray) -> str:
        """The phrases of the two features with the largest |contribution|, in its direction."""
        parts = []
        for i in np.argsort(-np.abs(contrib)):
            phrase = self._phrase(FEATURES[i], float(x[i]), bool(contrib[i] > 0), pair)
            if phrase:
                parts.append(phrase)
            if len(parts) == 2:
                break
        return "; ".join(parts)

    def _phrase(self, feature: str, value: float, up: bool, pair: CriticPair) -> str:
        cls = _readable(pair.product_class, "this class")
        if feature == "visual_max":
            return f"{'looks like a region of' if up else 'resembles nothing in'} the room photo (best region cos {value:.2f})"
        if feature == "visual_top3":
            return f"matches {'several' if up else 'few'} regions of the photo (top-3 cos {value:.2f})"
        if feature == "visual_global":
            return f"{'fits' if up else 'clashes with'} the whole photo's look (cos {value:.2f})"
        if feature == "text_sim":
            return f"its text {'matches' if up else 'is far from'} the query (cos {value:.2f})"
        if feature == "log_rank":
            return f"retrieval ranked it {'' if up else 'only '}#{pair.fused_rank or 1}"
        if feature == "class_prior":
            rate = self.stats.rate(pair.product_class)[0]
            return f"{cls} items are {'often' if up else 'rarely'} staged in rooms ({rate:.0%} of candidates)"
        if feature == "class_room_fit":
            room = self.stats.room_in(pair.query_text)
            if room is None:
                return ""
            rate = self.stats.rate(pair.product_class, room)[0]
            return f"{cls} {'suits' if up else 'seldom appears in'} a {room} ({rate:.0%} of {room} candidates)"
        if feature in ("type_prior", "type_room_fit"):
            kind = _readable(pair.product_type, "this type")
            room = self.stats.room_in(pair.query_text) if feature == "type_room_fit" else None
            if feature == "type_room_fit" and room is None:
                return ""
            rate = self.stats.type_rate(pair.product_class, pair.product_type, room)[0]
            where = f"a {room}" if room else "rooms"
            return f"{kind} items are {'often' if up else 'rarely'} staged in {where} ({rate:.0%} of candidates)"
        return ""  # no_visual says nothing about fit

    def save(self, path: Path) -> None:
        """Write the checkpoint (safetensors: tensors + JSON metadata), atomically."""
        write_checkpoint(
            path,
            {"weights": self.weights.astype(np.float32), "bias": np.array([self.bias], np.float32),
             "mean": self.mean.astype(np.float32), "std": self.std.astype(np.float32)},
            {"format": FORMAT, "features": json.dumps(FEATURES), "stats": self.stats.to_json(),
             "meta": json.dumps(self.meta, sort_keys=True)},
        )

    @classmethod
    def load(cls, path: Path) -> "LearnedCritic":
        """Read a checkpoint written by :meth:`save`.

        Raises:
            FileNotFoundError: no checkpoint at ``path`` (train one with ``mars train critic``).
            ValueError: the file is not a learned-critic checkpoint or has other features.
        """
        if not path.exists():
            raise FileNotFoundError(f"no learned-critic checkpoint at {path}; train one with `mars train critic`")
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            metadata: Mapping[str, str] = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a learned-critic checkpoint (format {metadata.get('format')!r})")
        if tuple(json.loads(metadata["features"])) != FEATURES:
            raise ValueError(f"{path} was trained on features {metadata['features']}, this MARS computes {FEATURES}")
        t = load_file(str(path))
        return cls(t["weights"], float(t["bias"][0]), t["mean"], t["std"], ClassStats.from_json(metadata["stats"]),
                   json.loads(metadata["meta"]))
