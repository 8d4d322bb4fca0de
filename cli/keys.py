"""``spendtap keys add|list|rm``: bearer API keys, stored as fingerprints only."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from spendtap.cli.output import output_options, write_rows
from spendtap.cli.paths import db_option, open_store
from spendtap.store.backend import open_key_store
from spendtap.store.keys import ApiKeyError, generate_secret

KEY_COLUMNS = ("account", "key_id", "prefix", "fingerprint", "created_at", "revoked_at")
KEY_TABLE = (
    ("account", "account"),
    ("key_id", "key_id"),
    ("prefix", "prefix"),
    ("fingerprint_start", "fingerprint"),
    ("created_at", "created_at"),
    ("revoked_at", "revoked_at"),
)


def open_keys(path: Path, *, create: bool = False, readonly: bool = False):
    """Keys over the ledger at ``path``; any ledger error is one line and exit 1.

    ``readonly`` for commands that only read (they work on a read-only ledger).
    """
    return open_store(
        open_key_store,
        path,
        create=create,
        readonly=readonly,
        user_errors=(ApiKeyError, ValueError),
    )


@click.group(name="keys")
def keys_group() -> None:
    """Map bearer API keys to accounts and keys (only fingerprints are stored).

    For a sidecar with no gateway in front: a request's `Authorization: Bearer`
    or `x-api-key` secret names its principal. The ledger keeps the SHA-256
    fingerprint of each secret and a short prefix, never the secret itself.

    \b
    Examples:
        spendtap keys add --account acme --key-id k-acme-1 --generate
        printf %s "$SECRET" | spendtap keys add --account acme --key-id k-acme-2
        spendtap keys list
        spendtap keys rm --key-id k-acme-1
    """


@keys_group.command(name="add")
@click.option("--account", required=True, help="The account the key spends for.")
@click.option("--key-id", required=True, help="The key's name in the ledger and metrics.")
@click.option(
    "--generate",
    is_flag=True,
    help="Generate a new secret and print it once (the default when stdin is a terminal; "
    "otherwise the secret is read from stdin).",
)
@db_option
def keys_add(account: str, key_id: str, generate: bool, db_path: Path) -> None:
    """Register an API key: the secret from stdin, or a new one printed once.

    With --generate (or at an interactive terminal), a new random secret is
    generated and printed on stdout once: spendtap cannot show it again.
    Otherwise the secret piped on stdin is registered (surrounding whitespace
    stripped); an empty stdin is an error, never a silently generated key.
    Creates the ledger if there is none.

    \b
    Examples:
        spendtap keys add --account acme --key-id k-acme-1 --generate
        printf %s "$OPENAI_API_KEY" | spendtap keys add --account acme --key-id k-acme-2
    """
    stdin = sys.stdin
    generated = generate or stdin.isatty()
    if generated:
        secret = generate_secret()
    else:
        secret = stdin.read().strip()
        if not secret:
            raise click.ClickException(
                "no secret on stdin and it is not a terminal: pipe the secret in, "
                "or pass --generate to make a new one"
            )
    with open_keys(db_path, create=True) as keys:
        record = keys.add(account, key_id, secret)
    if generated:
        click.echo(secret)
        click.echo(
            f"registered {record.prefix} for account {account}, key {key_id}; "
            "store the secret now: it is not kept and cannot be shown again",
            err=True,
        )
    else:
        click.echo(
            f"registered {record.prefix} (fingerprint {record.fingerprint[:12]}) "
            f"for account {account}, key {key_id}"
        )


@keys_group.command(name="list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@db_option
@output_options
def keys_list(include_revoked: bool, db_path: Path, fmt: str) -> None:
    """List registered keys: account, key id, prefix and fingerprint (never the secret).

    \b
    Examples:
        spendtap keys list
        spendtap keys list --all -f json
    """
    with open_keys(db_path, readonly=True) as keys:
        records = keys.list(include_revoked=include_revoked)
    rows = []
    for r in records:
        row = r.as_dict()
        row["fingerprint_start"] = r.fingerprint[:12]
        rows.append(row)
    write_rows(rows, fmt, KEY_COLUMNS, table_columns=KEY_TABLE)


@keys_group.command(name="rm")
@click.option("--key-id", help="Revoke every active secret of this key id.")
@click.option(
    "--fingerprint", metavar="HEX", help="Revoke the one key whose fingerprint starts so."
)
@db_option
def keys_rm(key_id: str | None, fingerprint: str | None, db_path: Path) -> None:
    """Revoke API keys: they stop resolving at once (the record stays for --all).

    \b
    Examples:
        spendtap keys rm --key-id k-acme-1
        spendtap keys rm --fingerprint 3fa9c2e17b04
    """
    if (key_id is None) == (fingerprint is None):
        raise click.UsageError("give exactly one of --key-id and --fingerprint")
    with open_keys(db_path) as keys:
        count = keys.revoke(key_id=key_id, fingerprint_prefix=fingerprint)
    if count == 0:
        what = f"key id {key_id}" if key_id is not None else f"fingerprint {fingerprint}"
        raise click.ClickException(f"no active key with {what}")
    click.echo(f"revoked {count} key{'s' if count != 1 else ''}")
