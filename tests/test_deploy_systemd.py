"""deploy/systemd: the unit passes ``systemd-analyze verify`` and has the promised hardening."""

from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest

from tests.helpers import SPENDTAP_SCRIPT, invoke
from tests.proc import REPO

UNIT = REPO / "deploy" / "systemd" / "spendtap.service"
ENV_FILE = REPO / "deploy" / "systemd" / "spendtap.env"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections to keys to values, repeated keys kept in order (systemd allows repeats)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"key outside a section: {raw}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile reads them (outer quotes removed)."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def test_unit_verifies(tmp_path):
    """``systemd-analyze verify`` accepts the unit with no warning at all.

    verify needs ExecStart's binary to exist, so it checks a copy whose ExecStart
    is this venv's ``spendtap`` and whose EnvironmentFile is the shipped env file;
    every other line is the shipped one. verify exits 0 even on unknown keys or bad
    values (it only warns), so any output counts as a failure.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (scripts/ci-deps.sh installs systemd)")
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/spendtap run\n" in text
    copy = text.replace("ExecStart=/usr/local/bin/spendtap", f"ExecStart={SPENDTAP_SCRIPT}")
    copy = copy.replace("EnvironmentFile=/etc/spendtap/spendtap.env", f"EnvironmentFile={ENV_FILE}")
    unit = tmp_path / "spendtap.service"
    unit.write_text(copy)
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The verify check above has teeth: a misspelt hardening value produces output."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (scripts/ci-deps.sh installs systemd)")
    copy = UNIT.read_text().replace(
        "ExecStart=/usr/local/bin/spendtap", f"ExecStart={SPENDTAP_SCRIPT}"
    )
    copy = copy.replace("ProtectSystem=strict", "ProtectSystem=strikt")
    unit = tmp_path / "spendtap.service"
    unit.write_text(copy)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert "strikt" in proc.stdout + proc.stderr


def test_unit_structure():
    """Reverse mode via `spendtap run`, own user, state dir for the ledger, hardened, restarts."""
    unit = parse_unit(UNIT.read_text())
    svc = unit["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["ExecStart"] == "/usr/local/bin/spendtap run"
    assert one["User"] == "spendtap" and one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "spendtap"
    assert "SPENDTAP_DB=/var/lib/spendtap/ledger.db" in svc["Environment"]
    assert "HOME=/var/lib/spendtap" in svc["Environment"]
    assert one["EnvironmentFile"] == "/etc/spendtap/spendtap.env"
    assert one["Restart"] == "on-failure"
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert one[key] == value, key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_security_exposure_is_low():
    """``systemd-analyze security --offline`` rates the unit's exposure below 2.0 (of 10)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (scripts/ci-deps.sh installs systemd)")
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
    )
    if "Unknown option" in proc.stderr or "unrecognized option" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
    last = [ln for ln in proc.stdout.splitlines() if "Overall exposure level" in ln]
    assert last, proc.stdout + proc.stderr
    score = float(last[0].split(":")[1].split()[0])
    assert score < 2.0, last[0]


def test_env_file_is_a_valid_run_configuration(clean_env):
    """The shipped env file, read as systemd does, makes `spendtap run` build the intended
    command: reverse mode to the local neuron, the unit's ledger path, the extra --set items."""
    env = parse_env_file(ENV_FILE.read_text())
    assert all(k.startswith("SPENDTAP_") for k in env)
    env["SPENDTAP_DB"] = "/var/lib/spendtap/ledger.db"  # what the unit's Environment= sets
    result = invoke("run", "--dry-run", env=env)
    assert result.exit_code == 0, result.output
    args = shlex.split(result.output)
    assert args[args.index("--mode") + 1] == "reverse:http://127.0.0.1:8000"
    assert args[args.index("--listen-host") + 1] == "0.0.0.0"
    assert args[args.index("--listen-port") + 1] == "8080"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert "spendtap_db=/var/lib/spendtap/ledger.db" in sets
    assert "spendtap_metrics=127.0.0.1:9464" in sets
    assert "block_global=false" in sets
    assert "spendtap_commit_wait_ms=2000" in sets
    assert "spendtap_trusted_peers=127.0.0.1,::1" in sets  # the env file states its trust
    assert not any(s.startswith(("spendtap_node=", "spendtap_access_log=")) for s in sets)
