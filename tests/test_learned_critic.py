"""The learned critic: features, class statistics, fitting, checkpoints and rationales."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from contract_critic import DIM, CriticContract
from critic.features import FEATURES, vector_features
from critic.learned import PRIOR_STRENGTH, ClassStats, LearnedCritic
from critic.protocol import CriticPair
from mars.registry import build_critic
from mars.settings import Settings
from evaluation.beir import BenchmarkQuery
from training.critic import MinedQuery, cross_validate, evaluate, fit, rerank


def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _pair(regions, image, text_q=None, text_p=None, cls="lamp", rank=1, query="a lamp for this bedroom", kind=None):
    vectors = {}
    if image is not None:
        vectors["image"] = _unit(image)
    if text_p is not None:
        vectors["text"] = _unit(text_p)
    return CriticPair(query, None, f"p{rank}", "", None, product_class=cls, product_type=kind, fused_rank=rank,
                      room_regions=None if regions is None else np.stack([_unit(r) for r in regions]),
                      query_vector=None if text_q is None else _unit(text_q), product_vectors=vectors)


def test_vector_features_by_hand():
    regions = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
    f = dict(zip(FEATURES, vector_features(_pair(regions, [0, 1, 0], [1, 0], [1, 1], rank=5))))
    assert f["visual_max"] == pytest.approx(1.0)
    assert f["visual_top3"] == pytest.approx((1.0 + math.sqrt(0.5) + 0.0) / 3)
    assert f["visual_global"] == pytest.approx(0.0)  # region 0 is the whole photo
    assert f["no_visual"] == 0.0 and f["text_sim"] == pytest.approx(math.sqrt(0.5))
    assert f["log_rank"] == pytest.approx(math.log(5))
    no_photo = dict(zip(FEATURES, vector_features(_pair(regions, None, rank=1))))
    assert no_photo["no_visual"] == 1.0 and no_photo["visual_max"] == 0.0 and no_photo["text_sim"] == 0.0
    with pytest.raises(ValueError, match="dimension"):
        vector_features(_pair(regions, [1, 0, 0, 0]))


def test_class_stats_smoothed_rates_by_hand():
    classes = ["lamp", "lamp", "rug", "rug", "rug", None]
    types = ["pendant lamp", "floor lamp", "rug", "rug", "rug", None]
    stats = ClassStats.fit(classes, types, ["bedroom", "bedroom", "bedroom", "kitchen", "living room", None], [1, 1, 0, 0, 1, 0])
    overall = (3 + 1) / (6 + 2)
    lamp = (2 + PRIOR_STRENGTH * overall) / (2 + PRIOR_STRENGTH)
    assert stats.rate("lamp") == pytest.approx((lamp, overall))
    assert stats.rate("lamp", "bedroom") == pytest.approx(((2 + PRIOR_STRENGTH * lamp) / (2 + PRIOR_STRENGTH), lamp))
    assert stats.rate("sofa") == pytest.approx((overall, overall))  # unseen class: the overall rate
    pendant = (1 + PRIOR_STRENGTH * lamp) / (1 + PRIOR_STRENGTH)
    assert stats.type_rate("lamp", "pendant lamp") == pytest.approx((pendant, lamp))
    assert stats.type_rate("lamp", "pendant lamp", "bedroom") == pytest.approx(
        ((1 + PRIOR_STRENGTH * pendant) / (1 + PRIOR_STRENGTH), pendant))
    assert stats.room_in("a rug for this living room") == "living room"  # longest room name wins
    assert stats.room_in("a rug for this garage") is None and stats.room_in(None) is None
    feats = stats.features([_pair(None, None, cls="lamp", kind="pendant lamp"), _pair(None, None, cls="rug", query="a rug")])
    assert feats[0, 0] > 0 > feats[1, 0]  # lamps were staged more often than rugs
    assert feats[1, 1] == 0.0 and feats[1, 3] == 0.0  # no room named: no room fit
    assert feats[0, 2] > 0  # a pendant lamp was staged every time it was a candidate, above the lamp rate
    with pytest.raises(ValueError, match="one entry per pair"):
        ClassStats.fit(classes, types[:2], [None] * 6, [0] * 6)


def test_leave_one_room_out_counts():
    """``without`` removes one room's counts: a type staged only in that room falls back to its class rate."""
    rooms = ["bedroom"] * 4
    everything = ClassStats.fit(["lamp"] * 4, ["pendant lamp", "floor lamp", "floor lamp", "floor lamp"], rooms, [1, 0, 1, 0])
    one_room = ClassStats.fit(["lamp"], ["pendant lamp"], ["bedroom"], [1])
    rest = everything.without(one_room)
    assert rest.positives == 1 and rest.candidates == 3
    assert rest.counts["t:pendant lamp"] == [0, 0] and rest.counts["c:lamp"] == [1, 3]
    rate, parent = rest.type_rate("lamp", "pendant lamp")
    assert rate == pytest.approx(parent)  # no evidence left about pendant lamps


def _mined(rng, n_queries=40, room_offset=0):
    """Queries whose staged products are the ones that look like a region of the photo."""
    out = []
    for q in range(n_queries):
        regions = rng.normal(size=(5, 8))
        pairs, labels = [], []
        for rank in range(1, 21):
            staged = rng.random() < 0.25
            image = regions[rng.integers(5)] + rng.normal(scale=0.3, size=8) if staged else rng.normal(size=8)
            pairs.append(_pair(regions, image, rank=rank, cls="lamp" if rank % 2 else "rug"))
            labels.append(int(staged))
        relevant = {p.product_id for p, y in zip(pairs, labels) if y}
        query = BenchmarkQuery(f"q{q}", "room-class", "a lamp for this bedroom", None, f"room{room_offset + q % 10}", "Bedroom")
        out.append(MinedQuery(query, [p.product_id for p in pairs], pairs, labels, ["x"] * 20, relevant))
    return out


def test_fit_learns_the_visual_signal_and_reranks_held_out_rooms():
    rng = np.random.default_rng(0)
    critic = fit(_mined(rng))
    w = dict(zip(FEATURES, critic.weights))
    assert w["visual_max"] > 0 and w["visual_max"] == max(w.values())
    test = _mined(rng, room_offset=100)
    report = evaluate(critic, test, top_n=20)["room-class"]
    assert report["full"] > report["hybrid"] + 0.1  # fused order here is random; the critic finds the staged ones
    order = rerank(critic, test[0], 20)
    assert sorted(order) == sorted(test[0].fused)
    cv = cross_validate(_mined(rng), folds=5)["room-class"]
    assert cv["queries"] == 40 and cv["full"] > cv["hybrid"]
    with pytest.raises(ValueError, match="positive and negative"):
        fit([MinedQuery(test[0].query, [], test[0].pairs[:2], [0, 0], ["x", "x"], set())])


def test_checkpoint_round_trip_and_rationale(tmp_path):
    rng = np.random.default_rng(1)
    critic = fit(_mined(rng))
    path = tmp_path / "critic" / "learned.safetensors"
    critic.save(path)
    loaded, detail = build_critic(Settings(home=tmp_path, critic="learned", critic_checkpoint=path))
    assert isinstance(loaded, LearnedCritic) and "training pairs" in detail
    pairs = _mined(rng, n_queries=1)[0].pairs
    a, b = critic.score(pairs), loaded.score(pairs)
    assert [v.score for v in a] == pytest.approx([v.score for v in b], abs=1e-6)
    best = max(a, key=lambda v: v.score)
    assert best.backend == "learned" and 0.0 <= best.score <= 1.0
    assert "region of the room photo (best region cos" in best.rationale  # the driving signal, with its value
    assert loaded.meta["pairs"] == 800 and loaded.meta["step"] > 0


def test_registry_without_checkpoint_and_bad_files(tmp_path):
    critic, detail = build_critic(Settings(home=tmp_path, critic="learned"))
    assert critic is None and "mars train critic" in detail and str(tmp_path) in detail
    assert build_critic(Settings(home=tmp_path, critic="none")) == (None, "MARS_CRITIC=none")
    with pytest.raises(ValidationError, match="critic"):
        Settings(home=tmp_path, critic="oracle")
    with pytest.raises(ValueError, match="MARS_CRITIC_MODEL"):
        build_critic(Settings(home=tmp_path, critic="vlm"))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a learned-critic checkpoint"):
        build_critic(Settings(home=tmp_path, critic="learned", critic_checkpoint=tmp_path / "other.safetensors"))


def test_rationale_names_the_type_in_words_with_its_computed_rate():
    stats = ClassStats.fit(["lamp"] * 4, ["lamp/pendant-lamp", "lamp/pendant-lamp", "lamp/floor-lamp", "lamp/floor-lamp"],
                           ["bedroom"] * 4, [1, 1, 0, 0])
    weights = np.array([1.0 if f == "type_prior" else 0.0 for f in FEATURES], np.float32)
    critic = LearnedCritic(weights, 0.0, np.zeros(len(FEATURES), np.float32), np.ones(len(FEATURES), np.float32), stats)
    pendant, floor = critic.score([_pair(None, None, kind="lamp/pendant-lamp"), _pair(None, None, kind="lamp/floor-lamp")])
    rate = stats.type_rate("lamp", "lamp/pendant-lamp")[0]
    assert pendant.score > 0.5 > floor.score
    assert pendant.rationale.startswith(f"pendant lamp items are often staged in rooms ({rate:.0%} of candidates)")
    assert floor.rationale.startswith("floor lamp items are rarely staged in rooms")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A learned critic trained on synthetic mined queries (8-dimensional vectors), saved."""
    critic = fit(_mined(np.random.default_rng(2)))
    assert critic.mean.shape == (len(FEATURES),) and DIM == 8  # the contract pairs' vectors fit its training data
    path = tmp_path_factory.mktemp("learned-critic") / "learned.safetensors"
    critic.save(path)
    return path


class TestLearnedCriticContract(CriticContract):
    """The critic contract on a small trained checkpoint, loaded from disk."""

    @pytest.fixture
    def critic(self, small_checkpoint) -> LearnedCritic:
        return LearnedCritic.load(small_checkpoint)

    @pytest.fixture
    def failing_critic(self):
        pytest.skip("the learned critic computes in process from the pairs' vectors: no transport, no "
                    "generated answer, nothing that can be unavailable")
