"""Settings for ``spendtap run`` from a TOML file, ``SPENDTAP_*`` variables and the command line.

Operators set the sidecar up once, in a config file (``--config FILE.toml``,
or ``$SPENDTAP_CONFIG``) or an environment file (systemd's ``EnvironmentFile``,
a Kubernetes ``env:`` list). The precedence is::

    command line  >  SPENDTAP_* environment  >  config file  >  defaults

Keys (TOML key / environment variable / ``spendtap run`` option)::

    upstream        SPENDTAP_UPSTREAM         --upstream        http(s)://HOST[:PORT]
    listen          SPENDTAP_LISTEN           --listen          HOST:PORT
    db              SPENDTAP_DB               --db              path of the ledger
    metrics         SPENDTAP_METRICS          --metrics         HOST:PORT, "" disables
    mode            SPENDTAP_MODE             --mode            reverse|regular|upstream|transparent
    node            SPENDTAP_NODE             --node            node label
    metrics_prefix  SPENDTAP_METRICS_PREFIX   --metrics-prefix  metric name prefix
    access_log      SPENDTAP_ACCESS_LOG       --access-log      JSONL access log path
    prices          SPENDTAP_PRICES           --prices          TOML price file
    trusted_peers   SPENDTAP_TRUSTED_PEERS    --trusted-peers   who may send principal headers
    central         SPENDTAP_CENTRAL          --central         postgresql://USER@HOST:PORT/DB
    [set]           SPENDTAP_SET              --set             free-form mitmproxy/spendtap options

``[set]`` is a TOML table (``tcp_timeout = 3600``); ``SPENDTAP_SET`` holds
``OPTION=VALUE`` items separated by whitespace (shell quoting applies). The
``set`` entries of all three sources are merged by option name, the higher
source winning per option.

Every ``spendtap_*`` option in ``set`` is checked against the addon's own option
table (``spendtap.options``): an unknown name (with a suggestion) or a value the
addon would not accept is refused here, so mitmdump never starts with a setting
that would leave it proxying unmetered. Listening beyond loopback (or in
transparent mode) with principal headers and no trust stated is refused too.

Any invalid setting (an unknown key, a wrong type, a bad address or URL) raises
``ConfigError`` with one line naming where it came from; ``spendtap run`` turns
that into a one-line error and exit status 1, before anything starts.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from spendtap.address import parse_listen
from spendtap.options import DEFAULT_METRICS, OptionError, check_settings
from spendtap.proxy.trust import TrustPolicy, unguarded_start

MODES = ("reverse", "regular", "upstream", "transparent")
ENV_PREFIX = "SPENDTAP_"
ENV_CONFIG = "SPENDTAP_CONFIG"

# key -> default; every key is a string setting (``set`` is handled apart).
DEFAULTS: dict[str, str | None] = {
    "upstream": None,
    "listen": "127.0.0.1:8080",
    "db": None,  # None: the ledger's own default path (spendtap.paths)
    "metrics": DEFAULT_METRICS,
    "mode": "reverse",
    "node": None,
    "metrics_prefix": None,
    "access_log": None,
    "prices": None,
    "trusted_peers": None,  # None: loopback (or any peer, with a gateway secret)
    "central": None,  # None: budgets and ledger in the local SQLite file only
}
KEYS = (*DEFAULTS, "set")
_OPTION_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
    """An invalid setting; the message is one line that names its source."""


@dataclass
class Settings:
    """The resolved settings, and where each one came from (for messages and doctor)."""

    upstream: str | None = None
    listen: str = "127.0.0.1:8080"
    db: str | None = None
    metrics: str = DEFAULT_METRICS
    mode: str = "reverse"
    node: str | None = None
    metrics_prefix: str | None = None
    access_log: str | None = None
    prices: str | None = None
    trusted_peers: str | None = None
    central: str | None = None
    set: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    # key -> where it was given, for a key given as a spendtap_* option in ``set``
    lifted: dict[str, str] = field(default_factory=dict)

    def set_items(self) -> tuple[str, ...]:
        return tuple(f"{k}={v}" for k, v in self.set.items())


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config file: its keys as written, ``set`` as a dict of strings."""
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(KEYS)})")
        if key == "set":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'set' must be a table of OPTION = VALUE")
            out["set"] = {name: _scalar(f"{where}: set.{name}", v) for name, v in value.items()}
            for name in out["set"]:
                _check_option_name(f"{where}: set", name)
        else:
            if not isinstance(value, str):
                raise ConfigError(
                    f"{where}: {key} must be a string, got {type(value).__name__} {value!r}"
                )
            out[key] = value
    return out


def load_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``SPENDTAP_*`` variables that name settings (others, such as SPENDTAP_PYTHON, are
    left alone: they belong to other tools)."""
    out: dict[str, Any] = {}
    for key in DEFAULTS:
        name = env_name(key)
        if name in environ:
            out[key] = environ[name]
    raw = environ.get(env_name("set"))
    if raw is not None:
        try:
            items = shlex.split(raw)
        except ValueError as e:
            raise ConfigError(f"{env_name('set')}: {e}") from None
        out["set"] = parse_set_items(env_name("set"), items)
    return out


def parse_set_items(where: str, items: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{where}: expected OPTION=VALUE, got {item!r}")
        _check_option_name(where, name)
        out[name] = value
    return out


def resolve(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    config_path: str | os.PathLike | None,
) -> Settings:
    """Merge the sources (``cli`` holds only values given on the command line) and validate."""
    layers: list[tuple[str, dict[str, Any]]] = [("default", dict(DEFAULTS))]
    if config_path is None and environ.get(ENV_CONFIG):
        config_path = environ[ENV_CONFIG]
    if config_path is not None:
        layers.append((str(config_path), load_file(config_path)))
    layers.append(("environment", load_env(environ)))
    cli_values = dict(cli)
    if "set" in cli_values:
        cli_values["set"] = parse_set_items("--set", tuple(cli_values["set"]))
    layers.append(("command line", cli_values))

    settings = Settings()
    for source, values in layers:
        for key, value in values.items():
            if key == "set":
                for name, v in value.items():
                    settings.set[name] = v
                    settings.sources[f"set.{name}"] = source
                continue
            setattr(settings, key, value)
            settings.sources[key] = source
    _validate(settings)
    return settings


def _describe(settings: Settings, key: str) -> str:
    if key in settings.lifted:
        return settings.lifted[key]
    source = settings.sources.get(key, "default")
    if source == "environment":
        return env_name(key)
    if source == "command line":
        return "--" + key.replace("_", "-")
    if source == "default":
        return "default"
    return f"{source}: {key}"


# Settings with a key of their own that are also addon options: ``set.spendtap_db``
# is the same setting as ``db``, so it is lifted into ``db`` (giving both is an error).
DEDICATED_OPTIONS = {
    "db": "spendtap_db",
    "metrics": "spendtap_metrics",
    "node": "spendtap_node",
    "metrics_prefix": "spendtap_metrics_prefix",
    "access_log": "spendtap_access_log",
    "prices": "spendtap_prices",
    "trusted_peers": "spendtap_trusted_peers",
    # Lifted so that `spendtap run` hands it to mitmdump in the environment, never in argv.
    "central": "spendtap_central",
}


def _lift_dedicated(s: Settings) -> None:
    for key, option in DEDICATED_OPTIONS.items():
        if option not in s.set:
            continue
        if s.sources.get(key, "default") != "default":
            raise ConfigError(
                f"{_describe(s, key)}: {key} given twice (also as {_describe_set(s, option)} "
                f"{option}); give one"
            )
        s.lifted[key] = f"{_describe_set(s, option)} {option}"
        value = s.set.pop(option)
        s.sources[key] = s.sources.pop(f"set.{option}", "default")
        setattr(s, key, "" if value is None else str(value))


def _validate(s: Settings) -> None:
    _lift_dedicated(s)
    # Empty strings from an env file (SPENDTAP_NODE=) mean "not set".
    for key in (
        "upstream", "db", "node", "metrics_prefix", "access_log", "trusted_peers", "prices",
        "central",
    ):  # fmt: skip
        if getattr(s, key) == "":
            setattr(s, key, None)
    if s.mode not in MODES:
        raise ConfigError(
            f"{_describe(s, 'mode')}: mode must be one of {', '.join(MODES)}, got {s.mode!r}"
        )
    for key in ("listen", "metrics"):
        value = getattr(s, key)
        if key == "metrics" and value == "":
            continue
        check_address(f"{_describe(s, key)}", value)
    if s.upstream is not None:
        check_url(_describe(s, "upstream"), s.upstream)
        if s.mode not in ("reverse", "upstream"):
            raise ConfigError(
                f"{_describe(s, 'upstream')}: an upstream makes no sense in {s.mode} mode"
            )
    elif s.mode in ("reverse", "upstream"):
        raise ConfigError(
            f"an upstream is required in {s.mode} mode "
            f"(--upstream, {env_name('upstream')} or 'upstream' in the config file)"
        )
    if s.metrics_prefix is not None and not _PREFIX.match(s.metrics_prefix):
        raise ConfigError(
            f"{_describe(s, 'metrics_prefix')}: metrics prefix must be letters, digits and _, "
            f"got {s.metrics_prefix!r}"
        )
    options = _check_spendtap_options(s)
    if s.central is not None:
        try:
            check_settings({"spendtap_central": s.central})
        except OptionError as e:
            raise ConfigError(f"{_describe(s, 'central')}: {e}") from None
    peers = s.trusted_peers or options.get("spendtap_trusted_peers", "")
    try:
        policy = TrustPolicy.from_settings(
            peers,
            options.get("spendtap_gateway_secret") or None,
        )
    except ValueError as e:  # the peers are checked above: this is the secret
        raise ConfigError(f"spendtap_gateway_secret: {e}") from None
    if options.get("spendtap_gateway_secret_file"):
        # A secret in a file counts as stated trust; the addon reads the file itself.
        policy = TrustPolicy(peers=policy.peers, secret=policy.secret, stated=True)
    problem = unguarded_start(
        listen_hosts=[parse_listen(s.listen)[0]],
        transparent=s.mode == "transparent",
        principal_source=options.get("spendtap_principal_source", "headers"),
        policy=policy,
    )
    if problem is not None:
        raise ConfigError(problem)


def _check_spendtap_options(s: Settings) -> dict[str, Any]:
    """Every ``spendtap_*`` setting checked against the addon's option table."""
    values: dict[str, Any] = {}
    if s.trusted_peers is not None:
        values["spendtap_trusted_peers"] = s.trusted_peers
    for name, raw in s.set.items():
        try:
            values.update(check_settings({name: raw}))
        except OptionError as e:
            raise ConfigError(f"{_describe_set(s, name)}: {e}") from None
    try:
        check_settings({"spendtap_trusted_peers": values.get("spendtap_trusted_peers", "")})
    except OptionError as e:
        raise ConfigError(f"{_describe(s, 'trusted_peers')}: {e}") from None
    return values


def _describe_set(settings: Settings, name: str) -> str:
    source = settings.sources.get(f"set.{name}", "default")
    if source == "environment":
        return env_name("set")
    if source == "command line":
        return "--set"
    return f"{source}: set"


def check_address(where: str, value: str) -> tuple[str, int]:
    """A ``HOST:PORT`` a server can listen on, or ``ConfigError``."""
    try:
        host, port = parse_listen(value)
    except ValueError as e:
        raise ConfigError(f"{where}: bad address: {e}") from None
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ConfigError(f"{where}: bad address: bad host in {value!r}")
    return host, port


def check_url(where: str, value: str) -> str:
    parsed = urlparse(value)
    try:
        parsed.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{where}: bad URL {value!r}: bad port") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{where}: expected http(s)://HOST[:PORT], got {value!r}")
    return value


def _scalar(where: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    raise ConfigError(
        f"{where}: must be a string, integer or boolean, got {type(value).__name__} {value!r}"
    )


def _check_option_name(where: str, name: str) -> None:
    if not _OPTION_NAME.match(name):
        raise ConfigError(f"{where}: bad option name {name!r}")
