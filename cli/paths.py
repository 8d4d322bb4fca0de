"""Where the ledger lives, and the ``--db`` option every ledger command shares.

The default ledger path is ``$SPENDTAP_DB`` if set, else
``$XDG_DATA_HOME/spendtap/ledger.db`` (an absolute ``XDG_DATA_HOME`` only, as
the XDG spec asks), else ``~/.local/share/spendtap/ledger.db``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from spendtap.ledger import Ledger, LedgerError, LedgerNotFound, readonly_reason
from spendtap.paths import ENV_DB, default_db_path


def db_option[F: Callable](fn: F) -> F:
    """The ``--db PATH`` option (env ``SPENDTAP_DB``), passed to the command as ``db_path``."""
    return click.option(
        "--db",
        "db_path",
        type=click.Path(path_type=Path),
        envvar=ENV_DB,
        show_envvar=True,
        default=lambda: str(default_db_path()),
        show_default="$XDG_DATA_HOME/spendtap/ledger.db",
        help="The ledger file.",
    )(fn)


def open_ledger(path: Path, *, write: bool = False) -> Ledger:
    """Open an existing ledger, or fail with one clear line (exit 1).

    Read-only unless ``write``: that works where operators keep ledgers, a read-only
    mount or a backup copy. With ``write``, a ledger that cannot be written is
    refused up front, in one line.
    """
    if write:
        refuse_readonly(path)
    try:
        ledger = Ledger.open_existing(path, readonly=not write)
    except LedgerNotFound:
        raise click.ClickException(
            f"no ledger at {path} (spendtap run creates it; pass --db or set {ENV_DB})"
        ) from None
    except LedgerError as e:
        raise click.ClickException(str(e)) from None
    except sqlite3.Error as e:
        raise click.ClickException(f"cannot open the ledger {path}: {e}") from None
    if ledger.note:
        click.echo(f"note: {ledger.note}", err=True)
    return ledger


def refuse_readonly(path: Path) -> None:
    """A command that writes, on a ledger it cannot write: one line, exit 1."""
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
    except LedgerNotFound:
        raise click.ClickException(
            f"no ledger at {path} (spendtap run creates it; pass --db or set {ENV_DB})"
        ) from None
    except (LedgerError, sqlite3.Error, OSError) as e:
        raise click.ClickException(str(e)) from None
    try:
        yield store
    except user_errors as e:
        raise click.ClickException(str(e)) from None
    except (LedgerError, sqlite3.Error) as e:
        if "readonly database" in str(e):
            raise click.ClickException(_readonly_message(path, str(e))) from None
        raise click.ClickException(f"cannot use the ledger: {e}") from None
    finally:
        store.close()
