"""The OpenAI-compatible critic (critic/openai_compat.py) against a real loopback HTTP server that
implements ``POST /v1/chat/completions`` with OpenAI's documented response shape, and against a
loopback server that accepts connections and never answers (:class:`StallingServer`)."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from PIL import Image

from contract_critic import CriticContract
from critic.openai_compat import OpenAICompatCritic, image_data_url, to_openai_messages
from critic.prompt import JSON_QUESTION, CriticAnswer, CriticAnswerError, build_prompt
from critic.protocol import Critic, CriticPair, CriticUnavailable, Verdict

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
ROOM = Image.new("RGB", (48, 32), (200, 180, 150))


def _pairs(n: int, query: str = "a lamp for this bedroom") -> list[CriticPair]:
    return [
        CriticPair(query, ROOM, f"p{i:02d}", f"product p{i:02d}, a lamp", Image.new("RGB", (32, 32), (i * 10, 0, 0)))
        for i in range(n)
    ]


def completion(content: str | None, finish_reason: str = "stop") -> dict:
    """A chat completion in the shape of OpenAI's API reference (object "chat.completion")."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def product_of(body: dict) -> str:
    """The product id named in the first user message's last text part ("Product: product pNN, ...")."""
    text = body["messages"][0]["content"][-1]["text"]
    return re.search(r"Product: product (p\d+)", text).group(1)


def good_answer(product: str) -> str:
    return json.dumps({"score": int(product[1:]) / 20, "rationale": f"fits {product}"})


class Server(ThreadingHTTPServer):
    """Loopback chat-completions server; ``reply(body, headers, n)`` gives ``(status, payload, delay_s)``
    for the n-th request (1-based); records the bodies, headers and the most requests in flight."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.reply: Callable[[dict, dict, int], tuple[int, dict, float]] = lambda b, h, n: (
            200, completion(good_answer(product_of(b))), 0.0)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s = self.server
        with s.lock:
            s.bodies.append(body)
            s.headers.append({k.lower(): v for k, v in self.headers.items()})
            n = len(s.bodies)
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            if self.path != "/v1/chat/completions":
                status, payload, delay = 404, {"error": {"message": f"no route {self.path}"}}, 0.0
            else:
                status, payload, delay = s.reply(body, s.headers[n - 1], n)
            if delay and s.stopping.wait(delay):
                return
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            with s.lock:
                s.in_flight -= 1


@contextmanager
def running_server() -> Iterator[Server]:
    """A :class:`Server` serving on a daemon thread for the ``with`` block, then stopped."""
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()


class StallingServer:
    """A loopback TCP server that accepts every connection and never answers: it reads nothing,
    writes nothing and keeps the sockets open until :meth:`close` (an endpoint that hangs).
    ``url`` is its ``/v1`` API root; ``accepted`` counts the connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="stalling-server", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def accepted(self) -> int:
        return len(self.held)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.held.append(conn)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()

    def __enter__(self) -> StallingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refused_url() -> str:
    """A loopback ``/v1`` URL on a port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.fixture
def server():
    with running_server() as srv:
        yield srv


@pytest.fixture
def make_critic(server):
    made: list[OpenAICompatCritic] = []

    def make(**kwargs) -> OpenAICompatCritic:
        kwargs.setdefault("timeout_s", 5)
        kwargs.setdefault("max_retries", 0)
        critic = OpenAICompatCritic(server.url, MODEL, **kwargs)
        made.append(critic)
        return critic

    yield make
    for critic in made:
        critic.close()


def _decode(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
    assert image.format == "JPEG"
    return image


# ---------------------------------------------------------------- (1) scores, order, request body


def test_scores_rationales_in_input_order_and_request_format(server, make_critic):
    critic = make_critic(max_tokens=64)
    assert isinstance(critic, Critic) and critic.name == "openai" and critic.uses_images
    pairs = _pairs(20)
    verdicts = critic.score(pairs)

    assert [v.score for v in verdicts] == [i / 20 for i in range(20)]
    assert [v.rationale for v in verdicts] == [f"fits p{i:02d}" for i in range(20)]
    assert all(isinstance(v, Verdict) and v.backend == f"openai:{MODEL}" for v in verdicts)
    assert len({v.latency_s for v in verdicts}) == 1 and verdicts[0].latency_s > 0

    assert len(server.bodies) == 20
    room_urls = set()
    for body, headers in zip(server.bodies, server.headers):
        assert body["model"] == MODEL and body["temperature"] == 0 and body["max_tokens"] == 64
        assert "response_format" not in body
        assert headers["authorization"] == "Bearer EMPTY"
        [message] = body["messages"]
        assert message["role"] == "user"
        parts = message["content"]
        images = [p for p in parts if p["type"] == "image_url"]
        assert len(images) == 2 and {p["type"] for p in parts} == {"text", "image_url"}
        # the room photo is the first part after its caption: the shared prefix of all 20 requests
        assert parts[0] == {"type": "text", "text": "Room photo:\n"} and parts[1]["type"] == "image_url"
        assert _decode(images[0]["image_url"]["url"]).size == (48, 32)
        assert _decode(images[1]["image_url"]["url"]).size == (32, 32)
        assert parts[-1]["text"].endswith(JSON_QUESTION)
        room_urls.add(images[0]["image_url"]["url"])
    assert len(room_urls) == 1  # byte-identical room photo in every request (prefix cache)
    # the 20 requests differ only after the room + request prefix
    prefixes = {json.dumps(b["messages"][0]["content"][:4]) for b in server.bodies}
    assert len(prefixes) == 1


def test_answers_give_the_validated_teacher_answers(server, make_critic):
    answers = make_critic().answers(_pairs(3))
    assert all(isinstance(a, CriticAnswer) for a in answers)
    assert [(a.score, a.rationale) for a in answers] == [(0.0, "fits p00"), (0.05, "fits p01"), (0.1, "fits p02")]
    assert make_critic().answers([]) == [] and make_critic().score([]) == []


def test_json_mode_sends_response_format_and_text_only_pairs_send_no_images(server, make_critic):
    pair = CriticPair(None, None, "p03", "product p03, a rug", None)
    verdict, = make_critic(json_mode=True).score([pair])
    assert verdict.score == 0.15
    [body] = server.bodies
    assert body["response_format"] == {"type": "json_object"}
    assert all(p["type"] == "text" for p in body["messages"][0]["content"])


def test_message_conversion():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert _decode(image_data_url(rgba)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert image_data_url(ROOM) == image_data_url(ROOM)
    prompt = build_prompt(_pairs(1)[0], JSON_QUESTION)
    urls = {id(ROOM): "data:image/jpeg;base64,ROOM"}
    parts = to_openai_messages(prompt, urls)[0]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,ROOM"}}
    assert parts[5]["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")  # encoded on the fly
    with pytest.raises(ValueError, match="more image parts than its 1 images"):
        to_openai_messages(type(prompt)(prompt.messages, prompt.images[:1]))
    with pytest.raises(ValueError, match="2 image parts for 3 images"):
        to_openai_messages(type(prompt)(prompt.messages, prompt.images + [ROOM]))


# ---------------------------------------------------------------- (2) repair round


def test_invalid_json_once_is_repaired_with_a_second_request(server, make_critic):
    def reply(body, headers, n):
        product = product_of(body)
        if product == "p01" and len(body["messages"]) == 1:
            return 200, completion("Sure, it fits nicely!"), 0.0
        return 200, completion(good_answer(product)), 0.0

    server.reply = reply
    verdicts = make_critic().score(_pairs(3))
    assert [v.score for v in verdicts] == [0.0, 0.05, 0.1]
    for_p01 = [b for b in server.bodies if product_of(b) == "p01"]
    assert len(for_p01) == 2 and len(server.bodies) == 4
    first, repair = for_p01
    assert [m["role"] for m in repair["messages"]] == ["user", "assistant", "user"]
    assert repair["messages"][0] == first["messages"][0]  # same prompt, same images, as prefix
    assert repair["messages"][1] == {"role": "assistant", "content": "Sure, it fits nicely!"}
    follow_up = repair["messages"][2]["content"][0]["text"]
    assert "not valid: no JSON object found" in follow_up and "valid JSON only" in follow_up


def test_invalid_json_twice_raises_naming_the_product(server, make_critic):
    def reply(body, headers, n):
        product = product_of(body)
        if product == "p02":
            return 200, completion('{"score": 7, "rationale": "great"}'), 0.0
        return 200, completion(good_answer(product)), 0.0

    server.reply = reply
    with pytest.raises(CriticUnavailable, match=r"product p02: .*no valid JSON answer after one repair") as info:
        make_critic().score(_pairs(4))
    assert f"at {server.url} ({MODEL}) gave no readable answer" in str(info.value)
    assert isinstance(info.value.__cause__, CriticAnswerError)
    assert "less than or equal to 1" in info.value.__cause__.reason
    assert len([b for b in server.bodies if product_of(b) == "p02"]) == 2
    # the teacher's answers (distillation) still name the invalid answer itself
    with pytest.raises(CriticAnswerError, match=r"product p02: .*no valid JSON answer after one repair") as info:
        make_critic().answers(_pairs(4))
    assert "less than or equal to 1" in info.value.reason


def test_cut_answer_says_max_tokens(server, make_critic):
    server.reply = lambda body, headers, n: (200, completion('{"score": 0.5, "rat', "length"), 0.0)
    with pytest.raises(CriticUnavailable, match=r"product p00: .*cut at max_tokens=16") as info:
        make_critic(max_tokens=16).score(_pairs(1))
    assert isinstance(info.value.__cause__, CriticAnswerError)
    assert "cut at max_tokens=16" in server.bodies[1]["messages"][2]["content"][0]["text"]


# ---------------------------------------------------------------- (3) retries and timeouts


def test_503_then_200_is_retried_by_the_sdk(server, make_critic):
    def reply(body, headers, n):
        if n == 1:
            return 503, {"error": {"message": "overloaded"}}, 0.0
        return 200, completion(good_answer(product_of(body))), 0.0

    server.reply = reply
    verdict, = make_critic(max_retries=1).score(_pairs(1))
    assert verdict.score == 0.0 and len(server.bodies) == 2


def test_503_without_retries_raises_the_sdk_error_naming_the_product(server, make_critic):
    server.reply = lambda body, headers, n: (503, {"error": {"message": "overloaded"}}, 0.0)
    with pytest.raises(CriticUnavailable, match=rf"at {re.escape(server.url)} .* answered HTTP 503 \(up to 0 retries\)") as info:
        make_critic(max_retries=0).score(_pairs(1))
    cause = info.value.__cause__
    assert isinstance(cause, openai.InternalServerError) and cause.status_code == 503
    assert any("product p00" in note and MODEL in note for note in cause.__notes__)
    with pytest.raises(openai.InternalServerError):  # the teacher's answers raise the SDK's error itself
        make_critic(max_retries=0).answers(_pairs(1))


def test_a_server_that_never_answers_times_out_quickly(server, make_critic):
    server.reply = lambda body, headers, n: (200, completion(good_answer(product_of(body))), 30.0)
    critic = make_critic(timeout_s=0.5, max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(CriticUnavailable, match=r"timed out: no answer within timeout_s=0\.5 s") as info:
        critic.score(_pairs(2))
    assert time.perf_counter() - t0 < 3.0
    assert isinstance(info.value.__cause__, openai.APITimeoutError)
    assert any("while judging product p0" in note for note in info.value.__cause__.__notes__)


def test_a_stalled_endpoint_is_unavailable_within_a_few_seconds():
    """An endpoint that accepts the connection and never answers: timeout_s bounds each request,
    and after the first failure no further request is sent, so 20 pairs cost one wave."""
    with StallingServer() as stalled:
        critic = OpenAICompatCritic(stalled.url, MODEL, timeout_s=0.5, max_retries=0, max_concurrency=8)
        t0 = time.perf_counter()
        with pytest.raises(CriticUnavailable) as info:
            critic.score(_pairs(20))
        elapsed = time.perf_counter() - t0
        critic.close()
        assert stalled.accepted == 8  # the first wave only
    assert 0.5 <= elapsed < 3.0
    message = str(info.value)
    assert message == (f"the OpenAI-compatible critic at {stalled.url} ({MODEL}) timed out: "
                       "no answer within timeout_s=0.5 s (0 retries)")
    assert isinstance(info.value.__cause__, openai.APITimeoutError)


def test_a_refused_connection_is_unavailable_naming_the_endpoint():
    url = refused_url()
    with OpenAICompatCritic(url, MODEL, max_retries=0) as critic:
        with pytest.raises(CriticUnavailable, match=rf"at {re.escape(url)} \({re.escape(MODEL)}\) could not be "
                           r"reached \(0 retries\): Connection error\. \(.*Connection refused\)") as info:
            critic.score(_pairs(3))
    assert type(info.value.__cause__) is openai.APIConnectionError


@pytest.mark.parametrize(("content_type", "body", "reason"), [
    ("text/html", b"<html><body>502 Bad Gateway</body></html>", "response is not a chat completion"),
    ("application/json", b"not json", "response body is not JSON"),
    ("application/json", b'{"object": "list", "data": []}', "no choices"),
    ("application/json", b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": 5}}]}',
     "message content is not text"),
])
def test_a_200_that_is_not_a_chat_completion_is_unavailable(content_type, body, reason):
    """A proxy's HTML page, a body that is not JSON, JSON of another shape: a response the critic
    cannot read (a server's fault, not the model's: no repair request), never an AttributeError."""
    requests: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.05)
        done = threading.Event()

        def serve() -> None:
            while not done.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    requests.append(conn.recv(1 << 20))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                                 % (content_type.encode(), len(body)) + body)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        try:
            with OpenAICompatCritic(url, MODEL, max_retries=0) as critic:
                with pytest.raises(CriticUnavailable, match=rf"at {re.escape(url)} .* gave no readable answer: product p00") as info:
                    critic.score(_pairs(1))
        finally:
            done.set()
            thread.join(5)
    assert isinstance(info.value.__cause__, CriticAnswerError) and info.value.__cause__.reason == reason
    assert len(requests) == 1 and requests[0].startswith(b"POST /v1/chat/completions")


def test_a_rationale_over_several_lines_reads_as_one_line(server, make_critic):
    server.reply = lambda body, headers, n: (200, completion(json.dumps(
        {"score": 0.4, "rationale": "Warm light;\n  suits the\r\nbedroom. "})), 0.0)
    verdict, = make_critic().score(_pairs(1))
    assert (verdict.score, verdict.rationale) == (0.4, "Warm light; suits the bedroom.")


def test_wrong_base_url_gives_a_clear_error(server):
    with OpenAICompatCritic(server.url.removesuffix("/v1"), MODEL, max_retries=0) as critic:
        with pytest.raises(CriticUnavailable, match=r"answered HTTP 404: ") as info:
            critic.score(_pairs(1))
    assert server.url.removesuffix("/v1") in str(info.value)
    assert isinstance(info.value.__cause__, openai.NotFoundError)
    assert any(server.url.removesuffix("/v1") in note for note in info.value.__cause__.__notes__)


# ---------------------------------------------------------------- (4) concurrency


def test_requests_run_concurrently_up_to_max_concurrency(server, make_critic):
    server.reply = lambda body, headers, n: (200, completion(good_answer(product_of(body))), 0.2)
    t0 = time.perf_counter()
    verdicts = make_critic(max_concurrency=4).score(_pairs(8))
    elapsed = time.perf_counter() - t0
    assert [v.score for v in verdicts] == [i / 20 for i in range(8)]
    assert 1 < server.max_in_flight <= 4
    assert elapsed < 8 * 0.2  # not serial
    assert verdicts[0].latency_s >= 0.4  # two waves of 0.2 s


# ---------------------------------------------------------------- (5) constructor validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": ""}, "base_url must be a non-empty URL"),
        ({"base_url": "localhost:8000/v1"}, "must start with http:// or https://"),
        ({"model": " "}, "model must be"),
        ({"api_key": ""}, "api_key must be a non-empty string"),
        ({"timeout_s": 0}, "timeout_s must be a finite number of seconds > 0"),
        ({"timeout_s": float("inf")}, "timeout_s must be"),
        ({"timeout_s": "30"}, "timeout_s must be"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"max_retries": 1.5}, "max_retries must be an integer"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"json_mode": "yes"}, "json_mode must be True or False"),
    ],
)
def test_constructor_validation(kwargs, message):
    args = {"base_url": "http://127.0.0.1:9/v1", "model": MODEL, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        OpenAICompatCritic(**args)


def test_constructor_defaults_open_no_connection():
    critic = OpenAICompatCritic("http://127.0.0.1:9/v1", MODEL)
    assert (critic.timeout_s, critic.max_retries, critic.max_concurrency, critic.max_tokens, critic.json_mode) == (
        30.0, 2, 8, 128, False)
    assert critic.client.api_key == "EMPTY" and critic.client.max_retries == 2
    assert repr(critic) == f"OpenAICompatCritic(base_url='http://127.0.0.1:9/v1', model='{MODEL}')"
    critic.close()


def test_registry_builds_the_endpoint_critic_from_settings(tmp_path):
    from critic.openai_compat import OpenAICompatCritic
    from mars.registry import build_critic
    from mars.settings import Settings

    with pytest.raises(ValueError, match="MARS_CRITIC_ENDPOINT"):
        build_critic(Settings(home=tmp_path, critic="openai"))
    critic, detail = build_critic(Settings(
        home=tmp_path, critic="openai", critic_endpoint="http://127.0.0.1:9/v1", critic_api_model="qwen-vl",
        critic_api_key="secret", critic_timeout_s=2,
    ))
    assert isinstance(critic, OpenAICompatCritic) and "qwen-vl" in detail and "secret" not in detail


class TestOpenAICompatCriticContract(CriticContract):
    """The critic contract against the loopback chat-completions server (scores by product id)."""

    @pytest.fixture
    def critic(self, make_critic) -> OpenAICompatCritic:
        return make_critic()

    @pytest.fixture
    def failing_critic(self) -> Iterator[OpenAICompatCritic]:
        """An endpoint that refuses connections."""
        with OpenAICompatCritic(refused_url(), MODEL, max_retries=0) as critic:
            yield critic
