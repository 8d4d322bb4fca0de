"""Bearer keys: fingerprint-only storage, resolution, revocation, and secret extraction."""

from __future__ import annotations

import hashlib

import pytest

from spendtap.store.keys import (
    DuplicateKey,
    Keys,
    WeakSecret,
    extract_secret,
    fingerprint,
    generate_secret,
    secret_prefix,
)


@pytest.fixture
def keys(tmp_path):
    k = Keys(tmp_path / "ledger.db")
    yield k
    k.close()


def test_fingerprint_is_sha256_hex():
    """A fingerprint is the SHA-256 hex digest of the secret."""
    assert fingerprint("sk-abc") == hashlib.sha256(b"sk-abc").hexdigest()


def test_generated_secrets_are_unique_and_prefixed():
    """Generated secrets carry the sk-st- scheme and 256 random bits."""
    a, b = generate_secret(), generate_secret()
    assert a != b and a.startswith("sk-st-") and len(a) == 6 + 43
    assert secret_prefix(a) == a[:8] + "\u2026"


def test_prefix_never_shows_more_than_a_quarter():
    """The shown prefix is at most 8 characters and a quarter of the secret."""
    assert secret_prefix("abcdefghijklmnop") == "abcd\u2026"
    assert secret_prefix("x" * 100) == "x" * 8 + "\u2026"


def test_add_resolve_revoke(keys):
    """A registered secret resolves to its principal until revoked."""
    secret = generate_secret()
    record = keys.add("acme", "k1", secret)
    assert record.fingerprint == fingerprint(secret)
    assert keys.resolve(secret) == ("acme", "k1")
    assert keys.resolve(secret + "x") is None
    assert keys.resolve(None) is None
    assert keys.revoke(key_id="k1") == 1
    assert keys.resolve(secret) is None
    assert keys.list() == []
    assert [k.key_id for k in keys.list(include_revoked=True)] == ["k1"]


def test_revoke_by_fingerprint_prefix(keys):
    """One key can be revoked by a fingerprint prefix of at least 8 hex digits."""
    a, b = "secret-number-one-aaaa", "secret-number-two-bbbb"
    keys.add("acme", "k1", a)
    keys.add("acme", "k1", b)
    with pytest.raises(ValueError, match="8 hex"):
        keys.revoke(fingerprint_prefix="abc")
    assert keys.revoke(fingerprint_prefix=fingerprint(a)[:10]) == 1
    assert keys.resolve(a) is None and keys.resolve(b) == ("acme", "k1")
    assert keys.revoke(fingerprint_prefix="0" * 12) == 0


def test_duplicate_and_weak_secrets_are_refused(keys):
    """The same secret twice, a short one or one with whitespace is refused."""
    keys.add("acme", "k1", "a-long-enough-secret")
    with pytest.raises(DuplicateKey):
        keys.add("beta", "k9", "a-long-enough-secret")
    with pytest.raises(WeakSecret):
        keys.add("acme", "k2", "short")
    with pytest.raises(WeakSecret):
        keys.add("acme", "k2", "has a space in it ok")
    with pytest.raises(ValueError):
        keys.add("", "k2", "another-long-secret")


def test_the_secret_never_reaches_the_file(tmp_path):
    """Only the fingerprint is stored: the secret's bytes are nowhere in the ledger files."""
    path = tmp_path / "ledger.db"
    secret = generate_secret()
    with Keys(path) as keys:
        keys.add("acme", "k1", secret)
        keys.resolve(secret)
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert fingerprint(secret).encode() in blob
    assert secret.encode() not in blob
    assert secret[8:].encode() not in blob


@pytest.mark.parametrize(
    ("headers", "secret"),
    [
        ({"authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "bearer   sk-2 "}, "sk-2"),
        ({"x-api-key": "sk-3"}, "sk-3"),
        ({"authorization": "Bearer sk-4", "x-api-key": "sk-5"}, "sk-4"),
        ({"authorization": "Basic dXNlcjpwdw==", "x-api-key": "sk-6"}, "sk-6"),
        ({"x-goog-api-key": "AIza-7"}, "AIza-7"),  # Gemini's native API
        ({"x-api-key": "sk-8", "x-goog-api-key": "AIza-9"}, "sk-8"),
        ({"authorization": "Bearer "}, None),
        ({"authorization": "Basic dXNlcjpwdw=="}, None),
        ({}, None),
    ],
)
def test_extract_secret(headers, secret):
    """The secret comes from a Bearer Authorization header, else x-api-key, else x-goog-api-key."""
    assert extract_secret(headers) == secret
