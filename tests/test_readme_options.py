"""The README's option table and the addon's option table say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

from spendtap.options import OPTIONS

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_rows() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Addon options", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `spendtap_"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`(spendtap_[a-z_]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        for i, name in enumerate(names):
            rows[name] = defaults[i] if i < len(defaults) else cells[1]
    return rows


def test_every_option_is_documented_and_nothing_else():
    documented = _readme_rows()
    assert set(documented) == {o.name for o in OPTIONS}


def test_documented_defaults_match_the_code():
    documented = _readme_rows()
    for option in OPTIONS:
        if option.default in ("", None):
            continue  # empty defaults are described in words (what empty means)
        default = option.default
        shown = ("true" if default else "false") if isinstance(default, bool) else str(default)
        assert shown in documented[option.name], (option.name, documented[option.name])
