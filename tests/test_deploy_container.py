"""deploy/Containerfile: what it copies exists, and what it runs is a real `spendtap` command.

The image cannot be built here (no container runtime, no registry for the base
image), so this checks every input of the build instead.
"""

from __future__ import annotations

import json
import shlex
import tomllib

from spendtap.cli.main import cli
from tests.helpers import invoke
from tests.proc import REPO

CONTAINERFILE = REPO / "deploy" / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def env_of_final_stage() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions():
        if word == "FROM":
            env = {}
        elif word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_copied_sources_exist():
    """Every COPY from the build context names a path that exists in the repository."""
    copies = [exec_form(a) for w, a in instructions() if w == "COPY"]
    assert copies
    for args in copies:
        if any(a.startswith("--from=") for a in args):
            continue
        *sources, _dest = [a for a in args if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"


def test_copies_everything_the_package_build_needs():
    """pyproject.toml and every folder its package-dir maps are copied into the build stage."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = set()
    for word, args in instructions():
        if word == "COPY" and "--from=" not in args:
            *sources, _ = exec_form(args)
            copied |= {s.rstrip("/") for s in sources}
    assert needed <= copied, needed - copied
    readme = pyproject["project"].get("readme")
    if readme and (REPO / readme).exists():
        assert readme in copied, f"pyproject names {readme}: copy it too"


def test_entrypoint_is_spendtap_run():
    """The image runs `spendtap run`, a registered command, and the console script exists."""
    (entry,) = [exec_form(a) for w, a in instructions() if w == "ENTRYPOINT"]
    assert entry == ["spendtap", "run"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["spendtap"] == "spendtap.cli.main:cli"
    assert "run" in cli.commands


def test_image_env_makes_a_valid_run(clean_env):
    """The image's ENV plus the two settings an operator must add (the upstream, and who may
    name a principal) is a valid configuration: `spendtap run --dry-run` builds the mitmdump
    command from it; without the trust choice the image refuses to start."""
    env = env_of_final_stage()
    assert env["SPENDTAP_DB"].startswith(env["HOME"] + "/")
    vol = [exec_form(a) for w, a in instructions() if w == "VOLUME"]
    assert vol == [[env["HOME"]]]
    env["SPENDTAP_UPSTREAM"] = "http://neuron:8000"
    refused = invoke("run", "--dry-run", env=env)
    assert refused.exit_code == 1
    assert "no trusted peers stated" in refused.output
    assert "SPENDTAP_TRUSTED_PEERS" in (REPO / "deploy" / "Containerfile").read_text()
    env["SPENDTAP_TRUSTED_PEERS"] = "10.0.0.5"
    result = invoke("run", "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    args = shlex.split(result.output)
    assert args[args.index("--listen-host") + 1] == "0.0.0.0"
    assert f"spendtap_db={env['SPENDTAP_DB']}" in args
    assert "spendtap_metrics=0.0.0.0:9464" in args
    assert "spendtap_trusted_peers=10.0.0.5" in args
    exposed = [a.split() for w, a in instructions() if w == "EXPOSE"]
    assert exposed == [["8080", "9464"]]
