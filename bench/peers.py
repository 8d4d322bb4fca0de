"""Peer proxies, each in its own virtualenv under ``bench/.peers/`` (gitignored).

LiteLLM: pinned to the version measured (``LITELLM_VERSION``), installed from
``bench/litellm-requirements.txt`` (a full ``pip freeze``: the proxy's dependencies
are listed explicitly because the ``litellm[proxy]`` extra pins helper packages --
``litellm-proxy``, ``litellm-proxy-extras``, ``litellm-enterprise`` -- at releases the
package index may not carry; ``litellm-proxy`` 1.110 needs Python 3.14).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".peers"
LITELLM_VERSION = "1.110.2"
LITELLM_REQUIREMENTS = HERE / "litellm-requirements.txt"


def _base_python() -> str:
    """The interpreter behind the current venv (a venv's own python would nest venvs)."""
    base = Path(sys.base_prefix) / "bin"
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        if (base / name).exists():
            return str(base / name)
    return sys.executable


def ensure_litellm(log=print) -> tuple[Path, str]:
    """Create (once) the LiteLLM venv; return the ``litellm`` executable and its version."""
    venv = PEERS / f"litellm-{LITELLM_VERSION}"
    exe = venv / "bin" / "litellm"
    marker = venv / ".installed"
    if exe.exists() and marker.exists():
        return exe, LITELLM_VERSION
    PEERS.mkdir(exist_ok=True)
    if not (venv / "bin" / "python").exists():
        log(f"creating {venv} ...")
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    log(f"installing litellm {LITELLM_VERSION} and its proxy dependencies (a few minutes) ...")
    r = subprocess.run([*pip, "-r", str(LITELLM_REQUIREMENTS)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install for litellm failed:\n{r.stderr[-2000:]}")
    if not exe.exists():
        raise RuntimeError(f"{exe} missing after install")
    marker.write_text(LITELLM_VERSION + "\n")
    return exe, LITELLM_VERSION
