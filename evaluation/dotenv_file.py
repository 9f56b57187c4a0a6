"""Writing ``mars tune --write``'s chosen setting into the dotenv file that
:class:`mars.settings.Settings` reads (environment variables still override it):
:func:`settings_env` gives the values, :func:`update_dotenv` sets them in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluation.query_lists import SHAPES

#: Dotenv keys of the tuned settings.
ENV_K, ENV_WEIGHTS = "MARS_RRF_K", {"photo": "MARS_WEIGHTS_PHOTO", "text": "MARS_WEIGHTS_TEXT"}


def settings_env(chosen_settings: Mapping[str, Any]) -> dict[str, str]:
    """The dotenv values of a report's ``chosen.settings``: ``MARS_RRF_K`` and the two weight
    fields as JSON (the form ``Settings`` parses)."""
    values = {ENV_K: str(chosen_settings["rrf_k"])}
    for shape, field_name in SHAPES.items():
        values[ENV_WEIGHTS[shape]] = json.dumps(dict(chosen_settings[field_name]))
    return values


def _quote(value: str) -> str:
    """A dotenv value: bare when it is plain, else single-quoted (python-dotenv reads single-quoted
    values literally, bar ``\\\\`` and ``\\'``)."""
    if value and all(c.isalnum() or c in "._-+:/" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _line_key(line: str) -> str | None:
    """The key a dotenv line sets (``export`` prefix allowed), None for a blank, comment or key-less line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("export "):
        stripped = stripped[len("export "):].lstrip()
    key, sep, _ = stripped.partition("=")
    return key.strip() if sep else None


def update_dotenv(path: Path, values: Mapping[str, str]) -> None:
    """Set ``values`` (key -> unquoted value) in the dotenv file ``path``, keeping every other line.

    A key already in the file is replaced where it first appears (later duplicates, which would
    override it, are dropped); a new key is appended. The file is created when missing and
    replaced atomically.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    out: list[str] = []
    done: set[str] = set()
    for line in lines:
        key = _line_key(line)
        if key in values:
            if key not in done:
                out.append(f"{key}={_quote(values[key])}")
                done.add(key)
            continue
        out.append(line)
    out.extend(f"{key}={_quote(value)}" for key, value in values.items() if key not in done)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".env.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["ENV_K", "ENV_WEIGHTS", "settings_env", "update_dotenv"]
