"""The one registry of swappable parts: a setting's name → the factory that builds it.

:class:`mars.settings.Settings` validates ``MARS_VECTOR_BACKEND``, ``MARS_LEXICAL_BACKEND`` and
``MARS_CRITIC`` against these tables, and the engine's wiring (:mod:`mars.stores`,
:mod:`mars.wiring`) builds what they name through them; nothing else switches on a backend's
name. Importing this module loads no engine: each factory imports its implementation when
called. Adding a backend is one entry here and one module beside its protocol
(``docs/architecture.md``, "Adding a backend").

| seam | protocol | names |
|---|---|---|
| vector store | :class:`indexing.vector_store.VectorStore` | ``qdrant-edge``, ``faiss``, ``qdrant`` |
| lexical index | :class:`indexing.lexical_index.LexicalIndex` | ``tantivy``, ``opensearch`` |
| critic | :class:`critic.protocol.Critic` | ``none``, ``learned``, ``vlm``, ``openai`` |
| encoders | :class:`indexing.encoders.ImageEncoder` / ``TextEncoder`` | see :func:`load_encoders` |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from indexing.encoders import EncoderConfigError, ImageEncoder, TextEncoder

if TYPE_CHECKING:
    from critic.protocol import Critic
    from indexing.lexical_index import LexicalIndex
    from indexing.vector_store import VectorStore
    from mars.settings import Settings


def _is_http(url: str | None) -> bool:
    return (url or "").startswith(("http://", "https://"))


# ------------------------------------------------------------------ vector stores


@dataclass(frozen=True)
class VectorBackend:
    """A vector backend: how to open its store, whether it lives in this process, and whether
    queries are served by the exact FAISS ``IndexFlatIP`` reference built from the store's
    vectors (``exact_search``) instead of the store's own index."""

    description: str
    open: Callable[["Settings", Path, dict[str, int]], "VectorStore"]
    embedded: Callable[["Settings"], bool]
    exact_search: bool = False


def _open_qdrant_edge(settings: "Settings", home: Path, dims: dict[str, int]) -> "VectorStore":
    from indexing.qdrant_edge import QdrantEdgeStore

    return QdrantEdgeStore(home / "index" / "vectors", dims)


def _open_qdrant_server(settings: "Settings", home: Path, dims: dict[str, int]) -> "VectorStore":
    from indexing.qdrant_server import QdrantServerStore

    url = settings.qdrant_url or ""  # checked by check_url
    if _is_http(url):
        return QdrantServerStore(dims, url=url, api_key=settings.qdrant_api_key)
    return QdrantServerStore(dims, path=url)


VECTOR_BACKENDS: dict[str, VectorBackend] = {
    "qdrant-edge": VectorBackend("Qdrant Edge shard in MARS_HOME/index/vectors (embedded default)",
                                 _open_qdrant_edge, lambda s: True),
    "faiss": VectorBackend("the Qdrant Edge shard, queried through the exact FAISS IndexFlatIP reference",
                           _open_qdrant_edge, lambda s: True, exact_search=True),
    "qdrant": VectorBackend("a Qdrant server or cluster at MARS_QDRANT_URL via qdrant-client (a directory or "
                            ":memory: runs its local mode in this process)",
                            _open_qdrant_server, lambda s: not _is_http(s.qdrant_url)),
}


def check_url(settings: "Settings") -> None:
    """Refuse server backends named without their URL, before anything is opened.

    Raises:
        ValueError: ``qdrant`` without ``MARS_QDRANT_URL`` or ``opensearch`` without ``MARS_OPENSEARCH_URL``.
    """
    if settings.vector_backend == "qdrant" and not settings.qdrant_url:
        raise ValueError("MARS_VECTOR_BACKEND=qdrant needs MARS_QDRANT_URL (http://host:6333, a directory or :memory:)")
    if settings.lexical_backend == "opensearch" and not settings.opensearch_url:
        raise ValueError("MARS_LEXICAL_BACKEND=opensearch needs MARS_OPENSEARCH_URL (http://host:9200)")


# ------------------------------------------------------------------ lexical indexes


@dataclass(frozen=True)
class LexicalBackend:
    """A BM25 backend: how to open its index and whether it lives in this process."""

    description: str
    open: Callable[["Settings", Path], "LexicalIndex"]
    embedded: bool


def _boosts(settings: "Settings") -> dict[str, float]:
    return {"title": settings.boost_title, "type": settings.boost_type, "colour": settings.boost_colour,
            "text": settings.boost_text}


def _open_tantivy(settings: "Settings", home: Path) -> "LexicalIndex":
    from indexing.tantivy_index import TantivyIndex

    return TantivyIndex(home / "index" / "bm25", _boosts(settings))


def _open_opensearch(settings: "Settings", home: Path) -> "LexicalIndex":
    from indexing.opensearch import OpenSearchIndex

    return OpenSearchIndex(_boosts(settings), url=settings.opensearch_url, k1=settings.bm25_k1, b=settings.bm25_b,
                           replicas=settings.opensearch_replicas)


LEXICAL_BACKENDS: dict[str, LexicalBackend] = {
    "tantivy": LexicalBackend("tantivy index in MARS_HOME/index/bm25 (embedded default)", _open_tantivy, True),
    "opensearch": LexicalBackend("an OpenSearch cluster at MARS_OPENSEARCH_URL", _open_opensearch, False),
}


def embedded_stores(settings: "Settings") -> bool:
    """True when a store lives in this process (then one process owns ``MARS_HOME`` and runs
    every write itself); False when both stores are servers (any number of API and worker
    processes share them and bulk jobs go to the queues)."""
    return VECTOR_BACKENDS[settings.vector_backend].embedded(settings) or LEXICAL_BACKENDS[settings.lexical_backend].embedded


# ------------------------------------------------------------------ critics


def _no_critic(settings: "Settings") -> tuple["Critic | None", str]:
    return None, "MARS_CRITIC=none"


def _learned_critic(settings: "Settings") -> tuple["Critic | None", str]:
    from critic.learned import LearnedCritic

    checkpoint = settings.critic_path
    if not checkpoint.exists():
        return None, f"no learned-critic checkpoint at {checkpoint}; train one with `mars train critic`"
    critic = LearnedCritic.load(checkpoint)
    return critic, f"learned critic from {checkpoint} ({critic.meta.get('pairs', '?')} training pairs)"


def _vlm_critic(settings: "Settings") -> tuple["Critic | None", str]:
    if not settings.critic_model:
        raise ValueError("MARS_CRITIC=vlm needs MARS_CRITIC_MODEL (a local Qwen2-VL directory)")
    from critic.vlm import QwenVLCritic  # torch-heavy; only when asked for

    vlm = QwenVLCritic(
        settings.critic_model,
        adapter=settings.critic_adapter,
        load_in_4bit=settings.critic_4bit,
        batch_size=settings.critic_batch_size,
        rationale_top_k=settings.critic_rationale_top_k,
    )
    adapter = f" + LoRA {settings.critic_adapter}" if settings.critic_adapter else ""
    return vlm, f"Qwen2-VL critic from {settings.critic_model}{adapter}"


def _openai_critic(settings: "Settings") -> tuple["Critic | None", str]:
    if not settings.critic_endpoint or not settings.critic_api_model:
        raise ValueError(
            "MARS_CRITIC=openai needs MARS_CRITIC_ENDPOINT (e.g. http://localhost:8000/v1) "
            "and MARS_CRITIC_API_MODEL (the served model name)"
        )
    from critic.openai_compat import OpenAICompatCritic  # imports the openai SDK only when asked for

    key = settings.critic_api_key.get_secret_value() if settings.critic_api_key else None
    api = OpenAICompatCritic(
        settings.critic_endpoint,
        settings.critic_api_model,
        api_key=key,
        timeout_s=settings.critic_timeout_s,
        max_retries=settings.critic_max_retries,
        max_concurrency=settings.critic_max_concurrency,
    )
    return api, f"OpenAI-compatible critic {settings.critic_api_model} at {settings.critic_endpoint}"


#: ``MARS_CRITIC`` name → factory returning ``(critic or None, a one-line note for responses)``.
CRITICS: dict[str, Callable[["Settings"], tuple["Critic | None", str]]] = {
    "none": _no_critic,
    "learned": _learned_critic,
    "vlm": _vlm_critic,
    "openai": _openai_critic,
}


def build_critic(settings: "Settings") -> tuple["Critic | None", str]:
    """The critic ``settings.critic`` names, built in this process, and a one-line note for
    responses. (With ``MARS_CRITIC_QUEUE`` the engine's wiring sends its work to the Celery
    ``critic`` queue instead, whose worker builds its critic with this same function.)

    ``"none"`` gives ``(None, "MARS_CRITIC=none")``. ``"learned"`` loads
    ``settings.critic_path`` and, when it does not exist yet, gives ``(None, "<how to train
    one>")`` so search keeps working and ``--mode full`` says why nothing was re-scored.
    ``"vlm"`` builds a :class:`critic.vlm.QwenVLCritic` from ``MARS_CRITIC_MODEL`` (weights
    load on first use, not here); ``"openai"`` a :class:`critic.openai_compat.OpenAICompatCritic`
    on ``MARS_CRITIC_ENDPOINT``.

    Raises:
        ValueError: an unknown name, ``vlm`` without ``MARS_CRITIC_MODEL``, ``openai``
            without ``MARS_CRITIC_ENDPOINT`` / ``MARS_CRITIC_API_MODEL``, or a file that is not
            a learned-critic checkpoint.
        RuntimeError: ``MARS_CRITIC_4BIT`` without CUDA or bitsandbytes.
    """
    factory = CRITICS.get(settings.critic)
    if factory is None:
        raise ValueError(f"unknown critic {settings.critic!r}; available: {', '.join(CRITICS)}")
    return factory(settings)


# ------------------------------------------------------------------ encoders

#: Image encoder specs: a name, or ``hf:<dir>`` (a local transformers SigLIP or CLIP checkpoint).
IMAGE_ENCODERS: tuple[str, ...] = ("efficientnet-lite0-gem", "efficientnet-lite0", "hf:<dir>")
#: Text encoder specs: a name, ``st:<dir>`` (a local sentence-transformers model) or ``hf:<dir>``.
TEXT_ENCODERS: tuple[str, ...] = ("all-minilm-l6-v2", "st:<dir>", "hf:<dir>")


def load_encoders(image_spec: str, text_spec: str, batch_size: int = 8, *, runtime: str = "onnx",
                  cache_dir: Path | None = None, threads: int = 0) -> tuple[ImageEncoder, TextEncoder]:
    """Build the (image, text) encoders named by the settings (:data:`IMAGE_ENCODERS`,
    :data:`TEXT_ENCODERS`). The same ``hf:<dir>`` on both sides loads the model once.
    EfficientNet-Lite0 and sentence-transformers models run on ``runtime`` (``onnx``: ONNX
    Runtime, their exports cached in ``cache_dir``; ``torch``: PyTorch eager) with ``threads``
    intra-op threads (0: every core); ``hf:<dir>`` models run in PyTorch.

    Raises:
        EncoderConfigError: for an unknown spec or runtime, or a missing directory.
    """
    shared: dict[str, object] = {}

    def hf(path: str):  # noqa: ANN202 - indexing.hf_encoder.HFDualEncoder
        from indexing.hf_encoder import HFDualEncoder

        if path not in shared:
            shared[path] = HFDualEncoder(path, batch_size=batch_size)
        return shared[path]

    if image_spec in ("efficientnet-lite0-gem", "efficientnet-lite0"):
        from indexing.efficientnet import GEM_POWER, EfficientNetLite0Encoder

        power = GEM_POWER if image_spec == "efficientnet-lite0-gem" else 1.0
        image: ImageEncoder = EfficientNetLite0Encoder(batch_size=batch_size, pooling_power=power, runtime=runtime,
                                                       cache_dir=cache_dir, threads=threads)
    elif image_spec.startswith("hf:"):
        image = hf(image_spec[3:])  # type: ignore[assignment]
    else:
        raise EncoderConfigError(f"unknown image encoder {image_spec!r}: use {', '.join(IMAGE_ENCODERS)}")
    if text_spec == "all-minilm-l6-v2" or text_spec.startswith("st:"):
        from indexing.sentence_encoder import SentenceTransformerEncoder

        text: TextEncoder = SentenceTransformerEncoder(None if text_spec == "all-minilm-l6-v2" else text_spec[3:],
                                                       runtime=runtime, cache_dir=cache_dir, threads=threads)
    elif text_spec.startswith("hf:"):
        text = hf(text_spec[3:])  # type: ignore[assignment]
    else:
        raise EncoderConfigError(f"unknown text encoder {text_spec!r}: use {', '.join(TEXT_ENCODERS)}")
    return image, text


def encoders_for(settings: "Settings") -> tuple[ImageEncoder, TextEncoder]:
    """The encoders ``settings`` name, on ``MARS_ENCODER_RUNTIME`` with ``MARS_INFERENCE_THREADS``
    threads, ONNX exports cached under ``MARS_HOME/models`` (:func:`load_encoders`)."""
    return load_encoders(settings.image_encoder, settings.text_encoder, settings.embed_batch_size,
                         runtime=settings.encoder_runtime, cache_dir=settings.home / "models",
                         threads=settings.inference_threads)
