"""Prices: the catalogue agrees with genai-prices' own results, the operator's file wins,
money is exact, and a bad price file is one line."""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price, extract_usage
from hypothesis import given, settings
from hypothesis import strategies as st

from spendtap.metering.usage import ANTHROPIC_MESSAGES
from spendtap.pricing import (
    PriceFile,
    PriceFileError,
    Pricer,
    TokenSplit,
    catalogue_version,
    provider_url,
    to_nusd,
)
from spendtap.store.ledger import Ledger
from tests.corpus_cases import load_cases, scan

PROVIDER = {ANTHROPIC_MESSAGES: "anthropic"}


def _priceable_cases():
    out = []
    for case in load_cases():
        result = scan(case.api, case.content_type, [case.body])
        usage = result.usage
        if result.response_model is None or usage.prompt_tokens is None:
            continue
        provider = PROVIDER.get(case.api, "openai")
        try:
            calc_price(GenaiUsage(input_tokens=1, output_tokens=1), result.response_model,
                       provider_id=provider)  # fmt: skip
        except LookupError:
            continue
        out.append(pytest.param(case, result, provider, id=case.name))
    return out


CASES = _priceable_cases()


def test_the_corpus_has_cases_the_catalogue_knows():
    names = {p.id for p in CASES}
    # OpenAI with cached input, Anthropic with cache reads, a reasoning model.
    assert {"openai-chat-json-cached", "anthropic-json-cache-read"} <= names, names
    assert any(p.values[1].usage.reasoning_tokens for p in CASES), names


@pytest.mark.parametrize(("case", "result", "provider"), CASES)
def test_catalogue_price_equals_genai_prices_own(case, result, provider):
    """Our split of the scanned usage, priced, equals genai-prices pricing the raw usage
    figures it extracts itself from the same response (or, for streams, the figures the
    corpus records, in genai-prices' own convention)."""
    if not case.streaming and case.api in ("openai-chat", ANTHROPIC_MESSAGES):
        flavor = "default" if provider == "anthropic" else "chat"
        extracted = extract_usage(json.loads(case.body), provider_id=provider, api_flavor=flavor)
        theirs = extracted.usage
    else:
        e = case.meta["expected"]
        cached, written = e["cached_input_tokens"] or 0, e["cache_creation_input_tokens"] or 0
        total_input = e["input_tokens"] + (
            cached + written if case.api == ANTHROPIC_MESSAGES else 0
        )
        theirs = GenaiUsage(
            input_tokens=total_input,
            cache_read_tokens=cached or None,
            cache_write_tokens=written or None,
            output_tokens=e["output_tokens"] or 0,
        )
    expected = to_nusd(calc_price(theirs, result.response_model, provider_id=provider).total_price)
    u = result.usage
    ours = Pricer().price(
        result.response_model,
        TokenSplit(u.prompt_tokens, u.completion_tokens, u.cached_tokens,
                   u.cache_creation_tokens, u.reasoning_tokens),
        provider=provider,
    )  # fmt: skip
    assert ours is not None and ours.source == f"catalogue:{catalogue_version()}"
    assert ours.cost_nusd == expected
    assert expected > 0


def test_hand_computed_catalogue_figures():
    """gpt-4o: $2.50 input, $1.25 cached input, $10 output per million; claude sonnet 4:
    $3 input, $0.30 cache read, $3.75 cache write, $15 output."""
    p = Pricer()
    got = p.price("gpt-4o", TokenSplit(1000, 500, cached=200), node="api.openai.com:443")
    assert got.cost_nusd == (800 * 2_500 + 200 * 1_250 + 500 * 10_000)  # nano-dollars
    got = p.price("claude-sonnet-4-0", TokenSplit(1000, 500, cached=200, cache_write=100),
                  node="api.anthropic.com")  # fmt: skip
    assert got.cost_nusd == 700 * 3_000 + 200 * 300 + 100 * 3_750 + 500 * 15_000


PRICES = """
[models."qwen3-8b"]
input = 0.05
output = 0.25

[models."qwen3-*"]
input = "0.10"
cached_input = 0.01
cache_write = 0.125
output = 0.40
request = 0.0001

[models."gpt-4o"]
input = 1
output = 2
"""


def test_the_price_file_wins_exact_before_glob(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    p = Pricer(PriceFile.load(path))
    source = f"file:{path}"
    # exact entry
    got = p.price("qwen3-8b", TokenSplit(1_000_000, 1_000_000))
    assert (got.cost_nusd, got.source, got.detail) == (300_000_000, source, "qwen3-8b")
    # glob entry, with every rate and the request fee
    got = p.price("qwen3-32b", TokenSplit(1000, 500, cached=200, cache_write=100))
    expected = (700 * Decimal("0.10") + 200 * Decimal("0.01") + 100 * Decimal("0.125")
                + 500 * Decimal("0.40")) / 1_000_000 + Decimal("0.0001")  # fmt: skip
    assert got.cost_nusd == to_nusd(expected) == 384_500
    assert got.detail == "qwen3-*"
    # overrides the catalogue
    assert p.price("gpt-4o", TokenSplit(1_000_000, 0)).cost_nusd == 1_000_000_000
    # not in the file: the catalogue; in neither: no cost, never 0
    assert p.price("gpt-4o-mini", TokenSplit(10, 10)).source.startswith("catalogue:")
    assert p.price("llama-local-9000", TokenSplit(10, 10)) == p.price(
        "llama-local-9000", TokenSplit(10, 10)
    )
    unknown = p.price("llama-local-9000", TokenSplit(10, 10))
    assert unknown.cost_nusd is None and unknown.source == "none"
    # no usage: nothing to price
    assert p.price("qwen3-8b", TokenSplit(None, None)) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = [", "not TOML"),
        ("currency = 'EUR'", "unknown key 'currency'"),
        ('[models."m"]\ninput = 1', "output is required"),
        ('[models."m"]\ninput = -1\noutput = 1', "input must be a finite number >= 0"),
        ('[models."m"]\ninput = "abc"\noutput = 1', "input must be a number"),
        ('[models."m"]\ninput = 1\noutput = 1\nimput = 2', "unknown key 'imput'"),
        ('[models."qwen3-[ab"]\ninput = 1\noutput = 1', "bad glob"),
        ('[models."m"]\ninput = true\noutput = 1', "input must be a number"),
        ('[models."m"]\ninput = nan\noutput = 1', "finite"),
    ],
)
def test_a_bad_price_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PriceFileError) as e:
        PriceFile.load(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(path) in str(e.value)


def test_a_missing_price_file(tmp_path):
    with pytest.raises(PriceFileError, match="no such file"):
        PriceFile.load(tmp_path / "nope.toml")


def test_provider_from_the_upstream_host():
    assert provider_url("api.openai.com:443") == "https://api.openai.com/v1"
    assert provider_url("api.anthropic.com") == "https://api.anthropic.com/v1"
    assert provider_url("10.0.0.5:8000") is None
    assert provider_url(None) is None


def test_price_file_parses_what_tomllib_parses():
    doc = tomllib.loads(PRICES)
    assert set(PriceFile.parse(doc).exact) == {"qwen3-8b", "gpt-4o"}


# -- exactness -------------------------------------------------------------------------

tokens = st.integers(min_value=0, max_value=5_000_000)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(tokens, tokens, st.sampled_from(["a", "b", "c"]),
                  st.sampled_from(["qwen3-8b", "qwen3-32b", "gpt-4o", "unknown-model"])),
        min_size=1, max_size=40,
    )
)  # fmt: skip
def test_report_total_is_the_exact_sum_of_row_costs(tmp_path_factory, rows):
    """Whatever the rows, each group's cost_usd is exactly the Decimal sum of its rows'
    costs, and the grand total of the groups equals the sum of every row."""
    path = tmp_path_factory.mktemp("exact") / "ledger.db"
    pricer = Pricer(PriceFile.parse(tomllib.loads(PRICES)))
    ledger = Ledger(path)
    try:
        stored = []
        for i, (prompt, completion, account, model) in enumerate(rows):
            row = {"id": f"r{i}", "ts": "2026-01-01T00:00:00Z", "account": account,
                   "model": model, "prompt_tokens": prompt,
                   "completion_tokens": completion}  # fmt: skip
            pricer.apply(row)
            stored.append(row)
        ledger.insert_rows(stored)
        report = ledger.report("account")
        by_account: dict[str, Decimal] = {}
        for row in stored:
            if row["cost_nusd"] is not None:
                cost = Decimal(row["cost_nusd"]) / 10**9
                by_account[row["account"]] = by_account.get(row["account"], Decimal(0)) + cost
        for group in report:
            assert group["cost_usd"] == by_account.get(group["account"])
        assert sum(g["cost_usd"] or 0 for g in report) == sum(by_account.values(), Decimal(0))
        unknown = sum(1 for r in stored if r["model"] == "unknown-model")
        assert sum(g["unpriced"] for g in report) == unknown
    finally:
        ledger.close()
