"""Where the ledger lives when nobody says: ``$SPENDTAP_DB``, else the per-user data dir."""

from __future__ import annotations

import os
from pathlib import Path


def default_db_path() -> str:
    env = os.environ.get("SPENDTAP_DB")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "spendtap" / "ledger.db")
