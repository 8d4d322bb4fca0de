"""Where the ledger lives when nobody says.

``$SPENDTAP_DB`` if set, else ``$XDG_DATA_HOME/spendtap/ledger.db`` (an absolute
``XDG_DATA_HOME`` only, as the XDG spec asks), else
``~/.local/share/spendtap/ledger.db``. Shared by the addon and the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_DB = "SPENDTAP_DB"


def default_db_path(environ: Mapping[str, str] | None = None) -> Path:
    """The ledger path to use when none is given."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DB):
        return Path(env[ENV_DB]).expanduser()
    xdg = env.get("XDG_DATA_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "spendtap" / "ledger.db"
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".local" / "share" / "spendtap" / "ledger.db"
