"""Where the ledger lives, and the ``--db`` option every ledger command shares.

The default ledger path is ``$SPENDTAP_DB`` if set, else
``$XDG_DATA_HOME/spendtap/ledger.db`` (an absolute ``XDG_DATA_HOME`` only, as
the XDG spec asks), else ``~/.local/share/spendtap/ledger.db``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from spendtap.cli.config import ENV_CONFIG
from spendtap.paths import ENV_DB, default_db_path
from spendtap.store.backend import open_ledger_reader
from spendtap.store.central import is_central_url, redact_dsn
from spendtap.store.ledger import (
    Ledger,
    LedgerError,
    LedgerNotFound,
    StorageError,
    readonly_reason,
)


class LedgerLocation(click.ParamType):
    """A ledger file path (a ``Path``), or a ``postgresql://`` URL (kept as a string)."""

    name = "path|postgresql://..."

    def convert(self, value: Any, param: Any, ctx: Any) -> Path | str:
        if isinstance(value, Path):
            return value
        text = str(value)
        if is_central_url(text):
            return text
        return Path(text)

    def get_metavar(self, param: Any, ctx: Any = None) -> str:
        return "PATH|URL"


def db_option[F: Callable](fn: F) -> F:
    """The ``--db PATH|URL`` option (env ``SPENDTAP_DB``), passed to the command as ``db_path``."""
    return click.option(
        "--db",
        "db_path",
        type=LedgerLocation(),
        envvar=ENV_DB,
        show_envvar=True,
        default=lambda: str(default_db_path()),
        show_default="$XDG_DATA_HOME/spendtap/ledger.db",
        help="The ledger file, or a postgresql://USER@HOST:PORT/DB URL for the fleet's "
        "central store (the password is never shown).",
    )(fn)


def config_option(help_text: str) -> Callable[[Callable], Callable]:
    """The ``--config PATH`` option (env ``SPENDTAP_CONFIG``): the TOML file of
    ``spendtap run``, passed to the command as ``config_path``."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=ENV_CONFIG,
        show_envvar=True,
        help=help_text,
    )


def describe(path: Path | str) -> str:
    """A ledger location as it may be printed (a URL's password hidden)."""
    return redact_dsn(path) if is_central_url(path) else str(path)


def open_ledger(path: Path | str, *, write: bool = False) -> Any:
    """Open an existing ledger, or fail with one clear line (exit 1).

    Read-only unless ``write``: that works where operators keep ledgers, a read-only
    mount or a backup copy. With ``write``, a ledger that cannot be written is
    refused up front, in one line. A ``postgresql://`` URL opens the fleet's central
    store (``spendtap.store.central.CentralStore``, the same reading interface).
    """
    if is_central_url(path):
        try:
            return open_ledger_reader(path)
        except LedgerError as e:
            raise click.ClickException(str(e)) from None
    if write:
        refuse_readonly(path)
    try:
        ledger = Ledger.open_existing(path, readonly=not write)
    except LedgerNotFound:
        raise click.ClickException(
            f"no ledger at {path} (spendtap run creates it; pass --db or set {ENV_DB})"
        ) from None
    except StorageError as e:  # the database's own words, said here where
        raise click.ClickException(f"cannot open the ledger {path}: {e}") from None
    except LedgerError as e:
        raise click.ClickException(str(e)) from None
    if ledger.note:
        click.echo(f"note: {ledger.note}", err=True)
    return ledger


def refuse_readonly(path: Path) -> None:
    """A command that writes, on a ledger it cannot write: one line, exit 1."""
    if is_central_url(path):
        return  # PostgreSQL answers for itself
    reason = readonly_reason(path)
    if reason is not None:
        raise click.ClickException(_readonly_message(path, reason))


def _readonly_message(path: Path, reason: str) -> str:
    ctx = click.get_current_context(silent=True)
    command = ctx.command_path if ctx is not None else "this command"
    return (
        f"the ledger {path} is read-only ({reason}): {command} changes it; "
        "run it where the ledger is writable"
    )


@contextmanager
def open_store(
    factory: Callable[..., Any],
    path: Path,
    *,
    create: bool = False,
    readonly: bool = False,
    user_errors: tuple[type[Exception], ...] = (),
) -> Iterator[Any]:
    """A store over the ledger (``Budgets``, ``Keys``); any ledger error is one line, exit 1.

    ``readonly`` opens it read-only (for commands that only read); otherwise a
    ledger this process cannot write is refused up front, in one line.
    ``user_errors`` are the store's own refusals (a duplicate key, a bad window):
    their message is shown as it is.
    """
    if not readonly:
        refuse_readonly(path)
    try:
        store = factory(path, readonly=True) if readonly else factory(path, create=create)
    except ImportError as e:
        raise click.ClickException(f"{describe(path)}: {e}") from None
    except LedgerNotFound:
        raise click.ClickException(
            f"no ledger at {path} (spendtap run creates it; pass --db or set {ENV_DB})"
        ) from None
    except (LedgerError, OSError) as e:
        raise click.ClickException(str(e)) from None
    try:
        yield store
    except user_errors as e:
        raise click.ClickException(str(e)) from None
    except LedgerError as e:
        if "readonly database" in str(e):
            raise click.ClickException(_readonly_message(path, str(e))) from None
        raise click.ClickException(f"cannot use the ledger: {e}") from None
    finally:
        store.close()
