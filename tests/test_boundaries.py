"""The folder layout is the architecture: these tests hold each folder to its imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ADDON = Path(__file__).resolve().parent.parent / "addon"
# The hook layer: the only modules that may import mitmproxy (spendtap's addons, the
# error page patch, the chunk joining, the script watcher's stop, the hook dispatch, the lean
# runner, and mitmdump started on the chosen event loop).
# spendtap.proxy.addons only lists the addons.
HOOK_LAYER = {
    "proxy/failclosed.py",
    "proxy/hooks.py",
    "proxy/guard.py",
    "proxy/recording.py",
    "proxy/gatekeeper.py",
    "proxy/monitoring.py",
    "proxy/heap.py",
    "proxy/errorpage.py",
    "proxy/coalesce.py",
    "proxy/noreload.py",
    "proxy/dispatch.py",
    "proxy/runner.py",
    "proxy/eventloop.py",
}


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
    }, f"top-level modules {sorted(top_level)}: new ones go in a folder of the data path"
    for folder in ("metering", "store", "proxy", "metrics"):
        assert (ADDON / folder / "__init__.py").is_file()


ROOT = ADDON.parent
# Above the storage boundary: these catch the store's exceptions (spendtap.store.errors),
# never a database driver's, so a backend's driver can change without edits here.
ABOVE_THE_STORE = sorted(
    [p.relative_to(ROOT).as_posix() for p in (ROOT / "cli").glob("*.py")]
    + ["addon/store/writer.py"]
)


@pytest.mark.parametrize("module", ABOVE_THE_STORE)
def test_the_cli_and_the_writer_import_no_database_driver(module):
    source = (ROOT / module).read_text()
    roots = _imported_roots(ROOT / module)
    # Also an import inside a function (ast.walk sees those too) and importlib by name.
    for driver in ("sqlite3", "psycopg", "psycopg_pool"):
        assert driver not in roots, f"{module} imports {driver}: catch spendtap.store.errors"
        assert f'import_module("{driver}' not in source, f"{module} loads {driver} by name"
