"""The contract every :class:`critic.protocol.Critic` must keep, as a test class to subclass once
per backend (the style of Haystack's ``haystack.testing`` suites, e.g. ``DocumentStoreBaseTests``:
the base class holds the tests, the subclass supplies the component through fixtures).

Usage, in the backend's own test module::

    from contract_critic import CriticContract

    class TestMyCriticContract(CriticContract):
        @pytest.fixture
        def critic(self):
            return MyCritic(...)

        @pytest.fixture
        def failing_critic(self):
            return MyCritic(endpoint_that_refuses_connections)   # or pytest.skip("why it cannot fail")

The file name does not start with ``test_``, so pytest collects the tests only through the
subclasses. ``pairs`` has a default (five pairs with photos, texts and 8-dimensional unit
vectors) that a subclass may override.

The contract:

* ``critic`` is a :class:`~critic.protocol.Critic` with a non-empty ``name`` (str) and a bool
  ``uses_images``;
* ``score(pairs)`` returns one :class:`~critic.protocol.Verdict` per pair, in the pairs' order:
  each ``score`` a finite float in [0, 1], a non-empty one-line ``rationale``, a non-empty
  ``backend`` and a finite ``latency_s >= 0`` (seconds);
* ``score([])`` returns ``[]``;
* a critic that cannot judge a request raises :class:`~critic.protocol.CriticUnavailable` (and
  nothing else) with a non-empty one-line message: the funnel keeps its fused order and puts
  that message in the response. ``failing_critic`` is such a critic, failing for a real reason
  of its backend (a refused connection, an unreadable answer, a broker that cannot be reached);
  a backend that has no way to fail skips it with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from critic.protocol import Critic, CriticPair, CriticUnavailable, Verdict

#: Dimension of the contract pairs' vectors (regions, query and product vectors).
DIM = 8
#: Score tolerance when the same pair is scored in another position of the batch (a batched
#: model pads rows differently; float32 logits move in the 5th decimal).
ORDER_TOLERANCE = 1e-4


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def contract_pairs(n: int = 5, seed: int = 0) -> list[CriticPair]:
    """``n`` pairs of one search: a shared room photo (64x48) and its region vectors (4, DIM),
    the query "a lamp for this bedroom" and its vector; product ``p{i:02d}`` with text
    ``"product p{i:02d}, ..."``, a photo of its own (every third pair has none), taxonomy class
    and type, fused rank ``i + 1``, and unit ``image``/``text`` vectors (float32 (DIM,)); the
    image vector of every even pair lies near one of the room's regions (a product that looks
    like part of the room). Different products, so a critic scores them differently."""
    rng = np.random.default_rng(seed)
    room = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    regions, query = _unit(rng, 4, DIM), _unit(rng, DIM)
    kinds = ["lamp/pendant-lamp", "lamp/floor-lamp", "rug/flatwoven-rug", "bed/storage-bed", "chair/armchair"]
    pairs = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        photo = None if i % 3 == 2 else Image.fromarray(rng.integers(0, 256, (32, 24 + 8 * i, 3), dtype=np.uint8))
        image = _unit(rng, DIM)
        if i % 2 == 0:
            near = regions[i % len(regions)] + 0.3 * image
            image = (near / np.linalg.norm(near)).astype(np.float32)
        pairs.append(CriticPair(
            "a lamp for this bedroom", room, f"p{i:02d}", f"product p{i:02d}, a {kind.split('/')[1].replace('-', ' ')}",
            photo, product_class=kind.split("/")[0], product_type=kind, fused_rank=i + 1, room_regions=regions,
            query_vector=query, product_vectors={"image": image, "text": _unit(rng, DIM)},
        ))
    return pairs


class CriticContract:
    """Tests every :class:`~critic.protocol.Critic` backend must pass; subclass it and provide
    the ``critic`` and ``failing_critic`` fixtures (and ``pairs`` if the default does not suit)."""

    @pytest.fixture
    def critic(self) -> Critic:
        """The backend under test, ready to score ``pairs``."""
        raise NotImplementedError("a CriticContract subclass must provide the `critic` fixture")

    @pytest.fixture
    def failing_critic(self) -> Critic:
        """The backend set up so that it cannot judge a request for a real reason of its own
        (or ``pytest.skip`` with the reason it cannot fail)."""
        raise NotImplementedError("a CriticContract subclass must provide the `failing_critic` fixture")

    @pytest.fixture
    def pairs(self) -> list[CriticPair]:
        """The pairs the contract scores (:func:`contract_pairs`)."""
        return contract_pairs()

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def check_verdicts(verdicts: Sequence[Verdict], pairs: Sequence[CriticPair]) -> None:
        """Assert one well-formed :class:`Verdict` per pair."""
        assert isinstance(verdicts, list) and len(verdicts) == len(pairs)
        for v in verdicts:
            assert isinstance(v, Verdict)
            assert isinstance(v.score, float) and math.isfinite(v.score) and 0.0 <= v.score <= 1.0, v
            assert isinstance(v.rationale, str) and v.rationale.strip(), v
            assert "\n" not in v.rationale and "\r" not in v.rationale, v
            assert isinstance(v.backend, str) and v.backend, v
            assert math.isfinite(v.latency_s) and v.latency_s >= 0.0, v

    # ------------------------------------------------------------------ the contract

    def test_is_a_critic_with_a_name_and_an_image_flag(self, critic: Critic) -> None:
        assert isinstance(critic, Critic)
        assert isinstance(critic.name, str) and critic.name.strip()
        assert isinstance(critic.uses_images, bool)

    def test_one_well_formed_verdict_per_pair(self, critic: Critic, pairs: list[CriticPair]) -> None:
        self.check_verdicts(critic.score(pairs), pairs)

    def test_verdicts_follow_the_pairs_order(self, critic: Critic, pairs: list[CriticPair]) -> None:
        forward = critic.score(pairs)
        spread = max(v.score for v in forward) - min(v.score for v in forward)
        assert spread > 10 * ORDER_TOLERANCE, (
            "the contract pairs must get different scores, or their order cannot be checked", forward)
        backward = critic.score(pairs[::-1])
        self.check_verdicts(backward, pairs)
        for f, b in zip(forward, backward[::-1]):  # pair i's verdict, wherever pair i stood
            assert b.score == pytest.approx(f.score, abs=ORDER_TOLERANCE), (f, b)

    def test_an_empty_batch_gives_no_verdicts(self, critic: Critic) -> None:
        assert critic.score([]) == []

    def test_a_critic_that_cannot_judge_raises_critic_unavailable(
        self, failing_critic: Critic, pairs: list[CriticPair],
    ) -> None:
        with pytest.raises(Exception) as err:
            failing_critic.score(pairs)
        assert isinstance(err.value, CriticUnavailable), (
            f"{type(failing_critic).__name__}.score raised {type(err.value).__name__}, not CriticUnavailable: {err.value}")
        message = str(err.value)
        assert message.strip() and "\n" not in message, message
