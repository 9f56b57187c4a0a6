"""Reader of Amazon Berkeley Objects (ABO) product listings.

Sources:
    * J. Collins et al., "ABO: Dataset and Benchmarks for Real-World 3D Object
      Understanding", CVPR 2022, arXiv:2110.06199.
    * The dataset page and its README, which document the layout and the listing schema:
      https://amazon-berkeley-objects.s3.amazonaws.com/index.html

Layout (relative to the dataset root)::

    listings/metadata/listings_<i>.json.gz   one JSON object per line (UTF-8, gzip)
    images/metadata/images.csv.gz            image_id,height,width,path
    images/small/<path>                      the catalog images (max. 256 px side)

Listing fields used here: ``item_id``; the language-tagged lists
``[{"language_tag": "en_US", "value": ...}, ...]`` of ``item_name``, ``brand``, ``color``
(whose entries may also carry ``standardized_values``), ``material``, ``style``,
``product_description``, ``bullet_point``, ``item_keywords`` (and any other field of that
shape); ``product_type`` (``[{"value": "CHAIR"}]``); ``node``
(``[{"node_id": 123, "node_name": "/Categories/..."}]``); ``main_image_id`` and
``other_image_id``, which :file:`images.csv` maps to files under ``images/small``;
``item_dimensions`` (``{"height": {"unit": ..., "value": ...}, ...}``).

Mapping to MARS fields (:data:`ingestion.records.CORE_FIELDS`):

========  =================================================================================
id        ``item_id`` (passed through as-is, so a missing or non-string id is rejected by
          validation with its reason)
title     ``item_name`` in the preferred language (default ``en_US``; else the first
          ``en_*`` entry; else the first entry)
type      ``product_type`` humanised (``"HOME_FURNITURE"`` -> ``"Home furniture"``), else
          the last segment of the first ``node`` path
colour    ``color`` value in the preferred language
text      ``product_description`` then the ``bullet_point`` values, one per line
size      ``item_dimensions`` formatted as ``"L 20 x W 15 x H 30 inches"`` when complete
image     absolute path of the main image under the images root, or
          ``<images_base_url>/<path>`` when a base URL is given; None without a main image
========  =================================================================================

The mapping is fixed: :func:`ingestion.readers.open_source` refuses a field mapping (``--map``)
for ABO listings with a ValueError instead of ignoring it.

Everything else goes into ``attributes``: ``brand``, ``material``, ``style``, ``keywords``
(list), ``node_path``, ``node_id``, ``product_type`` (the raw code), ``colour_standardized``
(list), ``main_image_id``, ``other_image_ids`` (list), ``title_language``, and every other
listing field (language-tagged ones reduced to the preferred language, ``[{"value": x}]``
reduced to ``x``, the rest as read). A main image id that ``images.csv`` does not know
(or whose path leads outside the images root) leaves ``image`` empty and says so in
``attributes["image_note"]``.

Like :func:`ingestion.readers.read_jsonl`, the reader never validates: a line that is not
UTF-8 JSON, not an object, or whose fields do not have the documented shape becomes a
:class:`~ingestion.raw_records.RawRecord` with ``error`` set, and the pipeline rejects it with
that reason and its line number.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from ingestion.raw_records import RawRecord, json_objects

#: File names of the listing files (``listings_0.json.gz`` ... ``listings_f.json.gz``).
LISTINGS_NAME = re.compile(r"listings_[0-9a-z]+\.json(\.gz)?", re.IGNORECASE)

#: Language-tagged fields that get their own attribute name (ABO name -> attribute name).
_RENAMED = {"item_keywords": "keywords"}
#: Language-tagged attributes kept as lists (all values of the chosen language).
_LIST_ATTRIBUTES = frozenset({"item_keywords"})
#: Fields mapped to core fields or handled specially below.
_HANDLED = frozenset(
    {
        "item_id",
        "item_name",
        "product_type",
        "node",
        "color",
        "product_description",
        "bullet_point",
        "main_image_id",
        "other_image_id",
        "item_keywords",
    }
)
_SNIFF_BYTES = 1 << 20


class AboSchemaError(ValueError):
    """A listing field does not have the shape the ABO schema documents; the message names it."""


def humanise_product_type(code: str) -> str:
    """Turn an ABO ``product_type`` code into a type name: ``"CHAIR"`` -> ``"Chair"``,
    ``"HOME_FURNITURE_AND_DECOR"`` -> ``"Home furniture and decor"``; "" for a blank code."""
    words = code.replace("_", " ").split()
    return " ".join(words).capitalize() if words else ""


def node_leaf(node_name: str) -> str:
    """Last segment of a browse-node path: ``"/Categories/Furniture/Chairs"`` -> ``"Chairs"``."""
    parts = [p.strip() for p in node_name.split("/") if p.strip()]
    return parts[-1] if parts else ""


def pick_language(entries: Any, language: str, field: str = "field") -> tuple[str | None, list[Any]]:
    """Values of a language-tagged list in one language.

    The language is ``language`` if present, else the first ``en_*`` tag in list order,
    else the tag of the first entry. Entries without ``language_tag`` count as untagged
    (tag None) and are chosen only by the last rule.

    Args:
        entries: the field as read, e.g. ``[{"language_tag": "en_US", "value": "Chair"}]``;
            None or [] for a missing field.
        language: preferred tag, e.g. ``"en_US"``.
        field: the field's name, for the error message.

    Returns:
        (the chosen tag, the values with that tag in list order); (None, []) when empty.

    Raises:
        AboSchemaError: ``entries`` is not a list of objects each holding a ``value``.
    """
    if entries is None:
        return None, []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "value" in e for e in entries):
        raise AboSchemaError(f"{field}: expected a list of {{language_tag, value}} objects, got {_preview(entries)}")
    if not entries:
        return None, []
    tags = [e.get("language_tag") for e in entries]
    if language in tags:
        chosen = language
    else:
        chosen = next((t for t in tags if isinstance(t, str) and t.startswith("en_")), tags[0])
    return chosen, [e["value"] for e in entries if e.get("language_tag") == chosen]


def _preview(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_language_tagged(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(e, dict) and "value" in e and "language_tag" in e for e in value)
    )


def _is_plain_values(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(e, dict) and set(e) == {"value"} for e in value)


def _text_values(values: list[Any], field: str) -> list[str]:
    for v in values:
        if not isinstance(v, str):
            raise AboSchemaError(f"{field}: expected text values, got {_preview(v)}")
    return [v.strip() for v in values if v.strip()]


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def format_dimensions(dimensions: Any) -> str:
    """``item_dimensions`` as ``"L 20 x W 15 x H 30 inches"``; "" unless length, width and
    height each have a numeric ``value`` (units are written once when they agree)."""
    if not isinstance(dimensions, dict):
        return ""
    parts: list[tuple[str, Any, Any]] = []
    for key, label in (("length", "L"), ("width", "W"), ("height", "H")):
        dim = dimensions.get(key)
        if not isinstance(dim, dict) or isinstance(dim.get("value"), bool) or not isinstance(dim.get("value"), (int, float)):
            return ""
        parts.append((label, dim["value"], dim.get("unit")))
    units = {unit for _, _, unit in parts}
    if len(units) == 1:
        unit = units.pop()
        return " x ".join(f"{label} {_number(value)}" for label, value, _ in parts) + (f" {unit}" if unit else "")
    return " x ".join(f"{label} {_number(value)}{f' {unit}' if unit else ''}" for label, value, unit in parts)


def _number(value: float) -> str:
    """A measurement without trailing zeros or exponent: 26 -> "26", 31.50 -> "31.5"."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def listing_to_data(
    row: Mapping[str, Any],
    *,
    image_paths: Mapping[str, str] | None,
    images_root: Path | None,
    images_base_url: str | None = None,
    language: str = "en_US",
) -> dict[str, Any]:
    """Map one ABO listing to MARS record data (the table in the module docstring).

    Args:
        row: the listing as parsed from its JSON line.
        image_paths: ``image_id -> path`` from :func:`read_image_index` (paths relative to
            ``images/small``), or None when no ``images.csv`` is known.
        images_root: the folder the paths are relative to; used when ``images_base_url`` is None.
        images_base_url: if given, images become ``<images_base_url>/<path>`` URLs.
        language: preferred language tag.

    Returns:
        The data for :class:`~ingestion.raw_records.RawRecord` (no ``id`` key when the listing
        has no ``item_id``).

    Raises:
        AboSchemaError: a field does not have its documented shape.
    """
    data: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    if "item_id" in row:
        data["id"] = row["item_id"]

    tag, names = pick_language(row.get("item_name"), language, "item_name")
    names = _text_values(names, "item_name")
    if names:
        data["title"] = names[0]
        attributes["title_language"] = tag

    product_type = row.get("product_type")
    codes: list[str] = []
    if product_type is not None:
        if not isinstance(product_type, list) or not all(isinstance(e, dict) and "value" in e for e in product_type):
            raise AboSchemaError(f"product_type: expected a list of {{value}} objects, got {_preview(product_type)}")
        codes = _text_values([e["value"] for e in product_type], "product_type")
        if codes:
            attributes["product_type"] = codes[0] if len(codes) == 1 else codes

    nodes = row.get("node")
    node_path = ""
    if nodes is not None:
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise AboSchemaError(f"node: expected a list of {{node_id, node_name}} objects, got {_preview(nodes)}")
        if nodes:
            first = nodes[0]
            if not isinstance(first.get("node_name", ""), str):
                raise AboSchemaError(f"node: node_name must be text, got {_preview(first.get('node_name'))}")
            node_path = first.get("node_name", "")
            if node_path:
                attributes["node_path"] = node_path
            if "node_id" in first:
                attributes["node_id"] = first["node_id"]
            if len(nodes) > 1:
                attributes["nodes"] = nodes
    type_name = (humanise_product_type(codes[0]) if codes else "") or node_leaf(node_path)
    if type_name:
        data["type"] = type_name

    color = row.get("color")
    colour_tag, colours = pick_language(color, language, "color")
    colours = _text_values(colours, "color")
    if colours:
        data["colour"] = colours[0]
    if color:
        standardized: list[str] = []
        for entry in color:
            if entry.get("language_tag") == colour_tag and entry.get("standardized_values") is not None:
                values = entry["standardized_values"]
                if not isinstance(values, list):
                    raise AboSchemaError(f"color: standardized_values must be a list, got {_preview(values)}")
                standardized.extend(_text_values(values, "color.standardized_values"))
        if standardized:
            attributes["colour_standardized"] = _dedupe(standardized)

    _, description = pick_language(row.get("product_description"), language, "product_description")
    _, bullets = pick_language(row.get("bullet_point"), language, "bullet_point")
    text = _text_values(description, "product_description") + _text_values(bullets, "bullet_point")
    if text:
        data["text"] = "\n".join(text)

    size = format_dimensions(row.get("item_dimensions"))
    if size:
        data["size"] = size

    main_image = row.get("main_image_id")
    data["image"] = None
    if main_image is not None:
        if not isinstance(main_image, str):
            raise AboSchemaError(f"main_image_id: expected text, got {_preview(main_image)}")
        attributes["main_image_id"] = main_image
        if image_paths is None:
            attributes["image_note"] = f"main image {main_image} not resolved: no images.csv given or found"
        elif main_image not in image_paths:
            attributes["image_note"] = f"main image {main_image} is not listed in images.csv"
        elif images_base_url:
            data["image"] = f"{images_base_url.rstrip('/')}/{image_paths[main_image].lstrip('/')}"
        elif images_root is not None:
            local = (images_root / image_paths[main_image]).resolve()
            if local.is_relative_to(images_root.resolve()):
                data["image"] = str(local)
            else:
                attributes["image_note"] = f"main image {main_image} has a path outside the images root"
    others = row.get("other_image_id")
    if others is not None:
        if not isinstance(others, list) or not all(isinstance(o, str) for o in others):
            raise AboSchemaError(f"other_image_id: expected a list of image ids, got {_preview(others)}")
        if others:
            attributes["other_image_ids"] = others

    _, keywords = pick_language(row.get("item_keywords"), language, "item_keywords")
    keywords = _dedupe(_text_values(keywords, "item_keywords"))
    if keywords:
        attributes["keywords"] = keywords

    for key, value in row.items():
        if key in _HANDLED:
            continue
        name = _RENAMED.get(key, key)
        if _is_language_tagged(value):
            _, values = pick_language(value, language, key)
            values = [v.strip() if isinstance(v, str) else v for v in values]
            values = [v for v in values if v not in ("", None)]
            if key in _LIST_ATTRIBUTES:
                attributes[name] = values
            elif values:
                attributes[name] = ", ".join(_dedupe([str(v) for v in values]))
        elif _is_plain_values(value):
            values = [e["value"] for e in value]
            attributes[name] = values[0] if len(values) == 1 else values
        else:
            attributes[name] = value
    if attributes:
        data["attributes"] = attributes
    return data


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def read_image_index(images_csv: Path) -> dict[str, str]:
    """``image_id -> path`` from ABO's ``images/metadata/images.csv(.gz)``
    (columns ``image_id,height,width,path``; path relative to ``images/small``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the header lacks ``image_id`` or ``path``, or a row has an empty one.
    """
    with _open_binary(images_csv) as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image_id", "path"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{images_csv}: header {reader.fieldnames} lacks {', '.join(sorted(missing))}")
        index: dict[str, str] = {}
        for number, row in enumerate(reader, start=1):
            image_id, rel = (row.get("image_id") or "").strip(), (row.get("path") or "").strip()
            if not image_id or not rel:
                raise ValueError(f"{images_csv}: row {number} has an empty image_id or path")
            index[image_id] = rel
    return index


def _listing_sort_key(path: Path) -> tuple[int, str]:
    stem = path.name.split(".")[0].removeprefix("listings_")
    try:
        return int(stem, 16), path.name
    except ValueError:
        return 1 << 30, path.name


def listing_files(path: Path) -> list[Path]:
    """The listing files of ``path``: the file itself, or for a folder (the dataset root or
    ``listings/metadata``) its ``listings_*.json(.gz)`` files in index order (``_0`` .. ``_f``).
    [] when a folder has none."""
    if path.is_file():
        return [path]
    folder = path / "listings" / "metadata" if (path / "listings" / "metadata").is_dir() else path
    return sorted((p for p in folder.iterdir() if p.is_file() and LISTINGS_NAME.fullmatch(p.name)), key=_listing_sort_key)


def find_images_csv(listings_path: Path) -> Path | None:
    """Where ``images.csv(.gz)`` lies for a listings file or folder: ``<root>/images/metadata/``
    of the ABO layout, or beside the listings; None when there is none."""
    base = listings_path if listings_path.is_dir() else listings_path.parent
    candidates: list[Path] = []
    for folder in (base, *base.parents[:3]):
        candidates += [folder / "images" / "metadata", folder]
    for folder in candidates:
        for name in ("images.csv.gz", "images.csv"):
            if (folder / name).is_file():
                return folder / name
    return None


def _default_images_root(images_csv: Path) -> Path:
    for folder in (images_csv.parent.parent / "small", images_csv.parent / "small", images_csv.parent / "images" / "small"):
        if folder.is_dir():
            return folder
    return images_csv.parent


def _looks_like_listing(path: Path) -> bool:
    with _open_binary(path) as fh:
        for line in fh:
            if len(line) > _SNIFF_BYTES:
                return False
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return False
            return isinstance(row, dict) and "item_id" in row and ("item_name" in row or "main_image_id" in row)
    return False


def is_abo_source(path: Path) -> bool:
    """Whether ``path`` is ABO listings: a folder holding ``listings/metadata/listings_*.json(.gz)``
    or such files directly (and no BEIR ``corpus.jsonl``), a file named ``listings_*.json(.gz)``,
    or a ``.json``/``.json.gz`` file whose first record has ``item_id`` and ``item_name`` or
    ``main_image_id``.

    Raises:
        OSError: a ``.json.gz`` file is not valid gzip (raised while sniffing it).
    """
    if path.is_dir():
        return not (path / "corpus.jsonl").exists() and bool(listing_files(path))
    if not path.is_file():
        return False
    if LISTINGS_NAME.fullmatch(path.name):
        return True
    if path.name.lower().endswith((".json", ".json.gz")):
        return _looks_like_listing(path)
    return False


def _read_listing_file(
    path: Path,
    image_paths: Mapping[str, str] | None,
    images_root: Path | None,
    images_base_url: str | None,
    language: str,
) -> Iterator[RawRecord]:
    with _open_binary(path) as fh:
        for item in json_objects(path, fh):
            if isinstance(item, RawRecord):
                yield item
                continue
            number, row = item
            try:
                data = listing_to_data(
                    row, image_paths=image_paths, images_root=images_root, images_base_url=images_base_url, language=language
                )
            except AboSchemaError as exc:
                item_id = row.get("item_id")
                prefix = f"item {item_id}: " if isinstance(item_id, str) else ""
                yield RawRecord(str(path), number, None, raw=row, error=f"{prefix}{exc}")
                continue
            yield RawRecord(str(path), number, data, raw=row)


def read_abo(
    listings_path: Path | str,
    images_csv: Path | str | None = None,
    images_root: Path | str | None = None,
    language: str = "en_US",
    images_base_url: str | None = None,
) -> Iterator[RawRecord]:
    """Records of ABO listings (see the module docstring for the field mapping).

    The paths are checked and ``images.csv`` is read when this is called; the listings
    are read lazily as the returned iterator is consumed.

    Args:
        listings_path: a ``listings_*.json`` / ``.json.gz`` file, ``listings/metadata``, or
            the dataset root (all listing files in index order).
        images_csv: ``images/metadata/images.csv(.gz)``; default: found by
            :func:`find_images_csv` (without one, listings are read with no images and
            ``attributes["image_note"]`` says why).
        images_root: the folder ``images.csv`` paths are relative to; default
            ``images/small`` beside ``images/metadata``.
        language: preferred language tag of the multilingual fields (``en_US``).
        images_base_url: if given, images are ``<images_base_url>/<path>`` URLs (e.g. a
            mirror of ``images/small``) instead of local paths.

    Returns:
        An iterator of one :class:`~ingestion.raw_records.RawRecord` per non-blank line;
        ``position`` is the 1-based line number within its listing file, ``source`` that file.

    Raises:
        FileNotFoundError: ``listings_path`` or a given ``images_csv``/``images_root`` is
            missing, or a folder holds no listing files.
        ValueError: ``images.csv`` is malformed (see :func:`read_image_index`).
        OSError, EOFError: a ``.gz`` file is corrupt or truncated (raised while iterating).
    """
    path = Path(listings_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    files = listing_files(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no listings_*.json(.gz) files (ABO layout expected)")
    csv_path = Path(images_csv) if images_csv is not None else find_images_csv(path)
    if csv_path is not None and not csv_path.is_file():
        raise FileNotFoundError(f"images.csv {csv_path} does not exist")
    image_paths = read_image_index(csv_path) if csv_path is not None else None
    root: Path | None = None
    if images_root is not None:
        root = Path(images_root)
        if not root.is_dir():
            raise FileNotFoundError(f"images root {root} is not a folder")
    elif csv_path is not None:
        root = _default_images_root(csv_path)
    return _read_files(files, image_paths, root, images_base_url, language)


def _read_files(
    files: list[Path],
    image_paths: Mapping[str, str] | None,
    images_root: Path | None,
    images_base_url: str | None,
    language: str,
) -> Iterator[RawRecord]:
    for file in files:
        yield from _read_listing_file(file, image_paths, images_root, images_base_url, language)
