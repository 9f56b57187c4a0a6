"""The queued critic (workers/critic.py, workers/critic_client.py, critic/wire.py): payloads, the
micro-batcher (critic/batching.py), and a real Celery worker.

The worker tests run one real ``celery -A workers.app worker -Q critic -P threads`` process
on real Redis (db 12, flushed) serving the tiny random-init Qwen2-VL of tests/tiny_qwen2vl.py
(fast path: ``MARS_CRITIC_RATIONALE_TOP_K=0``); the same critic built in this process is the
reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from celery import Celery
from kombu.exceptions import OperationalError
from PIL import Image

from contract_critic import CriticContract, contract_pairs
from critic.batching import MicroBatcher
from critic.prompt import CriticAnswerError, render_chat
from critic.protocol import Critic, CriticPair, CriticTimeout, CriticUnavailable, Verdict
from critic.vlm import QwenVLCritic
from critic.wire import image_from_b64, image_to_b64, pairs_from_json, pairs_to_json
from mars.settings import Settings
from redis_db import flushed_redis
from workers.app import celery_config
from workers.critic_client import QueuedCritic

pytestmark = pytest.mark.slow

BROKER = "redis://127.0.0.1:6379/12"
REPO = Path(__file__).resolve().parent.parent


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


ROOM = _photo(120, 90, 0)
WORDS = ["white chair", "oak table with six chairs", "lamp", "rug, flatwoven", "bed with storage", "black shelf"]


def _pairs(n: int, seed: int, query: str = "a cosy bedroom") -> list[CriticPair]:
    """``n`` pairs sharing the room photo; product texts and photos differ by ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        CriticPair(
            query, ROOM, f"p{seed}-{i}", f"{WORDS[(seed + i) % len(WORDS)]} {seed}-{i}",
            _photo(40 + 10 * i, 60, 100 * seed + i) if i % 3 != 2 else None,
            product_class="lighting", fused_rank=i + 1,
            room_regions=rng.standard_normal((3, 8)).astype(np.float32),
            query_vector=rng.standard_normal(8).astype(np.float32),
            product_vectors={"image": rng.standard_normal(8).astype(np.float32)},
        )
        for i in range(n)
    ]


def _jpeg(pairs: Sequence[CriticPair]) -> list[CriticPair]:
    """The pairs as the worker sees them with the default JPEG transport."""
    return pairs_from_json(pairs_to_json(pairs))


def _assert_same(got: Sequence[Verdict], want: Sequence[Verdict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g.score - w.score) < 1e-4, (g, w)
        assert (g.rationale, g.backend) == (w.rationale, w.backend)


@pytest.fixture(scope="module")
def reference(tiny_qwen2vl_dir) -> QwenVLCritic:
    """The worker's critic, in this process (same settings as the worker's)."""
    critic = QwenVLCritic(tiny_qwen2vl_dir, batch_size=32, rationale_top_k=0, device="cpu")
    critic.warm_up()
    return critic


# ---------------------------------------------------------------- payloads (no worker)


def test_payload_keeps_every_field_and_sends_the_shared_room_photo_once():
    pairs = _pairs(4, 1)
    payload = json.loads(json.dumps(pairs_to_json(pairs, image_format="PNG")))
    assert len(payload["images"]) == 1 + 3  # one room photo, three product photos (one pair has none)
    back = pairs_from_json(payload)
    assert back[0].room_image is back[1].room_image  # shared again on the other side
    for a, b in zip(pairs, back):
        assert (a.query_text, a.product_id, a.product_text, a.product_class, a.fused_rank) == (
            b.query_text, b.product_id, b.product_text, b.product_class, b.fused_rank)
        assert np.array_equal(np.asarray(a.room_image), np.asarray(b.room_image))  # PNG is lossless
        assert (a.product_image is None) == (b.product_image is None)
        for x, y in [(a.room_regions, b.room_regions), (a.query_vector, b.query_vector),
                     (a.product_vectors["image"], b.product_vectors["image"])]:
            assert y.dtype == np.float32 and y.shape == x.shape and np.array_equal(x, y)
    same_room = [replace(p, room_regions=np.ones((450, 8), np.float32) if i == 0 else None, product_type="pendant lamp")
                 for i, p in enumerate(pairs)]
    same_room = [replace(p, room_regions=same_room[0].room_regions) for p in same_room]  # one search: one region array
    payload = pairs_to_json(same_room)
    assert len(payload["regions"]) == 1  # hundreds of region rows travel once per search, not once per pair
    back = pairs_from_json(payload)
    assert back[0].room_regions is back[3].room_regions and back[0].room_regions.shape == (450, 8)
    assert {b.product_type for b in back} == {"pendant lamp"}
    bare = pairs_from_json(pairs_to_json([CriticPair(None, None, "x", "text only", None)]))[0]
    assert (bare.query_text, bare.room_image, bare.room_regions, dict(bare.product_vectors)) == (None, None, None, {})
    rgba = image_from_b64(image_to_b64(Image.new("RGBA", (8, 8), (1, 2, 3, 4))))
    assert rgba.mode == "RGB" and rgba.size == (8, 8)  # JPEG has no alpha
    with pytest.raises(ValueError, match="payload version"):
        pairs_from_json({"v": 99, "images": [], "pairs": []})


def test_client_takes_its_deadline_and_kind_from_the_settings():
    learned = QueuedCritic.from_settings(Settings(critic="learned", critic_deadline_ms=750))
    assert (learned.name, learned.uses_images, learned.deadline_ms) == ("queued:learned", False, 750.0)
    vlm = QueuedCritic.from_settings(Settings(critic="vlm"))
    assert (vlm.name, vlm.uses_images, vlm.deadline_ms) == ("queued:vlm", True, 3000.0)
    with pytest.raises(ValueError, match="deadline_ms"):
        QueuedCritic(deadline_ms=0)


# ---------------------------------------------------------------- the batcher (no worker)


class CountingCritic:
    """A list-level critic (not pairwise-independent as far as the batcher knows) that logs calls."""

    name = "counting"
    uses_images = False

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        self.calls.append([p.product_id for p in pairs])
        return [Verdict(0.5, f"{p.product_id} of {len(pairs)}", self.name, 0.0) for p in pairs]


def test_batcher_flushes_at_b_pairs_or_after_t_and_drops_expired_requests():
    critic = CountingCritic()
    assert isinstance(critic, Critic)
    full = MicroBatcher(critic, max_pairs=4, max_wait_s=30.0)  # only B can close a batch quickly
    t0 = time.monotonic()
    a, b = full.submit(_pairs(2, 1)), full.submit(_pairs(2, 2))
    (va, ba), (vb, bb) = a.result(5), b.result(5)
    assert time.monotonic() - t0 < 5 and ba == bb and ba[0].pairs == 4 and ba[0].requests == 2
    # a non-VLM critic scores each request's list as a whole, never a mix of requests
    assert critic.calls == [["p1-0", "p1-1"], ["p2-0", "p2-1"]] and va[0].rationale == "p1-0 of 2"
    full.close()

    timed = MicroBatcher(critic, max_pairs=100, max_wait_s=0.15)
    t0 = time.monotonic()
    (_, batches), waited = timed.submit(_pairs(1, 3)).result(5), time.monotonic() - t0
    assert 0.15 <= waited < 2 and batches[0].requests == 1
    late = timed.submit(_pairs(2, 4), deadline=time.time() - 0.001)
    with pytest.raises(CriticTimeout):
        late.result(5)
    assert not any(pid.startswith("p4-") for call in critic.calls for pid in call) and timed.dropped == 1
    big = timed.submit(_pairs(3, 5))
    assert big.result(5)[1][0].pairs == 3  # a request is never split for a list-level critic
    timed.close()


def _fake_generate(prompts) -> list[str]:
    """JSON answers that depend on each prompt's text; invalid for a product called BAD."""
    out = []
    for p in prompts:
        text = render_chat(p.messages)
        out.append("no json" if "BAD" in text else json.dumps({"score": (sum(map(ord, text)) % 97) / 100,
                                                                 "rationale": f"len {len(text)}"}))
    return out


def test_batcher_gives_each_request_what_it_would_get_alone_and_isolates_failures(tiny_qwen2vl_dir):
    critic = QwenVLCritic(tiny_qwen2vl_dir, batch_size=32, rationale_top_k=2, device="cpu")
    critic.warm_up()
    critic.generate = _fake_generate  # the random model writes no JSON; the bookkeeping is under test
    requests = [_pairs(3, 1), _pairs(4, 2), _pairs(1, 3)]
    bad = [CriticPair("q", None, "bad", "BAD product", None), *_pairs(2, 4)]
    batcher = MicroBatcher(critic, max_pairs=32, max_wait_s=0.3)
    futures = [batcher.submit(r) for r in [*requests, bad]]
    for request, future in zip(requests, futures):
        verdicts, batches = future.result(30)
        _assert_same(verdicts, critic.score(request))  # top-2 rationales per request, not per batch
        assert [v.rationale.startswith("len ") for v in verdicts] == [i < 2 for i in range(len(request))]
        assert batches[0].requests == 4 and batches[0].pairs == 11
    with pytest.raises(CriticUnavailable, match="bad") as err:  # what critic.score(bad) raises alone
        futures[-1].result(30)
    assert isinstance(err.value.__cause__, CriticAnswerError) and err.value.__cause__.reason == "no JSON object found"
    with pytest.raises(CriticUnavailable, match="bad") as alone:
        critic.score(bad)
    assert str(alone.value) == str(err.value)
    batcher.close()
    with pytest.raises(CriticUnavailable, match="closed"):
        batcher.submit(requests[0])


def test_a_message_that_expired_in_the_queue_is_a_timeout_not_an_error():
    """A worker that takes a message after its ``expires`` stores it REVOKED ("expired") instead of
    running it; the client must read that as :class:`CriticTimeout` (the fused order stands), not
    raise Celery's ``TaskRevokedError`` at the search. No worker here: the backend is marked as
    Celery's worker marks it, while the client waits."""
    from celery.signals import before_task_publish

    broker = "redis://127.0.0.1:6379/14"
    with flushed_redis(broker):
        app = Celery("mars-critic-expiry-client", set_as_current=False)
        app.conf.update(celery_config(Settings(broker_url=broker)))
        published: list[str] = []

        def expire(headers=None, **_):
            published.append(headers["id"])
            threading.Timer(0.3, lambda: app.backend.mark_as_revoked(headers["id"], reason="expired")).start()

        before_task_publish.connect(expire, weak=False)
        try:
            t0 = time.monotonic()
            with pytest.raises(CriticTimeout, match=r"revoked \(expired\) before a worker took it") as err:
                QueuedCritic(deadline_ms=10_000, celery_app=app).score(_pairs(2, 5))
        finally:
            before_task_publish.disconnect(expire)
        assert time.monotonic() - t0 < 5  # the REVOKED state answered, not the 10 s deadline
        assert err.value.task_id == published[0] and err.value.deadline_ms == 10_000
        assert isinstance(err.value, TimeoutError)


def _closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client_app(name: str, broker: str, **conf) -> Celery:
    """A client app with the API's configuration on ``broker`` (and ``conf`` on top)."""
    app = Celery(name, set_as_current=False)
    app.conf.update({**celery_config(Settings(broker_url=broker)), **conf})
    return app


@pytest.mark.parametrize("stored", [
    CriticUnavailable("the Qwen2-VL critic (tiny) gave no readable answer: product p5-0: no JSON object found"),
    ValueError("critic payload version 99; this worker reads version 2"),
])
def test_a_failure_on_the_worker_is_critic_unavailable_chained_from_it(stored):
    """Whatever the worker's task raised is stored as its FAILURE and re-raised by Celery at the
    client, which must turn it into :class:`CriticUnavailable` (the fused order stands). No
    worker here: the backend is marked as Celery's worker marks a failed task, while the client waits."""
    from celery.signals import before_task_publish

    broker = "redis://127.0.0.1:6379/14"
    with flushed_redis(broker):
        app = _client_app("mars-critic-failure-client", broker)
        published: list[str] = []

        def fail(headers=None, **_):
            published.append(headers["id"])
            threading.Timer(0.3, lambda: app.backend.mark_as_failure(headers["id"], stored)).start()

        before_task_publish.connect(fail, weak=False)
        try:
            t0 = time.monotonic()
            with pytest.raises(CriticUnavailable) as err:
                QueuedCritic(deadline_ms=10_000, celery_app=app).score(_pairs(2, 6))
        finally:
            before_task_publish.disconnect(fail)
    assert time.monotonic() - t0 < 5  # the stored failure answered, not the 10 s deadline
    assert not isinstance(err.value, CriticTimeout)
    assert f"task {published[0]} failed on the worker: {type(stored).__name__}: {stored}" in str(err.value)
    assert type(err.value.__cause__) is type(stored) and str(err.value.__cause__) == str(stored)


def test_an_unreachable_broker_or_result_store_is_critic_unavailable():
    dead = f"redis://:secret@127.0.0.1:{_closed_port()}/0"
    # the broker is down, the result store up: kombu's OperationalError after the publish retries
    app = _client_app("mars-critic-no-broker", dead, result_backend="redis://127.0.0.1:6379/14")
    t0 = time.monotonic()
    with pytest.raises(CriticUnavailable, match=r"cannot reach the broker at redis://:\*\*@127\.0\.0\.1") as err:
        QueuedCritic(deadline_ms=3000, celery_app=app).score(_pairs(2, 7))
    assert time.monotonic() - t0 < 3 and "secret" not in str(err.value)
    assert isinstance(err.value.__cause__, OperationalError) and "Connection refused" in str(err.value)
    # both down: the result store fails first (it subscribes before the message is sent), after
    # its own reconnect retries (shortened here; Celery's default policy retries 20 times, ~19 s)
    fast_retry = {"retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.1}}
    app = _client_app("mars-critic-no-redis", dead, result_backend_transport_options=fast_retry)
    with pytest.raises(CriticUnavailable, match="cannot reach the result backend at redis://:\\*\\*@") as err:
        QueuedCritic(deadline_ms=3000, celery_app=app).score(_pairs(2, 7))
    assert isinstance(err.value.__cause__, RuntimeError) and "Connection refused" in str(err.value)


# ---------------------------------------------------------------- the real worker


class Worker:
    """One ``critic`` worker process and the client app of this test process."""

    def __init__(self, model_dir: Path, home: Path, log: Path) -> None:
        env = {
            **os.environ,
            "MARS_BROKER_URL": BROKER,
            "MARS_HOME": str(home),
            "MARS_CRITIC": "vlm",
            "MARS_CRITIC_QUEUE": "true",  # the API's shared configuration: the worker still serves the model
            "MARS_CRITIC_MODEL": str(model_dir),
            "MARS_CRITIC_RATIONALE_TOP_K": "0",
            "MARS_CRITIC_BATCH_SIZE": "32",  # one forward pass per batch
            "MARS_CRITIC_QUEUE_MAX_PAIRS": "32",
            "MARS_CRITIC_QUEUE_MAX_WAIT_MS": "300",  # wide window: concurrent test requests surely meet
        }
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "critic", "-P", "threads",
             "-c", "4", "--prefetch-multiplier", "1", "-n", "critic-test@%h", "--without-gossip",
             "--without-mingle", "-l", "INFO"],
            env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=REPO,
        )
        self.app = Celery("mars-critic-test-client", set_as_current=False)  # the API's configuration
        self.app.conf.update(celery_config(Settings(broker_url=BROKER)))

    def client(self, deadline_ms: float = 3000, **kw) -> QueuedCritic:
        return QueuedCritic(deadline_ms=deadline_ms, celery_app=self.app, **kw)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until a probe request is answered (the worker warms up before consuming)."""
        probe, end = self.client(deadline_ms=2000), time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the critic worker exited ({self.proc.returncode}):\n{self.tail()}", pytrace=False)
            try:
                probe.score(_pairs(1, 99))
                return
            except CriticTimeout:
                continue
        pytest.fail(f"the critic worker was not ready in {timeout_s} s:\n{self.tail()}", pytrace=False)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def worker(tiny_qwen2vl_dir, tmp_path_factory) -> Iterator[Worker]:
    with flushed_redis(BROKER):
        w = Worker(tiny_qwen2vl_dir, tmp_path_factory.mktemp("mars-home"), tmp_path_factory.mktemp("logs") / "critic.log")
        try:
            w.wait_ready()
            yield w
        finally:
            w.stop()


def test_queued_scores_equal_in_process_scores(worker, reference):
    pairs = _pairs(5, 10)
    assert worker.client().name == "queued:vlm" and isinstance(worker.client(), Critic)
    _assert_same(worker.client(deadline_ms=20_000).score(pairs), reference.score(_jpeg(pairs)))
    # lossless transport: the very pixels of this process
    _assert_same(worker.client(deadline_ms=20_000, image_format="PNG").score(pairs), reference.score(pairs))
    assert worker.client().score([]) == []


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_verdicts(worker, reference):
    requests = [_pairs(3, 20 + i) for i in range(4)]
    client = worker.client(deadline_ms=20_000)
    replies: list = [None] * len(requests)
    gate = threading.Barrier(len(requests))

    def call(i: int) -> None:
        gate.wait()
        replies[i] = client.request(requests[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r is not None for r in replies), worker.tail()
    for request, reply in zip(requests, replies):
        _assert_same(reply.verdicts, reference.score(_jpeg(request)))
    model_calls = {b.id for r in replies for b in r.batches}
    assert len(model_calls) < len(requests), [r.batches for r in replies]
    assert max(b.requests for r in replies for b in r.batches) >= 2


def test_deadline_raises_critic_timeout_and_later_requests_are_unaffected(worker, reference):
    t0 = time.monotonic()
    with pytest.raises(CriticTimeout, match="within 1 ms") as err:
        worker.client(deadline_ms=1).score(_pairs(3, 30))
    assert time.monotonic() - t0 < 0.5 and isinstance(err.value, TimeoutError) and err.value.task_id
    after = _pairs(2, 31)
    _assert_same(worker.client(deadline_ms=20_000).score(after), reference.score(_jpeg(after)))
    # the worker never scored the late request: Celery expired it (REVOKED) or the batcher dropped it
    late = worker.app.AsyncResult(err.value.task_id)
    end = time.monotonic() + 5
    while late.state not in ("REVOKED", "FAILURE") and time.monotonic() < end:
        time.sleep(0.05)
    assert late.state in ("REVOKED", "FAILURE"), (late.state, worker.tail())


def test_registry_sends_the_named_critic_to_the_queue(tmp_path):
    from mars.wiring import stage3_critic

    critic, detail = stage3_critic(Settings(home=tmp_path, critic="vlm", critic_model=str(tmp_path), critic_queue=True))
    assert isinstance(critic, QueuedCritic) and critic.name == "queued:vlm" and "'critic' queue" in detail
    assert stage3_critic(Settings(home=tmp_path, critic="none", critic_queue=True)) == (None, "MARS_CRITIC=none")


class TestQueuedCriticContract(CriticContract):
    """The critic contract for the queued client against the real worker (tiny Qwen2-VL, fast path)."""

    @pytest.fixture
    def critic(self, worker) -> QueuedCritic:
        return worker.client(deadline_ms=20_000)

    @pytest.fixture
    def failing_critic(self) -> QueuedCritic:
        """A client whose broker refuses connections (its result store is the real Redis)."""
        app = _client_app("mars-critic-contract-no-broker", f"redis://127.0.0.1:{_closed_port()}/0",
                          result_backend="redis://127.0.0.1:6379/14")
        return QueuedCritic(deadline_ms=3000, celery_app=app)

    def test_the_contract_pairs_score_as_in_process(self, critic, reference):
        pairs = contract_pairs()
        _assert_same(critic.score(pairs), reference.score(_jpeg(pairs)))
