"""API keys of the HTTP API, stored hashed in the catalog (table ``api_keys``).

A key is ``mars_`` followed by 32 random bytes from :func:`secrets.token_urlsafe` (43
URL-safe base64 characters, 256 bits): it is shown once, when it is created, and only its
SHA-256 digest is stored, with its first :data:`PREFIX_LENGTH` characters (``prefix``) so
listings can name a key without revealing it.

Why a fast hash: slow, salted password hashes (Argon2id, scrypt, bcrypt, PBKDF2) exist to make
guessing *low-entropy, human-chosen* secrets expensive (OWASP Password Storage Cheat Sheet).
A key drawn from a CSPRNG with 256 bits of entropy cannot be guessed from its digest whatever
the hash's speed, so one SHA-256 is the usual choice for machine-generated tokens (GitHub
stores its tokens hashed and gives them an identifiable prefix: GitHub Engineering blog,
"Behind GitHub's new authentication token formats", 2021), and it keeps the check cheap on
every request. Digests are compared with :func:`hmac.compare_digest` (constant time).

Roles, weakest first (:data:`ROLES`): ``viewer`` (search and read), ``editor`` (viewer +
ingest and deletes), ``admin`` (editor + key management). The HTTP side is
:mod:`query.auth`; the ``mars keys`` commands call this module on the catalog directly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.models import ApiKey, iso_or_none, utcnow

#: A role of a key; see :data:`ROLES`.
Role = Literal["viewer", "editor", "admin"]

#: The roles, weakest first: each holds every right of the roles before it.
ROLES: tuple[str, ...] = get_args(Role)

#: What every key starts with (recognisable in logs and by secret scanners).
KEY_MARKER = "mars_"

#: Characters of a key kept in the catalog as its public ``prefix`` (the marker + 7 of the
#: random part, 42 bits: enough to tell keys apart in a listing, useless for guessing).
PREFIX_LENGTH = 12

#: Longest string accepted as a key (a real one has 48 characters); longer input is unknown.
MAX_KEY_LENGTH = 256

#: ``last_used_at`` is written at most this often per key, so requests rarely write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def role_allows(held: str, needed: str) -> bool:
    """True when a key with role ``held`` may do what needs role ``needed``.

    Raises:
        ValueError: if either is not one of :data:`ROLES`.
    """
    for role in (held, needed):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return ROLES.index(held) >= ROLES.index(needed)


def new_key() -> str:
    """A fresh random key: ``mars_`` + 43 URL-safe characters (32 bytes from ``secrets``)."""
    return KEY_MARKER + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of ``key``: its SHA-256 digest as 64 lower-case hex characters."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str, role: str) -> tuple[ApiKey, str]:
    """Create and commit a key named ``name`` with ``role``.

    Returns:
        ``(row, key)``: the catalog row (no secret in it) and the plaintext key, which is
        not stored anywhere and must be handed to its user now.

    Raises:
        ValueError: if ``role`` is not one of :data:`ROLES`, or ``name`` is empty or longer
            than 128 characters.
    """
    name = name.strip()
    if not name or len(name) > 128:
        raise ValueError("a key's name must have 1 to 128 characters")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    key = new_key()
    row = ApiKey(name=name, role=role, prefix=key[:PREFIX_LENGTH], hash=hash_key(key), created_at=utcnow())
    session.add(row)
    session.commit()
    return row, key


def find_key(session: Session, key: str) -> ApiKey | None:
    """The catalog row of ``key`` (revoked or not), or None if no stored key matches.

    Candidates are found by the public prefix; the digests are compared in constant time.
    """
    if not key.startswith(KEY_MARKER) or len(key) > MAX_KEY_LENGTH:
        return None
    digest = hash_key(key)
    found = None
    for row in session.scalars(select(ApiKey).where(ApiKey.prefix == key[:PREFIX_LENGTH])):
        if hmac.compare_digest(row.hash, digest):
            found = row
    return found


def mark_used(session: Session, row: ApiKey, now: datetime | None = None) -> bool:
    """Set ``row.last_used_at`` to ``now`` (default: the current UTC time) and commit, unless it
    was set less than :data:`LAST_USED_RESOLUTION` ago. Returns whether it wrote."""
    now = now or utcnow()
    if row.last_used_at is not None and now - row.last_used_at < LAST_USED_RESOLUTION:
        return False
    row.last_used_at = now
    session.commit()
    return True


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: int) -> ApiKey | None:
    """Revoke key ``key_id`` (from then on it is refused) and commit; None if there is no such
    key. Revoking a revoked key changes nothing (its first ``revoked_at`` stays)."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def describe(row: ApiKey) -> dict[str, Any]:
    """A key as JSON-ready data without its secret: ``id``, ``name``, ``role``, ``prefix``, and
    ``created_at``, ``last_used_at``, ``revoked_at`` as ISO 8601 UTC strings (or None)."""
    return {"id": row.id, "name": row.name, "role": row.role, "prefix": row.prefix, "created_at": iso_or_none(row.created_at),
            "last_used_at": iso_or_none(row.last_used_at), "revoked_at": iso_or_none(row.revoked_at)}
