"""The whole set-up of a dataset folder in one resumable run (``mars setup DATA``): ingest,
cross-modal alignment, whitening (with its learned stage when the folder holds judged rooms),
staging prior, critic.

A dataset folder is BEIR-style: ``corpus.jsonl`` (+ the photos it names), and optionally
``rooms/`` (room photos), ``queries.jsonl`` and ``qrels/*.tsv`` (judged rooms: the products each
room shows). Without rooms there is no whitening; without judged rooms the whitening is PCA
only and there is no prior and no critic (the search then says which stages are absent).

Each stage is fingerprinted by its inputs: the catalog (every product's content hash, as
ingest stored it), the data files it reads (sha256 of their bytes), the encoders and the
stages it builds on. After a stage finishes, its fingerprint is written to
``MARS_HOME/setup.json``; a later run skips a stage whose fingerprint is unchanged and whose
output is still there, so an interrupted run resumes where it stopped and a second run fits
nothing. Ingest itself always runs: it is incremental (an unchanged product is not re-embedded).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

#: The stages, in the order they run.
STAGES: tuple[str, ...] = ("ingest", "align", "whitening", "prior", "critic")
#: The critic's mining: fused candidates per judged room query (hard negatives) and random
#: controls, as ``mars train critic`` mines by default.
CRITIC_DEPTH, CRITIC_CONTROLS = 40, 3


class SetupError(ValueError):
    """The dataset folder cannot be set up as given; the message says why."""


@dataclass(frozen=True)
class DataFolder:
    """What a dataset folder holds (see the module doc).

    Attributes:
        root: the folder.
        corpus: its ``corpus.jsonl``.
        rooms: its ``rooms/`` folder, or None.
        queries: its ``queries.jsonl``, or None.
        qrels: the judgments file used (``qrels/dev.tsv``, or the only ``qrels/*.tsv``), or None.
    """

    root: Path
    corpus: Path
    rooms: Path | None = None
    queries: Path | None = None
    qrels: Path | None = None

    @property
    def judged(self) -> bool:
        """Whether the folder holds judged rooms (rooms, queries and qrels)."""
        return self.rooms is not None and self.queries is not None and self.qrels is not None

    @classmethod
    def open(cls, path: Path, qrels: Path | None = None) -> DataFolder:
        """The dataset folder at ``path``; ``qrels`` overrides the judgments file.

        Raises:
            SetupError: no folder, no ``corpus.jsonl``, a missing ``qrels``, or several
                ``qrels/*.tsv`` with none named ``dev.tsv`` and none given.
        """
        root = Path(path)
        if not root.is_dir():
            raise SetupError(f"{root} is not a folder: give a dataset folder with a corpus.jsonl")
        corpus = root / "corpus.jsonl"
        if not corpus.is_file():
            raise SetupError(f"{root} has no corpus.jsonl: a dataset folder holds corpus.jsonl (+ rooms/, queries.jsonl, qrels/)")
        if qrels is not None and not Path(qrels).is_file():
            raise SetupError(f"no judgments file {qrels}")
        if qrels is None and (root / "qrels").is_dir():
            found = sorted((root / "qrels").glob("*.tsv"))
            dev = root / "qrels" / "dev.tsv"
            if dev in found or len(found) == 1:
                qrels = dev if dev in found else found[0]
            elif found:
                raise SetupError(f"{root / 'qrels'} holds {len(found)} judgment files and no dev.tsv: name one with --qrels")
        rooms = root / "rooms" if (root / "rooms").is_dir() else None
        queries = root / "queries.jsonl" if (root / "queries.jsonl").is_file() else None
        return cls(root, corpus, rooms, queries, Path(qrels) if qrels is not None else None)


@dataclass
class StageResult:
    """How one stage went: ``status`` is ``fitted`` (``ingested`` for ingest), ``unchanged`` (its
    inputs did not change: nothing done) or ``absent`` (its inputs are not in the folder); ``on`` says what it was
    fitted on, ``seconds`` its wall time, ``detail`` a short report line."""

    stage: str
    status: str
    on: str = ""
    seconds: float = 0.0
    detail: str = ""


def sha256_of(paths: Iterable[Path]) -> str:
    """sha256 hex of the files' names and bytes, in the given order (a folder's photos, a file)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def catalog_fingerprint(engine: Any) -> str:
    """sha256 hex of every product's (id, content hash) in the catalog and the encoders the index
    was built with: it changes when ingest added, changed or removed a product."""
    from catalog.models import Product

    h = hashlib.sha256(json.dumps((engine.manifest or {}).get("encoders", {}), sort_keys=True).encode())
    with engine.sessions() as session:
        for pid, digest in session.execute(select(Product.id, Product.content_hash).order_by(Product.id)):
            h.update(f"{pid}\0{digest}\n".encode())
    return h.hexdigest()


def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 hex of ``parts`` as sorted JSON (a stage's inputs)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Stamps:
    """The fingerprints of the stages done, in ``MARS_HOME/setup.json`` (written atomically after each stage)."""

    path: Path
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, home: Path) -> Stamps:
        """The stamps under ``home`` (none when the file is missing or unreadable: every stage runs)."""
        path = Path(home) / "setup.json"
        try:
            done = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            done = {}
        return cls(path, done if isinstance(done, dict) else {})

    def current(self, stage: str, inputs: str) -> bool:
        """Whether ``stage`` was done with these ``inputs``."""
        return self.done.get(stage, {}).get("inputs") == inputs

    def mark(self, stage: str, inputs: str, result: StageResult) -> None:
        """Record ``stage`` as done with ``inputs`` (and its result) and write the file."""
        self.done[stage] = {"inputs": inputs, "on": result.on, "seconds": round(result.seconds, 1), "detail": result.detail,
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text(json.dumps(self.done, indent=2))
        os.replace(staging, self.path)


#: ``progress(stage, done, total, note)``: a stage's progress (``total`` None when unknown).
Progress = Callable[[str, int, "int | None", str], None]


def _quiet(stage: str, done: int, total: int | None, note: str) -> None:
    return None


def run_setup(engine: Any, data: DataFolder, *, progress: Progress = _quiet,
              on_stage: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run every stage on ``data`` into ``engine``'s home (see the module doc).

    Args:
        engine: an open :class:`mars.engine.Engine` that owns its stores.
        data: the dataset folder.
        progress: told each stage's progress (records, epochs, photos, queries).
        on_stage: told each stage's result as soon as it is known.

    Returns:
        One :class:`StageResult` per stage of :data:`STAGES`, in order.

    Raises:
        Whatever a stage raises (FileNotFoundError, InvalidImage, ValueError, RuntimeError);
        the stages done before it keep their stamps, so the next run resumes there.
    """
    from evaluation.beir import load_qrels, load_queries
    from training.whitening import room_photos

    stamps = Stamps.load(engine.home)
    results: list[StageResult] = []

    def report(result: StageResult) -> StageResult:
        results.append(result)
        if on_stage is not None:
            on_stage(result)
        return result

    report(_ingest(engine, data, progress))
    catalog = catalog_fingerprint(engine)
    rooms = room_photos(data.rooms) if data.rooms is not None else []
    files = {"rooms": sha256_of(rooms) if rooms else None,
             "queries": sha256_of([data.queries]) if data.queries else None,
             "qrels": sha256_of([data.qrels]) if data.qrels else None}
    judged = (load_queries(data.queries), load_qrels(data.qrels)) if data.judged else None

    def stage(name: str, inputs: dict[str, Any], output: Path, fit: Callable[[], StageResult]) -> None:
        key = fingerprint({"catalog": catalog, **inputs})
        if stamps.current(name, key) and output.exists():
            done = stamps.done[name]
            report(StageResult(name, "unchanged", done.get("on", ""), 0.0, "inputs unchanged since " + done.get("finished_at", "?")))
            return
        t = time.perf_counter()
        result = fit()
        result.seconds = time.perf_counter() - t
        stamps.mark(name, key, result)
        report(result)

    stage("align", {}, _aligned_path(engine), lambda: _align(engine, progress))
    if rooms:
        stage("whitening", {"rooms": files["rooms"], "queries": files["queries"], "qrels": files["qrels"],
                            "judged": data.judged}, _whitening_path(engine),
              lambda: _whitening(engine, rooms, judged, progress))
    else:
        report(StageResult("whitening", "absent", detail=f"{data.root} has no rooms/ folder"))
    if judged is None:
        why = f"{data.root} has no judged rooms (rooms/, queries.jsonl and qrels/*.tsv)"
        report(StageResult("prior", "absent", detail=why))
        report(StageResult("critic", "absent", detail=why))
        return results
    stage("prior", {"queries": files["queries"], "qrels": files["qrels"]}, _prior_path(engine), lambda: _prior(engine, judged))
    upstream = {n: sha256_of([p]) for n, p in (("aligned", _aligned_path(engine)), ("whitening", _whitening_path(engine)),
                                               ("prior", _prior_path(engine))) if p.exists()}
    stage("critic", {"queries": files["queries"], "qrels": files["qrels"], "upstream": upstream},
          Path(engine.settings.critic_path), lambda: _critic(engine, judged, progress))
    return results


def _aligned_path(engine: Any) -> Path:
    from indexing.aligned import heads_path

    return heads_path(engine.home)


def _whitening_path(engine: Any) -> Path:
    from indexing.whitening import whitening_path

    return whitening_path(engine.home)


def _prior_path(engine: Any) -> Path:
    from indexing.staging_prior import staging_prior_path

    return staging_prior_path(engine.home)


def _ingest(engine: Any, data: DataFolder, progress: Progress) -> StageResult:
    from ingestion.readers import open_source

    with open(data.corpus, "rb") as fh:
        total = sum(1 for line in fh if line.strip())
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress("ingest", done, total, "")

    progress("ingest", 0, total, "")
    t = time.perf_counter()
    rep = engine.ingest(open_source(data.root), str(data.root.resolve()), total_hint=total, on_progress=advance)
    status = "ingested" if rep.ingested or rep.rejected else "unchanged"
    return StageResult("ingest", status, f"{rep.total} records of {data.corpus.name}", time.perf_counter() - t,
                       f"{rep.ingested} embedded, {rep.unchanged} unchanged, {rep.rejected} rejected, "
                       f"{rep.without_image} without a photo")


def _align(engine: Any, progress: Progress) -> StageResult:
    from threadpoolctl import threadpool_limits

    from training.align import AlignConfig, train_align

    config = AlignConfig()
    total = config.epochs * (2 if config.holdout > 0 else 1)
    done = 0

    def on_epoch(phase: str, epoch: int, loss: float) -> None:
        nonlocal done
        done += 1
        progress("align", done, total, f"{phase} · loss {loss:.3f}")

    # one BLAS/OpenMP thread: the heads' small matrices run many times faster on one (the
    # README's `OMP_NUM_THREADS=1 mars train align`)
    with threadpool_limits(1):
        rep = train_align(engine, config, on_epoch)
    recall = f"; held-out text→photo Recall@10 {rep.validation['recall@10']:.3f}" if rep.validation else ""
    return StageResult("align", "fitted", f"{rep.products} products", detail=f"{rep.points} points rewritten{recall}")


def _whitening(engine: Any, rooms: list[Path], judged: tuple | None, progress: Progress) -> StageResult:
    from training.whitening import fit_whitening, judged_photos

    photos, done = rooms, 0

    def on_photo() -> None:
        nonlocal done
        done += 1
        progress("whitening", done, len(photos), "room regions")

    white = fit_whitening(engine, photos, judged=judged_photos(*judged) if judged else None, on_photo=on_photo)
    engine.install_whitening(white)
    m = white.meta
    learned = f" + learned stage on {m['learned']['pairs']} judged (region, product) pairs" if "learned" in m else ""
    return StageResult("whitening", "fitted", f"{m['products']} product photos, {m['room_photos']} room photos",
                       detail=f"PCA to {m['dim']} dimensions ({m['variance_kept']:.1%} of the variance){learned}")


def _prior(engine: Any, judged: tuple) -> StageResult:
    from indexing.staging_prior import StagingPrior

    prior = StagingPrior.from_judgments(*judged)
    engine.install_prior(prior)
    return StageResult("prior", "fitted", f"{sum(prior.rooms.values())} judged rooms",
                       detail=f"{len(prior.rooms)} room types, {len(prior.counts)} products")


def _critic(engine: Any, judged: tuple, progress: Progress) -> StageResult:
    from training.critic import ROOM_TASKS, fit, mine_out_of_fold

    queries, qrels = judged
    room_queries = [q for q in queries if q.task in ROOM_TASKS]
    total = sum(1 for q in room_queries if qrels.get(q.id))
    done = 0

    def on_query() -> None:
        nonlocal done
        done += 1
        progress("critic", done, total, "mining pairs")

    mined = mine_out_of_fold(engine, room_queries, qrels, depth=CRITIC_DEPTH, controls=CRITIC_CONTROLS, on_query=on_query)
    progress("critic", total, total, "fitting")
    critic = fit(mined)
    critic.meta["folds"] = 0
    critic.save(engine.settings.critic_path)
    return StageResult("critic", "fitted", f"{len(mined)} judged room queries",
                       detail=f"{sum(len(m.pairs) for m in mined)} pairs; cross-validated gain: `mars train critic`")
