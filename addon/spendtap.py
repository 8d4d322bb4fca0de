"""Entry script for ``mitmdump -s addon/spendtap.py`` (or ``-s $(spendtap addon-path)``).

mitmproxy puts this file's folder first on ``sys.path`` while it loads the
script, where the name ``spendtap`` would mean this very file rather than the
package. So the package is imported with that folder hidden; if spendtap is
not installed (a bare checkout), the folder itself is loaded as the package.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))


def _import_package():
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    try:
        cached = sys.modules.get("spendtap")
        if cached is not None and not hasattr(cached, "__path__"):
            del sys.modules["spendtap"]  # a stale import of this file, not the package
        try:
            import spendtap.proxy.addons

            return spendtap.proxy.addons
        except ModuleNotFoundError as e:
            if e.name not in ("spendtap", "spendtap.proxy", "spendtap.proxy.addons"):
                raise
        spec = importlib.util.spec_from_file_location(
            "spendtap", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["spendtap"] = package
        spec.loader.exec_module(package)
        import spendtap.proxy.addons

        return spendtap.proxy.addons
    finally:
        sys.path[:] = saved


# mitmproxy loads every addon of this list, in order (see spendtap.proxy.addons).
addons = _import_package().default_addons()
