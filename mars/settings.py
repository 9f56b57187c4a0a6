"""Settings read from ``MARS_*`` environment variables (pydantic-settings).

Build them with :func:`get_settings` (cached); nothing reads the environment at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mars import registry


class Settings(BaseSettings):
    """All MARS knobs; each field is ``MARS_<FIELD>`` in the environment or in a dotenv file
    ``.env`` in the working directory (``MARS_<FIELD>=value`` lines; dicts as JSON). An environment
    variable overrides the file's value of its field (whole, dicts too), and arguments given to
    ``Settings(...)`` override both;
    ``mars tune --write`` stores the tuned RRF setting (``MARS_RRF_K``, ``MARS_WEIGHTS_PHOTO``,
    ``MARS_WEIGHTS_TEXT``) there. ``Settings(_env_file=None)`` ignores the file.

    Fusion defaults are the ones ``mars tune`` chose on the IKEA dev split (README, "Fusion
    weights"): weighted Reciprocal Rank Fusion (Cormack, Clarke & Büttcher, "Reciprocal Rank
    Fusion outperforms Condorcet and individual rank learning methods", SIGIR 2009) with
    ``rrf_k = 10``; queries with a room photo weigh image 1.0, BM25 0.1, text 0.1, aligned
    0.1 (the text mostly sets the category lock and the photo carries the look); queries
    without one weigh BM25 1.0, text 1.0, aligned 0.5. The ``aligned`` list exists once
    ``mars train align`` has run.
    """

    model_config = SettingsConfigDict(env_prefix="MARS_", extra="ignore", env_file=".env")

    @classmethod
    def settings_customise_sources(  # noqa: ANN206 - pydantic-settings hook
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings  # noqa: ANN001
    ):
        """Priority: ``Settings(...)`` arguments, the environment, ``.env``, the defaults. A field
        set in the environment takes nothing from ``.env``: pydantic-settings would otherwise
        merge a dict field (``weights_photo``) key by key across the two."""

        def dotenv_unless_in_environment() -> dict[str, Any]:
            in_environment = env_settings()
            return {name: value for name, value in dotenv_settings().items() if name not in in_environment}

        return init_settings, env_settings, dotenv_unless_in_environment, file_secret_settings

    home: Path = Field(Path(".mars"), description="Directory holding the catalog, indexes and manifest.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the catalog; default sqlite:///<home>/catalog.db."
    )

    image_encoder: str = Field(
        "efficientnet-lite0-gem",
        description="'efficientnet-lite0-gem' (offline default: GeM-pooled), 'efficientnet-lite0' (average-pooled, "
        "indexes built before GeM) or 'hf:<dir>' for a local SigLIP/CLIP checkpoint.",
    )
    text_encoder: str = Field(
        "all-minilm-l6-v2",
        description="'all-minilm-l6-v2' (offline default) or 'hf:<dir>' for a local SigLIP/CLIP checkpoint.",
    )
    embed_batch_size: int = Field(8, ge=1, description="Images/texts per encoder call.")
    encoder_runtime: Literal["onnx", "torch"] = Field(
        "onnx",
        description="Where the image encoder's network runs: 'onnx' (ONNX Runtime, default; exported once from the "
        "packaged weights into MARS_HOME/models) or 'torch' (PyTorch eager, the reference).",
    )
    inference_threads: int = Field(
        0, ge=0, description="Threads of one encoder call (ONNX Runtime intra-op threads, or torch's); 0 = every core "
        "this process may use.",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Images with more pixels (width*height) are rejected."
    )
    max_image_bytes: int = Field(20_000_000, ge=1, description="Image files larger than this are rejected.")
    max_bulk_bytes: int = Field(
        256_000_000, ge=1,
        description="Largest body of POST /v1/items:bulk; a larger one is refused with 413 before more is read.",
    )

    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines of `mars serve`: 'json' (one JSON object per line) or 'text'."
    )
    log_level: str = Field("INFO", description="Lowest level `mars serve` logs (DEBUG, INFO, WARNING, ERROR).")
    cors_origins: str = Field(
        "",
        description="Comma-separated origins (e.g. https://shop.example.com) allowed to call the API from a "
        "browser (CORS); empty (default) sends no CORS headers.",
    )

    image_fetch_timeout_s: float = Field(
        10.0, gt=0, description="Read timeout in seconds for an image given by http(s) URL (connect: half of it)."
    )
    image_fetch_retries: int = Field(2, ge=0, description="Retries of a URL image after a transient error (timeout, 429, 5xx).")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (server mode): Redis URL.")
    task_visibility_timeout_s: int = Field(
        3600, ge=1, description="Seconds before Redis re-delivers an unacknowledged task; longer than the longest task."
    )
    ingest_chunk_size: int = Field(32, ge=1, description="Records per queued ingest task (one encoder batch each).")
    vector_backend: str = Field(
        "qdrant-edge",
        description="'qdrant-edge' (embedded default), 'faiss' (exact IndexFlatIP reference over the Qdrant Edge "
        "vectors) or 'qdrant' (a Qdrant server/cluster at MARS_QDRANT_URL, via qdrant-client).",
    )
    qdrant_url: str | None = Field(
        None,
        description="Qdrant server for MARS_VECTOR_BACKEND=qdrant, e.g. http://qdrant:6333; a directory or "
        "':memory:' runs qdrant-client's local mode in this one process.",
    )
    qdrant_api_key: str | None = Field(None, description="Qdrant API key (server mode).")
    lexical_backend: str = Field(
        "tantivy", description="BM25 engine: 'tantivy' (embedded default) or 'opensearch' (at MARS_OPENSEARCH_URL)."
    )
    opensearch_url: str | None = Field(None, description="OpenSearch cluster for MARS_LEXICAL_BACKEND=opensearch.")
    opensearch_replicas: int = Field(1, ge=0, description="Replicas of a new OpenSearch index (0 on one node).")
    bm25_k1: float = Field(1.2, ge=0, description="OpenSearch BM25 k1 (Robertson & Zaragoza 2009); tantivy fixes 1.2.")
    bm25_b: float = Field(0.75, ge=0, le=1, description="OpenSearch BM25 b (same source); tantivy fixes 0.75.")
    retrieval_depth: int = Field(200, ge=1, description="Candidates each stage retrieves before fusion.")
    room_grid: str = Field(
        "1,2,3",
        description="Grid cells of a room photo searched in the index: comma-separated grid sizes (1 = whole photo, "
        "2 = 2x2 grid, ...); a CNN image encoder also re-scores their candidates with dense windows (query/regions.py).",
    )

    result_cache_hits: int = Field(
        400_000, ge=0,
        description="Embedded mode: hits the funnel's per-stage result cache keeps (BM25, text, image, aligned and "
        "prior lists by query input, lock and depth; ~200 bytes each, so ~80 MB at the default; dropped on every "
        "write); 0 turns it off. Server mode never caches (other processes write the stores).",
    )
    rrf_k: float = Field(10.0, gt=0, description="RRF constant k (Cormack et al., SIGIR 2009); tuned by `mars tune`.")
    weights_photo: dict[str, float] = Field(
        default_factory=lambda: {"bm25": 0.1, "image": 1.0, "text": 0.1, "aligned": 0.1, "prior": 0.0},
        description="RRF weight per list for queries with a room photo, as JSON, e.g. "
        '\'{"bm25": 0.25, "image": 1.0, "text": 0.25}\' (lists: bm25, image, text, aligned, prior; a list not named weighs 1.0; a list weighted 0 is not searched).',
    )
    weights_text: dict[str, float] = Field(
        default_factory=lambda: {"bm25": 1.0, "text": 1.0, "aligned": 0.5, "prior": 2.0},
        description="RRF weight per list for queries without a photo, as JSON (lists: bm25, text, aligned, prior: the "
        "staging prior of the query's room type, `mars train prior`).",
    )
    rules_cache_s: float = Field(
        5.0, ge=0, description="Seconds a process keeps the merchandising rules it read; its own rule writes drop "
        "them at once, those of other processes (API replicas, the mars CLI) show within this time.",
    )

    boost_title: float = Field(2.0, ge=0, description="BM25 field boost of the product title.")
    boost_type: float = Field(3.0, ge=0, description="BM25 field boost of the product type.")
    boost_colour: float = Field(1.5, ge=0, description="BM25 field boost of the colour.")
    boost_text: float = Field(1.0, ge=0, description="BM25 field boost of the description.")

    critic: str = Field(
        "learned",
        description="Critic for --mode full: 'learned' (offline default; trained by `mars train critic`), "
        "'vlm' (Qwen2-VL from MARS_CRITIC_MODEL), 'openai' (an OpenAI-compatible endpoint, e.g. vLLM) or 'none'.",
    )
    critic_endpoint: str | None = Field(
        None, description="Base URL of an OpenAI-compatible API incl. /v1 (e.g. http://localhost:8000/v1) for MARS_CRITIC=openai."
    )
    critic_api_model: str | None = Field(
        None, description="Served model name at MARS_CRITIC_ENDPOINT (e.g. Qwen/Qwen2.5-VL-7B-Instruct)."
    )
    critic_api_key: SecretStr | None = Field(
        None, description="Bearer key for MARS_CRITIC_ENDPOINT; unset sends 'EMPTY' (vLLM without --api-key)."
    )
    critic_timeout_s: float = Field(30.0, gt=0, description="Per-request network timeout (s) of the endpoint critic.")
    critic_max_retries: int = Field(2, ge=0, description="SDK retries (with backoff) on timeouts, 408/429/5xx.")
    critic_max_concurrency: int = Field(8, ge=1, description="Endpoint-critic requests in flight at once.")
    critic_model: str | None = Field(
        None, description="Qwen2-VL directory (or an id already in the local HF cache) for MARS_CRITIC=vlm."
    )
    critic_adapter: Path | None = Field(None, description="LoRA adapter directory for the Qwen2-VL critic.")
    critic_4bit: bool = Field(False, description="Load the Qwen2-VL critic in 4-bit NF4 (needs CUDA + bitsandbytes).")
    critic_batch_size: int = Field(4, ge=1, description="Pairs per Qwen2-VL forward/generate call.")
    critic_rationale_top_k: int = Field(
        5, ge=0, description="How many of the critic's pairs get a generated rationale (the rest: fast score)."
    )
    critic_queue: bool = Field(
        False,
        description="Send critic work to the Celery 'critic' queue (a GPU worker running MARS_CRITIC) instead of "
        "scoring in this process; past MARS_CRITIC_DEADLINE_MS the fused order stands.",
    )
    critic_queue_max_pairs: int = Field(
        32, ge=1, description="Queued critic worker: most pairs per model call (micro-batch B), across concurrent requests."
    )
    critic_queue_max_wait_ms: float = Field(
        20.0, ge=0, description="Queued critic worker: ms a micro-batch waits for more pairs after its oldest pair arrived (T)."
    )
    critic_deadline_ms: float = Field(
        3000.0, gt=0, description="Queued critic: per-request deadline in ms; past it the fused order stands and the response says critic: unavailable (timed out ...)."
    )
    critic_checkpoint: Path | None = Field(
        None, description="Learned-critic checkpoint (safetensors); default <home>/critic/learned.safetensors."
    )
    category_head: Path | None = Field(
        None,
        description="Category-head checkpoint (safetensors, `mars train category-head`); default <home>/category_head.safetensors.",
    )
    critic_top_n: int = Field(20, ge=1, description="How many fused results the critic re-scores.")

    api_auth: Literal["keys", "open"] = Field(
        "keys",
        description="HTTP API access: 'keys' (default) needs an API key (`mars keys create`) with the route's role; "
        "'open' (`mars serve --open`, local demos only) lets every request act as admin without a key.",
    )
    rate_limit: str = Field(
        "600/minute",
        description="Requests allowed per API key (per client IP in open mode), in the `limits` notation: "
        "'600/minute', '10/second;600/minute' (all must hold); '' turns the limit off. Kept in each API "
        "process's memory (moving window): N replicas allow N times as much.",
    )

    @field_validator("vector_backend", "lexical_backend", "critic")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        """Backend and critic names are those of :mod:`mars.registry`."""
        names = {"vector_backend": registry.VECTOR_BACKENDS, "lexical_backend": registry.LEXICAL_BACKENDS,
                 "critic": registry.CRITICS}[info.field_name]
        if value not in names:
            raise ValueError(f"unknown {info.field_name} {value!r}; use one of: {', '.join(names)}")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            parse_many(value)  # ValueError, with the offending part, on a malformed limit
        return value

    @property
    def catalog_url(self) -> str:
        """The catalog's SQLAlchemy URL (``database_url`` or the SQLite file under ``home``)."""
        return self.database_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    @property
    def embedded_stores(self) -> bool:
        """True when a store lives in this process (tantivy, Qdrant Edge, or Qdrant local
        mode): then one process owns ``home`` and runs every write itself. False when both
        stores are servers (Qdrant at an http(s) URL and OpenSearch): any number of API and
        worker processes share them and bulk jobs go to the queues (:func:`mars.registry.embedded_stores`)."""
        return registry.embedded_stores(self)

    @property
    def critic_path(self) -> Path:
        """Where the learned critic's checkpoint is read and written."""
        return self.critic_checkpoint or self.home / "critic" / "learned.safetensors"

    @property
    def grid_sizes(self) -> list[int]:
        """``room_grid`` parsed into grid sizes, e.g. ``[1, 2, 3]``.

        Raises:
            ValueError: if an entry is not a positive integer.
        """
        sizes = [int(part) for part in self.room_grid.split(",") if part.strip()]
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"MARS_ROOM_GRID must list positive integers, got {self.room_grid!r}")
        return sizes


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide :class:`Settings`, read from the environment on first call."""
    return Settings()
