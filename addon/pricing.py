"""What a request cost: the operator's own prices first, then a maintained catalogue.

Prices come from two places, in this order:

1. The operator's price file (TOML, ``spendtap_prices``): per-model rates in dollars
   per million tokens, for self-hosted models no catalogue lists and for internal
   rates. A model matches an exact ``[models."NAME"]`` entry first, else the first
   glob entry (``[models."qwen3-*"]``) in file order.
2. The ``genai-prices`` catalogue (pydantic's price data, shipped in its wheel; never
   updated over the network here), matched on the model and, when the upstream is
   a provider's own API host, on that provider.

Money is exact: every figure is a ``Decimal`` and a row's cost is stored as an
integer number of nano-dollars (``cost_nusd``), rounded half-even once per row, so
any sum of rows is exact. A row whose price is unknown has no cost (NULL), never 0,
and its ``price_source`` says ``none``; a row with no token figures is not priced.

Token figures follow the ledger's semantics: ``prompt_tokens`` includes cache reads
(``cached_tokens``) and cache writes (``cache_creation_tokens``); ``completion_tokens``
includes reasoning, which is billed as output.

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

NANO = Decimal("1e-9")
NANOS_PER_USD = 10**9
MILLION = Decimal(1_000_000)
RATE_KEYS = ("input", "cached_input", "cache_write", "output")
ENTRY_KEYS = (*RATE_KEYS, "request")
# The catalogue is matched on the provider only where the upstream is its own API.
PROVIDER_HOSTS = {
    "api.openai.com": "https://api.openai.com/v1",
    "api.anthropic.com": "https://api.anthropic.com/v1",
    "generativelanguage.googleapis.com": "https://generativelanguage.googleapis.com/v1beta",
    "api.groq.com": "https://api.groq.com/openai/v1",
    "api.mistral.ai": "https://api.mistral.ai/v1",
    "api.deepseek.com": "https://api.deepseek.com",
    "api.x.ai": "https://api.x.ai/v1",
    "api.together.xyz": "https://api.together.xyz/v1",
    "openrouter.ai": "https://openrouter.ai/api/v1",
    "api.cohere.com": "https://api.cohere.com/v2",
}


class PriceFileError(ValueError):
    """The price file cannot be used; the message is one line naming the file."""


def catalogue_version() -> str:
    try:
        return importlib.metadata.version("genai-prices")
    except importlib.metadata.PackageNotFoundError:
        return "unavailable"


def to_nusd(usd: Decimal) -> int:
    """Dollars to whole nano-dollars, rounded half-even."""
    return int(usd.quantize(NANO, rounding=ROUND_HALF_EVEN) * NANOS_PER_USD)


def format_usd(nusd: int | None, places: int = 9) -> str | None:
    """Nano-dollars as a fixed-point decimal string (exact at 9 places)."""
    if nusd is None:
        return None
    value = Decimal(nusd) / NANOS_PER_USD
    return str(value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN))


@dataclass(frozen=True, slots=True)
class TokenSplit:
    """One request's token figures, as the ledger keeps them."""

    prompt: int | None
    completion: int | None
    cached: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TokenSplit:
        return cls(
            prompt=row.get("prompt_tokens"),
            completion=row.get("completion_tokens"),
            cached=row.get("cached_tokens"),
            cache_write=row.get("cache_creation_tokens"),
            reasoning=row.get("reasoning_tokens"),
        )

    @property
    def empty(self) -> bool:
        return self.prompt is None and self.completion is None


@dataclass(frozen=True, slots=True)
class Rates:
    """Dollars per million tokens (and per request) from the operator's price file."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None  # default: the input rate
    cache_write: Decimal | None = None  # default: the input rate
    request: Decimal = Decimal(0)

    def cost(self, usage: TokenSplit) -> Decimal:
        prompt = usage.prompt or 0
        cached = min(usage.cached or 0, prompt)
        written = min(usage.cache_write or 0, prompt - cached)
        plain = prompt - cached - written
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        tokens = (
            plain * self.input
            + cached * cached_rate
            + written * write_rate
            + (usage.completion or 0) * self.output
        )
        return tokens / MILLION + self.request

    def describe(self) -> str:
        parts = [f"input ${self.input}/MTok"]
        if self.cached_input is not None:
            parts.append(f"cached input ${self.cached_input}/MTok")
        if self.cache_write is not None:
            parts.append(f"cache write ${self.cache_write}/MTok")
        parts.append(f"output ${self.output}/MTok")
        if self.request:
            parts.append(f"${self.request}/request")
        return ", ".join(parts)


def _rate(where: str, key: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PriceFileError(f"{where}: {key} must be a number, got {value!r}")
    try:
        rate = Decimal(str(value))
    except InvalidOperation:
        raise PriceFileError(f"{where}: {key} must be a number, got {value!r}") from None
    if not rate.is_finite() or rate < 0:
        raise PriceFileError(f"{where}: {key} must be a finite number >= 0, got {value!r}")
    return rate


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _check_glob(where: str, pattern: str) -> None:
    depth = 0
    for c in pattern:
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
    if depth:
        raise PriceFileError(f"{where}: bad glob {pattern!r} (unclosed '[')")


@dataclass(frozen=True)
class PriceFile:
    """The operator's prices: exact model names, then globs in file order."""

    path: str
    exact: dict[str, Rates]
    globs: tuple[tuple[str, Rates], ...]

    @classmethod
    def load(cls, path: str | Path) -> PriceFile:
        where = str(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise PriceFileError(f"price file {where}: no such file") from None
        except OSError as e:
            raise PriceFileError(f"price file {where}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise PriceFileError(f"price file {where}: not TOML: {e}") from None
        return cls.parse(doc, where)

    @classmethod
    def parse(cls, doc: Mapping[str, Any], where: str = "<prices>") -> PriceFile:
        unknown = set(doc) - {"models"}
        if unknown:
            raise PriceFileError(
                f'price file {where}: unknown key {sorted(unknown)[0]!r} (expected [models."NAME"])'
            )
        models = doc.get("models", {})
        if not isinstance(models, dict):
            raise PriceFileError(f"price file {where}: models must be a table")
        exact: dict[str, Rates] = {}
        globs: list[tuple[str, Rates]] = []
        for name, entry in models.items():
            at = f"price file {where}: models.{name!r}"
            if not name.strip():
                raise PriceFileError(f"{at}: empty model name")
            if not isinstance(entry, dict):
                raise PriceFileError(f"{at}: must be a table of rates")
            bad = set(entry) - set(ENTRY_KEYS)
            if bad:
                raise PriceFileError(
                    f"{at}: unknown key {sorted(bad)[0]!r} (expected {', '.join(ENTRY_KEYS)})"
                )
            for needed in ("input", "output"):
                if needed not in entry:
                    raise PriceFileError(f"{at}: {needed} is required (dollars per million)")
            values = {k: _rate(at, k, v) for k, v in entry.items()}
            rates = Rates(
                input=values["input"],
                output=values["output"],
                cached_input=values.get("cached_input"),
                cache_write=values.get("cache_write"),
                request=values.get("request", Decimal(0)),
            )
            if _is_glob(name):
                _check_glob(at, name)
                globs.append((name, rates))
            else:
                exact[name] = rates
        return cls(path=where, exact=exact, globs=tuple(globs))

    def match(self, model: str) -> tuple[str, Rates] | None:
        if model in self.exact:
            return model, self.exact[model]
        for pattern, rates in self.globs:
            if fnmatch.fnmatchcase(model, pattern):
                return pattern, rates
        return None


@dataclass(frozen=True, slots=True)
class Price:
    """A priced request: the cost (None when unknown) and where its price came from."""

    cost_nusd: int | None
    source: str  # "file:<path>", "catalogue:<version>" or "none"
    detail: str = ""  # which entry or catalogue model, for ``spendtap prices``


def provider_url(node: str | None) -> str | None:
    """The catalogue's API URL for an upstream that is a provider's own API host."""
    if not node:
        return None
    host = node.rsplit(":", 1)[0] if node.count(":") == 1 else node
    return PROVIDER_HOSTS.get(host.lower())


_warming: threading.Thread | None = None
_warm_lock = threading.Lock()


def _load_catalogue() -> None:
    try:
        from genai_prices import (
            calc_price,  # noqa: F401 - the import is the point
            data_snapshot,
        )

        data_snapshot.get_snapshot()
    except Exception:  # pricing reports its own failures when a row is priced
        pass


def warm_catalogue() -> threading.Thread:
    """Import genai-prices and load its bundled catalogue on a background thread, once.

    Loading it is a few hundred milliseconds of CPU (thousands of model entries). Left to
    the first row priced, it ran on the ledger writer's thread while that row's response
    waited for its commit, and while the event loop needed the GIL (a profile with
    ``py-spy --gil`` showed the import as most of the writer thread's GIL time).
    """
    global _warming
    with _warm_lock:
        if _warming is None:
            _warming = threading.Thread(
                target=_load_catalogue, name="spendtap-prices-warm", daemon=True
            )
            _warming.start()
        return _warming


class Pricer:
    """Prices rows; safe to share between threads (no mutable state of its own)."""

    def __init__(self, price_file: PriceFile | None = None, *, catalogue: bool = True):
        self.price_file = price_file
        self.catalogue = catalogue
        self.catalogue_source = f"catalogue:{catalogue_version()}"
        if catalogue:
            warm_catalogue()

    @classmethod
    def from_path(cls, path: str | None) -> Pricer:
        return cls(PriceFile.load(path) if path else None)

    def lookup(
        self, model: str, *, provider: str | None = None, when: datetime | None = None
    ) -> tuple[str, str]:
        """(source, description) of the price that applies to ``model``; source 'none' if none."""
        if self.price_file is not None:
            hit = self.price_file.match(model)
            if hit is not None:
                pattern, rates = hit
                return f"file:{self.price_file.path}", f"{pattern}: {rates.describe()}"
        if self.catalogue:
            found = _catalogue_model(model, provider, when)
            if found is not None:
                provider_name, model_id, model_price = found
                return self.catalogue_source, f"{provider_name} {model_id}: {model_price}"
        return "none", "no price in the price file or the catalogue"

    def price(
        self,
        model: str | None,
        usage: TokenSplit,
        *,
        node: str | None = None,
        provider: str | None = None,
        when: datetime | None = None,
    ) -> Price | None:
        """The cost of one request, or None when it has no token figures to price."""
        if usage.empty:
            return None
        if not model:
            return Price(None, "none")
        if self.price_file is not None:
            hit = self.price_file.match(model)
            if hit is not None:
                return Price(to_nusd(hit[1].cost(usage)), f"file:{self.price_file.path}", hit[0])
        if self.catalogue:
            cost = _catalogue_cost(model, usage, provider, provider_url(node), when)
            if cost is not None:
                return Price(to_nusd(cost), self.catalogue_source)
        return Price(None, "none")

    def apply(self, row: dict[str, Any]) -> None:
        """Set a ledger row's ``cost_nusd`` and ``price_source`` (both None: nothing to price)."""
        price = self.price_row(row)
        row["cost_nusd"] = None if price is None else price.cost_nusd
        row["price_source"] = None if price is None else price.source

    def price_row(self, row: Mapping[str, Any], *, provider: str | None = None) -> Price | None:
        """The cost of a ledger row (its model, node, token figures and timestamp)."""
        return self.price(
            row.get("model"),
            TokenSplit.from_row(row),
            node=row.get("node"),
            provider=provider,
            when=_parse_ts(row.get("ts")),
        )


def _parse_ts(ts: Any) -> datetime | None:
    if not isinstance(ts, str):
        return None
    try:
        when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _catalogue_usage(usage: TokenSplit):
    from genai_prices import Usage

    prompt = usage.prompt or 0
    cached = min(usage.cached or 0, prompt)
    written = min(usage.cache_write or 0, prompt - cached)
    return Usage(
        input_tokens=prompt,
        cache_read_tokens=cached or None,
        cache_write_tokens=written or None,
        output_tokens=usage.completion or 0,
    )


# Models the catalogue does not list (self-hosted ones, mostly): remembered so that each
# of their rows costs a set look-up, not a catalogue search. Whether a model is listed
# does not depend on the time (only its prices do). Bounded; a new catalogue comes with
# a new process.
_UNLISTED: set[tuple[str, str | None, str | None]] = set()
_MAX_UNLISTED = 10_000


def _catalogue_cost(
    model: str,
    usage: TokenSplit,
    provider: str | None,
    api_url: str | None,
    when: datetime | None,
) -> Decimal | None:
    from genai_prices import calc_price

    key = (model, provider, api_url)
    if key in _UNLISTED:
        return None
    attempts: list[dict[str, Any]] = [{}]
    if provider:
        attempts.insert(0, {"provider_id": provider})
    elif api_url:
        # The host says provider X; if X does not list the model, try by model alone.
        attempts.insert(0, {"provider_api_url": api_url})
    for kwargs in attempts:
        try:
            result = calc_price(
                _catalogue_usage(usage), model, genai_request_timestamp=when, **kwargs
            )
        except LookupError:
            continue
        except ValueError:
            return None  # listed, but this usage cannot be priced: not remembered
        return Decimal(result.total_price)
    if len(_UNLISTED) < _MAX_UNLISTED:
        _UNLISTED.add(key)
    return None


def _catalogue_model(model: str, provider: str | None, when: datetime | None):
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        found_provider, found_model = snapshot.find_provider_model(model, None, provider, None)
    except LookupError:
        return None
    prices = found_model.get_prices(when or datetime.now(tz=UTC))
    return found_provider.id, found_model.id, prices
