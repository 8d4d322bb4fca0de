"""The folder layout is the architecture: these tests hold each folder to its imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ADDON = Path(__file__).resolve().parent.parent / "addon"
# The hook layer: the only modules that may import mitmproxy.
HOOK_LAYER = {"proxy/hooks.py", "proxy/errorpage.py", "proxy/runner.py"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _modules():
    return sorted(
        p.relative_to(ADDON).as_posix()
        for p in ADDON.rglob("*.py")
        if p.name != "spendtap.py"  # the entry script mitmdump loads
    )


@pytest.mark.parametrize("module", _modules())
def test_the_core_imports_neither_mitmproxy_nor_click(module):
    roots = _imported_roots(ADDON / module)
    assert "click" not in roots, f"{module} imports click: the CLI belongs in cli/"
    if module not in HOOK_LAYER:
        assert "mitmproxy" not in roots, f"{module} imports mitmproxy: only {HOOK_LAYER} may"


def test_every_module_lives_in_a_folder_of_the_data_path():
    top_level = {p.name for p in ADDON.glob("*.py")}
    assert top_level <= {
        "__init__.py",
        "spendtap.py",
        "options.py",
        "pricing.py",
        "address.py",
        "paths.py",
        "timeparse.py",
    }, (
        f"top-level modules {sorted(top_level)}: new ones go in a folder of the data path"
    )
    for folder in ("metering", "store", "proxy", "metrics"):
        assert (ADDON / folder / "__init__.py").is_file()
