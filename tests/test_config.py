"""`spendtap run` settings: TOML file, SPENDTAP_* variables, command line, and their precedence."""

from __future__ import annotations

import shlex

import pytest

from spendtap.cli.config import ConfigError, Settings, resolve
from tests.helpers import invoke

UP = "http://127.0.0.1:8000"


# Every test here reads settings from SPENDTAP_* variables: none may come from the shell.
pytestmark = pytest.mark.usefixtures("clean_env")


def write(tmp_path, text: str):
    path = tmp_path / "spendtap.toml"
    path.write_text(text)
    return path


def dry_run(*args: str, env: dict | None = None) -> tuple[int, str, list[str]]:
    result = invoke("run", "--dry-run", *args, env=env or {})
    argv = shlex.split(result.output) if result.exit_code == 0 else []
    return result.exit_code, result.output, argv


def sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_defaults():
    """With only an upstream, the documented defaults apply."""
    s = resolve({"upstream": UP}, {}, None)
    assert (s.mode, s.listen, s.metrics, s.db, s.node) == (
        "reverse",
        "127.0.0.1:8080",
        "127.0.0.1:9464",
        None,
        None,
    )
    assert s.sources["listen"] == "default" and s.sources["upstream"] == "command line"


def test_file_keys(tmp_path):
    """Every documented key is read from the TOML file, [set] values as strings."""
    path = write(
        tmp_path,
        f"""
upstream = "{UP}"
listen = "0.0.0.0:9090"
db = "/srv/ledger.db"
metrics = "127.0.0.1:9999"
mode = "reverse"
node = "neuron-1"
metrics_prefix = "acme"
access_log = "/var/log/spendtap.jsonl"
trusted_peers = "10.0.0.5,10.1.0.0/16"
[set]
tcp_timeout = 3600
ssl_insecure = true
spendtap_key_header = "x-key"
""",
    )
    s = resolve({}, {}, path)
    assert s == Settings(
        upstream=UP,
        listen="0.0.0.0:9090",
        db="/srv/ledger.db",
        metrics="127.0.0.1:9999",
        mode="reverse",
        node="neuron-1",
        metrics_prefix="acme",
        access_log="/var/log/spendtap.jsonl",
        trusted_peers="10.0.0.5,10.1.0.0/16",
        set={"tcp_timeout": "3600", "ssl_insecure": "true", "spendtap_key_header": "x-key"},
        sources=s.sources,
    )


@pytest.mark.parametrize(
    ("cli", "env", "file", "expected"),
    [
        ({}, {}, "1.1.1.1:1", ("1.1.1.1", "1")),
        ({}, {"SPENDTAP_LISTEN": "2.2.2.2:2"}, "1.1.1.1:1", ("2.2.2.2", "2")),
        (
            {"listen": "3.3.3.3:3"},
            {"SPENDTAP_LISTEN": "2.2.2.2:2"},
            "1.1.1.1:1",
            ("3.3.3.3", "3"),
        ),
        ({"listen": "3.3.3.3:3"}, {}, None, ("3.3.3.3", "3")),
        ({}, {}, None, ("127.0.0.1", "8080")),
    ],
)
def test_precedence_cli_env_file_default(tmp_path, cli, env, file, expected):
    """Command line beats SPENDTAP_* beats the config file beats the default (end to end)."""
    args = ["--upstream", UP, "--trusted-peers", "10.0.0.5"]
    if "listen" in cli:
        args += ["--listen", cli["listen"]]
    if file:
        args += ["--config", str(write(tmp_path, f'listen = "{file}"\n'))]
    code, out, argv = dry_run(*args, env=env)
    assert code == 0, out
    assert (
        argv[argv.index("--listen-host") + 1],
        argv[argv.index("--listen-port") + 1],
    ) == expected


def test_every_env_var(tmp_path):
    """Each SPENDTAP_* variable reaches the mitmdump command line."""
    env = {
        "SPENDTAP_UPSTREAM": UP,
        "SPENDTAP_LISTEN": "0.0.0.0:8081",
        "SPENDTAP_DB": str(tmp_path / "l.db"),
        "SPENDTAP_METRICS": "127.0.0.1:9465",
        "SPENDTAP_MODE": "reverse",
        "SPENDTAP_NODE": "n7",
        "SPENDTAP_METRICS_PREFIX": "acme",
        "SPENDTAP_ACCESS_LOG": str(tmp_path / "a.jsonl"),
        "SPENDTAP_TRUSTED_PEERS": "10.0.0.5,fd00::/8",
        "SPENDTAP_SET": "tcp_timeout=60 'spendtap_gateway_secret_file=/etc/spend tap/gw'",
    }
    code, out, argv = dry_run(env=env)
    assert code == 0, out
    assert argv[argv.index("--mode") + 1] == f"reverse:{UP}"
    assert argv[argv.index("--listen-port") + 1] == "8081"
    s = sets(argv)
    for item in (
        f"spendtap_db={tmp_path / 'l.db'}",
        "spendtap_metrics=127.0.0.1:9465",
        "spendtap_node=n7",
        "spendtap_metrics_prefix=acme",
        f"spendtap_access_log={tmp_path / 'a.jsonl'}",
        "tcp_timeout=60",
        "spendtap_gateway_secret_file=/etc/spend tap/gw",
        "spendtap_trusted_peers=10.0.0.5,fd00::/8",
        "block_global=false",
    ):
        assert item in s, item


def test_set_entries_merge_by_option(tmp_path):
    """[set] from file, env and --set merge per option; the higher source wins per option."""
    path = write(tmp_path, f'upstream = "{UP}"\n[set]\na_one = "file"\nb_two = "file"\n')
    code, out, argv = dry_run(
        "--config", str(path), "--set", "b_two=cli", env={"SPENDTAP_SET": "a_one=env c_three=env"}
    )
    assert code == 0, out
    s = sets(argv)
    assert s[-3:] == ["a_one=env", "b_two=cli", "c_three=env"]


def test_config_from_env_var(tmp_path):
    """SPENDTAP_CONFIG names the file when --config is not given."""
    path = write(tmp_path, f'upstream = "{UP}"\nnode = "from-file"\n')
    code, out, argv = dry_run(env={"SPENDTAP_CONFIG": str(path)})
    assert code == 0, out
    assert "spendtap_node=from-file" in sets(argv)


def test_empty_env_values_mean_unset():
    """An env file's `SPENDTAP_NODE=` (empty) leaves the setting at its default."""
    s = resolve({}, {"SPENDTAP_UPSTREAM": UP, "SPENDTAP_NODE": "", "SPENDTAP_DB": ""}, None)
    assert s.node is None and s.db is None


def test_other_spendtap_variables_are_ignored():
    """Variables that belong to other tools (SPENDTAP_PYTHON for scripts/venv.sh) are not errors."""
    s = resolve({}, {"SPENDTAP_UPSTREAM": UP, "SPENDTAP_PYTHON": "python3.13"}, None)
    assert s.upstream == UP


@pytest.mark.parametrize(
    ("file", "env", "args", "message"),
    [
        ('upstrem = "x"\n', {}, [], "unknown key 'upstrem'"),
        ("listen = 8080\n", {}, [], "listen must be a string, got int"),
        ('listen = "0.0.0.0:http"\n', {}, [], "bad address: bad port"),
        ('metrics = "127.0.0.1:70000"\n', {}, [], "port out of range"),
        ('mode = "sideways"\n', {}, [], "mode must be one of"),
        ("[set]\nx = 1.5\n", {}, [], "set.x: must be a string, integer or boolean"),
        ('set = "a=b"\n', {}, [], "'set' must be a table"),
        ("listen = [\n", {}, [], "not valid TOML"),
        ("", {"SPENDTAP_LISTEN": "nonsense"}, [], "SPENDTAP_LISTEN: bad address"),
        ("", {"SPENDTAP_UPSTREAM": "ftp://x"}, [], "SPENDTAP_UPSTREAM: expected http(s)"),
        ("", {"SPENDTAP_UPSTREAM": "http://h:99999"}, [], "bad port"),
        ("", {"SPENDTAP_SET": "novalue"}, [], "SPENDTAP_SET: expected OPTION=VALUE"),
        ("", {"SPENDTAP_SET": "'unclosed"}, [], "SPENDTAP_SET: No closing quotation"),
        ("", {"SPENDTAP_METRICS_PREFIX": "a-b"}, [], "metrics prefix must be"),
        ("", {}, ["--set", "Bad Name=1"], "--set: bad option name"),
        ("", {}, ["--listen", "host:port"], "--listen: bad address"),
        ("", {"SPENDTAP_MODE": "transparent"}, [], "makes no sense in transparent mode"),
    ],
)
def test_invalid_settings_fail_in_one_line(tmp_path, file, env, args, message):
    """A bad setting from any source exits 1 with one line naming the source and the problem."""
    path = write(tmp_path, file)
    full_env = {"SPENDTAP_UPSTREAM": UP, **env} if "upstream" not in file else env
    code, out, _ = dry_run("--config", str(path), *args, env=full_env)
    assert code == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("Error: invalid setting: ")
    assert message in lines[0]


def test_missing_config_file(tmp_path):
    """A --config path that does not exist is one clear line, exit 1."""
    code, out, _ = dry_run("--config", str(tmp_path / "nope.toml"), "--upstream", UP)
    assert code == 1
    assert out.strip() == f"Error: invalid setting: {tmp_path / 'nope.toml'}: no such config file"


def test_missing_upstream_in_reverse_mode():
    """Reverse mode without an upstream from any source says where to set one."""
    code, out, _ = dry_run()
    assert code == 1
    assert "an upstream is required in reverse mode" in out


def test_transparent_mode_needs_no_upstream():
    """Transparent mode takes the destination from each connection, so no upstream is needed."""
    code, out, argv = dry_run(
        env={"SPENDTAP_MODE": "transparent", "SPENDTAP_TRUSTED_PEERS": "10.0.0.5"}
    )
    assert code == 0, out
    assert argv[argv.index("--mode") + 1] == "transparent"


def test_resolve_raises_config_error():
    """The pure resolver raises ConfigError (no click), for use outside the CLI."""
    with pytest.raises(ConfigError, match="SPENDTAP_LISTEN"):
        resolve({}, {"SPENDTAP_UPSTREAM": UP, "SPENDTAP_LISTEN": ":x"}, None)


def test_run_refuses_a_corrupt_ledger_in_one_line(tmp_path):
    """spendtap run stops before mitmdump with one clear line when the ledger is not usable."""
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    result = invoke("run", "--upstream", "http://127.0.0.1:1", db=bad)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "not a spendtap ledger" in result.output
    assert bad.read_bytes() == b"this is not sqlite at all" * 100
