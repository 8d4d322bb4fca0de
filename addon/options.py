"""The table of spendtap's own options: names, types, defaults, help and validation.

One table serves the addons (each declares its own options from it; see
``spendtap.proxy.addons``), ``spendtap run`` (which checks every ``spendtap_*``
setting against it before mitmdump starts) and the addons' own guard against values
mitmproxy would otherwise turn into a silently dropped script.

Why the guard: mitmproxy defers ``--set`` values for options a script has not
registered yet. When one of them then fails to parse, mitmproxy drops the whole
script and keeps proxying, unmetered and silent. So the addon reads its deferred
values itself, with the same parser ``spendtap run`` uses, before it registers
anything (see ``take_deferred``).

Values are parsed exactly as mitmproxy parses ``--set`` (a bool is ``true``,
``false`` or empty; an int is a decimal integer), and then checked against the
option's own rule (a range, a choice, an address). Every problem is one line that
names the option, the bad value and what is accepted.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from spendtap.address import parse_listen
from spendtap.proxy.trust import MIN_SECRET_LEN, parse_trusted_peers

PREFIX = "spendtap_"
ENV_CENTRAL = "SPENDTAP_CENTRAL"
# Defaults other modules start from too (the CLI, the metrics and budget classes).
DEFAULT_METRICS = "127.0.0.1:9464"
DEFAULT_METRICS_PREFIX = "cortex"
DEFAULT_FALLBACK_MAX_OUTPUT = 4096
PRINCIPAL_SOURCES = ("headers", "bearer", "both")
_METRIC_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OptionError(ValueError):
    """An unknown spendtap option or a value it does not accept; the message is one line."""


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    check: Callable[[Any], None] | None = None  # raises ValueError with what is accepted

    def parse(self, raw: str | None) -> Any:
        """A ``--set`` string to a checked value, or ``OptionError``."""
        if self.type is bool:
            if raw in (None, "", "true"):
                value: Any = True
            elif raw == "false":
                value = False
            else:
                raise OptionError(f"{self.name}: expected true or false, got {raw!r}")
        elif self.type is int:
            try:
                value = int(raw or "")
            except ValueError:
                raise OptionError(f"{self.name}: expected an integer, got {raw!r}") from None
        else:
            value = "" if raw is None else raw
        return self.validate(value)

    def validate(self, value: Any) -> Any:
        """Check an already typed value against the option's rule; return it."""
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise OptionError(f"{self.name}: expected an integer, got {value!r}")
        if self.type is bool and not isinstance(value, bool):
            raise OptionError(f"{self.name}: expected true or false, got {value!r}")
        if self.type is str and not isinstance(value, str):
            raise OptionError(f"{self.name}: expected a string, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"{self.name}: must be >= {self.minimum}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise OptionError(
                f"{self.name}: expected one of {', '.join(self.choices)}, got {value!r}"
            )
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as e:
                raise OptionError(f"{self.name}: {e}") from None
        return value


def _check_address(value: str) -> None:
    if value:
        try:
            parse_listen(value)
        except ValueError as e:
            raise ValueError(f"expected HOST:PORT or empty, {e}") from None


def _check_metric_prefix(value: str) -> None:
    if not _METRIC_PREFIX.match(value):
        raise ValueError(f"expected letters, digits and _ (not first a digit), got {value!r}")


def _check_header_name(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError(f"expected an HTTP header name, got {value!r}")


def _check_peers(value: str) -> None:
    parse_trusted_peers(value)


def _check_central(value: str) -> None:
    if value and not value.startswith(("postgresql://", "postgres://")):
        # Never echo the value: it may hold a password.
        raise ValueError("expected a postgresql://USER@HOST:PORT/DB URL or empty")


def _check_label(value: str) -> None:
    # A node label ends up in metric labels and ledger rows, one line each.
    if len(value) > 200 or any(not c.isprintable() for c in value):
        raise ValueError("expected a printable label of at most 200 characters")


def _check_secret(value: str) -> None:
    # Never echo the value: it is a secret even when it is a bad one.
    if value and len(value) < MIN_SECRET_LEN:
        raise ValueError(f"the gateway secret must be at least {MIN_SECRET_LEN} characters")


OPTIONS: tuple[Option, ...] = (
    Option(
        "spendtap_db",
        str,
        "",
        "Path of the SQLite ledger spendtap writes. Empty means $SPENDTAP_DB, "
        "else ~/.local/share/spendtap/ledger.db.",
    ),
    Option(
        "spendtap_metrics",
        str,
        DEFAULT_METRICS,
        "Address (HOST:PORT) where spendtap serves Prometheus /metrics and /healthz. "
        "Empty disables the metrics server.",
        check=_check_address,
    ),
    Option(
        "spendtap_metrics_prefix",
        str,
        DEFAULT_METRICS_PREFIX,
        "Prefix of every metric name; the default matches helexa cortex dashboards.",
        check=_check_metric_prefix,
    ),
    Option(
        "spendtap_node",
        str,
        "",
        "Node label for metrics and ledger rows. Empty means the upstream's host:port.",
        check=_check_label,
    ),
    Option(
        "spendtap_account_header",
        str,
        "x-helexa-account-id",
        "Request header that names the account (stamped by a gateway). Honoured only "
        "from trusted peers (spendtap_trusted_peers) with the gateway secret, if one is set.",
        check=_check_header_name,
    ),
    Option(
        "spendtap_key_header",
        str,
        "x-helexa-key-id",
        "Request header that names the key (stamped by a gateway). Honoured only from "
        "trusted peers (spendtap_trusted_peers) with the gateway secret, if one is set.",
        check=_check_header_name,
    ),
    Option(
        "spendtap_trusted_peers",
        str,
        "",
        "Client addresses whose principal headers are honoured: comma-separated "
        "addresses and CIDRs (IPv4, IPv6), or 'any'. Empty means loopback only, or any "
        "peer when a gateway secret is set. From other peers the headers are removed "
        "and counted.",
        check=_check_peers,
    ),
    Option(
        "spendtap_gateway_secret",
        str,
        "",
        "Shared secret the gateway sends in x-spendtap-gateway-secret; principal headers "
        "are honoured only with it. Prefer spendtap_gateway_secret_file (process arguments "
        "are visible to other users).",
        check=_check_secret,
    ),
    Option(
        "spendtap_gateway_secret_file",
        str,
        "",
        "File holding the gateway's shared secret (see spendtap_gateway_secret).",
    ),
    Option(
        "spendtap_upstream_key_file",
        str,
        "",
        "File holding the operator's upstream API key. When set, a request authenticated "
        "by a spendtap key goes upstream with this credential instead of the client's "
        "(Authorization: Bearer, or x-api-key for Anthropic, x-goog-api-key for Gemini), "
        "and an unknown key is refused. Read at start and on SIGHUP.",
    ),
    Option(
        "spendtap_prices",
        str,
        "",
        "TOML price file: per-model (or glob) dollars per million tokens for input, "
        "cached_input, cache_write and output, and an optional per-request fee. It "
        "overrides the genai-prices catalogue. Empty: the catalogue only.",
    ),
    Option(
        "spendtap_access_log",
        str,
        "",
        "Path of a JSONL access log, one line per request (no bodies, no secrets). "
        "Empty disables it.",
    ),
    Option(
        "spendtap_commit_wait_ms",
        int,
        2000,
        "How long the end of a response may wait for its ledger row to commit, in "
        "milliseconds. 0 never waits. While the ledger is failing nothing waits.",
        minimum=0,
    ),
    Option(
        "spendtap_ledger_process",
        bool,
        True,
        "Commit ledger rows from a child process fed through a pipe (the event loop's "
        "interpreter never waits for SQLite). false: from a thread of this process.",
    ),
    Option(
        "spendtap_join_chunks",
        bool,
        True,
        "Pass on the chunks of a chunked body that one read of the socket holds as one "
        "chunk: the same bytes, fewer events and writes. false: one chunk out for each "
        "chunk in, as mitmdump does.",
    ),
    Option(
        "spendtap_gc_freeze",
        bool,
        True,
        "Once the sidecar runs, move its start-up objects out of the cyclic garbage "
        "collector's passes (gc.freeze): a full pass then stops the event loop for "
        "milliseconds, not tens of them. false: the collector walks the whole heap.",
    ),
    Option(
        "spendtap_cache_hooks",
        bool,
        True,
        "Dispatch each mitmproxy hook only to the addons that have it (the lists are "
        "rebuilt when the addons change). false: mitmproxy's own dispatch, every hook "
        "through every addon.",
    ),
    Option(
        "spendtap_inject_usage",
        bool,
        True,
        "Ask streaming chat/completions upstreams for usage (stream_options.include_usage) "
        "when the client did not, and remove the added usage chunk from what the client "
        "receives.",
    ),
    Option(
        "spendtap_buffer_bytes",
        int,
        1 << 20,
        "Non-streaming bodies up to this size (Content-Length) are held until their ledger "
        "row commits, so a client that got the whole body has its row on disk. Larger "
        "bodies stream through with bounded memory. 0 streams everything.",
        minimum=0,
    ),
    Option(
        "spendtap_enforce_budgets",
        bool,
        True,
        "Reserve each request's tokens against its key's and account's budgets before "
        "dispatch, and refuse (429) what would exceed a cap. Principals without a budget "
        "are never refused.",
    ),
    Option(
        "spendtap_principal_source",
        str,
        "headers",
        "Where a request's principal comes from: headers (principal headers a trusted "
        "gateway stamps), bearer (Authorization: Bearer / x-api-key, registered with "
        "spendtap keys), or both (a trusted peer's headers first, else the bearer key).",
        choices=PRINCIPAL_SOURCES,
    ),
    Option(
        "spendtap_require_auth",
        bool,
        False,
        "Refuse (401 invalid_api_key) requests that name no principal: only a known "
        "bearer key or a trusted peer's principal headers name one.",
    ),
    Option(
        "spendtap_fallback_max_output",
        int,
        DEFAULT_FALLBACK_MAX_OUTPUT,
        "Output tokens reserved for a request that sets no max_tokens / "
        "max_completion_tokens / max_output_tokens.",
        minimum=0,
    ),
    Option(
        "spendtap_fail_open",
        bool,
        False,
        "When the ledger cannot reserve, dispatch budgeted requests anyway (counted) "
        "instead of refusing them with 503.",
    ),
    Option(
        "spendtap_reservation_max_age_s",
        int,
        7200,
        "Open reservations older than this are released by the periodic sweep (no "
        "request lives that long). Reservations of dead sidecar processes are released "
        "at start.",
        minimum=1,
    ),
    Option(
        "spendtap_central",
        str,
        "",
        "PostgreSQL URL (postgresql://USER@HOST:PORT/DB) of the fleet's central store: "
        "budgets are decided there for every sidecar, and each committed row is shipped "
        "there from the local ledger. libpq's PG* variables and password file apply; "
        "the password is never shown. Empty means $SPENDTAP_CENTRAL if set, else budgets "
        "and ledger stay in the local SQLite file.",
        check=_check_central,
    ),
    Option(
        "spendtap_central_timeout_ms",
        int,
        2000,
        "Longest wait on the central store for a connection or a statement, in "
        "milliseconds; past it a budgeted request is refused with 503 (or dispatched "
        "with spendtap_fail_open).",
        minimum=100,
    ),
    Option(
        "spendtap_central_lease_s",
        int,
        30,
        "This sidecar's lease in the central store, in seconds: renewed every third of "
        "it; once expired, any other sidecar releases this node's open reservations.",
        minimum=1,
    ),
    Option(
        "spendtap_connection_log",
        bool,
        False,
        "Log every client and server connection and streamed response (mitmproxy's "
        "per-connection lines). Off, the log holds start-up, warnings and errors only; "
        "spendtap run -v turns it on.",
    ),
    Option(
        "spendtap_max_model_series",
        int,
        200,
        "Distinct model/node label pairs before new ones are folded into _other.",
        minimum=1,
    ),
    Option(
        "spendtap_max_principal_series",
        int,
        1000,
        "Distinct account/key label pairs before new ones are folded into _other.",
        minimum=1,
    ),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}

# Options whose values are secrets: shown as *** wherever settings are printed.
SECRET_OPTIONS = frozenset({"spendtap_gateway_secret"})


def is_spendtap_option(name: str) -> bool:
    return name.startswith(PREFIX)


def unknown_option(name: str) -> OptionError:
    close = difflib.get_close_matches(name, BY_NAME, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return OptionError(f"unknown option {name}{hint}")


def parse_setting(name: str, raw: str | None) -> Any:
    """One ``NAME=VALUE`` setting of spendtap's, parsed and checked, or ``OptionError``."""
    option = BY_NAME.get(name)
    if option is None:
        raise unknown_option(name)
    return option.parse(raw)


def check_settings(items: Mapping[str, str | None]) -> dict[str, Any]:
    """Check every ``spendtap_*`` item of ``items`` (others are mitmproxy's); parsed values."""
    return {
        name: parse_setting(name, raw) for name, raw in items.items() if is_spendtap_option(name)
    }


def take_deferred(deferred: dict[str, Any]) -> list[str]:
    """Check the ``spendtap_*`` values mitmproxy deferred; remove the bad ones.

    ``deferred`` is mitmproxy's ``OptionManager.deferred`` (values are raw strings
    wrapped in an object with a ``val`` list, or already typed). A bad value is
    removed so that mitmproxy cannot drop the script over it; the caller must then
    refuse to meter. Returns one line per problem.
    """
    problems: list[str] = []
    for name in [n for n in deferred if is_spendtap_option(n)]:
        value = deferred[name]
        try:
            if name not in BY_NAME:
                raise unknown_option(name)
            raw = getattr(value, "val", None)
            if isinstance(raw, list):
                if len(raw) > 1:
                    raise OptionError(f"{name}: given {len(raw)} times ({', '.join(raw)})")
                BY_NAME[name].parse(raw[0] if raw else None)
            else:
                BY_NAME[name].validate(value)
        except OptionError as e:
            problems.append(str(e))
            del deferred[name]
    return problems


# Options whose values are URLs that may hold a password: only the password is hidden.
URL_OPTIONS = frozenset({"spendtap_central"})


def redact_url(url: str) -> str:
    """A URL with the password of its user info (and any ``password=`` query) as ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(
        "password=***" if q.lower().startswith("password=") else q
        for q in parts.query.split("&")
        if q
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_value(name: str, value: Any) -> Any:
    """A setting's value as it may be printed."""
    if name in SECRET_OPTIONS and value:
        return "***"
    if name in URL_OPTIONS and isinstance(value, str) and value:
        return redact_url(value)
    return value


def redact(items: Iterable[str]) -> list[str]:
    """``NAME=VALUE`` items with secret values replaced by ``***`` (for printing)."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if sep and name in SECRET_OPTIONS:
            out.append(f"{name}=***")
        elif sep and name in URL_OPTIONS:
            out.append(f"{name}={redact_url(value)}")
        else:
            out.append(item)
    return out
