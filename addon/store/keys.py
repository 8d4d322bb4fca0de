"""Bearer API keys mapped to principals, stored as SHA-256 fingerprints only.

Without a gateway in front to stamp trusted headers, a principal can come from
the secret the client presents (``Authorization: Bearer ...`` or
``x-api-key``). The ledger's ``api_keys`` table keeps, per secret, its SHA-256
fingerprint (hex), a short non-secret prefix for people to recognise it, the
account and key id it stands for, and when it was created and revoked. The
secret itself is never stored, logged or returned after ``add``.

Lookups compare fingerprints (an index lookup on the hash), so timing reveals
nothing about the secret. SHA-256 without a salt is the right hash here: the
secrets are high-entropy random tokens, not passwords, and a lookup must work
from the secret alone.

Exceptions::

    LedgerError (spendtap.store.ledger)
     +-- ApiKeyError               a key problem the caller should report
          +-- DuplicateKey          the secret is already registered
          +-- WeakSecret            the secret is too short to be a key

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from spendtap.store.errors import boundary_class
from spendtap.store.ledger import LedgerError, LedgerTables, transaction
from spendtap.timeparse import ts_from_epoch

__all__ = [
    "GENERATED_PREFIX",
    "MIN_SECRET_LEN",
    "ApiKey",
    "ApiKeyError",
    "DuplicateKey",
    "Keys",
    "WeakSecret",
    "extract_secret",
    "fingerprint",
    "generate_secret",
    "secret_prefix",
]

GENERATED_PREFIX = "sk-st-"
MIN_SECRET_LEN = 16
# How much of a secret may be shown: at most this many characters, and never
# more than a quarter of it (a generated key shows its scheme and 2 of 43
# random characters, about 12 of its 256 bits).
_PREFIX_MAX = 8


class ApiKeyError(LedgerError):
    """A key problem the caller should report."""


class DuplicateKey(ApiKeyError):
    """The secret is already registered (to this or another principal)."""


class WeakSecret(ApiKeyError):
    """The secret is too short (or blank) to be an API key."""


def fingerprint(secret: str) -> str:
    """The SHA-256 of the secret's UTF-8 bytes, as 64 hex digits."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_secret() -> str:
    """A new random key: ``sk-st-`` and 43 URL-safe characters (256 bits)."""
    return GENERATED_PREFIX + secrets.token_urlsafe(32)


def secret_prefix(secret: str) -> str:
    """The few leading characters that may be shown, followed by an ellipsis."""
    shown = min(_PREFIX_MAX, len(secret) // 4)
    if secret.startswith(GENERATED_PREFIX):
        shown = len(GENERATED_PREFIX) + 2
    return secret[:shown] + "\u2026"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.title())
    return value


def extract_secret(headers: Mapping[str, str]) -> str | None:
    """The secret a request presents: ``Authorization: Bearer X``, else ``x-api-key``,
    else ``x-goog-api-key`` (Gemini's native API).

    ``headers`` is any mapping with case-insensitive ``get`` (mitmproxy's
    ``Headers``) or a plain dict with lower-case (or title-case) names. Returns
    None when neither carries a non-blank value.
    """
    auth = _header(headers, "authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for name in ("x-api-key", "x-goog-api-key"):
        api_key = _header(headers, name)
        if api_key and api_key.strip():
            return api_key.strip()
    return None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A registered key as stored: never the secret."""

    fingerprint: str
    prefix: str
    account: str
    key_id: str
    created_at: str
    revoked_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = "fingerprint, prefix, account, key_id, created_at, revoked_at"


def new_record(account: str, key_id: str, secret: str, *, now: float | None = None) -> ApiKey:
    """The record a new key is stored as (checks the secret; never keeps it).

    Raises ``WeakSecret`` for a secret under ``MIN_SECRET_LEN`` characters or
    with whitespace, ``ValueError`` for an empty account or key id.
    """
    if not account or not key_id:
        raise ValueError("a key needs an account and a key id")
    if len(secret) < MIN_SECRET_LEN or any(c.isspace() for c in secret):
        raise WeakSecret(
            f"a secret must be at least {MIN_SECRET_LEN} characters without whitespace"
        )
    return ApiKey(
        fingerprint=fingerprint(secret),
        prefix=secret_prefix(secret),
        account=account,
        key_id=key_id,
        created_at=ts_from_epoch(time.time() if now is None else now),
        revoked_at=None,
    )


def revoke_prefix(key_id: str | None, fingerprint_prefix: str | None) -> str | None:
    """What ``revoke`` was asked (both stores check it alike): exactly one of a key id and
    a fingerprint prefix of at least 8 hex digits; the prefix in lower case, or None when
    the key id was given."""
    if (key_id is None) == (fingerprint_prefix is None):
        raise ValueError("revoke needs exactly one of key_id and fingerprint_prefix")
    if fingerprint_prefix is None:
        return None
    fp = fingerprint_prefix.lower()
    if len(fp) < 8 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError("a fingerprint prefix is at least 8 hex digits")
    return fp


def at_most_one(fp: str, matches: list) -> None:
    """A fingerprint prefix revokes one key: one that matches several revokes none."""
    if len(matches) > 1:
        raise ValueError(f"fingerprint prefix {fp} matches {len(matches)} keys")


@boundary_class
class Keys(LedgerTables):
    """The ``api_keys`` table of the ledger at ``path``.

    Owns one SQLite connection; safe to share between threads (serialized).
    ``create`` False opens only an existing ledger (``LedgerNotFound``); ``readonly``
    (for keys list) works on a read-only mount or a copy.
    """

    def add(self, account: str, key_id: str, secret: str, *, now: float | None = None) -> ApiKey:
        """Register ``secret`` as a key of ``account`` named ``key_id``; returns the record.

        Raises ``WeakSecret`` for a secret under ``MIN_SECRET_LEN`` characters
        or with whitespace, ``DuplicateKey`` if it is already registered,
        ``ValueError`` for an empty account or key id.
        """
        record = new_record(account, key_id, secret, now=now)
        with self._lock:
            try:
                self._conn.execute(
                    f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.fingerprint,
                        record.prefix,
                        record.account,
                        record.key_id,
                        record.created_at,
                        record.revoked_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise DuplicateKey("that secret is already registered") from None
        return record

    def resolve(self, secret: str | None) -> tuple[str, str] | None:
        """The (account, key_id) of an active key, or None (unknown, revoked or no secret)."""
        if not secret:
            return None
        with self._lock:
            row = self._conn.execute(
                "SELECT account, key_id FROM api_keys WHERE fingerprint = ? AND revoked_at IS NULL",
                (fingerprint(secret),),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def list(self, *, include_revoked: bool = False) -> list[ApiKey]:
        """Registered keys by account, key id and creation time."""
        sql = f"SELECT {_COLUMNS} FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        sql += " ORDER BY account, key_id, created_at"
        with self._lock:
            return [ApiKey(*r) for r in self._conn.execute(sql)]

    def revoke(
        self,
        *,
        key_id: str | None = None,
        fingerprint_prefix: str | None = None,
        now: float | None = None,
    ) -> int:
        """Revoke the active secrets of ``key_id``, or the one whose fingerprint starts so.

        A fingerprint prefix must be at least 8 hex digits and match one key.
        Returns how many keys were revoked (0: none matched). A revoked key no
        longer resolves; its record stays for ``keys list --all``.
        """
        fp = revoke_prefix(key_id, fingerprint_prefix)
        stamp = ts_from_epoch(time.time() if now is None else now)
        with self._lock:
            if fp is None:
                cur = self._conn.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                    (stamp, key_id),
                )
                return cur.rowcount
            with transaction(self._conn) as conn:
                matches = conn.execute(
                    "SELECT fingerprint FROM api_keys "
                    "WHERE substr(fingerprint, 1, ?) = ? AND revoked_at IS NULL",
                    (len(fp), fp),
                ).fetchall()
                at_most_one(fp, matches)
                for (full,) in matches:
                    conn.execute(
                        "UPDATE api_keys SET revoked_at = ? WHERE fingerprint = ?", (stamp, full)
                    )
            return len(matches)
