"""Installing spendtap: where the commands live after `make`, and on a server.

The README used bare `spendtap` and `mitmdump` without saying they are in
`.venv/bin` after `make demo`, and how to install on a server was only in
deploy/README.md. These tests hold the README to what the Makefile does, and
install the built wheel into a fresh virtual environment as a server would.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.proc import REPO

README = (REPO / "README.md").read_text()


def test_readme_says_where_the_commands_live():
    """The README names .venv/bin for both commands, and the Makefile installs them there."""
    assert ".venv/bin/spendtap" in README and ".venv/bin/mitmdump" in README
    assert "source .venv/bin/activate" in README
    makefile = (REPO / "Makefile").read_text()
    assert ".venv/bin/spendtap demo" in makefile
    # The environment the tests run in is that .venv: both commands are in its bin/.
    bindir = Path(sys.executable).parent
    assert (bindir / "spendtap").exists() and (bindir / "mitmdump").exists()


def test_readme_says_how_to_install_on_a_server():
    """pip install . into a venv, and pipx, are both in the README's own words."""
    assert re.search(r"-m venv \S+ && \S+/bin/pip install \.", README)
    assert "pipx install" in README


def _build_wheel(tmp_path: Path) -> tuple[Path, str]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         str(REPO), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        pytest.skip(f"cannot build the wheel here (no build backend offline?): {out.stderr[-300:]}")
    (wheel,) = (tmp_path / "dist").glob("spendtap-*.whl")
    return wheel, out.stdout + out.stderr


@pytest.mark.e2e
def test_server_install_from_the_wheel(tmp_path):
    """`pip install .` as on a server: a fresh venv gets a working `spendtap` command that
    finds its addon and the mitmdump beside it. (Dependencies come from this checkout's
    environment through a .pth file: the test must not need a package index.)"""
    wheel, _ = _build_wheel(tmp_path)
    venv = tmp_path / "server-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "_deps_from_checkout.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    spendtap = venv / "bin" / "spendtap"
    version = subprocess.run([str(spendtap), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("spendtap, version ")
    addon = subprocess.run([str(spendtap), "addon-path"], capture_output=True, text=True)
    assert Path(addon.stdout.strip()).is_file()
    assert str(site) in addon.stdout, "the addon comes from the installed package"


def test_build_prints_no_setuptools_warnings(tmp_path):
    """Building spendtap (what every `make` does) prints no setuptools deprecation
    warnings: `project.license` is an SPDX string, not a table."""
    wheel, output = _build_wheel(tmp_path)
    assert "Warning" not in output, output
    assert "project.license" not in output, output
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        assert "License-Expression: Apache-2.0" in z.read(meta).decode()


def test_demo_hint_names_the_command_as_it_can_be_typed(monkeypatch, tmp_path):
    """Off PATH (just after `make demo`), the demo's hint gives spendtap's path, not a bare
    name the shell cannot find; on PATH, the bare name."""
    from spendtap.cli.demo import _spendtap_command

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(REPO)
    hint = _spendtap_command()
    assert (
        hint != "spendtap"
        and Path(hint).resolve() == Path(sys.executable).with_name("spendtap").resolve()
    )
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    assert _spendtap_command() == "spendtap"
