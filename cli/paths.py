"""Where the ledger lives, and the ``--db`` option every ledger command shares.

The default ledger path is ``$SPENDTAP_DB`` if set, else
``$XDG_DATA_HOME/spendtap/ledger.db`` (an absolute ``XDG_DATA_HOME`` only, as
the XDG spec asks), else ``~/.local/share/spendtap/ledger.db``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from spendtap.ledger import Ledger, LedgerError, LedgerNotFound
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


def open_ledger(path: Path) -> Ledger:
    """Open an existing ledger for reading, or fail with one clear line (exit 1)."""
    try:
        return Ledger.open_existing(path)
    except LedgerNotFound:
        raise click.ClickException(
            f"no ledger at {path} (spendtap run creates it; pass --db or set {ENV_DB})"
        ) from None
    except LedgerError as e:
        raise click.ClickException(str(e)) from None
