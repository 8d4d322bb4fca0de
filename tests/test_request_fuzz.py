"""The request side never raises on arbitrary input: parser, estimates and injection."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from spendtap.metering.estimate import request_text
from spendtap.metering.inject import InjectedUsageFilter, with_include_usage
from spendtap.metering.request import clean_principal, detect_api, parse_request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(
        st.sampled_from(
            ["model", "messages", "content", "stream", "max_tokens", "input", "system", "tools",
             "type", "text", "image_url", "stream_options", "include_usage", "prompt", "x"]
        ),
        children,
        max_size=6,
    ),
    max_leaves=30,
)  # fmt: skip

PATHS = st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
     "/v1/embeddings", "/", "/openai/deployments/x/chat/completions?api-version=1"]
)  # fmt: skip


@settings(max_examples=300)
@given(PATHS, st.binary(max_size=2000))
def test_parse_request_never_raises_on_bytes(path, body):
    """Any bytes as a request body give a RequestInfo, never an exception."""
    info = parse_request(path, {}, body)
    assert info.api == detect_api(path)


@settings(max_examples=300)
@given(PATHS, json_values)
def test_parse_request_never_raises_on_json(path, doc):
    """Any JSON document gives a RequestInfo with sane types, and estimates never raise."""
    info = parse_request(path, {}, json.dumps(doc).encode())
    assert info.max_output_tokens is None or info.max_output_tokens >= 0
    assert info.prompt_estimate is None or info.prompt_estimate >= 0
    if isinstance(doc, dict):
        chars, messages, images = request_text(doc)
        assert min(chars, messages, images) >= 0


@settings(max_examples=300)
@given(json_values)
def test_injection_keeps_valid_json(doc):
    """Whatever the request, an injected body is valid JSON with include_usage on."""
    out = with_include_usage(json.dumps(doc).encode())
    if out is not None:
        assert json.loads(out)["stream_options"]["include_usage"] is True


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_usage_filter_never_raises_and_loses_nothing_without_usage(chunks):
    """The filter takes any bytes; without usage members it returns exactly its input."""
    f = InjectedUsageFilter()
    out = b"".join(f.feed(c) for c in chunks) + f.flush()
    if b"usage" not in b"".join(chunks):
        assert out == b"".join(chunks)


@given(st.text())
def test_principals_are_bounded_and_printable(value):
    """A trusted-header value becomes a bounded label without whitespace or control chars."""
    cleaned = clean_principal(value)
    assert cleaned is None or (len(cleaned) <= 128 and cleaned.isprintable() and " " not in cleaned)
